"""QLoRA's quality on CPU: what 4-bit NF4 frozen weights cost against bf16 ones.

    python benchmarks/qlora_quality.py                  both parts
    python benchmarks/qlora_quality.py --steps 20       a shorter demo run (the smoke test)

1. The tiny demo task (data/demo, configs/demo.yaml's settings) on the demo's tiny Mistral at width 4 (dim 256:
   NF4 needs whole scale groups of 16384 weights), trained by train.py twice, bf16 and bf16 + `model.quantize:
   nf4`, same seed and data: the final eval loss and token accuracy of each, and their ratio (goal: NF4 within 10%).
2. Random 7B-shaped layers (Mistral 7B v0.3's dim 4096, GQA 32/8 heads, SwiGLU 14336, `--layers` blocks of
   N(0, 1/fan_in) weights, the width model/tiny.py uses): each projection's NF4 round-trip error
   ‖W − deq(nf4(W))‖ / ‖W‖, and the blocks' output on 512 random tokens with NF4 projections against bf16 ones:
   relative error of the hidden states, computed in bf16 as on a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.args import ARCHITECTURES  # noqa: E402
from model.quantize import QUANTIZED_LINEARS, to_nf4  # noqa: E402
from model.tiny import write_tiny_model  # noqa: E402
from model.transformer import TransformerBlock, document_positions, rotary_table  # noqa: E402


def demo_task(steps: int, workdir: Path) -> dict:
    model_dir = write_tiny_model(workdir / "model", width=4)
    demo = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    results = {}
    for name, quantize in (("bf16", "none"), ("nf4", "nf4")):
        cfg = dict(demo, run_dir=str(workdir / name), max_steps=steps)
        cfg["model"] = dict(demo["model"], path=str(model_dir), dtype="bf16", quantize=quantize)
        cfg["data"] = dict(demo["data"], cache_dir=str(workdir / "cache"))
        cfg["data"]["train"], cfg["data"]["eval"] = (str(REPO / demo["data"][k]) for k in ("train", "eval"))
        cfg["eval"] = dict(demo["eval"], freq=steps)
        cfg["checkpoint"] = dict(demo["checkpoint"], enabled=False)
        config = workdir / f"{name}.yaml"
        config.write_text(yaml.safe_dump(cfg))
        subprocess.run([sys.executable, str(REPO / "train.py"), str(config)], cwd=REPO, check=True, capture_output=True)
        lines = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in lines if r["kind"] == "eval"][-1]
        results[name] = {"eval_loss": last["eval_loss"], "token_accuracy": last.get("eval_token_accuracy")}
    results["ratio"] = results["nf4"]["eval_loss"] / results["bf16"]["eval_loss"]
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qlora-quality-") as workdir:
        demo = demo_task(args.steps, Path(workdir))
    print(f"demo task, {args.steps} steps: eval loss bf16 {demo['bf16']['eval_loss']:.4f}, NF4 "
          f"{demo['nf4']['eval_loss']:.4f} (NF4 / bf16 = {demo['ratio']:.3f}); token accuracy bf16 "
          f"{demo['bf16']['token_accuracy']:.1%}, NF4 {demo['nf4']['token_accuracy']:.1%}")  # fmt: skip
    layers = seven_b_layers(args.layers)
    weights = ", ".join(f"{k} {v:.4f}" for k, v in layers["weight_error"].items())
    print(f"7B-shaped layers: NF4 round-trip error ||W - deq(nf4(W))|| / ||W||: {weights}")
    print(
        f"7B-shaped layers: {layers['layers']} blocks, {layers['tokens']} tokens, bf16: relative error of the "
        f"hidden states with NF4 projections {layers['hidden_error']:.4f}"
    )


if __name__ == "__main__":
    main()
