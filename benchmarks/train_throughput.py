"""Training throughput of tailor, and of Hugging Face transformers + PEFT on the same model and tokens.

    python benchmarks/train_throughput.py --arch mistral-7b --seq-len 8192 --steps 10
    python benchmarks/train_throughput.py --arch tiny --steps 3            # a smoke test on CPU
    python benchmarks/train_throughput.py --cpu-compare                     # tailor vs HF + PEFT on this CPU

A random-init model of the architecture (bf16 on a GPU), LoRA (rank 16 unless --rank) on every linear layer,
activation checkpointing, packed documents of random lengths, NF4 frozen weights with --quantize nf4. Prints tokens/s
per GPU, MFU and peak memory beside the memory estimate of the same setup (finetune/planning/memory_estimate.py),
and with transformers and peft importable the same for MistralForCausalLM / MixtralForCausalLM + PEFT (same rank
and targets, SDPA attention, gradient checkpointing, the same tokens), with the ratios side by side. `--hf` names
the baseline's settings:
- `default`: as its users run it: PEFT keeps the adapters in fp32 and casts each adapted layer's input to fp32
  (`autocast_adapter_dtype`), the packed row is one sequence (documents attend to each other), full logits.
- `equal`: made like tailor where HF allows it: adapters in the compute dtype (`autocast_adapter_dtype=False`),
  positions restarting in every document (`position_ids`), from which transformers builds a block-diagonal mask:
  no attention across documents. Its loss still builds the whole fp32 logits (HF's forward has no chunked loss).

MFU = tokens/s x FLOPs per token / peak, counted two ways:
- model FLOPs = 4 N + attention: the frozen weights get no weight gradient, so forward (2 N) and the input gradients
  of backward (2 N), with N the weights a token is multiplied by (model.args.active_parameters: attention, its
  experts and the router for MoE, the output head; not the embedding, a lookup); attention adds 12 x layers x heads
  x head_dim x mean context (QK^T and AV: 4 forward, 8 backward), the context within a document. The same work
  for every side, and the customary MFU.
- hardware FLOPs: what each side's GPU computes: the blocks' forward again in backward (activation checkpointing:
  2 (N - head) + 4 x layers x heads x head_dim x mean context more), and for HF as its users run it, attention over
  the whole row rather than each document.
The peak is measured here with a large bf16 matmul. `--profile` prints the profiler's table of one step.

`--cpu-compare` measures the two side by side on a CPU, where a shared machine's load drifts: a small Mistral (dim
512, 4 layers, GQA 8/2 heads, SwiGLU 1792) at vocabularies 32768 and 131072, fp32 at 1024 tokens a step and bf16 at
2048, with every target trained and with instruct-shaped batches (chats of alternating prompt and answer spans,
about half the targets trained; HF gets the prompt labels as -100). For each case it builds both models once, then
alternates timed runs (tailor, HF, tailor, HF, ...), so both see the same load, and prints the median tokens/s of
each with the spread (min-max) and the ratio of the medians; then the peak of the bytes held at once by tensors
made during one step of each (activations, logits, gradients: benchmarks/live_bytes.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import statistics
import time
from pathlib import Path

import torch
import yaml
from live_bytes import PeakLiveBytes  # benchmarks/, beside this script

from finetune.config import ModelConfig, OptimConfig, TrainConfig
from finetune.planning.memory_estimate import estimate_memory
from finetune.training.loss import DEFAULT_CHUNK_SIZE, CausalLMWithLoss, chunked_cross_entropy
from finetune.training.optim import build_optimizer
from finetune.training.parallel import enable_activation_checkpointing
from finetune.training.precision import DTYPES
from finetune.training.trace import this_gpu, trace_by_layers
from finetune.training.train_step import train_step
from model.args import ARCHITECTURES, ModelArgs, active_parameters
from model.loading import build_meta_model
from model.lora import LoRAArgs
from model.quantize import quantize_frozen_linears
from model.tiny import tiny_args
from model.transformer import document_positions

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIGS = {
    "mistral-7b-v0.3.yaml": "mistral-7b",
    "nemo-12b.yaml": "nemo-12b",
    "small-24b.yaml": "small-24b",
    "mixtral-8x7b.yaml": "mixtral-8x7b",
    "mixtral-8x22b.yaml": "mixtral-8x22b",
}
CPU_LOSS_MEMORY_SCALE = 8  # 32768 tokens x 131072 fp32 logits are 17 GB, three times over on the naive path
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HF_SETTINGS = ("default", "equal")


def model_args(arch: str, layers: int | None, nf4: bool = False) -> ModelArgs:
    # at width 4 every tiny projection holds whole NF4 scale groups
    args = tiny_args("mistral-7b", 32768, width=4 if nf4 else 1) if arch == "tiny" else ARCHITECTURES[arch]
    return dataclasses.replace(args, n_layers=layers) if layers else args


def random_documents(seq_len: int, generator: torch.Generator) -> list[int]:
    """Document lengths of a packed sequence: log-uniform between 64 and seq_len, the last one cut to fit."""
    lengths, left = [], seq_len
    while left > 0:
        length = int(math.exp(torch.empty(1).uniform_(math.log(64), math.log(seq_len), generator=generator)))
        lengths.append(min(length, left))
        left -= lengths[-1]
    return lengths


def chat_weights(seqlens: list[int], generator: torch.Generator) -> torch.Tensor:
    """Loss weights shaped like chat data: each document alternates a prompt span (weight 0) and an answer span
    (weight 1), each of 8 to 128 tokens, so about half the targets are trained."""
    weights = []
    for length in seqlens:
        trained = False
        while length > 0:
            span = min(int(torch.randint(8, 129, (), generator=generator)), length)
            weights += [float(trained)] * span
            length, trained = length - span, not trained
    return torch.tensor(weights)


def make_batches(args: ModelArgs, seq_len: int, count: int, instruct: bool = False) -> list:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, args.vocab_size, (seq_len + 1,), generator=generator)
        batch = type("Batch", (), {})()
        batch.tokens, batch.targets, batch.seqlens = tokens[:-1], tokens[1:], random_documents(seq_len, generator)
        batch.weights = chat_weights(batch.seqlens, generator) if instruct else torch.ones(seq_len)
        batches.append(batch)
    return batches


def mean_context(seqlens_list: list[list[int]]) -> float:
    """The keys a query attends to, on average: (n + 1) / 2 over a causal document of n tokens."""
    return sum(n * (n + 1) / 2 for s in seqlens_list for n in s) / sum(sum(s) for s in seqlens_list)


def flops_per_token(args: ModelArgs, seqlens_list: list[list[int]]) -> float:
    """Model FLOPs per token: 4 N + attention within each document (the module docstring)."""
    attention = 12 * args.n_layers * args.n_heads * args.head_dim * mean_context(seqlens_list)
    return 4 * active_parameters(args) + attention


def hardware_flops_per_token(args: ModelArgs, seqlens_list: list[list[int]], across_documents: bool) -> float:
    """What a side with checkpointed blocks computes per token: the blocks' forward twice (the head's once), and
    attention over the whole row when `across_documents`."""
    context = mean_context([[sum(s)] for s in seqlens_list] if across_documents else seqlens_list)
    blocks = active_parameters(args) - args.vocab_size * args.dim
    return 4 * active_parameters(args) + 2 * blocks + 16 * args.n_layers * args.n_heads * args.head_dim * context


def measured_peak_flops(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, runs = time.perf_counter(), 20
    for _ in range(runs):
        a @ b
    torch.cuda.synchronize()
    return runs * 2 * 8192**3 / (time.perf_counter() - start)


def build_tailor(
    args: ModelArgs,
    device: torch.device,
    dtype: torch.dtype,
    attention: str,
    compile_blocks: bool,
    rank: int = 16,
    nf4: bool = False,
) -> torch.nn.Module:
    model = build_meta_model(args, dtype, attention, LoRAArgs(rank=rank, alpha=2 * rank, targets=TARGETS))
    model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.zero_()
            elif "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0, 0.02)
    if nf4:
        quantize_frozen_linears(model)
    for block in model.layers:
        enable_activation_checkpointing(block)
        if compile_blocks:
            block.compile()
    return CausalLMWithLoss(model)


def tailor_step(loss_model, optimizer, batch, device) -> None:
    """train.py's own step: token-weighted loss, clipping, fused AdamW, nothing read back from the device."""
    train_step(loss_model, optimizer, [batch], device, max_grad_norm=1.0, world_size=1)


