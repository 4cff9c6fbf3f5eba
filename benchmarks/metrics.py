"""HD95 / NSD time on a CT-sized volume: the previous implementation vs the cropped one vs brute force.

    python benchmarks/metrics.py [--shape 512,512,300] [--spacing 0.8,0.8,2.5] [--repeat 3]

Two overlapping ellipsoids about 40 voxels across in a 512 x 512 x 300 volume. "old" is the implementation of
the last commit (``git show HEAD:ssl3d_cli/metrics.py``, written to a temporary folder and imported; HD95 only, it
has no NSD), "new" is ``ssl3d_cli.metrics`` (HD95 and NSD from one pair of distance maps on the joint bounding
box), "brute" compares every surface voxel with every other (float64, chunked) on the same masks. Prints a table
and one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ssl3d_cli import metrics as new  # noqa: E402


def old_module(tmp: Path) -> ModuleType | None:
    """The metrics module of the last commit, or None outside a git checkout."""
    try:
        text = subprocess.run(["git", "show", "HEAD:ssl3d_cli/metrics.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = tmp / "old_metrics.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("old_metrics", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def ellipsoid(shape: tuple[int, int, int], centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    """Boolean (X, Y, Z) ellipsoid, computed on its own box only (the volume may be large)."""
    mask = np.zeros(shape, bool)
    lo = [max(0, int(np.floor(c - r))) for c, r in zip(centre, radii)]
    hi = [min(n, int(np.ceil(c + r)) + 1) for n, c, r in zip(shape, centre, radii)]
    grid = np.meshgrid(*[np.arange(a, b, dtype=np.float64) for a, b in zip(lo, hi)], indexing="ij")
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0
    return mask


def brute_force(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float, float], tau: float) -> tuple[float, float]:
    """(HD95, NSD) from all pairs of surface voxel centres (float64), in chunks."""
    pa, pb = (np.argwhere(new.surface(m)).astype(np.float64) * np.asarray(spacing) for m in (a, b))

    def directed(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        out = np.empty(len(src))
        for i in range(0, len(src), 512):
            chunk = src[i:i + 512]
            out[i:i + 512] = np.sqrt(((chunk[:, None, :] - dst[None, :, :]) ** 2).sum(-1)).min(axis=1)
        return out

    d_ab, d_ba = directed(pa, pb), directed(pb, pa)
    hd = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
    return float(hd), float((np.count_nonzero(d_ab <= tau) + np.count_nonzero(d_ba <= tau)) / (d_ab.size + d_ba.size))


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """(best wall time in s, last value) over ``repeat`` calls."""
    best, value = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="512,512,300")
    ap.add_argument("--spacing", default="0.8,0.8,2.5")
    ap.add_argument("--tolerance", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    spacing = tuple(float(x) for x in args.spacing.split(","))
    centre = tuple(n / 2 for n in shape)
    a = ellipsoid(shape, centre, (20.0, 16.0, 9.0))  # ~40 voxels across in-plane; thinner along the coarse axis
    b = ellipsoid(shape, tuple(c + d for c, d in zip(centre, (4.0, -3.0, 1.0))), (18.0, 19.0, 8.0))
    small_box = tuple(slice(int(c) - 32, int(c) + 32) for c in centre)
    sa, sb = a[small_box], b[small_box]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        old = old_module(Path(tmp))
        for label, x, y, rep in ((f"{'x'.join(map(str, shape))}", a, b, args.repeat), ("64x64x64 crop", sa, sb, args.repeat)):
            if old is not None:
                t, hd = timed(lambda x=x, y=y: old.hd95(x, y, spacing), 1 if x.size > 10**7 else rep)
                rows.append({"volume": label, "impl": "old (HEAD)", "metrics": "HD95", "seconds": t, "hd95_mm": hd, "nsd": None})
            t, (hd, nsd) = timed(lambda x=x, y=y: new.surface_metrics(x, y, spacing, args.tolerance), rep)
            rows.append({"volume": label, "impl": "new", "metrics": "HD95+NSD", "seconds": t, "hd95_mm": hd, "nsd": nsd})
            t, (hd, nsd) = timed(lambda x=x, y=y: brute_force(x, y, spacing, args.tolerance), 1)
            rows.append({"volume": label, "impl": "brute force", "metrics": "HD95+NSD", "seconds": t, "hd95_mm": hd, "nsd": nsd})
    print(f"# two ellipsoids, {int(a.sum())} and {int(b.sum())} voxels, spacing {spacing} mm, NSD tolerance {args.tolerance} mm; best of {args.repeat}")
    print(f"{'volume':>16} {'implementation':>14} {'metrics':>9} {'seconds':>9} {'HD95 mm':>9} {'NSD':>7}")
    for r in rows:
        nsd_text = f"{r['nsd']:.4f}" if r["nsd"] is not None else "-"
        print(f"{r['volume']:>16} {r['impl']:>14} {r['metrics']:>9} {r['seconds']:>9.3f} {r['hd95_mm']:>9.4f} {nsd_text:>7}")
    print(json.dumps({"shape": shape, "spacing_mm": spacing, "rows": rows}))


if __name__ == "__main__":
    main()
