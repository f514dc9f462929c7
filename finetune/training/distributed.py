"""The process group: torchrun's environment in, rank and device out. One process without torchrun is rank 0 of 1.

FSDP, torch.distributed.tensor and torch.distributed.checkpoint are imported only where they are used (sharding,
saving, resuming): `is_dtensor` tells a shard without them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """NCCL on GPUs (device cuda:LOCAL_RANK, whatever CUDA_VISIBLE_DEVICES says), gloo on CPU."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ and not is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, timeout=timedelta(minutes=30), device_id=device if device.type == "cuda" else None
        )
    return DistInfo(rank, world_size, local_rank, device)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place and returned; no-op in one process."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End this process with `code`. After an error in a run of several ranks, leave without Python's finalization:
    there c10d's C++ teardown can abort a rank whose process group is already destroyed (SIGABRT, "terminate called
    without an active exception", no Python frame left; seen in about one run in three of the 2-rank disk-full test
    with gloo), after its `error: ...` was printed, so torchrun would report exit -6 instead of the documented code.
    Nothing is lost by skipping it: the output is flushed here, metrics.jsonl at every record, and the run lock is
    released by the kernel."""
    if code != 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def is_dtensor(tensor: object) -> bool:
    """Whether `tensor` is a DTensor (an FSDP2 shard), without importing torch.distributed.tensor: that import takes
    most of a second (it loads sympy), which a run on one device never needs, and until it happened nothing can be
    a DTensor."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)
