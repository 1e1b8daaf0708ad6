"""Timing helper shared by the Python benchmarks."""

import gc
import time


def best_of(fn, repeat):
    """The fastest of `repeat` calls of fn(), in seconds, each after a garbage collection."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
