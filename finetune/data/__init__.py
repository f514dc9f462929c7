"""The data path: JSONL files -> checked samples -> tokens and loss weights -> cached -> packed batches.

Nothing here imports from `model/`: data knows the tokenizer, never the network.

The loader's names are imported when first asked for: packing makes torch tensors, and importing torch is over a
second that `tailor validate` and the tokenizer's worker processes, which import this package, never need.
"""

import importlib

from finetune.data.errors import DataError, DataFaults, SampleFault
from finetune.data.model_tokenizer import check_tokenizer_vocab, load_tokenizer
from finetune.data.tokenize import TokenizedSample, tokenize_sample

_IMPORTED_ON_USE = {
    "Batch": "finetune.data.packing",
    "TrainLoader": "finetune.data.loader",
    "build_eval_batches": "finetune.data.loader",
    "build_train_loader": "finetune.data.loader",
}


def __getattr__(name: str):
    """The loader's names (PEP 562: called only for a name not defined above)."""
    if name in _IMPORTED_ON_USE:
        return getattr(importlib.import_module(_IMPORTED_ON_USE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Batch",
    "DataError",
    "DataFaults",
    "SampleFault",
    "TokenizedSample",
    "TrainLoader",
    "build_eval_batches",
    "build_train_loader",
    "check_tokenizer_vocab",
    "load_tokenizer",
    "tokenize_sample",
]
