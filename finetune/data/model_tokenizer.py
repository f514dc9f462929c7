"""The model folder's tokenizer: which file it is, loading it with mistral-common, and checking it against the
model's vocabulary. Torch-free: `tailor validate`, training's preflight, the exports and chat all find it here."""

from __future__ import annotations

from pathlib import Path

from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import is_tekken

from finetune.data.errors import first_line
from finetune.data.tekken_loading import load_tekken

# mistral-common's own file names, newest first; a plain `tokenizer.model` (a Hugging Face copy) is the fallback.
TOKENIZER_PATTERNS = ("tekken*.json", "tokenizer.model.v*", "*.model.v*")


def find_tokenizer_file(model_dir: str | Path) -> Path:
    """The model folder's one tokenizer file: mistral-common's (newest name first), else a plain tokenizer.model.

    Raises:
        FileNotFoundError: no such folder, or no tokenizer file in it.
        ValueError: several tokenizer files, naming them.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder not found: {model_dir}")
    found = sorted({p for pattern in TOKENIZER_PATTERNS for p in model_dir.glob(pattern) if p.is_file()})
    if not found and (model_dir / "tokenizer.model").is_file():
        found = [model_dir / "tokenizer.model"]
    if len(found) == 1:
        return found[0]
    if not found:
        looked_for = ", ".join((*TOKENIZER_PATTERNS, "tokenizer.model"))
        raise FileNotFoundError(f"no mistral-common tokenizer in {model_dir}: looked for {looked_for}")
    names = ", ".join(p.name for p in found)
    raise ValueError(f"{model_dir} holds several tokenizer files ({names}); keep the one the model was trained with")


def load_tokenizer(model_dir: str | Path) -> MistralTokenizer:
    """The mistral-common tokenizer of a model folder (tekken.json, tokenizer.model.v1/v3/v7, ...).

    Raises:
        FileNotFoundError: no such folder, or no tokenizer file in it (find_tokenizer_file).
        ValueError: several tokenizer files, or one mistral-common cannot read (truncated, or not a tokenizer),
            naming it.
    """
    path = find_tokenizer_file(model_dir)
    try:
        if is_tekken(path):
            return load_tekken(path, ValidationMode.finetuning)
        return MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning)
    except Exception as e:  # noqa: BLE001 - whatever a parser of outside bytes raises, the file is at fault
        raise ValueError(f"{path}: not a tokenizer file mistral-common can read ({first_line(e)})") from None


def check_tokenizer_vocab(tokenizer: MistralTokenizer, vocab_size: int, model_dir: str | Path) -> None:
    """Check that the tokenizer makes exactly the ids the model's embedding has rows for.

    Args:
        vocab_size: the model's, from its params.json or config.json.
        model_dir: the model folder, which the error names.

    Raises:
        ValueError: the tokenizer's vocabulary is of another size.
    """
    n_words = tokenizer.instruct_tokenizer.tokenizer.n_words
    if n_words != vocab_size:
        tokenizer_file = tokenizer.instruct_tokenizer.tokenizer.file_path.name
        raise ValueError(
            f"{Path(model_dir)}: the tokenizer {tokenizer_file} has {n_words} tokens but the model's "
            f"params.json/config.json says vocab_size {vocab_size}; use the tokenizer file that came "
            "with these weights"
        )
