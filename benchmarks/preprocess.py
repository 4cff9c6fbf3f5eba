"""Preprocessing throughput and peak memory on CT-sized scans (512 x 512 x ~100).

    python benchmarks/preprocess.py [--cases 6] [--workers 1,2] [--size 128]

Writes synthetic CT-like scans of clinical size into a temporary folder, then preprocesses them
with one worker and with all workers, each in a fresh process (peak RSS of that process and its
workers is reported as ru_maxrss of the children: the largest single process).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_child  # noqa: E402

CHILD = """
import json, sys, time
from pathlib import Path
from ssl3d_cli.config import PreprocessConfig
from ssl3d_cli.stages.preprocess import preprocess
data, out, workers, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
res = preprocess(data, config=PreprocessConfig(size=(size,) * 3), cache_dir=Path(out), workers=workers)
dt = time.perf_counter() - t0
print(json.dumps({"workers": workers, "cases": len(res.processed), "seconds": round(dt, 2), "cases_per_s": round(len(res.processed) / dt, 3)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--workers", default=f"1,{os.cpu_count()}")
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args()
    from ssl3d_cli.stages.synth import synth

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "ct"
        t0 = time.perf_counter()
        synth(data, kind="ct", cases=args.cases, unlabelled=0, shape=(512, 512, 100), seed=0)
        print(f"# wrote {args.cases} scans of ~512x512x100 in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        results = []
        for w in [int(x) for x in args.workers.split(",")]:
            res = run_child(CHILD, str(data), str(Path(tmp) / f"cache{w}"), str(w), str(args.size))
            results.append(res)
            print(json.dumps(res))
    print(json.dumps({"benchmark": "preprocess", "size": args.size, "results": results}))


if __name__ == "__main__":
    main()
