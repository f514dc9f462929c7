"""Memory measured on a CPU: the peak of the bytes held at once by the tensors made inside a block.

CUDA has `torch.cuda.max_memory_allocated`; a CPU has no allocator statistics per tensor, and the process's resident
memory moves with the allocator's caching. train_throughput.py measures a step's and the loss's memory on a CPU with
this probe, and the loss's memory test (tests/train/test_loss.py) uses it too.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakLiveBytes(TorchDispatchMode):
    """`with PeakLiveBytes() as probe: ...`: the peak of the bytes held at once by tensors created inside the block
    (forward and backward), on any device, so memory can be measured on a CPU too (tests, benchmarks). Tensors made
    before it, like the inputs, are not counted. Storages are tracked by weak references, so a tensor counts for
    exactly as long as something (a variable, the autograd graph) keeps it alive."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = weakref.finalize(storage, self._free, key, storage.nbytes())
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
        return out

    def _free(self, key, nbytes):
        del self.live[key]
        self.now -= nbytes
