"""The base model a checkpoint's adapters were trained on, recorded in state/base_model.json and checked on resume.

Adapters trained on one base mean nothing on another: a resume on a model of another shape cannot load them, and
one on a model of the same shape (another fine-tune of it, say) would go on training them on the wrong weights
without a word. So each checkpoint records its base's path and identity, and a resume compares them with
`model.path` before any data is tokenized or weight loaded: another shape is refused, naming the model the run was
trained with; another model of the same shape is refused unless `resume_other_base: true` says it is meant.

The identity is cheap whatever the model's size: a digest of each weight file's name and size and of three samples
of its bytes (its start, which in safetensors is the header with every tensor's name, dtype and shape; its middle;
its end). A copy of the folder elsewhere has the same identity; another model of the same shape has another.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from finetune.atomic_files import atomic_write
from finetune.checkpoints.folders import STATE
from model.args import ModelArgs, load_model_args, read_json_object
from model.weights import weight_files

BASE_FILE = "base_model.json"
SAMPLE_BYTES = 1 << 16
SHAPE_KEYS = ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size", "moe")


def base_identity(model_dir: str | Path) -> str:
    """A digest of the model folder's weight files: their names, sizes and three samples of their bytes."""
    digest = hashlib.sha256()
    for file in weight_files(model_dir)[0]:
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as f:
            for offset in sorted({0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}):
                f.seek(offset)
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def write_base_record(state_dir: Path, model_dir: str | Path) -> None:
    """Write state/base_model.json: the base's path (absolute, as the run saw it) and identity."""
    record = {"path": str(Path(model_dir).absolute()), "identity": base_identity(model_dir)}
    with atomic_write(state_dir / BASE_FILE, "w", encoding="utf-8") as f:
        json.dump(record, f)


def base_record_problem(checkpoint: Path) -> str | None:
    """None when the checkpoint has no base record (an older tailor's) or a readable one; else what is wrong."""
    path = Path(checkpoint) / STATE / BASE_FILE
    if not path.exists():
        return None
    try:
        record = read_json_object(path)
    except (OSError, ValueError):
        return f"{STATE}/{BASE_FILE} is unreadable"
    if set(record) != {"path", "identity"} or not all(isinstance(v, str) for v in record.values()):
        return f"{STATE}/{BASE_FILE} is not a base model record that tailor writes"
    return None


def check_base_model(checkpoint: Path, model_dir: Path, trained_with: str | None, other_base: bool) -> str | None:
    """Say whether the adapters of `checkpoint` may go on training on `model_dir`.

    Args:
        trained_with: the model.path of the run's config.yaml, for a checkpoint that does not record its base.
        other_base: resume_other_base: accept another model of the same shape.

    Returns:
        Why not (another shape always; another model of the same shape unless `other_base`), or None, having
        printed what could not be checked.
    """
    checkpoint, record_path = Path(checkpoint), Path(checkpoint) / STATE / BASE_FILE
    record = read_json_object(record_path) if record_path.is_file() else None
    trained_on = record["path"] if record else trained_with or "its base model"
    try:
        saved = ModelArgs.from_dict(read_json_object(checkpoint / "params.json"), source="params.json").to_dict()
    except ValueError as error:
        return f"resume: {checkpoint}: {error}"
    current = load_model_args(model_dir).to_dict()
    if differ := [f"{k} {saved.get(k)} vs {current.get(k)}" for k in SHAPE_KEYS if saved.get(k) != current.get(k)]:
        return (
            f"resume: {checkpoint} was trained on {trained_on}, and model.path {model_dir} is a model of another shape "
            f"({', '.join(differ)}): its adapters cannot load there. Set model.path={trained_on} to continue this "
            "run, or choose another run_dir to train on this model afresh"
        )
    if record is None:
        print(
            f"{checkpoint} does not record the identity of its base model (an older tailor saved it): whether "
            f"model.path {model_dir} is the model it was trained on ({trained_on}) cannot be checked",
            flush=True,
        )
        return None
    if record["identity"] == base_identity(model_dir):
        return None
    if other_base:
        print(
            f"{checkpoint} was trained on {trained_on}; it goes on training on another base model of the same shape, "
            f"{model_dir}, as resume_other_base: true asks",
            flush=True,
        )
        return None
    if Path(trained_on) == Path(model_dir).absolute():
        return (
            f"resume: {checkpoint} was trained on the base model in {model_dir}, whose weight files have changed "
            "since (same shape, other bytes): its adapters would go on training on another base. Put the model it "
            "was trained on back, set resume_other_base=true if training on these weights is meant, or choose "
            "another run_dir to start afresh"
        )
    return (
        f"resume: {checkpoint} was trained on the base model {trained_on}, and model.path {model_dir} is another "
        "model of the same shape (its weights differ): its adapters would go on training on another base. Set "
        f"model.path={trained_on} to continue this run, resume_other_base=true if training on {model_dir} is meant, "
        "or choose another run_dir to start afresh"
    )
