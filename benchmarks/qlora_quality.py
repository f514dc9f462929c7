"""QLoRA's quality on CPU: what 4-bit NF4 frozen weights cost against bf16 ones.

    python benchmarks/qlora_quality.py                  both parts
    python benchmarks/qlora_quality.py --steps 20       a shorter demo run (the smoke test)
    python benchmarks/qlora_quality.py --seeds 0 1 2 3 4 --variants bf16 nf4 --skip-layers    NF4 / bf16 over seeds
    python benchmarks/qlora_quality.py --steps 120 --seeds 2 --variants nf4 "bf16 on deq(nf4(W))" --keep DIR
                                                        NF4 against its control, run folders kept in DIR
    python benchmarks/qlora_quality.py ... --keep DIR --trained     the runs kept in DIR read again, not retrained

1. The tiny demo task (data/demo, configs/demo.yaml's settings; `--lr` another learning rate) on the demo's tiny
   Mistral at width 4 (dim 256: NF4 needs whole scale groups of 16384 weights), trained by train.py per seed and
   variant: bf16, bf16 + `model.quantize: nf4`, and the control, bf16 on a base whose projections are deq(nf4(W));
   same seed and data. Per run: the eval loss at half and all of the steps, the final token accuracy, each final
   loss over bf16's (goal: NF4 within 10%), and the held-out prompts (data/demo/eval.jsonl) answered greedily by the
   final adapter as `tailor chat --adapter` answers them: how many exactly right, how many the same as bf16's. Over
   several seeds, the median and quartiles of each variant's ratio to bf16. Every step is logged: where NF4 and its
   control part is printed (or that they never do, and whether their final adapters are bitwise equal).
2. Random 7B-shaped layers (Mistral 7B v0.3's dim 4096, GQA 32/8 heads, SwiGLU 14336, `--layers` blocks of
   N(0, 1/fan_in) weights, the width model/tiny.py uses): each projection's NF4 round-trip error
   ‖W − deq(nf4(W))‖ / ‖W‖, and the blocks' output on 512 random tokens with NF4 projections against bf16 ones:
   relative error of the hidden states, computed in bf16 as on a GPU. First, NF4's error as the QLoRA reference
   implementation's test measures it (bitsandbytes' tests/test_functional.py, test_4bit_quant), against its figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.args import ARCHITECTURES  # noqa: E402
from model.quantize import QUANTIZED_LINEARS, is_quantized_name, to_nf4  # noqa: E402
from model.tiny import write_tiny_model  # noqa: E402
from model.transformer import TransformerBlock, document_positions, rotary_table  # noqa: E402

HELD_OUT = [json.loads(line) for line in (REPO / "data/demo/eval.jsonl").read_text().splitlines()]
VARIANTS = {  # name: (model.quantize, projection weights of the model folder)
    "bf16": ("none", "original"),
    "nf4": ("nf4", "original"),
    # the control: bf16 LoRA on a base whose projections hold deq(nf4(W)) as plain bf16 tensors. Equal to the NF4
    # run, the gap is the 4-bit base's; equal to the bf16 run, it is the NF4 code path's
    "bf16 on deq(nf4(W))": ("none", "dequantized"),
}


def write_dequantized_model(model_dir: Path, folder: Path) -> Path:
    """A copy of `model_dir` whose quantized projections are replaced by their NF4 round trip, in bf16 (as the NF4
    run dequantizes them for its matmuls)."""
    shutil.copytree(model_dir, folder)
    path = folder / "consolidated.safetensors"
    state = load_file(path)
    for name, tensor in state.items():
        if is_quantized_name(name):
            state[name] = to_nf4(tensor.to(torch.bfloat16)).get_original_weight().to(tensor.dtype)
    save_file(state, path)
    return folder


def demo_task(steps: int, seed: int, workdir: Path, variants: list[str], lr: float | None, trained: bool) -> dict:
    """Each variant's eval loss at half and all of `steps` (train loss and gradient norm at every step), final token
    accuracy, and greedy answers to the held-out prompts, with config seed `seed` (LoRA initialization and data
    order; the random base is the same for every seed). `trained`: the runs of the same settings kept in `workdir`
    by an earlier invocation are read, not trained again."""
    model_dir = workdir / "model"
    if not model_dir.exists():
        write_tiny_model(model_dir, width=4)
        write_dequantized_model(model_dir, workdir / "model-dequantized")
    demo = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    results = {}
    for name in variants:
        quantize, weights = VARIANTS[name]
        path = model_dir if weights == "original" else workdir / "model-dequantized"
        run_dir = workdir / f"{name.replace(' ', '_')}-seed{seed}"
        cfg = dict(demo, run_dir=str(run_dir), max_steps=steps, seed=seed)
        cfg["model"] = dict(demo["model"], path=str(path), dtype="bf16", quantize=quantize)
        cfg["data"] = dict(demo["data"], cache_dir=str(workdir / "cache"))
        cfg["data"]["train"], cfg["data"]["eval"] = (str(REPO / demo["data"][k]) for k in ("train", "eval"))
        cfg["eval"] = dict(demo["eval"], freq=steps // 2, generate=0)  # answers are scored by this script itself
        cfg["checkpoint"] = dict(demo["checkpoint"], freq=steps, keep=1)  # the final adapter, for the answers
        cfg["logging"] = dict(demo["logging"], freq=1)  # every step's loss and gradient norm: where runs part
        if lr is not None:
            cfg["optim"] = dict(demo["optim"], lr=lr, min_lr=lr / 10)
        config = workdir / f"{run_dir.name}.yaml"
        if trained:
            if yaml.safe_load(config.read_text()) != cfg:
                raise SystemExit(f"error: --trained: {config} holds other settings than this invocation's")
        else:
            config.write_text(yaml.safe_dump(cfg))
            if run_dir.exists():  # a kept folder of an earlier invocation: this one starts afresh
                shutil.rmtree(run_dir)
            subprocess.run(
                [sys.executable, str(REPO / "train.py"), str(config)], cwd=REPO, check=True, capture_output=True
            )
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in lines if r["kind"] == "eval" and not r.get("base")]  # the base model, measured at step 0
        results[name] = {
            "eval_loss": {r["step"]: r["eval_loss"] for r in evals},
            "token_accuracy": evals[-1].get("eval_token_accuracy"),
            "answers": held_out_answers(path, run_dir / "checkpoints" / f"checkpoint_{steps:06d}", quantize),
        }
    return results


def held_out_answers(model_dir: Path, checkpoint: Path, quantize: str) -> list[str]:
    """The trained adapter's greedy answers to data/demo/eval.jsonl's prompts, as `tailor chat --adapter` (and the
    demo's report) gives them: on CPU in fp32, the base quantized as in training."""
    from finetune.after.chat import Sampling, answer_conversations, load_chat_model

    model, tokenizer = load_chat_model(model_dir, checkpoint, quantize=quantize)
    prompts = [{"messages": c["messages"][:-1]} for c in HELD_OUT]
    return answer_conversations(model, tokenizer, prompts, Sampling(max_tokens=32), batch_size=len(prompts))


def compare_runs(demo: dict, steps: int) -> list[str]:
    """One line per variant: its eval losses, their ratio to bf16's, and its held-out answers: exactly right, with
    the right greeting (the part before the comma: "Good night"; the name follows it), and the same as bf16's."""
    expected = [c["messages"][-1]["content"] for c in HELD_OUT]
    bf16 = demo.get("bf16")
    lines = []
    for name, result in demo.items():
        losses = ", ".join(f"step {step} {loss:.4f}" for step, loss in result["eval_loss"].items())
        ratio = result["eval_loss"][steps] / bf16["eval_loss"][steps] if bf16 else float("nan")
        right = sum(a == e for a, e in zip(result["answers"], expected))
        greeting = sum(a.partition(",")[0] == e.partition(",")[0] for a, e in zip(result["answers"], expected))
        same = sum(a == b for a, b in zip(result["answers"], bf16["answers"])) if bf16 else 0
        lines.append(
            f"{name}: eval loss {losses} (/ bf16 = {ratio:.3f}); token accuracy {result['token_accuracy']:.1%}; "
            f"held-out answers exactly right {right}/{len(expected)}, greeting right {greeting}/{len(expected)}, "
            f"the same as bf16's {same}/{len(expected)}"
        )
    return lines


@torch.no_grad()
def seven_b_layers(layers: int) -> dict:
    args = ARCHITECTURES["mistral-7b"]
    torch.manual_seed(0)
    blocks = []
    errors = {}
    for _ in range(layers):
        block = TransformerBlock(args).to(torch.bfloat16)
        for name, param in block.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape) / param.shape[1] ** 0.5)
        blocks.append(block)
    quantized = []
    for block in blocks:
        copy = TransformerBlock(args).to(torch.bfloat16)
        copy.load_state_dict(block.state_dict())
        for name, param in list(copy.named_parameters()):
            if name.rpartition(".")[0].rpartition(".")[2] in QUANTIZED_LINEARS:
                nf4 = to_nf4(param.detach())
                original = block.get_parameter(name).float()
                error = (nf4.get_original_weight().float() - original).norm() / original.norm()
                errors.setdefault(name.rpartition(".")[0].rpartition(".")[2], []).append(error.item())
                module = copy.get_submodule(name.rpartition(".")[0])
                module.weight = torch.nn.Parameter(nf4, requires_grad=False)
        quantized.append(copy)
    n = 512
    x = torch.randn(n, args.dim).to(torch.bfloat16)
    rope = rotary_table(document_positions([n], "cpu"), args.head_dim, args.rope_theta)
    from model.attention import DocumentMask

    mask = DocumentMask([n], "sdpa", None, "cpu")
    reference, approximate = x, x
    for block, copy in zip(blocks, quantized):
        reference, approximate = block(reference, rope, mask), copy(approximate, rope, mask)
    hidden_error = ((approximate.float() - reference.float()).norm() / reference.float().norm()).item()
    return {
        "weight_error": {k: sum(v) / len(v) for k, v in errors.items()},
        "hidden_error": hidden_error,
        "layers": layers,
        "tokens": n,
    }