def build_hf(args: ModelArgs, device: torch.device, dtype: torch.dtype, equal: bool = False, rank: int = 16):
    """MistralForCausalLM or MixtralForCausalLM + PEFT, as its users run it, or `equal`: adapters in `dtype`."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from model.args import args_to_hf_config

    config_dict = args_to_hf_config(args)
    config_class = transformers.MixtralConfig if args.moe else transformers.MistralConfig
    config = config_class(**{k: v for k, v in config_dict.items() if k not in ("architectures", "model_type")})
    config._attn_implementation = "sdpa"
    model_class = transformers.MixtralForCausalLM if args.moe else transformers.MistralForCausalLM
    with torch.device(device):
        model = model_class(config).to(dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=HF_TARGETS, lora_dropout=0.0)
    return get_peft_model(model, lora, autocast_adapter_dtype=not equal)


def hf_step(model, optimizer, batch, device) -> None:
    """The same tokens as one sequence, as HF's users pack them: without position_ids, documents attend to each
    other (more attention FLOPs than tailor)."""
    hf_step_packed(model, optimizer, batch, device, by_document=False)


def hf_step_by_document(model, optimizer, batch, device) -> None:
    """The same tokens with positions restarting in every document: transformers finds the documents from the
    position_ids and masks attention between them, as tailor does."""
    hf_step_packed(model, optimizer, batch, device, by_document=True)


def hf_step_packed(model, optimizer, batch, device, by_document: bool) -> None:
    tokens = batch.tokens[None].to(device)
    labels = tokens.clone()  # transformers shifts the labels itself: label i + 1 is the target of position i
    labels[0, 1:][batch.weights[:-1] == 0] = -100
    positions = document_positions(batch.seqlens, device)[None] if by_document else None
    out = model(input_ids=tokens, labels=labels, position_ids=positions)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(name: str, model, step, batches, device, warmup: int) -> dict:
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], OptimConfig(lr=1e-5))
    for batch in batches[:warmup]:
        step(model, optimizer, batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step(model, optimizer, batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(b.tokens.numel() for b in batches[warmup:])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return dict(name=name, tokens_per_s=tokens / seconds, peak_gib=peak)


def loss_memory(device: torch.device, tokens: int, vocab: int, dim: int, chunk_size: int) -> None:
    """Peak memory of forward + backward of the loss alone: naive full logits vs tailor's chunked loss. On a GPU
    the allocator's peak; on a CPU the peak of live tensor bytes (benchmarks/live_bytes.py)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, dim, device=device, dtype=dtype) * dim**-0.5
    targets = torch.randint(0, vocab, (tokens,), device=device)
    weights = torch.ones(tokens, device=device)

    def naive():
        logits = (hidden @ weight.T).float()
        return (torch.nn.functional.cross_entropy(logits, targets, reduction="none") * weights).sum()

    def chunked():
        return chunked_cross_entropy(hidden, weight, targets, weights, chunk_size).loss_sum

    peaks = {}
    for name, loss in (("chunked", chunked), ("naive", naive)):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            try:
                loss().backward()
            except torch.OutOfMemoryError:  # then the naive peak is at least what was free
                free = torch.cuda.mem_get_info(device)[0]
                print(f"loss memory: the {name} path ran out of memory with {free / 2**30:.1f} GiB free")
                torch.cuda.empty_cache()
                peaks[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
                continue
            torch.cuda.synchronize()
            peaks[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        else:
            with PeakLiveBytes() as probe:
                loss().backward()
            peaks[name] = probe.peak / 2**30
        hidden.grad = None
    print(
        f"loss memory, {tokens} tokens x {vocab} vocab, {dtype}, chunks of {chunk_size}: naive "
        f"{peaks['naive']:.3f} GiB, chunked {peaks['chunked']:.3f} GiB ({peaks['chunked'] / peaks['naive']:.3f} of "
        "naive; goal <= 0.125)"
    )


CPU_COMPARE_SHAPE = dict(dim=512, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=1792)
CPU_COMPARE_RUNS = ((torch.float32, 1024), (torch.bfloat16, 2048))  # dtype, tokens a step


def timed_run(model, step, optimizer, batches, device) -> float:
    """tokens/s of one run: a step on each batch."""
    start = time.perf_counter()
    for batch in batches:
        step(model, optimizer, batch, device)
    return sum(b.tokens.numel() for b in batches) / (time.perf_counter() - start)


def step_peak_bytes(model, step, optimizer, batch, device) -> int:
    with PeakLiveBytes() as probe:
        step(model, optimizer, batch, device)
    return probe.peak


def cpu_compare(vocabs: list[int], layers: int | None, runs: int, steps: int, warmup: int) -> None:
    """tailor and transformers + PEFT in alternating runs on this CPU (see the module's docstring)."""
    device = torch.device("cpu")
    shape = dict(CPU_COMPARE_SHAPE, n_layers=layers or CPU_COMPARE_SHAPE["n_layers"])
    print(
        f"cpu-compare: torch {torch.__version__}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, model "
        f"{shape}, LoRA rank 16 on {', '.join(TARGETS)}, checkpointing per block, fused AdamW; {runs} alternating runs "
        f"of {steps} steps after {warmup} warmup; load average {os.getloadavg()[0]:.1f} at the start"
    )
    for vocab in vocabs:
        args = dataclasses.replace(ARCHITECTURES["mistral-7b"], **shape, vocab_size=vocab)
        for dtype, seq_len in CPU_COMPARE_RUNS:
            tailor = build_tailor(args, device, dtype, "auto", compile_blocks=False)
            hf = build_hf(args, device, dtype)
            sides = {"tailor": (tailor, tailor_step), "transformers+peft": (hf, hf_step)}
            optimizers = {
                name: build_optimizer([p for p in m.parameters() if p.requires_grad], OptimConfig(lr=1e-5))
                for name, (m, _) in sides.items()
            }
            for instruct in (False, True):
                batches = make_batches(args, seq_len, warmup + steps, instruct)
                trained = sum(float(b.weights.sum()) for b in batches) / sum(b.weights.numel() for b in batches)
                speeds = {name: [] for name in sides}
                for name, (model, step) in sides.items():
                    timed_run(model, step, optimizers[name], batches[:warmup], device)
                for _ in range(runs):
                    for name, (model, step) in sides.items():
                        speeds[name].append(timed_run(model, step, optimizers[name], batches[warmup:], device))
                peaks = {
                    name: step_peak_bytes(model, step, optimizers[name], batches[-1], device) / 2**30
                    for name, (model, step) in sides.items()
                }
                medians = {name: statistics.median(v) for name, v in speeds.items()}
                case = "instruct-shaped" if instruct else "every target"
                print(
                    f"vocab {vocab}, {str(dtype).removeprefix('torch.')}, {seq_len} tokens a step, {case} "
                    f"({trained:.0%} of targets trained), load average {os.getloadavg()[0]:.1f}:"
                )
                for name in sides:
                    print(
                        f"  {name:>18}: median {medians[name]:,.0f} tokens/s (runs {min(speeds[name]):,.0f} to "
                        f"{max(speeds[name]):,.0f}), step peak {peaks[name]:.2f} GiB"
                    )
                ours, theirs = medians["tailor"], medians["transformers+peft"]
                print(
                    f"  tailor / HF: {ours / theirs:.2f}x tokens/s, "
                    f"{peaks['tailor'] / peaks['transformers+peft']:.2f}x step peak memory"
                )
            del tailor, hf, sides, optimizers
            gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="mistral-7b", choices=["tiny", *ARCHITECTURES])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--layers", type=int, help="fewer layers (e.g. for MoE on one GPU); the output says so")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers + PEFT baseline")
    parser.add_argument(
        "--hf",
        nargs="+",
        choices=HF_SETTINGS,
        default=["default"],
        help="the baseline's settings, each measured: default (as its users run it), equal (made like tailor)",
    )
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha is twice it)")
    parser.add_argument("--quantize", choices=["none", "nf4"], default="none", help="tailor's frozen weights")
    parser.add_argument("--profile", action="store_true", help="then the profiler's table of one tailor step")
    parser.add_argument("--compile", action="store_true", help="torch.compile tailor's blocks (model.compile)")
    parser.add_argument(
        "--loss-memory",
        action="store_true",
        help="only compare the loss's peak memory with the naive path at seq-len x the arch's vocab, in chunks of "
        "the default size; on a CPU, at each shipped config's seq_len and vocabulary, with the tokens and the "
        "chunk both divided by 8 (the same number of chunks) and a hidden size of 64",
    )
    parser.add_argument(
        "--cpu-compare",
        action="store_true",
        help="tailor vs transformers + PEFT on this CPU, alternating runs (see above); uses --steps, --warmup, "
        "--layers, --runs and --vocabs",
    )
    parser.add_argument("--runs", type=int, default=3, help="--cpu-compare: timed runs of each side")
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32768, 131072], help="--cpu-compare: vocabularies")
    opts = parser.parse_args()
    if opts.cpu_compare:
        return cpu_compare(opts.vocabs, opts.layers, opts.runs, opts.steps, opts.warmup)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if opts.loss_memory:
        args = model_args(opts.arch, opts.layers)
        if device.type == "cuda":
            return loss_memory(device, opts.seq_len, args.vocab_size, args.dim, DEFAULT_CHUNK_SIZE)
        for config, arch in SHIPPED_CONFIGS.items():
            seq_len = yaml.safe_load((REPO / "configs" / config).read_text())["seq_len"]
            scaled = CPU_LOSS_MEMORY_SCALE
            print(
                f"{config} ({arch}), seq_len {seq_len}, default chunk {DEFAULT_CHUNK_SIZE}, both divided by {scaled}:"
            )
            loss_memory(device, seq_len // scaled, ARCHITECTURES[arch].vocab_size, 64, DEFAULT_CHUNK_SIZE // scaled)
        return None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = model_args(opts.arch, opts.layers, opts.quantize == "nf4")
    seq_len = min(opts.seq_len, 256) if device.type == "cpu" else opts.seq_len
    batches = make_batches(args, seq_len, opts.warmup + opts.steps)
    seqlens = [b.seqlens for b in batches]
    per_token = flops_per_token(args, seqlens)
    peak_flops = measured_peak_flops(device)
    layers_note = f" ({opts.layers} of {ARCHITECTURES[opts.arch].n_layers} layers)" if opts.layers else ""
    print(
        f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
        f"{opts.arch}{layers_note}, seq_len {seq_len}, {opts.steps} steps after {opts.warmup} warmup, {dtype}"
    )
    print(
        f"FLOPs per token = 4 N + 12 x layers x heads x head_dim x mean context = {per_token / 1e9:.2f} GFLOP; "
        f"measured bf16 peak {peak_flops / 1e12:.0f} TFLOP/s"
    )

    tailor = build_tailor(args, device, dtype, opts.attention, opts.compile, opts.rank, opts.quantize == "nf4")
    name = "tailor" + (" compiled" if opts.compile else "") + (" nf4" if opts.quantize == "nf4" else "")
    results = [measure(name, tailor, tailor_step, batches, device, opts.warmup)]
    results[0]["hardware_flops"] = hardware_flops_per_token(args, seqlens, across_documents=False)
    if opts.profile:
        profile_step(tailor, batches[-1], device)
    del tailor  # free tailor's model before the baseline's is built, so each peak is its own
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for setting in [] if opts.no_hf else opts.hf:
        equal = setting == "equal"
        try:
            hf = build_hf(args, device, dtype, equal, opts.rank)
        except ImportError as error:
            print(f"Hugging Face baseline skipped: {error}")
            break
        step = hf_step_by_document if equal else hf_step
        results.append(measure(f"transformers+peft {setting}", hf, step, batches, device, opts.warmup))
        results[-1]["hardware_flops"] = hardware_flops_per_token(args, seqlens, across_documents=not equal)
        del hf
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    setup = benchmark_config(seq_len, opts.rank, opts.quantize, dtype, opts.attention)
    estimate = estimate_memory(args, setup, 1, dtype.itemsize)
    for r in results:
        mfu, hfu = (r["tokens_per_s"] * flops / peak_flops for flops in (per_token, r["hardware_flops"]))
        print(
            f"{r['name']:>26}: {r['tokens_per_s']:,.0f} tokens/s per GPU  MFU {mfu:.1%} (model FLOPs), "
            f"{hfu:.1%} (hardware FLOPs)  peak memory {r['peak_gib']:.1f} GiB measured"
        )
    print(f"memory estimate of tailor's setup: {estimate.summary()}")
    try:  # the forecast on fake tensors, beside the measured peak (docs/gpu-trace.md)
        trace = trace_by_layers(setup, args, this_gpu() if device.type == "cuda" else "h100")
        print(f"trace of tailor's setup: {trace.summary()}")
    except Exception as error:  # noqa: BLE001 - the measured lines above stand without it
        print(f"trace of tailor's setup failed: {type(error).__name__}: {error}")
    ours = results[0]
    for theirs in results[1:]:
        print(
            f"tailor / HF {theirs['name'].split()[-1]}: {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x "
            f"tokens/s, {ours['peak_gib'] / theirs['peak_gib']:.2f}x peak memory"
        )


def benchmark_config(seq_len: int, rank: int, quantize: str, dtype: torch.dtype, attention: str) -> TrainConfig:
    """The training config of the setup measured here, for its memory estimate and its trace."""
    lora = LoRAArgs(rank=rank, alpha=2 * rank, targets=TARGETS)
    name = next(name for name, value in DTYPES.items() if value == dtype)  # model.dtype's name for it
    model = ModelConfig(dtype=name, quantize=quantize, attention=attention, activation_checkpointing=True)
    return TrainConfig(seq_len=seq_len, lora=lora, model=model)


def profile_step(loss_model, batch, device: torch.device) -> None:
    """The profiler's table of one tailor step, the 25 costliest operations by device time (CPU time on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    optimizer = build_optimizer([p for p in loss_model.parameters() if p.requires_grad], OptimConfig(lr=1e-5))
    tailor_step(loss_model, optimizer, batch, device)  # AdamW's state made outside the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        tailor_step(loss_model, optimizer, batch, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"profile of one tailor step, by {sort}:")
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
