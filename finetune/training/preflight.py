"""Checks that find a user's mistakes before any heavy work starts (loading weights, tokenizing, training).

Each failure is a PreflightError whose message names the config key, the path and what to do.

`tailor validate` shares the model folder's check, in a process that never loads torch (over a second of its
start-up): the checks that build a meta model, and the run folder's check, whose file names live in modules of the
loop, import what they need when they run.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from finetune import exit_codes
from finetune.config import TrainConfig
from finetune.data import check_tokenizer_vocab, load_tokenizer
from finetune.data.config import DataSource, resolve_cache_dir
from finetune.data.errors import DataError
from finetune.data.sources import check_holds_none_of, source_files
from model.args import ModelArgs, args_from_config, num_parameters, read_model_config, vocab_size_in

if TYPE_CHECKING:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

# Bytes per LoRA parameter in a checkpoint: fp32 in lora.safetensors, again in state/ for resume, and AdamW's two
# fp32 moments.
CHECKPOINT_BYTES_PER_LORA_PARAMETER = 4 + 4 + 8
GIB = 2**30
# configs/demo.yaml's model: `tailor demo` makes it on first use, so on a fresh clone it is not there yet
DEMO_MODEL = Path("artifacts/tiny-mistral")
DEMO_RUN_DIR = Path("runs/demo")  # configs/demo.yaml's, which `tailor demo` trains


class PreflightError(ValueError):
    """Something in the config points at what is not there or does not fit; the message says what and where."""

    exit_code = exit_codes.USAGE


def run_preflight_checks(cfg: TrainConfig) -> tuple[MistralTokenizer, ModelArgs]:
    """Run every check, cheapest first.

    Returns:
        The model folder's tokenizer and its params.json (or config.json) as ModelArgs, which checking them has read
        anyway, for the run to use rather than read again.

    Raises:
        PreflightError: the first fault, naming the config key, the path and what to do.
    """
    model_dir = Path(cfg.model.path)
    check_model_folder(model_dir, Path(cfg.run_dir))
    written = {"run_dir": Path(cfg.run_dir), "data.cache_dir": resolve_cache_dir(cfg.data, cfg.run_dir)}
    check_data_paths("data.train", cfg.data.train, written)
    if cfg.eval.enabled:
        check_data_paths("data.eval", cfg.data.eval, written)
        check_data_paths("data.retain", cfg.data.retain, written)
    tokenizer = check_tokenizer(model_dir)
    try:
        described, values = read_model_config(model_dir)  # params.json or config.json, read once for the run
        check_tokenizer_vocab(tokenizer, vocab_size_in(described, values), model_dir)
        args = args_from_config(described, values)
    except ValueError as error:
        raise PreflightError(f"model.path: {error}") from None
    check_seq_len(cfg.seq_len, described, values)
    check_model_weights(cfg, args, described)
    check_run_dir(Path(cfg.run_dir))
    check_cache_dir(resolve_cache_dir(cfg.data, cfg.run_dir))
    check_disk_space(cfg, args)
    return tokenizer, args


def check_model_folder(folder: Path, run_dir: Path) -> None:
    """Check that model.path is a folder with params.json or config.json (the demo's model says how to make it).

    Args:
        run_dir: the config's; the demo's own (runs/demo, which `tailor demo` fills) needs another for a second run.

    Raises:
        PreflightError: naming model.path and what is missing.
    """
    if folder == DEMO_MODEL and not folder.exists():
        again = (
            "then this command with another run_dir (e.g. run_dir=runs/demo2) trains again"
            if run_dir == DEMO_RUN_DIR
            else "then this command again"
        )
        raise PreflightError(
            f"model.path: {folder} does not exist yet: it is the demo's tiny model, made by `python -m finetune demo` "
            f"(which trains runs/demo too); run that once first, {again}"
        )
    if not folder.is_dir():
        raise PreflightError(
            f"model.path: {folder} is not a folder (expected params.json and consolidated.safetensors, "
            "or a Hugging Face folder with config.json)"
        )
    if not (folder / "params.json").is_file() and not (folder / "config.json").is_file():
        raise PreflightError(f"model.path: {folder} has neither params.json nor config.json")


def check_data_paths(key: str, sources: list[DataSource], written: dict[str, Path]) -> None:
    """Check that each source is a .jsonl file or a folder of them, holding none of the folders a run writes.

    A source folder holding run_dir or data.cache_dir would read their .jsonl files back as data.

    Args:
        key: the config key of `sources` (data.train, data.eval, data.retain), which errors name.
        written: the folders the run writes, by config key.

    Raises:
        PreflightError: naming `key[i]` and the path.
    """
    for i, source in enumerate(sources):
        try:
            check_holds_none_of(source, written)
            source_files(source)
        except DataError as error:
            raise PreflightError(f"{key}[{i}]: {error}") from None


def check_tokenizer(model_dir: Path) -> MistralTokenizer:
    """Load the folder's one mistral-common tokenizer.

    Raises:
        PreflightError: no tokenizer file, several, or one mistral-common cannot read.
    """
    try:
        return load_tokenizer(model_dir)
    except (FileNotFoundError, ValueError) as error:
        raise PreflightError(f"model.path: {error}") from None


def check_model_weights(cfg: TrainConfig, args: ModelArgs, described: Path) -> None:
    """Check that the folder holds every weight of the described model, once, with its shape, and nothing else.

    Read from the files' headers only, so a truncated or damaged file, a missing tensor or a mismatched shape stops
    the run before any weight is loaded.

    Args:
        args: the model as params.json (or config.json) describes it.
        described: the file that describes it, which errors name.

    Raises:
        PreflightError: naming the weight file and tensor: unreadable, not a float, unknown, of another shape, or
            missing.
    """
    import torch

    from model.loading import build_meta_model
    from model.lora import is_lora_name
    from model.weights import weight_specs_by_file

    model_dir = Path(cfg.model.path)
    try:
        stored = weight_specs_by_file(model_dir)
    except (FileNotFoundError, ValueError) as error:
        raise PreflightError(f"model.path: {error}") from None
    model = build_meta_model(args, torch.float32, cfg.model.attention, cfg.lora)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters() if not is_lora_name(name)}
    for name, (file, spec) in stored.items():
        if not spec.dtype.is_floating_point:
            raise PreflightError(
                f"model.path: {file}: tensor {name!r} is {str(spec.dtype).removeprefix('torch.')}, where the model "
                "has a float weight; integer (quantized) weights are not trained as floats: use the float model"
            )
        if name not in expected:
            raise PreflightError(
                f"model.path: {file}: tensor {name!r} is not a weight of the model that {described} describes"
            )
        if spec.shape != expected[name]:
            raise PreflightError(
                f"model.path: {file}: tensor {name!r} has shape {spec.shape}, but {described} describes "
                f"{expected[name]}; are the weights and {described.name} from the same model?"
            )
    if missing := [name for name in expected if name not in stored]:
        shown = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise PreflightError(
            f"model.path: {model_dir}: the weight files hold no tensor for {len(missing)} of the model's weights "
            f"({shown}); is a shard missing?"
        )


def check_seq_len(seq_len: int, path: Path, values: dict) -> None:
    """Check that seq_len is within the length the model declares as its limit.

    seq_len may pass a sliding window (Mistral attends within it), never the declared limit: positions beyond it
    were never trained.

    Args:
        path: the model's params.json or config.json.
        values: what `path` holds.

    Raises:
        PreflightError: seq_len is longer than the declared limit.
    """
    key = "max_seq_len" if path.name == "params.json" else "max_position_embeddings"
    declared = values.get("text_config", values)  # multimodal Hugging Face configs nest the text model
    limit = declared.get(key) if isinstance(declared, dict) else None
    if isinstance(limit, int) and seq_len > limit:
        raise PreflightError(
            f"seq_len {seq_len} is longer than the {key} {limit} that {path} declares; set seq_len to {limit} or less"
        )


def check_run_dir(run_dir: Path) -> None:
    """Check that run_dir, and checkpoints/ in it, are folders this process can write; create run_dir if need be.

    What tailor writes there as a file (config.yaml, metrics.jsonl, the lock) must not be a folder or a FIFO.

    Raises:
        PreflightError: naming run_dir and the path at fault.
    """
    from finetune.training.config_record import CONFIG_FILE
    from finetune.training.monitoring import METRICS_FILE
    from finetune.training.run_lock import LOCK_FILE

    if run_dir.exists() and not run_dir.is_dir():
        raise PreflightError(f"run_dir: {run_dir} is a file, not a folder; choose another run_dir")
    check_writable("run_dir", run_dir)
    for name in (CONFIG_FILE, METRICS_FILE, LOCK_FILE):
        if (run_dir / name).is_dir():
            raise PreflightError(
                f"run_dir: {run_dir / name} is a folder, where tailor writes its {name} file; move it away"
            )
        if (run_dir / name).exists() and not (run_dir / name).is_file():  # a FIFO would block its reader for ever
            raise PreflightError(
                f"run_dir: {run_dir / name} is not a regular file (a FIFO, a socket or a device), where tailor "
                f"writes its {name} file; move it away"
            )
    checkpoints = run_dir / "checkpoints"
    if checkpoints.exists() and not checkpoints.is_dir():
        raise PreflightError(
            f"run_dir: {checkpoints} is a file, where tailor keeps the checkpoint folders; move it away"
        )
    if checkpoints.is_dir():
        check_writable("run_dir", checkpoints)


def check_cache_dir(cache_dir: Path) -> None:
    """Check that data.cache_dir is a folder this process can write; create it if need be.

    Raises:
        PreflightError: naming data.cache_dir.
    """
    if cache_dir.exists() and not cache_dir.is_dir():
        raise PreflightError(f"data.cache_dir: {cache_dir} is a file, not a folder; choose another data.cache_dir")
    check_writable("data.cache_dir", cache_dir)


def missing_folders(folder: Path) -> list[Path]:
    """The folders of `folder`'s path that do not exist yet, deepest first.

    Those are what a run creates (the run_dir, and the folders above it), which remove_unused_folders removes again
    if the run is refused.
    """
    missing, folder = [], folder.absolute()
    while not folder.exists() and not folder.is_symlink():
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_unused_folders(created: list[Path]) -> None:
    """Remove the folders a refused run created (missing_folders), deepest first.

    A folder goes only while it holds nothing but the run's lock file and status: one holding anything else is kept,
    and so are those above it.
    """
    from finetune.training.run_lock import LOCK_FILE
    from finetune.training.run_status import STATUS_FILE

    for folder in created:
        try:
            if any(entry.name not in (LOCK_FILE, STATUS_FILE) for entry in folder.iterdir()):
                return
            for bookkeeping in (LOCK_FILE, STATUS_FILE):
                (folder / bookkeeping).unlink(missing_ok=True)
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return


def check_writable(key: str, folder: Path) -> None:
    """Create `folder` if need be, and a file in it.

    That is the one test that holds everywhere: os.access answers yes to root, and on a read-only mount or a full
    disk only a write tells.

    Args:
        key: the config key of `folder`, which the error names.

    Raises:
        PreflightError: the folder or the file cannot be created.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise PreflightError(
            f"{key}: {folder} cannot be written ({error.strerror or error}); choose another {key}, or make it writable"
        ) from None


def checkpoint_bytes(cfg: TrainConfig, args: ModelArgs) -> int:
    """About how large one checkpoint is, in bytes.

    The LoRA parameters counted on a meta model (no memory), times the bytes each takes
    (CHECKPOINT_BYTES_PER_LORA_PARAMETER), plus the merged model when that is what is saved.
    """
    import torch

    from finetune.training.precision import compute_dtype
    from model.loading import build_meta_model
    from model.lora import is_lora_name

    dtype = compute_dtype(cfg.model.dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_meta_model(args, dtype, cfg.model.attention, cfg.lora)
    lora_parameters = sum(p.numel() for name, p in model.named_parameters() if is_lora_name(name))
    size = lora_parameters * CHECKPOINT_BYTES_PER_LORA_PARAMETER
    if not cfg.checkpoint.save_adapters:
        size += num_parameters(args) * dtype.itemsize
    return size


def check_disk_space(cfg: TrainConfig, args: ModelArgs) -> None:
    """Check that run_dir's disk has room for the checkpoints the run will keep.

    That is `checkpoint.keep` checkpoints and the one being written beside them (a preempted run saves one even with
    checkpoints off), less what the run's checkpoints already take.

    Raises:
        PreflightError: naming run_dir, the space free and the space needed.
    """
    run_dir = Path(cfg.run_dir)
    per_checkpoint = checkpoint_bytes(cfg, args)
    count = cfg.checkpoint.keep + 1 if cfg.checkpoint.enabled else 1
    existing = run_dir / "checkpoints"
    used = sum(p.stat().st_size for p in existing.rglob("*") if p.is_file()) if existing.is_dir() else 0
    needed = count * per_checkpoint - used
    free = shutil.disk_usage(_nearest_existing(run_dir)).free
    if needed > free:
        which = (
            f"checkpoint.keep {cfg.checkpoint.keep} and the one being written"
            if cfg.checkpoint.enabled
            else "the one a preempted run writes"
        )
        raise PreflightError(
            f"run_dir: {run_dir} has {free / GIB:.1f} GiB free, but its checkpoints need about {needed / GIB:.1f} "
            f"GiB more ({count} of about {per_checkpoint / GIB:.2f} GiB each: {which}); free some space, lower "
            "checkpoint.keep or lora.rank, or choose another run_dir"
        )


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path
