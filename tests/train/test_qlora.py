"""QLoRA: frozen projections in NF4 (torchao), LoRA in fp32. The forward is the dequantized model's; training learns,
on 1 rank or 2 FSDP2 ranks alike, resumes bit for bit; eval and chat on an NF4 base give the run's numbers; merge
goes into the original weights."""

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import REPO, records, subprocess_env
from safetensors.torch import load_file
from test_train_step import run_worker, three_steps

from finetune.after.chat import load_chat_model
from finetune.checkpoints.manifest import MANIFEST, write_manifest
from finetune.config import ConfigError, load_config
from finetune.data import build_eval_batches, load_tokenizer
from finetune.data.sources import open_run_data
from finetune.training.distributed import DistInfo
from finetune.training.eval import evaluate
from finetune.training.loss import CausalLMWithLoss
from finetune.training.model_setup import build_training_model
from model.args import load_model_args
from model.loading import load_model
from model.lora import LoRAArgs, inject_lora, mark_only_lora_trainable, merged_weight
from model.quantize import QUANTIZED_LINEARS, is_nf4, nf4_rows, to_nf4
from model.settings import NF4_BITS_PER_WEIGHT
from model.tiny import write_tiny_model
from model.weights import read_weights

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """The tiny 7B-like model at width 4 (dim 256): every projection holds whole NF4 scale groups on 2 ranks."""
    return write_tiny_model(tmp_path_factory.mktemp("wide") / "model", width=4)


@pytest.fixture
def nf4_config(write_config, wide_model_dir):
    def write(**overrides):
        return write_config(model__path=str(wide_model_dir), model__quantize="nf4", **overrides)

    return write


