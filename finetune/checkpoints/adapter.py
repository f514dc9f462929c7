"""Adapter checkpoint files: `lora.safetensors` and the `lora` entry of params.json, read and written the same way
by training, merge, the PEFT converters and chat."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from finetune.checkpoints.manifest import MANIFEST, verify_checkpoint
from model.args import load_model_args
from model.quantize import QUANTIZATIONS
from model.settings import LORA_TARGETS, LoRAArgs

ADAPTER_FILE = "lora.safetensors"


def read_adapter(ckpt_dir: str | Path) -> tuple[dict[str, torch.Tensor], LoRAArgs]:
    """The adapter weights (native names) and LoRA settings of a checkpoint folder written by the trainer.

    The folder holds `lora.safetensors` and a params.json with a `lora` entry, verified against its manifest.
    mistral-finetune's folders (no manifest; a `lora` entry with `scaling` but no `alpha`) read too.

    Raises:
        ValueError: naming the folder or file: not a checkpoint folder (or a run folder), a file that fails its
            manifest, is missing or unreadable, or weights that do not match the `lora` entry.
    """
    folder = Path(ckpt_dir)
    weights, params = folder / ADAPTER_FILE, folder / "params.json"
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such checkpoint folder")
    if (folder / "checkpoints").is_dir():
        raise ValueError(f"{folder} is a run folder; give one of its checkpoints, {folder}/checkpoints/checkpoint_N")
    if (folder / MANIFEST).exists():  # a tailor checkpoint: damaged files are refused, never merged or chatted with
        problem = verify_checkpoint(folder)
        if problem is not None:
            raise ValueError(f"{folder}: {problem}")
    for path in (weights, params):
        if not path.is_file():
            raise ValueError(
                f"{folder}: no {path.name}; expected an adapter checkpoint folder "
                "(run_dir/checkpoints/checkpoint_N with lora.safetensors and params.json)"
            )
    try:
        entry = json.loads(params.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{params}: not JSON ({error})") from None
    entry = entry.get("lora") if isinstance(entry, dict) else None
    if not isinstance(entry, dict) or "rank" not in entry or not ({"alpha", "scaling"} & set(entry)):
        raise ValueError(f"{params}: no 'lora' entry with rank and alpha; was this folder written by the trainer?")
    try:  # safetensors: a JSON header and raw numbers, so no bytes of this file can run code
        state = load_file(weights)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights}: not a safetensors file of adapter weights ({error})") from None
    if not all(torch.is_floating_point(t) and bool(torch.isfinite(t).all()) for t in state.values()):
        raise ValueError(f"{weights}: holds non-finite or non-float values, which no training writes")
    modules = sorted({key.rsplit(".", 2)[0] for key in state})
    targets = entry.get("targets") or sorted({m.rpartition(".")[2] for m in modules}, key=_target_order)
    where = f"{params}: lora."
    check_numbers(where, {k: entry[k] for k in ("alpha", "scaling", "dropout") if k in entry}, rank=entry["rank"])
    alpha = entry["alpha"] if "alpha" in entry else entry["scaling"] * entry["rank"]
    variants = {key: entry.get(key, False) for key in ("rslora", "dora")}  # absent from older checkpoints: plain LoRA
    lora = lora_args(
        where, rank=entry["rank"], alpha=alpha, dropout=entry.get("dropout", 0.0), targets=targets, **variants
    )
    for module in modules:
        a, b = state.get(f"{module}.lora_A.weight"), state.get(f"{module}.lora_B.weight")
        if a is None or b is None or a.shape[0] != lora.rank or b.shape[1] != lora.rank:
            raise ValueError(
                f"{weights}: {module} needs lora_A [rank, in] and lora_B [out, rank] with rank "
                f"{lora.rank}, got A {None if a is None else tuple(a.shape)}, "
                f"B {None if b is None else tuple(b.shape)}"
            )
        magnitude = state.get(f"{module}.lora_magnitude.weight")
        if lora.dora != (magnitude is not None) or (magnitude is not None and magnitude.shape != (b.shape[0],)):
            shape = None if magnitude is None else tuple(magnitude.shape)
            raise ValueError(
                f"{weights}: {module} has lora_magnitude {shape}, where params.json's lora.dora is "
                f"{str(lora.dora).lower()}: DoRA needs one magnitude per output row, [{b.shape[0]}], plain LoRA none"
            )
    return state, lora


def check_numbers(where: str, numbers: dict[str, object], **integers: object) -> None:
    """Check that values read from a file are numbers, so that a wrong one never becomes a TypeError further on.

    Args:
        where: the file (and key prefix) that errors begin with.
        integers: values that must be whole numbers.

    Raises:
        ValueError: a string, a list or a boolean, naming `where` and the key.
    """
    for key, value in {**numbers, **integers}.items():
        kinds = int if key in integers else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError(f"{where}{key} is {value!r}; expected {'an integer' if key in integers else 'a number'}")


def lora_args(
    where: str,
    rank: object,
    alpha: object,
    dropout: object,
    targets: object,
    rslora: object = False,
    dora: object = False,
) -> LoRAArgs:
    """LoRAArgs from values read from a file (params.json's `lora` entry, PEFT's adapter_config.json).

    Each value is checked for its kind first.

    Raises:
        ValueError: a value of the wrong kind or out of range, naming `where`.
    """
    check_numbers(where, {"alpha": alpha, "dropout": dropout}, rank=rank)
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{where}targets is {targets!r}; expected a list of module names")
    if not isinstance(rslora, bool) or not isinstance(dora, bool):
        raise ValueError(f"{where}rslora and dora must be true or false, got {rslora!r} and {dora!r}")
    try:
        return LoRAArgs(rank=rank, alpha=alpha, dropout=dropout, targets=tuple(targets), rslora=rslora, dora=dora)
    except ValueError as e:
        raise ValueError(f"{where.rstrip('.')}: {e}") from None


def _target_order(target: str) -> int:
    return LORA_TARGETS.index(target) if target in LORA_TARGETS else len(LORA_TARGETS)


def base_params(model_dir: str | Path) -> dict:
    """A model folder's params.json without any `lora` entry, kept verbatim (keys tailor ignores included).

    Made from its config.json when the folder is in Hugging Face format.
    """
    path = Path(model_dir) / "params.json"
    params = json.loads(path.read_text()) if path.is_file() else load_model_args(model_dir).to_dict()
    params.pop("lora", None)
    return params


def lora_entry(lora: LoRAArgs, base_quantization: str = "none") -> dict:
    """The `lora` entry of a checkpoint's params.json.

    mistral-inference reads rank and scaling (alpha / rank, or alpha / sqrt(rank) with rsLoRA); `rslora` and `dora`
    say which variant merge, export and chat read.

    Args:
        base_quantization: how the base's frozen weights were stored in training; recorded unless "none", for
            merge and chat to read.
    """
    entry = {
        "rank": lora.rank,
        "alpha": lora.alpha,
        "scaling": lora.scaling,
        "dropout": lora.dropout,
        "targets": list(lora.targets),
        "rslora": lora.rslora,
        "dora": lora.dora,
    }
    if base_quantization != "none":
        entry["base_quantization"] = base_quantization
    return entry


def read_base_quantization(ckpt_dir: str | Path) -> str:
    """How the base's frozen weights were stored while the adapter trained: "none", or "nf4" (QLoRA).

    Read from the `lora` entry of the checkpoint's params.json. A file that is not a checkpoint's reads as "none":
    `read_adapter` says what is wrong with it.

    Raises:
        ValueError: a base_quantization that is not one of QUANTIZATIONS.
    """
    params = Path(ckpt_dir) / "params.json"
    try:
        entry = json.loads(params.read_text(encoding="utf-8")).get("lora")
        value = entry.get("base_quantization", "none") if isinstance(entry, dict) else "none"
    except (OSError, ValueError, AttributeError, RecursionError):
        return "none"
    if value not in QUANTIZATIONS:
        raise ValueError(f"{params}: lora.base_quantization is {value!r}; expected one of {', '.join(QUANTIZATIONS)}")
    return value


def params_with_lora(base_dir: str | Path, lora: LoRAArgs) -> dict:
    """A checkpoint's params.json: the base's plus the `lora` entry."""
    return dict(base_params(base_dir), lora=lora_entry(lora))
