"""Telling an FSDP2 shard (a DTensor) from a plain tensor without importing torch.distributed.tensor."""

from __future__ import annotations

import sys


def is_dtensor(tensor: object) -> bool:
    """Whether `tensor` is a DTensor (an FSDP2 shard).

    Answered without importing torch.distributed.tensor: that import takes most of a second (it loads sympy), which a
    run on one device never needs, and until it happened nothing can be a DTensor.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)
