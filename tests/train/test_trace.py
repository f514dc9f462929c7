"""A shipped config's real training step traced at full size on tensors that hold no memory (training/trace.py).

To keep CI's cost small, each model is traced with 1 and 2 of its layers and extrapolated per layer
(`trace_by_layers`): every block is the same, so the weights, the LoRA state, the FLOPs and the host syncs of L layers
are exactly those of one plus L - 1 times the second's difference; and at seq_len 4096 (the FLOPs per token of the
blocks do not depend on it)."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import records, subprocess_env, torchrun

from finetune.config import load_config
from finetune.planning.memory_estimate import (
    VALUE_BYTES,
    estimate_memory,
    lora_parameters,
    other_parameters,
    projection_parameters,
)
from finetune.training.trace import this_gpu, trace_before_start, trace_by_layers
from model.args import ARCHITECTURES, active_parameters, load_model_args
from model.attention import available_backends, resolve_backend
from model.tiny import tiny_args

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 4096


def shipped(name: str):
    return load_config(REPO / "configs" / name, [f"seq_len={SEQ_LEN}"])


# every shipped config but the demos (demo*.yaml, a tiny CPU model), its architecture, and the ranks its largest
# setup runs on
SHIPPED = {
    "mistral-7b-v0.3.yaml": ("mistral-7b", 8),
    "mistral-7b-v0.3-qlora-16gb.yaml": ("mistral-7b", 8),
    "nemo-12b.yaml": ("nemo-12b", 8),
    "nemo-12b-qlora-24gb.yaml": ("nemo-12b", 8),
    "small-24b.yaml": ("small-24b", 8),
    "small-24b-qlora-24gb.yaml": ("small-24b", 8),
    "mixtral-8x7b.yaml": ("mixtral-8x7b", 8),
    "mixtral-8x22b.yaml": ("mixtral-8x22b", 16),
}
REAL_BYTES_BOUND = 2**30  # what the trace of a config of up to 282 GiB of weights may really allocate


def _status_kib(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def test_the_shipped_configs_are_all_traced():
    assert sorted(SHIPPED) == sorted(p.name for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("demo"))


@pytest.mark.parametrize("ranks", ["1", "N"])
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_config_traces_as_on_an_h100_within_10_percent_of_the_estimate(name, ranks):
    """Issue #25: each shipped config at its own seq_len, as on an H100 (its configured dtype, `auto`'s backend),
    on one rank and on the ranks of its largest setup (8, 16 for Mixtral 8x22B): no error, the frozen weights and
    the LoRA state those of the estimate (1/N of one rank's with N ranks), the traced peak within 10% of
    memory_estimate.py's per-rank total, and the process's resident memory (its high-water mark, reset before the
    trace; Linux's /proc) grown by under 1 GiB. No case is cut: the 16 cases took 1.5 to 12 s each on the 2-core
    build machine with other work running (114 s in all, 78 s of CPU), so every one runs at its full seq_len."""
    if name.endswith("qlora-16gb.yaml") or name.endswith("qlora-24gb.yaml"):
        pytest.importorskip("torchao", reason="NF4 is the qlora extra")
    arch, most = SHIPPED[name]
    world_size = 1 if ranks == "1" else most
    cfg, args = load_config(REPO / "configs" / name), ARCHITECTURES[arch]
    value_bytes = VALUE_BYTES[cfg.model.dtype]
    linux = Path("/proc/self/clear_refs").exists()
    if linux:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the resident memory now
        before = _status_kib("VmRSS")
    trace = trace_by_layers(cfg, args, "h100", world_size=world_size)
    if linux:
        assert (_status_kib("VmHWM") - before) * 1024 < REAL_BYTES_BOUND
    assert trace.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.model.dtype]
    assert trace.backend == "varlen"  # what `auto` takes on an H100
    one_rank, estimate = estimate_memory(args, cfg, 1, value_bytes), estimate_memory(args, cfg, world_size, value_bytes)
    # NF4: the estimate's 4.127 bits a weight rounds the int8 scales' own fp16 factors (0.02% off). Mixtral 8x22B's
    # routers have 8 rows: over 16 ranks FSDP2 gives rank 0 a whole row, not half of one (336 KiB, 0.002% above 1/16)
    exact = 1e-9 if cfg.model.quantize == "none" and world_size <= 8 else 0.001
    assert trace.frozen == pytest.approx(one_rank.weights / world_size, rel=exact)
    assert trace.lora_state == estimate.lora == pytest.approx(one_rank.lora / world_size, rel=1e-9)
    assert trace.peak == pytest.approx(estimate.total, rel=0.10)


def test_mistral_7b_traced_as_on_an_h100_holds_the_estimated_weights_and_waits_for_nothing():
    cfg, args = shipped("mistral-7b-v0.3.yaml"), ARCHITECTURES["mistral-7b"]
    trace = trace_by_layers(cfg, args, "h100")
    estimate = estimate_memory(args, cfg, 1, 2)
    assert (trace.dtype, trace.backend) == (torch.bfloat16, "varlen")  # what `auto` takes on an H100
    assert trace.frozen == estimate.weights == 14_496_047_104  # 7.25B parameters in bf16, exactly
    assert trace.lora_state == estimate.lora
    assert trace.host_syncs == []  # a dense step never waits for the device
    assert "_scaled_dot_product_flash_attention_for_cpu_backward" in trace.attention_kernels
    # FLOPs per token: the benchmarks' model FLOPs, 4 N, plus checkpointing's second forward of the blocks and LoRA's
    # 8 FLOPs a parameter (forward, recomputation, input and weight gradients); the CPU attention kernel the trace
    # runs is not counted by torch.utils.flop_counter, so neither is attention
    n, head = active_parameters(args), args.vocab_size * args.dim
    formula = 4 * n + 2 * (n - head) + 8 * lora_parameters(args, cfg)
    assert trace.flops_per_token == pytest.approx(formula, rel=0.02)
    assert trace.flops_per_token > 4 * n * 1.45  # recomputation counted: hardware FLOPs, not model FLOPs
    # the live bytes of the step at their highest (in the last block's recomputation), AdamW's moments included
    assert trace.peak == pytest.approx(estimate.total, rel=0.10)
    assert trace.peak > trace.frozen + trace.lora_state + args.n_layers * SEQ_LEN * args.dim * 2  # inputs kept


def test_the_traced_peak_grows_with_the_kept_block_inputs_as_the_estimate_does():
    """At 32768 tokens the activations are half the peak: the checkpointed blocks' inputs and one block's
    recomputation, as the estimate counts them."""
    cfg, args = load_config(REPO / "configs" / "mistral-7b-v0.3.yaml", ["seq_len=32768"]), ARCHITECTURES["mistral-7b"]
    trace = trace_by_layers(cfg, args, "h100")
    estimate = estimate_memory(args, cfg, 1, 2)
    assert estimate.activations > 0.45 * estimate.total
    assert trace.peak == pytest.approx(estimate.total, rel=0.10)
    assert "peak 31.29 GiB" in trace.summary()


def test_a_step_peaking_outside_backward_is_split_without_counting_anything_twice():
    """A tiny model with a 256-token vocabulary and rank-64 LoRA, 16 tokens: the update is as high as backward, and
    on 2 ranks the step peaks in forward, with the weights gathered whole. AdamW's moments, made by this first step's
    update, are counted once: the update holds the weights, the LoRA weights, their gradients and the moments."""
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        ["seq_len=16", "lora.rank=64", "lora.alpha=128", "lora.targets=[wq,wk,wv,wo,w1,w2,w3]"],
    )
    args = dataclasses.replace(tiny_args("mistral-7b", 256), n_layers=3)
    one = trace_by_layers(cfg, args, "h100")
    assert one.phases["optimizer"][0] == pytest.approx(one.frozen + one.lora_state, abs=64)  # and AdamW's step count
    assert one.peak == max(peak for peak, _ in one.phases.values())
    two = trace_by_layers(cfg, args, "h100", world_size=2)
    assert two.peak_in == "forward" and two.gathered > 0
    assert two.peak == two.held + two.gathered + two.transient  # in forward the activations are still being made
    assert two.transient > 0 and f"in forward; saved activations {two.saved / 2**30:.2f}" in two.summary()


def test_the_traced_peak_is_split_by_what_holds_it_and_each_part_is_the_estimates():
    """The peak is what the step held as it began (the weights, the LoRA weights, AdamW's moments), the checkpointed
    blocks' inputs the forward keeps, and the largest transient: at 32768 tokens the last block's recomputation,
    each part beside the estimate's formula for it."""
    tokens = 32768
    cfg, args = (
        load_config(REPO / "configs" / "mistral-7b-v0.3.yaml", [f"seq_len={tokens}"]),
        ARCHITECTURES["mistral-7b"],
    )
    trace = trace_by_layers(cfg, args, "h100")
    estimate = estimate_memory(args, cfg, 1, 2)
    assert trace.peak == trace.held + trace.gathered + trace.saved + trace.transient
    assert trace.held == trace.frozen + trace.lora_state * 12 // 16  # no gradients yet: 4 + 8 bytes a LoRA parameter
    assert (trace.gathered, trace.peak_in) == (0, "backward")
    kept_inputs = args.n_layers * tokens * args.dim * 2  # the estimate's L N d b
    assert trace.saved == pytest.approx(kept_inputs, rel=0.05)
    assert trace.transient == pytest.approx(
        estimate.activations - kept_inputs, rel=0.10
    )  # one block's N (a_attn + a_mlp)
    # the loss's own high-water mark: the estimate's chunk, beside the final norm's output, the trained rows gathered
    # from it and their gradient (3 N d b, which the estimate leaves out: the loss never peaks the step)
    row = tokens * args.dim * 2
    assert estimate.loss + 3 * row <= trace.loss <= estimate.loss + 4 * row
    assert trace.loss < trace.transient
    assert "(= weights, LoRA and AdamW 15.38 + saved activations 8.25 + largest transient 7.66, in backward" in (
        trace.summary()
    )


def test_mistral_7b_traced_as_rank_0_of_8_holds_an_eighth_of_the_weights_and_the_estimated_peak():
    """--gpus 8: the model sharded by FSDP2 as a run shards it, over a fake process group of 8 ranks in one process."""
    cfg, args = shipped("mistral-7b-v0.3.yaml"), ARCHITECTURES["mistral-7b"]
    trace, one_rank = (trace_by_layers(cfg, args, "h100", world_size=n) for n in (8, 1))
    assert trace.frozen * 8 == one_rank.frozen
    assert trace.lora_state * 8 == one_rank.lora_state
    assert trace.flops_per_token == one_rank.flops_per_token  # each rank computes its own tokens whole
    # the peak holds, beside the shards, the root's weights and the blocks FSDP2 has gathered whole
    assert trace.peak == pytest.approx(estimate_memory(args, cfg, 8, 2).total, rel=0.10)
    assert trace.peak > trace.frozen + trace.lora_state + args.vocab_size * args.dim * 2 * 2
    assert "as on h100, rank 0 of 8 under FSDP2, per rank: bfloat16" in trace.summary()
    # the same activations as one rank's, beside the weights FSDP2 holds whole at the peak: the root's embeddings and
    # head, the block being recomputed and the flat all-gather buffer of the next (freed once that one is copied out)
    assert trace.saved == one_rank.saved and one_rank.gathered == 0
    block = projection_parameters(args) // args.n_layers + 2 * args.dim  # its projections and two norms
    assert trace.gathered == pytest.approx(2 * args.vocab_size * args.dim * 2 + 2 * block * 2, rel=0.02)  # + LoRA
    assert "+ weights gathered whole 1.33 + saved activations 1.03" in trace.summary()
    assert not torch.distributed.is_initialized()  # the fake process group is gone with the trace


def test_mixtral_traced_shows_its_per_layer_host_syncs():
    cfg, args = shipped("mixtral-8x7b.yaml"), ARCHITECTURES["mixtral-8x7b"]
    trace = trace_by_layers(cfg, args, "h100")
    # every MoE layer reads its per-expert token counts on the host, in forward and again in the recomputation
    assert trace.host_syncs.count("bincount") == trace.host_syncs.count("tolist") == 2 * args.n_layers
    assert len(trace.host_syncs) == 4 * args.n_layers
    assert trace.frozen == estimate_memory(args, cfg, 1, 2).weights
    # FLOPs: a token passes num_experts_per_tok experts, and so only their adapters (with every expert's adapters the
    # formula was 5-7% above the trace)
    chosen = dataclasses.replace(args, moe=dataclasses.replace(args.moe, num_experts=args.moe.num_experts_per_tok))
    n, head = active_parameters(args), args.vocab_size * args.dim
    formula = 4 * n + 2 * (n - head) + 8 * lora_parameters(chosen, cfg)
    assert trace.flops_per_token == pytest.approx(formula, rel=0.02)
    assert "host syncs in the step: 128 (bincount x64, tolist x64)" in trace.summary()


def test_the_16gb_nf4_config_traced_as_on_a_t4():
    pytest.importorskip("torchao", reason="NF4 is the qlora extra")
    cfg, args = shipped("mistral-7b-v0.3-qlora-16gb.yaml"), ARCHITECTURES["mistral-7b"]
    trace = trace_by_layers(cfg, args, "t4")
    # fp16 as configured; below compute capability 8.0 `auto` takes SDPA, not the compiled FlexAttention
    assert (trace.dtype, trace.backend) == (torch.float16, "sdpa")
    estimate = estimate_memory(args, cfg, 1, 2)
    assert trace.frozen == pytest.approx(estimate.weights, rel=0.005)  # NF4 codes, scales and their scales
    # a projection weight: its 4-bit code, an int8 scale per 64 weights, an fp16 factor per 64 * 256 (torchao keeps
    # the factor in the weight's dtype); embeddings, norms and head in fp16: 0.571 bytes a parameter in all
    projections = projection_parameters(args)
    per_weight = (trace.frozen - 2 * other_parameters(args)) / projections
    assert per_weight == pytest.approx(0.5 + 1 / 64 + 2 / (64 * 256), rel=1e-5)
    assert trace.frozen / (projections + other_parameters(args)) == pytest.approx(0.571, abs=0.001)
    assert trace.lora_state == estimate.lora
    assert trace.host_syncs == []
    assert trace.peak == pytest.approx(estimate.total, rel=0.10)
    assert "peak 8.30 GiB" in trace.summary()
    # the dequantized copies are counted while alive: above its weights, the step holds more than the same step
    # with fp16 weights by at least torchao's int64 codes of the largest weight (8 bytes a weight)
    fp16 = trace_by_layers(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantize="none")), args, "t4")
    nf4_held, fp16_held = (t.peak - t.frozen - t.lora_state for t in (trace, fp16))
    assert nf4_held - fp16_held > 8 * args.hidden_dim * args.dim


def test_auto_takes_what_runs_below_compute_capability_8(monkeypatch):
    """T4 and V100: Triton's compiled flex kernels run out of shared memory there, and flash varlen needs 8.0."""
    assert resolve_backend("auto", "cuda", torch.float16, capability=(7, 5)) == "sdpa"
    assert resolve_backend("flex", "cuda", torch.float16, capability=(7, 5)) == "flex"  # named, it is tried
    assert resolve_backend("auto", "cuda", torch.bfloat16, capability=(9, 0)) == "varlen"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert available_backends("cuda", torch.float16)[0] == "sdpa"


def test_validate_traces_the_step(write_config, capsys):
    from finetune.cli import main

    config = write_config()
    assert main(["validate", str(config), "--trace"]) == 0
    out = capsys.readouterr().out
    assert "trace (as on h100: float32, attention sdpa): frozen weights " in out  # the test config: fp32, sdpa
    assert "host syncs in the step: 0" in out
    assert main(["validate", str(config), "--trace", "--gpus", "2"]) == 0
    assert "trace (as on h100, rank 0 of 2 under FSDP2, per rank: float32, attention sdpa)" in capsys.readouterr().out
    assert main(["validate", str(config), "--trace", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "error: --trace traces a GPU's step: --device one of h100, h200, a100, t4, not cpu" in err


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_run_prints_its_trace_before_step_1(write_config, tmp_path, ranks):
    """`model.trace: always`: the run's rank 0 prints the line `tailor validate --trace` prints, before step 1 (on a GPU
    `auto` does, as on that GPU); with 2 ranks the trace's fake process group is gone before the run's own opens."""
    config = write_config(max_steps=2, eval__enabled=False, checkpoint__freq=2, model__trace="always")
    command = [sys.executable, "train.py", str(config)] if ranks == 1 else torchrun(config)
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = load_config(config)
    gpu = this_gpu() if torch.cuda.is_available() else "h100"  # on a GPU machine, the run traces as its GPU
    expected = trace_by_layers(cfg, load_model_args(cfg.model.path), gpu, ranks).summary()
    lines = result.stdout.splitlines()
    assert lines.count(expected) == 1  # rank 0's only
    assert lines.index(expected) < next(i for i, line in enumerate(lines) if line.startswith("step 1/2"))
    assert [r["step"] for r in records(tmp_path / "run", "train")] == [1, 2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a run on the CPU: here `auto` traces, as on this GPU")
def test_a_run_on_the_cpu_traces_only_when_asked(write_config):
    cfg = load_config(write_config())
    assert cfg.model.trace == "auto" and trace_before_start(cfg, load_model_args(cfg.model.path), 1) is None
    never = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, trace="never"))
    assert trace_before_start(never, load_model_args(cfg.model.path), 1) is None
