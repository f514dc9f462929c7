"""The process group: torchrun's environment in, rank and device out. One process without torchrun is rank 0 of 1.

FSDP, torch.distributed.tensor and torch.distributed.checkpoint are imported only where they are used (sharding,
saving, resuming): model/dtensor.py's `is_dtensor` tells a shard without them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from finetune import exit_codes

SETUP_TIMEOUT = timedelta(minutes=5)  # the ranks meeting and passing a first barrier
COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # every collective after that: a slow save or eval on one rank


@dataclass
class DistInfo:
    """This process's place in the run: its rank of world_size, its rank on the node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, prints and writes the run's files."""
        return self.rank == 0


class ProcessGroupError(RuntimeError):
    """The ranks did not all meet: one did not start, or cannot reach the others.

    The message says how long it waited and what PyTorch said.
    """

    exit_code = exit_codes.NO_PROCESS_GROUP


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun), known before the process group exists."""
    return int(os.environ.get("RANK", 0))


def launch_world_size() -> int:
    """The number of ranks as torchrun set it (1 without torchrun), known before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", 1))


def init_distributed() -> DistInfo:
    """Join torchrun's process group, if any, and pick this rank's device.

    NCCL on GPUs (device cuda:LOCAL_RANK, whatever CUDA_VISIBLE_DEVICES says), gloo on CPU. The ranks get
    SETUP_TIMEOUT to meet and pass a first barrier, then COLLECTIVE_TIMEOUT for every collective after it: a rank that
    never comes up (an elastic restart that hangs in PyTorch's setup, a node that is down) ends the others in
    minutes, not in the half hour a slow save or eval on one rank may need later.

    Raises:
        ProcessGroupError: the ranks did not all meet within SETUP_TIMEOUT.
    """
    rank, world_size = launch_rank(), launch_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ and not is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)  # PyTorch's, since 2.3
        setup = SETUP_TIMEOUT if set_timeout else COLLECTIVE_TIMEOUT
        try:
            dist.init_process_group(backend, timeout=setup, device_id=device if device.type == "cuda" else None)
            if set_timeout:
                dist.barrier()
        except (RuntimeError, dist.DistError) as error:
            reason = (str(error).strip() or type(error).__name__).splitlines()[0]
            raise ProcessGroupError(
                f"rank {rank}: the {world_size} ranks did not all meet within {setup.total_seconds():.0f} s "
                f"({reason}); a rank that did not start, or a host that cannot reach "
                f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}. Nothing was trained: "
                "run the same command again (resume: auto continues from the newest checkpoint)"
            ) from None
        if set_timeout:
            set_timeout(COLLECTIVE_TIMEOUT)
    return DistInfo(rank, world_size, local_rank, device)


def is_initialized() -> bool:
    """Whether a process group is open: several ranks under torchrun."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place and returned; no-op in one process."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_to_main(obj: object) -> list | None:
    """Every rank's `obj` in rank order on rank 0, None on the other ranks; `[obj]` in one process."""
    if not is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def barrier() -> None:
    """Wait for every rank; a no-op in one process."""
    if is_initialized():
        dist.barrier()


def destroy() -> None:
    """Close the process group, if one is open; safe to call twice."""
    if is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End this process with `code`; after an error in a run of several ranks, without Python's finalization.

    There c10d's C++ teardown can abort a rank whose process group is already destroyed (SIGABRT, "terminate called
    without an active exception", no Python frame left; seen in about one run in three of the 2-rank disk-full test
    with gloo), after its `error: ...` was printed, so torchrun would report exit -6 instead of the documented code.
    Nothing is lost by skipping it: the output is flushed here, metrics.jsonl at every record, and the run lock is
    released by the kernel.
    """
    if code != 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
