import json
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

import finetune.after.merge
from finetune.after.merge import merge_adapter
from finetune.checkpoints.adapter import read_adapter
from finetune.checkpoints.streaming import TensorSpec, write_safetensors
from finetune.cli import main
from model.loading import load_model
from model.lora import merged_state_dict

ARCH_LAYOUTS = [("mistral-7b", "native"), ("mixtral-8x7b", "native"), ("mistral-7b", "sharded"), ("mistral-7b", "hf")]


@pytest.mark.parametrize("arch, layout", ARCH_LAYOUTS)
def test_merged_model_equals_the_adapter_forward(arch, layout, adapter_checkpoint, adapted_model, tmp_path):
    base, checkpoint = adapter_checkpoint(arch, layout=layout)
    out = merge_adapter(base, checkpoint, tmp_path / "merged")

    adapted = adapted_model(base, checkpoint)
    merged = load_model(out, dtype=torch.float32)
    # Bit for bit what merging in memory gives (same fp32 arithmetic as LoRALinear.merge)...
    expected = merged_state_dict(adapted)
    for name, tensor in merged.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    # ...so the merged model computes what the base plus adapter computes.
    tokens = torch.randint(0, merged.args.vocab_size, (24,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens, [10, 14]), adapted(tokens, [10, 14]), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(load_model(base, dtype=torch.float32)(tokens, [24]), merged(tokens, [24]), atol=1e-2)

    params = json.loads((out / "params.json").read_text())
    assert "lora" not in params and params["vocab_size"] == merged.args.vocab_size
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.safetensors", "params.json", "tokenizer.model.v3"]


def test_merge_streams_one_tensor_at_a_time(adapter_checkpoint, tmp_path, monkeypatch):
    """Peak memory is about one tensor: at most two base tensors (the one being merged and the one the loop has
    not yet let go of) are ever alive together."""
    base, checkpoint = adapter_checkpoint("mixtral-8x7b")
    alive, peak, seen = set(), [0], [0]
    original = finetune.after.merge.read_weights

    def counted(folder, **options):
        for name, tensor in original(folder, **options):
            alive.add(name)
            weakref.finalize(tensor, alive.discard, name)
            peak[0], seen[0] = max(peak[0], len(alive)), seen[0] + 1
            yield name, tensor
            del tensor

    monkeypatch.setattr(finetune.after.merge, "read_weights", counted)
    merge_adapter(base, checkpoint, tmp_path / "merged")
    assert seen[0] > 40  # 2 layers x (4 attention + router + 4 experts x 3 + 2 norms) + 3
    assert peak[0] <= 2


def test_write_safetensors_reads_back_with_safetensors(tmp_path):
    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f16": torch.randn(7).to(torch.float16),
        "i64": torch.arange(6).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6).t(),
    }
    specs = {name: TensorSpec(t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    write_safetensors(tmp_path / "a.safetensors", specs, reversed(list(tensors.items())))  # any order
    loaded = load_file(tmp_path / "a.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype, name

    with pytest.raises(ValueError, match="no data came for tensor"):
        write_safetensors(tmp_path / "b.safetensors", specs, list(tensors.items())[:2])
    with pytest.raises(ValueError, match="planned as"):
        write_safetensors(tmp_path / "c.safetensors", {"x": TensorSpec(torch.float32, (2,))}, [("x", torch.zeros(3))])


def test_merge_keeps_a_bf16_base_in_bf16(adapter_checkpoint, tmp_path):
    base, checkpoint = adapter_checkpoint("mistral-7b")
    bf16_base = tmp_path / "bf16"
    bf16_base.mkdir()
    save_file(
        {k: v.to(torch.bfloat16) for k, v in load_file(base / "consolidated.safetensors").items()},
        bf16_base / "consolidated.safetensors",
    )
    for name in ("params.json", "tokenizer.model.v3"):
        (bf16_base / name).write_bytes((base / name).read_bytes())
    out = merge_adapter(bf16_base, checkpoint, tmp_path / "merged")
    merged = load_file(out / "consolidated.safetensors")
    adapter, lora = read_adapter(checkpoint)
    base_wq = load_file(bf16_base / "consolidated.safetensors")["layers.0.attention.wq.weight"]
    delta = (
        lora.alpha
        / lora.rank
        * adapter["layers.0.attention.wq.lora_B.weight"]
        @ adapter["layers.0.attention.wq.lora_A.weight"]
    )
    assert merged["layers.0.attention.wq.weight"].dtype == torch.bfloat16
    assert torch.equal(merged["layers.0.attention.wq.weight"], (base_wq.float() + delta).to(torch.bfloat16))


def test_read_adapter_accepts_mistral_finetune_params(adapter_checkpoint, tmp_path):
    _, checkpoint = adapter_checkpoint("mistral-7b")
    folder = tmp_path / "mf"
    folder.mkdir()
    (folder / "lora.safetensors").write_bytes((checkpoint / "lora.safetensors").read_bytes())
    params = json.loads((checkpoint / "params.json").read_text())
    params["lora"] = {"enable": True, "rank": 4, "dropout": 0.0, "scaling": 2.0}  # mistral-finetune's entry
    (folder / "params.json").write_text(json.dumps(params))
    state, lora = read_adapter(folder)
    assert lora.alpha == 8.0 and lora.rank == 4
    assert lora.targets == ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")
    assert state.keys() == read_adapter(checkpoint)[0].keys()


def test_user_errors_name_the_folder_and_the_fault(adapter_checkpoint, tmp_path, capsys):
    base, checkpoint = adapter_checkpoint("mistral-7b")
    with pytest.raises(ValueError, match=f"{tmp_path}: no lora.safetensors"):
        read_adapter(tmp_path)
    with pytest.raises(ValueError, match=f"^{tmp_path / 'gone'}: no such checkpoint folder$"):
        read_adapter(tmp_path / "gone")
    run_dir = checkpoint.parent.parent
    with pytest.raises(
        ValueError, match=f"^{run_dir} is a run folder; give one of its checkpoints, {run_dir}/checkpoints/"
    ):
        read_adapter(run_dir)
    no_lora = tmp_path / "no_lora"
    no_lora.mkdir()
    (no_lora / "lora.safetensors").write_bytes((checkpoint / "lora.safetensors").read_bytes())
    (no_lora / "params.json").write_text((base / "params.json").read_text())
    with pytest.raises(ValueError, match="params.json: no 'lora' entry"):
        read_adapter(no_lora)
    mixtral_base, _ = adapter_checkpoint("mixtral-8x7b")
    with pytest.raises(ValueError, match="trained on another model"):
        merge_adapter(mixtral_base, checkpoint, tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists() and not list(tmp_path.glob(".wrong*"))  # nothing half-written

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    args = ["--base", str(base), "--adapter", str(checkpoint), "--out"]
    assert main(["merge", *args, str(taken)]) == 2
    assert f"error: {taken} already exists and is not empty" in capsys.readouterr().err
    assert main(["merge", *args, str(tmp_path / "ok")]) == 0
