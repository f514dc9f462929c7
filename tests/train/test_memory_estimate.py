"""The memory estimate against measured peaks on CPU (the real model, a real step), and its formulas at full size."""

import json
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from finetune.config import load_config
from finetune.data import build_eval_batches, load_tokenizer
from finetune.data.sources import open_run_data
from finetune.planning.memory_estimate import (
    GIB,
    estimate_memory,
    first_change,
    fit_report,
    fits,
    other_parameters,
    projection_parameters,
)
from finetune.training.distributed import DistInfo
from finetune.training.model_setup import build_training_model
from finetune.training.optim import build_optimizer
from finetune.training.train_step import train_step
from model.args import ARCHITECTURES, load_model_args, num_parameters
from model.tiny import write_tiny_model

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]


class PeakTensorBytes(TorchDispatchMode):
    """What torch.cuda.max_memory_allocated is on a GPU, on CPU: the bytes of every live tensor storage, counted
    once however many views share it, from the tensors already there when counting starts (`add`) and every tensor an
    operation makes while the mode is on (autograd's saved tensors and the optimizer's state included); a storage is
    freed when its last tensor is."""

    def __init__(self):
        super().__init__()
        self.tensors, self.nbytes, self.current, self.peak = {}, {}, 0, 0

    def add(self, tensor: torch.Tensor) -> None:
        if type(tensor).__name__ == "NF4Tensor":
            for inner in tensor.__tensor_flatten__()[0]:
                self.add(getattr(tensor, inner))
            return
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if storage.nbytes() == 0 or tensor.device.type == "meta":
            return
        if key not in self.tensors:
            self.tensors[key], self.nbytes[key] = 0, storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.tensors[key] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key) -> None:
        self.tensors[key] -= 1
        if self.tensors[key] == 0:
            del self.tensors[key]
            self.current -= self.nbytes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self.add(item)
        return out


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("wide") / "model", width=4)


@pytest.fixture(scope="module")
def pretrain_file(tmp_path_factory):
    """Long plain texts made of the demo conversations: every position of a packed sequence is trained, as the
    estimate assumes (its loss term is for the worst case)."""
    conversations = [json.loads(line)["messages"] for line in (REPO / "data/demo/train.jsonl").open()]
    path = tmp_path_factory.mktemp("pretrain") / "train.jsonl"
    with path.open("w") as out:
        for i in range(0, len(conversations), 40):
            text = " ".join(m["content"] for c in conversations[i : i + 40] for m in c)
            out.write(json.dumps({"text": text}) + "\n")
    return path


def measured_peak(cfg) -> int:
    data = open_run_data(cfg.data, load_tokenizer(cfg.model.path), cache_dir=Path(cfg.data.cache_dir))
    batches = build_eval_batches(data, seq_len=cfg.seq_len, batch_size=cfg.batch_size, rank=0, world_size=1)
    batch = max(batches, key=lambda b: int((b.weights > 0).sum()))
    assert int((batch.weights > 0).sum()) == cfg.seq_len * cfg.batch_size  # every position trained
    model = build_training_model(cfg, load_model_args(cfg.model.path), DistInfo(0, 1, 0, CPU))
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim)
    tracker = PeakTensorBytes()
    for param in model.parameters():
        tracker.add(param)
    with tracker:
        for _ in range(2):  # the second step has the optimizer's state and the first step's nothing
            train_step(model, optimizer, [batch], CPU, 1.0, 1).outcome()
    return tracker.peak


@pytest.mark.parametrize(
    "overrides",
    [
        dict(model__quantize="nf4"),  # NF4 projections, checkpointing per block
        dict(model__dtype="bf16"),
        dict(seq_len=256, batch_size=1, model__activation_checkpointing=False),
        dict(seq_len=256, batch_size=1, model__checkpointing_scope="mlp", model__quantize="nf4"),
    ],
)
def test_the_estimate_is_within_15_percent_of_the_measured_peak(write_config, wide_model_dir, pretrain_file, overrides):
    cfg = load_config(
        write_config(
            model__path=str(wide_model_dir), data__train=str(pretrain_file), data__eval=str(pretrain_file), **overrides
        )
    )
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.model.dtype]
    estimate = estimate_memory(load_model_args(wide_model_dir), cfg, 1, dtype.itemsize)
    peak = measured_peak(cfg)
    assert abs(estimate.total - peak) <= 0.15 * peak, (estimate, peak)


