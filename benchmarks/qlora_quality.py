"""QLoRA's quality on CPU: what 4-bit NF4 frozen weights cost against bf16 ones.

    python benchmarks/qlora_quality.py                  both parts
    python benchmarks/qlora_quality.py --steps 20       a shorter demo run (the smoke test)
    python benchmarks/qlora_quality.py --steps 120 --seeds 0 1 --skip-layers    the demo task, two seeds

1. The tiny demo task (data/demo, configs/demo.yaml's settings) on the demo's tiny Mistral at width 4 (dim 256:
   NF4 needs whole scale groups of 16384 weights), trained by train.py three times per seed: bf16, bf16 +
   `model.quantize: nf4`, and the control, bf16 on a base whose projections are deq(nf4(W)); same seed and data:
   the eval loss at half and all of the steps, the final token accuracy, and each final loss over bf16's
   (goal: NF4 within 10%).
2. Random 7B-shaped layers (Mistral 7B v0.3's dim 4096, GQA 32/8 heads, SwiGLU 14336, `--layers` blocks of
   N(0, 1/fan_in) weights, the width model/tiny.py uses): each projection's NF4 round-trip error
   ‖W − deq(nf4(W))‖ / ‖W‖, and the blocks' output on 512 random tokens with NF4 projections against bf16 ones:
   relative error of the hidden states, computed in bf16 as on a GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
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


def demo_task(steps: int, seed: int, workdir: Path) -> dict:
    """Each variant's eval loss and token accuracy at half and all of `steps`, with config seed `seed` (LoRA
    initialization and data order; the random base is the same for every seed)."""
    model_dir = workdir / "model"
    if not model_dir.exists():
        write_tiny_model(model_dir, width=4)
        write_dequantized_model(model_dir, workdir / "model-dequantized")
    demo = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    results = {}
    for name, (quantize, weights) in VARIANTS.items():
        path = model_dir if weights == "original" else workdir / "model-dequantized"
        run_dir = workdir / f"{name.replace(' ', '_')}-seed{seed}"
        cfg = dict(demo, run_dir=str(run_dir), max_steps=steps, seed=seed)
        cfg["model"] = dict(demo["model"], path=str(path), dtype="bf16", quantize=quantize)
        cfg["data"] = dict(demo["data"], cache_dir=str(workdir / "cache"))
        cfg["data"]["train"], cfg["data"]["eval"] = (str(REPO / demo["data"][k]) for k in ("train", "eval"))
        cfg["eval"] = dict(demo["eval"], freq=steps // 2)
        cfg["checkpoint"] = dict(demo["checkpoint"], enabled=False)
        config = workdir / f"{run_dir.name}.yaml"
        config.write_text(yaml.safe_dump(cfg))
        subprocess.run([sys.executable, str(REPO / "train.py"), str(config)], cwd=REPO, check=True, capture_output=True)
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in lines if r["kind"] == "eval"]
        results[name] = {
            "eval_loss": {r["step"]: r["eval_loss"] for r in evals},
            "token_accuracy": evals[-1].get("eval_token_accuracy"),
        }
    return results


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="demo-task steps (configs/demo.yaml: 200)")
    parser.add_argument("--layers", type=int, default=2, help="7B-shaped blocks")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="config seeds of the demo runs")
    parser.add_argument("--skip-layers", action="store_true", help="the demo task only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qlora-quality-") as workdir:
        for seed in args.seeds:
            demo = demo_task(args.steps, seed, Path(workdir))
            bf16 = demo["bf16"]["eval_loss"][args.steps]
            for name, result in demo.items():
                losses = ", ".join(f"step {step} {loss:.4f}" for step, loss in result["eval_loss"].items())
                ratio = result["eval_loss"][args.steps] / bf16
                print(
                    f"demo task, seed {seed}, {name}: eval loss {losses} (/ bf16 = {ratio:.3f}); token accuracy "
                    f"{result['token_accuracy']:.1%}",
                    flush=True,
                )
    if args.skip_layers:
        return
    layers = seven_b_layers(args.layers)
    weights = ", ".join(f"{k} {v:.4f}" for k, v in layers["weight_error"].items())
    print(f"7B-shaped layers: NF4 round-trip error ||W - deq(nf4(W))|| / ||W||: {weights}")
    print(
        f"7B-shaped layers: {layers['layers']} blocks, {layers['tokens']} tokens, bf16: relative error of the "
        f"hidden states with NF4 projections {layers['hidden_error']:.4f}"
    )


if __name__ == "__main__":
    main()
