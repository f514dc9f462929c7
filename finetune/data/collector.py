"""Python's cyclic garbage collector, paused where the data path makes objects by the hundred thousand.

A build parses every line into dicts and lists, which the collector tracks: it runs once per 700 new ones, and over
every older one too as they pile up, for objects that form no cycle (benchmarks/RESULTS.md has what pausing saves).
This module imports nothing heavy, so that `tailor validate` can pause the collector before the data path's own
imports.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def cycle_collector_paused() -> Iterator[None]:
    """Turn the collector off inside the block, and back as the caller had it after, whatever is raised."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()
