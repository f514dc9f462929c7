"""Python's cyclic garbage collector, paused where the data path makes objects by the hundred thousand.

The word memo makes a list per word, a hundred thousand at once, and a build or `tailor validate` keeps them to its
end: the collector would run once per 700 new objects, and over every older one too as they pile up, for lists of
ints that form no cycle. It more than doubled the time of a build's batched encode and made reading a memo file's
lists several times slower. This module imports nothing heavy, so that `tailor validate` can pause the collector
before the data path's own imports.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def cycle_collector_paused() -> Iterator[None]:
    """The collector off inside, and back as the caller had it after, whatever is raised."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()
