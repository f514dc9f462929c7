"""A Tekken tokenizer file loaded as `MistralTokenizer.from_file` loads it, less the list of its tokens as strings.

mistral-common's Tekkenizer decodes every token of its vocabulary to a string when it loads (its `vocab()`, one
Python call per token), about half of the load of a 131k-token file, for a list that nothing on the data path
reads. The Tekkenizer here makes that list on first use instead, the same list. The rest
is mistral-common's own parts, put together as its `from_file` does: the validator and request normaliser of the
file's version, the image and audio encoders its config asks for, and the instruct tokenizer of that version. A
version without a row in INSTRUCT_TOKENIZERS (one newer than this table) is loaded by `from_file` itself.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from mistral_common.protocol.instruct.normalize import get_normalizer
from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
from mistral_common.tokens.tokenizers.base import TokenizerVersion
from mistral_common.tokens.tokenizers.instruct import (
    InstructTokenizerV3,
    InstructTokenizerV7,
    InstructTokenizerV11,
    InstructTokenizerV13,
    InstructTokenizerV15,
)
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer, load_audio_encoder, load_image_encoder
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

# The instruct tokenizer MistralTokenizer.from_file (mistral-common 1.13) pairs with each Tekken version; v1 and v2
# are SentencePiece only. From v7 on they take an audio encoder.
INSTRUCT_TOKENIZERS = {
    TokenizerVersion.v3: InstructTokenizerV3,
    TokenizerVersion.v7: InstructTokenizerV7,
    TokenizerVersion.v11: InstructTokenizerV11,
    TokenizerVersion.v13: InstructTokenizerV13,
    TokenizerVersion.v15: InstructTokenizerV15,
}


class TekkenizerVocabOnUse(Tekkenizer):
    """mistral-common's Tekkenizer, whose list of token strings (`vocab()`) is made when first asked for."""

    def __init__(self, *args, **kwargs):
        self._loading = True  # Tekkenizer.__init__ fills its list through id_to_piece: placeholders, dropped below
        super().__init__(*args, **kwargs)
        self._loading = False
        vars(self).pop("_vocab", None)  # the placeholders; the cached property below makes the real list

    @cached_property
    def _vocab(self) -> list[str]:
        return [Tekkenizer.id_to_piece(self, i) for i in range(self.n_words)]

    def id_to_piece(self, token_id: int) -> str:
        """The token's string; an empty placeholder while Tekkenizer.__init__ fills its list."""
        return "" if self._loading else super().id_to_piece(token_id)


def load_tekken(path: str | Path, mode: ValidationMode) -> MistralTokenizer:
    """MistralTokenizer.from_file(path, mode) for a Tekken file, with a TekkenizerVocabOnUse inside."""
    tokenizer = TekkenizerVocabOnUse.from_file(path)
    instruct_tokenizer = INSTRUCT_TOKENIZERS.get(tokenizer.version)
    if instruct_tokenizer is None or (tokenizer.audio is not None and instruct_tokenizer is InstructTokenizerV3):
        return MistralTokenizer.from_file(str(path), mode=mode)  # a version this table does not know, or a refusal
    image, audio = tokenizer.image, tokenizer.audio
    encoders = {"image_encoder": None if image is None else load_image_encoder(image, tokenizer)}
    if instruct_tokenizer is not InstructTokenizerV3:
        encoders["audio_encoder"] = None if audio is None else load_audio_encoder(audio, tokenizer)
    return MistralTokenizer(
        instruct_tokenizer(tokenizer, **encoders),
        validator=get_validator(tokenizer.version, mode=mode),
        request_normalizer=get_normalizer(tokenizer.version, tokenizer.model_settings_builder),
    )
