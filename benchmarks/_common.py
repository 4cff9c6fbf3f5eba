"""Helpers shared by the benchmarks: peak memory of a child process, timing, device sync."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Any


def run_child(code: str, *args: str) -> dict[str, Any]:
    """Run ``python -c code args`` and return its last stdout line (JSON) plus the child's peak RSS in MiB."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out["child_peak_rss_mib_at_least"] = round(max(peak, before) / 1024, 1)
    out["wall_s"] = round(wall, 2)
    return out


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB: VmHWM, which (unlike ru_maxrss) does not carry the parent's peak
    across fork + exec, so a child started by a benchmark that has just written large scans reports its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()
