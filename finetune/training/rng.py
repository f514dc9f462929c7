"""The random generators a run draws from (torch, CUDA, numpy, Python): saved with a checkpoint as JSON, restored on
resume, or seeded anew from (seed, step) when a run resumes on another number of ranks."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from finetune.training.train_state import ResumePoint


def rng_state(device: torch.device) -> dict:
    """This process's random generators (torch, CUDA, numpy, Python) as JSON-able lists."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [kind, keys.tolist(), position, has_gauss, cached_gauss],
        "python": [version, list(internal), gauss_next],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore this process's random generators from rng_state's lists (CUDA's only on a GPU, where saved).

    A `state` that is not rng_state's raises whatever torch, numpy or Python raise for it: rng_state_problem checks
    one without raising.
    """
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)


def rng_state_problem(state: dict) -> str | None:
    """None when `state` (from rng_state) can be restored; else why not.

    Tried on throwaway generators, so the process's own are untouched.
    """
    try:
        torch.Generator().set_state(torch.tensor(state["torch"], dtype=torch.uint8))
        kind, keys, position, has_gauss, cached_gauss = state["numpy"]
        np.random.RandomState().set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gauss))
        version, internal, gauss_next = state["python"]
        random.Random().setstate((version, tuple(internal), gauss_next))
    except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def seed_rngs(seed: int) -> None:
    """Seed every random generator of this process (torch, CUDA, numpy, Python) from `seed`."""
    torch.manual_seed(seed)  # CUDA's generators too
    np.random.seed(seed % 2**32)
    random.seed(seed)


def derived_seed(*numbers: int) -> int:
    """A seed drawn from several numbers (e.g. seed, step, rank) by numpy's SeedSequence: unrelated for each tuple."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(1)[0])


def train_data_seed(seed: int, start: ResumePoint | None, world_size: int) -> int:
    """The data loader's seed: the config's, unless the run resumes on another number of ranks.

    There the saved data position has no counterpart (finetune/training/checkpointing.py), so the data starts a new
    order, seeded by (seed, step).
    """
    if start is None or start.world_size == world_size:
        return seed
    return derived_seed(seed, start.step)
