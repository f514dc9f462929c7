"""How long a run will take: tokens to process / (GPUs x tokens per second per GPU).

Tokens per second per GPU come from MEASURED (tailor's own training throughput, filled in from
benchmarks/RESULTS.md as model sizes get measured) and, for a model not measured yet, from its parameter
count: LoRA training with activation checkpointing costs about 6 N FLOPs per token (forward, recomputed
forward, backward through the frozen weights; no weight gradients), and we assume 40% of an H100's
dense bf16 peak. Such an estimate is printed as one.
"""

from __future__ import annotations

import json
from pathlib import Path

MEASURED: dict[str, float] = {}  # model name (see model_name) -> tokens / s / GPU measured with tailor
H100_BF16_PEAK_FLOPS = 989e12
ASSUMED_UTILISATION = 0.4


def active_parameters(model_dir: str | Path) -> tuple[str, int]:
    """(name, parameters used per token) from params.json or config.json; MoE counts the experts used."""
    model_dir = Path(model_dir)
    if (model_dir / "params.json").is_file():
        p = json.loads((model_dir / "params.json").read_text())
        dim, layers, vocab, hidden = p["dim"], p["n_layers"], p["vocab_size"], p["hidden_dim"]
        head_dim = p.get("head_dim") or dim // p["n_heads"]
        heads, kv_heads = p["n_heads"], p.get("n_kv_heads", p["n_heads"])
        moe = p.get("moe") or {}
        experts, used = moe.get("num_experts", 1), moe.get("num_experts_per_tok", 1)
    else:
        p = json.loads((model_dir / "config.json").read_text())
        p = p.get("text_config", p)
        dim, layers, vocab, hidden = p["hidden_size"], p["num_hidden_layers"], p["vocab_size"], p["intermediate_size"]
        heads = p["num_attention_heads"]
        head_dim = p.get("head_dim") or dim // heads
        kv_heads = p.get("num_key_value_heads", heads)
        experts, used = p.get("num_local_experts", 1), p.get("num_experts_per_tok", 1)
    attention = 2 * dim * heads * head_dim + 2 * dim * kv_heads * head_dim
    active = layers * (attention + used * 3 * dim * hidden) + dim * vocab
    total = layers * (attention + experts * 3 * dim * hidden) + 2 * dim * vocab
    return model_name(total, experts), active


def model_name(total_parameters: int, experts: int) -> str:
    size = f"{total_parameters / 1e9:.0f}B" if total_parameters >= 1e9 else f"{total_parameters / 1e6:.0f}M"
    return size + (f" ({experts} experts)" if experts > 1 else "")


def tokens_per_second_per_gpu(model_dir: str | Path) -> tuple[float, str]:
    """(tokens / s / GPU, where the number comes from)."""
    name, active = active_parameters(model_dir)
    if name in MEASURED:
        return MEASURED[name], f"measured for {name}"
    rate = ASSUMED_UTILISATION * H100_BF16_PEAK_FLOPS / (6 * active)
    return rate, (f"estimated for a {name} model from its {active:,} active parameters at "
                  f"{ASSUMED_UTILISATION:.0%} of H100 bf16 peak; not measured")


def format_duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{max(minutes, 1)} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours < 48 else f"{hours / 24:.1f} days"