def test_the_formulas_at_full_size(write_config):
    args = ARCHITECTURES["mistral-7b"]
    assert projection_parameters(args) + other_parameters(args) == num_parameters(args)
    cfg = load_config(write_config(model__dtype="bf16", seq_len=8192, batch_size=1))
    bf16 = estimate_memory(args, cfg, 1, torch.bfloat16.itemsize)
    assert bf16.weights / 1e9 == pytest.approx(14.5, abs=0.1)  # 7.25B parameters in bf16
    cfg.model.quantize = "nf4"
    nf4 = estimate_memory(args, cfg, 1, torch.bfloat16.itemsize)
    # 6.98B projections at 4.127 bits, 0.27B embeddings and head in bf16
    assert nf4.weights / 1e9 == pytest.approx(6.98 * 4.127 / 8 + 0.27 * 2, abs=0.05)
    assert nf4.activations == bf16.activations and nf4.lora == bf16.lora
    # 8 GPUs shard the weights, and hold one block gathered ahead and the root whole
    eight = estimate_memory(args, cfg, 8, torch.bfloat16.itemsize)
    assert eight.weights < nf4.weights / 2 and eight.lora == nf4.lora / 8


def test_fit_and_the_setting_to_change_first(write_config):
    args = ARCHITECTURES["mistral-7b"]
    cfg = load_config(write_config(model__dtype="bf16", seq_len=8192, batch_size=1))
    estimate = estimate_memory(args, cfg, 1, torch.bfloat16.itemsize)
    assert not fits(estimate, 16 * GIB) and fits(estimate, 80 * GIB)
    assert first_change(cfg, estimate, 16 * GIB).startswith("model.quantize: nf4")
    report = fit_report(cfg, estimate, 16 * GIB, "a 16 GiB GPU")
    assert "does NOT fit a 16 GiB GPU" in report and "change first: model.quantize: nf4" in report
    cfg.model.activation_checkpointing = False
    assert first_change(cfg, estimate_memory(args, cfg, 1, torch.bfloat16.itemsize), 16 * GIB).startswith(
        "model.activation_checkpointing: true"
    )


def test_validate_says_whether_the_config_fits_a_gpu(write_config, capsys):
    from finetune.cli import main

    config = write_config()
    assert main(["validate", str(config), "--gpu-memory", "16"]) == 0
    assert "memory: about 0.1 GiB per GPU (weights " in capsys.readouterr().out
    assert main(["validate", str(config), "--gpu-memory", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit a 0.05 GiB GPU" in out and "change first: " in out
    assert main(["validate", str(config), "--gpu-memory", "0"]) == 2


@pytest.mark.parametrize(
    "name, arch, gib",
    [
        ("mistral-7b-v0.3-qlora-16gb.yaml", "mistral-7b", 15),
        ("nemo-12b-qlora-24gb.yaml", "nemo-12b", 22),
        ("small-24b-qlora-24gb.yaml", "small-24b", 22),
    ],
)
def test_the_small_gpu_configs_are_valid_and_fit_by_the_estimate_they_show(name, arch, gib):
    path = REPO / "configs" / name
    cfg = load_config(path)
    assert cfg.model.quantize == "nf4" and cfg.model.activation_checkpointing and cfg.batch_size == 1
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[cfg.model.dtype]
    estimate = estimate_memory(ARCHITECTURES[arch], cfg, 1, dtype.itemsize)
    assert fits(estimate, gib * GIB)
    assert f"{estimate.summary()} at seq_len {cfg.seq_len}, LoRA rank {cfg.lora.rank}" in path.read_text()
    # the next longer sequence would not fit: the estimate chose seq_len
    cfg.seq_len *= 2
    assert not fits(estimate_memory(ARCHITECTURES[arch], cfg, 1, dtype.itemsize), gib * GIB)
