"""Peak memory of the current process, shared by the benchmark scripts."""

from __future__ import annotations

import resource


def own_peak_rss_mb() -> float:
    """This process's peak RSS. ``ru_maxrss`` of a child started by fork/exec also counts the
    parent's resident pages at the fork; Linux's VmHWM belongs to the new address space only."""
    try:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
