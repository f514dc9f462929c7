"""`model.path` as a Hugging Face hub id (`mistralai/Mistral-7B-Instruct-v0.3`): the model's folder in the hub's cache.

A folder of that name here wins. Otherwise huggingface_hub (the `hub` extra, imported only here) downloads into its
own cache (HF_HUB_CACHE, or HF_HOME/hub) only the files tailor reads: the native consolidated weights, params.json
and the tokenizer file when the repository has them, else config.json, the safetensors and the tokenizer file. The
token is HF_TOKEN from the environment, nothing else, and is never written; HF_HUB_OFFLINE=1 uses the cache alone.
Resolved once, before the preflight checks: the run's config and its record name the folder, and keep the id in
`model.hub_id`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
from pathlib import Path

from finetune.config import TrainConfig
from finetune.data.errors import first_line
from finetune.data.model_tokenizer import TOKENIZER_PATTERNS
from finetune.training.preflight import DEMO_MODEL, PreflightError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name, as the hub spells repositories
NATIVE_FILES = ("params.json", "consolidated*.safetensors")
HF_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = (*TOKENIZER_PATTERNS, "tokenizer.model")


def is_hub_id(path: str) -> bool:
    """Whether model.path names a hub repository rather than a folder here.

    That is owner/name, with no file or folder of that name here, no local folder `owner` (`models/x` in a folder of
    models is a missing folder, not a repository), and not the demo's model, which `tailor demo` makes there.
    `./models/x` is always a folder.
    """
    owner = Path(path).parts[0] if path else ""
    return (
        bool(HUB_ID.fullmatch(path))
        and not Path(path).exists()
        and not Path(owner).is_dir()
        and Path(path) != DEMO_MODEL
    )


def resolve_hub_model(cfg: TrainConfig) -> TrainConfig:
    """Resolve model.path as a hub id to its folder in the hub's cache, downloading it if need be.

    Returns:
        cfg with model.path that folder and model.hub_id the id; cfg itself when model.path is not a hub id.

    Raises:
        PreflightError: naming model.path: huggingface_hub is missing, or the download failed (download_model).
    """
    if not is_hub_id(cfg.model.path):
        return cfg
    folder = download_model(cfg.model.path)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(folder), hub_id=cfg.model.path))


def files_to_download(repo_files: list[str]) -> list[str]:
    """The patterns of the files tailor reads from a repository holding `repo_files`: native when it can."""

    def has(pattern: str) -> bool:
        return any(fnmatch.fnmatch(name, pattern) for name in repo_files)

    native = has("params.json") and any(has(p) for p in NATIVE_FILES[1:])
    weights = NATIVE_FILES if native else HF_FILES
    tokenizers = [p for p in TOKENIZER_PATTERNS if has(p)] or ["tokenizer.model"]
    return [*weights, *tokenizers]


def download_model(repo_id: str) -> Path:
    """The repository's snapshot folder in the hub's cache, with the files tailor reads downloaded.

    Raises:
        PreflightError: naming model.path and what to do: huggingface_hub is missing, the repository is gated,
            private or absent, not cached while the hub cannot be reached, or the cache cannot be written.
    """
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError:
        raise PreflightError(
            f"model.path: {repo_id} is not a folder here, and reading it as a Hugging Face hub id needs "
            'huggingface_hub: pip install "tailor[hub]" (or pip install huggingface_hub)'
        ) from None
    token = os.environ.get("HF_TOKEN") or False  # the environment's token only, never a stored login
    where = f"model.path: {repo_id} (a Hugging Face hub id; no folder of that name here)"
    unreachable = "HF_HUB_OFFLINE is set"
    try:
        if not constants.HF_HUB_OFFLINE:
            try:
                files = huggingface_hub.list_repo_files(repo_id, token=token)
            except errors.HfHubHTTPError:
                raise
            except Exception as error:  # noqa: BLE001 - no network: the client raises its HTTP library's own errors
                unreachable = f"the hub cannot be reached: {first_line(error)}"
            else:
                patterns = files_to_download(files)
                return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, token=token))
        return Path(huggingface_hub.snapshot_download(repo_id, local_files_only=True))
    except errors.GatedRepoError:
        raise PreflightError(
            f"{where}: the repository is gated; accept its conditions at https://huggingface.co/{repo_id} with your "
            "account, then set HF_TOKEN to a token of that account"
        ) from None
    except errors.RepositoryNotFoundError:
        raise PreflightError(
            f"{where}: the hub has no such repository, or it is private (then set HF_TOKEN to a token that can read "
            "it); check the spelling, or point model.path at a model folder"
        ) from None
    except errors.LocalEntryNotFoundError:
        raise PreflightError(
            f"{where}: not in the hub's cache ({constants.HF_HUB_CACHE}), and {unreachable}; download it once with "
            "a network, or point model.path at a model folder"
        ) from None
    except errors.HfHubHTTPError as error:
        raise PreflightError(f"{where}: the hub answered {first_line(error)}") from None
    except OSError as error:  # a full disk, an unwritable cache
        raise PreflightError(f"{where}: {error.strerror or error}") from None