def first_parting(workdir: Path, seed: int, steps: int, names: tuple[str, str]) -> str:
    """The first step whose train loss or gradient norm differs between two runs of a seed (logged at every step),
    else whether their final adapters are bitwise equal."""
    folders = [workdir / f"{name.replace(' ', '_')}-seed{seed}" for name in names]
    runs = []
    for folder in folders:
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        runs.append({r["step"]: (r["loss"], r["grad_norm"]) for r in records if r["kind"] == "train"})
    for step in sorted(runs[0]):
        if runs[0][step] != runs[1].get(step):
            pair = f"{runs[0][step]} against {runs[1].get(step)}"
            return f"{names[0]} and {names[1]} part at step {step}: (loss, grad norm) {pair}"
    adapters = [load_file(f / "checkpoints" / f"checkpoint_{steps:06d}" / "lora.safetensors") for f in folders]
    equal = adapters[0].keys() == adapters[1].keys() and all(
        torch.equal(v, adapters[1][k]) for k, v in adapters[0].items()
    )
    return (
        f"{names[0]} and {names[1]}: the same train loss and gradient norm at all {len(runs[0])} steps; final "
        f"adapters ({len(adapters[0])} tensors) {'bitwise equal' if equal else 'NOT equal'}"
    )


@torch.no_grad()
def bitsandbytes_test_errors(samples: int = 20) -> tuple[float, float]:
    """NF4's mean |W - deq(nf4(W))| and mean |W - deq(nf4(W))| / |W| on N(0, 1) 1024 x 1024 weights, blocks of 64: the
    quantities bitsandbytes' tests/test_functional.py (TestQuantize4BitFunctional.test_4bit_quant) bounds by the
    averages it measured for its NF4 (0.072792 and 0.203299 at block size 64)."""
    absolute, relative = [], []
    for i in range(samples):
        w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(i))
        error = (w - to_nf4(w).get_original_weight()).abs()
        absolute.append(error.mean().item())
        relative.append((error / (w.abs() + 1e-8)).mean().item())
    return statistics.mean(absolute), statistics.mean(relative)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="demo-task steps (configs/demo.yaml: 200)")
    parser.add_argument("--lr", type=float, help="demo-task learning rate (configs/demo.yaml: 1e-2; min_lr lr/10)")
    parser.add_argument("--layers", type=int, default=2, help="7B-shaped blocks")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="config seeds of the demo runs")
    parser.add_argument("--skip-layers", action="store_true", help="the demo task only")
    parser.add_argument("--skip-demo", action="store_true", help="the layers only")
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="demo runs per seed"
    )
    parser.add_argument(
        "--keep", type=Path, metavar="DIR", help="work in DIR and keep its run folders (default: a temporary folder)"
    )
    parser.add_argument(
        "--trained", action="store_true", help="with --keep: read the runs kept there by an earlier invocation"
    )
    args = parser.parse_args()
    if args.trained and not args.keep:
        parser.error("--trained reads the runs of --keep DIR")
    with tempfile.TemporaryDirectory(prefix="qlora-quality-") as temporary:
        workdir = args.keep or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        ratios, finals = {}, {}  # NF4 / bf16 per seed; each variant's final eval losses
        for seed in [] if args.skip_demo else args.seeds:
            demo = demo_task(args.steps, seed, workdir, args.variants, args.lr, args.trained)
            for line in compare_runs(demo, args.steps):
                print(f"demo task, seed {seed}, {line}", flush=True)
            if {"nf4", "bf16 on deq(nf4(W))"} <= demo.keys():
                parting = first_parting(workdir, seed, args.steps, ("nf4", "bf16 on deq(nf4(W))"))
                print(f"demo task, seed {seed}: {parting}")
            for name, result in demo.items():
                finals.setdefault(name, []).append(result["eval_loss"][args.steps])
                if "bf16" in demo:
                    ratios.setdefault(name, []).append(
                        result["eval_loss"][args.steps] / demo["bf16"]["eval_loss"][args.steps]
                    )
        for name, values in ratios.items():
            if name != "bf16" and len(values) > 1:
                quartiles = statistics.quantiles(values, n=4, method="inclusive")
                median = statistics.median(values)
                print(
                    f"demo task, {name} / bf16 eval loss over {len(values)} seeds: median {median:.3f}, "
                    f"quartiles {quartiles[0]:.3f} to {quartiles[2]:.3f}, range {min(values):.3f} to {max(values):.3f}"
                )
        if "bf16" in finals and len(finals["bf16"]) > 1:
            # the expected final eval loss of each variant (the mean over seeds), and its spread between seeds: a ratio
            # of means does not swing with one seed's spike as a per-seed ratio does
            for name, values in finals.items():
                print(
                    f"demo task, {name}: final eval loss over {len(values)} seeds: mean {statistics.mean(values):.4f} "
                    f"(standard deviation {statistics.stdev(values):.4f}), "
                    f"{statistics.mean(values) / statistics.mean(finals['bf16']):.3f}x bf16's mean"
                )
    if args.skip_layers:
        return
    absolute, relative = bitsandbytes_test_errors()
    print(
        f"N(0, 1) 1024 x 1024 weights (bitsandbytes' NF4 test): mean |W - deq(nf4(W))| {absolute:.6f}, "
        f"mean |W - deq(nf4(W))| / |W| {relative:.6f} (bitsandbytes' NF4, block 64: 0.072792, 0.203299)"
    )
    layers = seven_b_layers(args.layers)
    weights = ", ".join(f"{k} {v:.4f}" for k, v in layers["weight_error"].items())
    print(f"7B-shaped layers: NF4 round-trip error ||W - deq(nf4(W))|| / ||W||: {weights}")
    print(
        f"7B-shaped layers: {layers['layers']} blocks, {layers['tokens']} tokens, bf16: relative error of the "
        f"hidden states with NF4 projections {layers['hidden_error']:.4f}"
    )


if __name__ == "__main__":
    main()
