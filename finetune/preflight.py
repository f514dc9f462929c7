"""Checks that find a user's mistakes before any heavy work starts (loading weights, tokenizing)."""

from __future__ import annotations

from pathlib import Path

from finetune.config import DataSource, TrainConfig


class PreflightError(ValueError):
    """Something in the config points at what is not there; the message says what and where."""


def run_preflight_checks(cfg: TrainConfig) -> None:
    check_model_folder(Path(cfg.model.path))
    check_data_paths("data.train", cfg.data.train)
    if cfg.eval.enabled:
        check_data_paths("data.eval", cfg.data.eval)


def check_model_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise PreflightError(f"model.path: {folder} is not a folder (expected params.json and consolidated.safetensors, "
                             "or a Hugging Face folder with config.json)")
    if not (folder / "params.json").is_file() and not (folder / "config.json").is_file():
        raise PreflightError(f"model.path: {folder} has neither params.json nor config.json")


def check_data_paths(key: str, sources: list[DataSource]) -> None:
    for i, source in enumerate(sources):
        path = Path(source.path)
        if not path.exists():
            raise PreflightError(f"{key}[{i}]: {path} does not exist")
        if path.is_dir() and not any(path.rglob("*.jsonl")):
            raise PreflightError(f"{key}[{i}]: the folder {path} holds no .jsonl file")
