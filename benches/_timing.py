"""Timing helper shared by the Python benchmarks."""

import gc
import time


def best_of(fn, repeat, collect=True):
    """The fastest of `repeat` calls of fn(), in seconds, each after a garbage collection (with
    `collect=False`, none: with a large heap alive, as a transformers model makes, a collection
    costs more than the small calls timed; the caller turns the collector off instead)."""
    best = float("inf")
    for _ in range(repeat):
        if collect:
            gc.collect()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