def test_nf4_forward_is_the_dequantized_models_and_only_projections_are_quantized(wide_model_dir):
    quantized = load_model(wide_model_dir, dtype=torch.float32, quantize="nf4")
    nf4 = {name for name, p in quantized.named_parameters() if is_nf4(p)}
    assert nf4 == {
        f"layers.{i}.{part}.{w}.weight"
        for i in range(2)
        for part, names in (("attention", ("wq", "wk", "wv", "wo")), ("feed_forward", ("w1", "w2", "w3")))
        for w in names
    }
    assert all(n.rpartition(".")[0].rpartition(".")[2] in QUANTIZED_LINEARS for n in nf4)
    # the reference: the same model with each NF4 weight replaced by its dequantized values
    reference = load_model(wide_model_dir, dtype=torch.float32)
    original = {name: p.detach().clone() for name, p in reference.named_parameters()}
    with torch.no_grad():
        for name in nf4:
            reference.get_parameter(name).copy_(quantized.get_parameter(name).get_original_weight())
    tokens = torch.randint(0, 32768, (40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected = quantized(tokens, [25, 15]), reference(tokens, [25, 15])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and NF4's error on these N(0, 1/in) weights: QLoRA's 4-bit NormalFloat keeps about 10% relative error
    for name in nf4:
        error = (reference.get_parameter(name) - original[name]).norm() / original[name].norm()
        assert 0.02 < error < 0.15, (name, error)
    assert NF4_BITS_PER_WEIGHT == pytest.approx(4.127, abs=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lora_gradients_through_an_nf4_base_are_those_on_its_dequantized_weights(wide_model_dir, dtype):
    # whether training on an NF4 base differs from bf16 training by the 4-bit base alone, or also by the code path:
    # torchao's linear_nf4 (its backward to the input, the dtype of its matmul) under LoRA, in both compute dtypes
    quantized = load_model(wide_model_dir, dtype=dtype, quantize="nf4")
    reference = load_model(wide_model_dir, dtype=dtype)
    with torch.no_grad():
        for name, param in quantized.named_parameters():
            if is_nf4(param):
                reference.get_parameter(name).copy_(param.get_original_weight())
    lora = LoRAArgs(rank=4, alpha=8, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    generator = torch.Generator().manual_seed(0)
    for model in (quantized, reference):
        inject_lora(model, lora)
        mark_only_lora_trainable(model)
    adapters = {
        n: torch.randn(p.shape, generator=generator) / 10 for n, p in quantized.named_parameters() if p.requires_grad
    }
    tokens = torch.randint(0, 32768, (40,), generator=generator)
    grads = []
    for model in (quantized, reference):
        model.load_state_dict(adapters, strict=False)
        logits = model(tokens, [25, 15])
        torch.nn.functional.cross_entropy(logits[:-1].float(), tokens[1:]).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert len(grads[0]) == 2 * 7 * 2 and all(g.abs().sum() > 0 for g in grads[0].values())
    for name in adapters:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0, msg=name)


def test_a_ranks_nf4_rows_hold_their_own_bytes_and_dequantize_to_the_whole_weights_rows():
    whole = to_nf4(torch.randn(1024, 512))
    rows = nf4_rows(whole, 4, 1)
    assert torch.equal(rows.get_original_weight(), whole.get_original_weight()[256:512])
    held = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in (rows.quantized_data, rows.quantized_scalers)
    }
    assert sum(held.values()) == (whole.quantized_data.nbytes + whole.quantized_scalers.nbytes) // 4


def test_nf4_trains_and_two_fsdp2_ranks_equal_one(nf4_config, tmp_path):
    config = nf4_config(optim__lr=1e-3)
    one = run_worker(config, tmp_path / "one.pt", ranks=1)
    two = run_worker(config, tmp_path / "two.pt", ranks=2)
    assert one["losses"][2] < one["losses"][0] - 0.05
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-4, atol=1e-4)
    for name, tensor in one["adapters"].items():
        assert tensor.dtype == torch.float32, name
        torch.testing.assert_close(two["adapters"][name], tensor, rtol=1e-3, atol=1e-5, msg=name)


def test_compiled_blocks_on_an_nf4_base_give_the_eager_losses_and_compile_once(nf4_config):
    """model.compile with NF4 weights: inductor (on CPU here) compiles each block around torchao's dequantizing
    matmul; three steps give the eager losses, and batches of other document lengths run without compiling again."""
    eager = three_steps(load_config(nf4_config()), CPU.device, contextlib.nullcontext)[1]
    torch._dynamo.utils.counters.clear()
    try:
        compiled = three_steps(
            load_config(nf4_config(model__compile=True)),
            CPU.device,
            lambda: torch.compiler.set_stance("fail_on_recompile"),
        )[1]
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs > 0  # the blocks did run compiled
    losses = torch.tensor([s.outcome().loss for s in compiled])
    assert losses[2] < losses[0] - 1.0
    torch.testing.assert_close(losses, torch.tensor([s.outcome().loss for s in eager]), rtol=1e-5, atol=1e-5)


def train(config, run_dir) -> None:
    result = subprocess.run(
        [sys.executable, "train.py", str(config), f"run_dir={run_dir}"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-5000:]


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory, wide_model_dir):
    """A 16-step NF4 run (activation checkpointing on, eval at 8 and 16, checkpoints at 8 and 16), and its copy
    resumed from step 8."""
    import yaml

    root = tmp_path_factory.mktemp("nf4-run")
    config = root / "config.yaml"
    cfg = {
        "seq_len": 128,
        "batch_size": 2,
        "max_steps": 16,
        "model": {"path": str(wide_model_dir), "dtype": "fp32", "attention": "sdpa", "quantize": "nf4"},
        "data": {
            "train": str(REPO / "data/demo/train.jsonl"),
            "eval": str(REPO / "data/demo/eval.jsonl"),
            "num_workers": 0,
            "cache_dir": str(root / "cache"),
        },
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.1, "targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]},
        "optim": {"lr": 1e-2, "weight_decay": 0.0, "warmup_steps": 2},
        "eval": {"freq": 8, "max_batches": 2},
        "checkpoint": {"freq": 8, "keep": 2},
    }
    config.write_text(yaml.safe_dump(cfg))
    whole, resumed = root / "whole", root / "resumed"
    train(config, whole)
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint_000016")
    train(config, resumed)
    return config, whole, resumed


def test_a_resumed_nf4_run_is_bitwise_the_uninterrupted_one(nf4_run):
    _, whole, resumed = nf4_run
    train_losses = [r["loss"] for r in records(whole, "train")]
    assert sum(train_losses[-3:]) / 3 < 0.6 * train_losses[0]
    keys = ("kind", "step", "loss", "grad_norm", "eval_loss")

    def numbers(run_dir):
        return [[r.get(k) for k in keys] for r in records(run_dir) if r["kind"] in ("train", "eval")]

    assert len(numbers(whole)) == 16 + 1 + 2 and numbers(resumed) == numbers(whole)
    final = "checkpoints/checkpoint_000016/lora.safetensors"
    one, two = load_file(whole / final), load_file(resumed / final)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_eval_and_chat_on_an_nf4_base_give_the_runs_numbers(nf4_run, capsys):
    config, whole, _ = nf4_run
    checkpoint = whole / "checkpoints" / "checkpoint_000016"
    assert json.loads((checkpoint / "params.json").read_text())["lora"]["base_quantization"] == "nf4"
    cfg = load_config(config, [f"run_dir={whole}"])
    batches = build_eval_batches(
        open_run_data(cfg.data, load_tokenizer(cfg.model.path), cache_dir=Path(cfg.data.cache_dir)),
        seq_len=128,
        batch_size=2,
        rank=0,
        world_size=1,
    )[:2]
    model, _ = load_chat_model(cfg.model.path, checkpoint, quantize="nf4")
    assert is_nf4(model.layers[0].attention.wq.weight)
    eval_loss = evaluate(CausalLMWithLoss(model), batches, torch.device("cpu"))["eval_loss"]
    assert eval_loss == pytest.approx(records(whole, "eval")[-1]["eval_loss"], rel=1e-5)
    # the CLI reads the quantization from the checkpoint
    from finetune.cli import main

    assert main(["chat", str(cfg.model.path), "--adapter", str(checkpoint), "--prompt", "hi", "--max-tokens", "3"]) == 0
    assert "trained on a nf4 base" in capsys.readouterr().err
    assert main(["chat", str(cfg.model.path), "--adapter", str(checkpoint), "--merge", "--prompt", "hi"]) == 2
    assert "tailor merge" in capsys.readouterr().err


def test_merge_of_an_nf4_adapter_goes_into_the_original_weights(nf4_run, tmp_path, capsys):
    config, whole, _ = nf4_run
    base = load_config(config, [f"run_dir={whole}"]).model.path
    checkpoint = whole / "checkpoints" / "checkpoint_000016"
    from finetune.cli import main

    assert main(["merge", "--base", base, "--adapter", str(checkpoint), "--out", str(tmp_path / "merged")]) == 0
    assert "merged into" in capsys.readouterr().out
    merged = load_file(tmp_path / "merged" / "consolidated.safetensors")
    adapter = load_file(checkpoint / "lora.safetensors")
    nf4 = load_model(base, dtype=torch.float32, quantize="nf4")
    for name, weight in read_weights(base):
        module = name.removesuffix(".weight")
        if f"{module}.lora_A.weight" not in adapter:
            assert torch.equal(merged[name], weight), name
            continue
        a, b = adapter[f"{module}.lora_A.weight"], adapter[f"{module}.lora_B.weight"]
        assert torch.equal(merged[name], merged_weight(weight, a, b, 2.0)), name
        dequantized = merged_weight(nf4.get_parameter(name).get_original_weight(), a, b, 2.0)
        assert not torch.allclose(merged[name], dequantized, atol=1e-3), name
    # the PEFT export is the file a bf16-trained adapter with the same weights gives
    bf16 = tmp_path / "bf16-checkpoint"
    shutil.copytree(checkpoint, bf16)
    params = json.loads((bf16 / "params.json").read_text())
    del params["lora"]["base_quantization"]
    (bf16 / "params.json").write_text(json.dumps(params))
    (bf16 / MANIFEST).unlink()
    write_manifest(bf16)  # as a bf16 run writes it
    for source, out in ((checkpoint, "peft-nf4"), (bf16, "peft-bf16")):
        assert main(["export-peft", "--adapter", str(source), "--out", str(tmp_path / out)]) == 0
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "peft-nf4" / name).read_bytes() == (tmp_path / "peft-bf16" / name).read_bytes(), name


def test_nf4_settings_are_checked_before_training(write_config, tiny_model_dir, nf4_config):
    with pytest.raises(ConfigError, match="save_adapters: false with model.quantize: nf4"):
        load_config(nf4_config(checkpoint__save_adapters=False))
    # the 64-wide tiny model's weights are smaller than one NF4 scale group: named, before any weight is read
    cfg = load_config(write_config(model__quantize="nf4"))
    with pytest.raises(ConfigError, match=r"model.quantize: nf4 cannot store layers.0.attention.wq.weight \[64, 64\]"):
        build_training_model(cfg, load_model_args(cfg.model.path), CPU)


def test_without_torchao_nf4_is_a_config_error_naming_the_key_and_the_extra(nf4_config, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a)
    )
    with pytest.raises(ConfigError, match=r'model.quantize is nf4, which needs torchao: pip install -e "\.\[qlora\]"'):
        load_config(nf4_config())
