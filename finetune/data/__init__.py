"""The data path: JSONL files -> checked samples -> tokens and loss weights -> cached -> packed batches.

Nothing here imports from `model/`: data knows the tokenizer, never the network.
"""

from finetune.data.errors import DataError, SampleFault
from finetune.data.loader import TrainLoader, build_eval_batches, build_train_loader
from finetune.data.packing import Batch
from finetune.data.tokenize import (
    TokenizedSample,
    check_tokenizer_vocab,
    load_tokenizer,
    read_vocab_size,
    tokenize_sample,
)

__all__ = [
    "Batch",
    "DataError",
    "SampleFault",
    "TokenizedSample",
    "TrainLoader",
    "build_eval_batches",
    "build_train_loader",
    "check_tokenizer_vocab",
    "load_tokenizer",
    "read_vocab_size",
    "tokenize_sample",
]
