"""Side-by-side timing for the ours-vs-torch benchmarks: interleaved runs, wall and CPU seconds.

On a shared CPU, load from other processes changes from minute to minute; running the
contenders in turn puts it on both alike. Process CPU seconds (all threads) are
reported too: they are much less sensitive to that load than wall time, and show how
many cores each side keeps busy (CPU / wall).
"""

from __future__ import annotations

import os
import statistics
import time


def interleaved(fns: dict, runs: int, warmup: int) -> dict:
    """{name: (median wall s, median CPU s, [wall s of each run])}; the functions run in turn, `runs` times each."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    walls, cpus = ({name: [] for name in fns} for _ in range(2))
    for _ in range(runs):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            cpus[name].append(time.process_time() - cpu)
            walls[name].append(time.perf_counter() - wall)
    return {name: (statistics.median(walls[name]), statistics.median(cpus[name]), walls[name]) for name in fns}


def report(results: dict, ours: str, theirs: str, unit: float = 1.0, label: str = "s") -> None:
    """Prints each side's medians and the ratios ours / theirs of wall and CPU time."""
    for name, (wall, cpu, runs) in results.items():
        print(f"  {name:40s} median wall {wall * unit:9.2f} {label}   CPU {cpu * unit:9.2f} {label}   "
              f"runs {', '.join(f'{t * unit:.2f}' for t in runs)}")  # fmt: skip
    (ours_wall, ours_cpu, _), (theirs_wall, theirs_cpu, _) = results[ours], results[theirs]
    print(f"  ratio ours / theirs: wall {ours_wall / theirs_wall:.2f}, CPU {ours_cpu / theirs_cpu:.2f}   "
          f"(1-min load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")  # fmt: skip
