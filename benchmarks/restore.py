"""Restore and decide on a CT-sized scan: the label map from cache-grid votes, now vs before issue 14 (same run).

    python benchmarks/restore.py [--shape 512,512,96] [--size 128] [--samples 10] [--rules borda,majority,mean] [--threads 0]

Votes shaped like a trained model's (the synthetic case's own label, smoothed, plus per-sample noise) are counted
once by each accumulator; each rule's labels on the scan's grid are then timed (best of ``--repeat``): ``now`` is
``inference.pipeline.ScanVotes`` (resample onto the crop box only, clear winners skipped, slab-wise decision),
``before`` the full-grid resample and decision of ``benchmarks/_baseline.py``. The labels are compared voxel for voxel.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="512,512,96")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--rules", default="borda,majority,mean")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    import _baseline as before
    import numpy as np
    import torch
    import torch.nn.functional as F

    from ssl3d_cli.config import PreprocessConfig
    from ssl3d_cli.data.preprocessing import preprocess_arrays
    from ssl3d_cli.data.synthetic import make_ct_case
    from ssl3d_cli.inference.pipeline import ScanVotes
    from ssl3d_cli.inference.votes import VoteAccumulator
    from ssl3d_cli.runtime.device import set_threads

    threads = set_threads(args.threads)
    case = make_ct_case(np.random.default_rng(0), tuple(int(s) for s in args.shape.split(",")))  # type: ignore[arg-type]
    pre = preprocess_arrays(case.image[None].astype(np.float32), case.affine, modality="ct", config=PreprocessConfig(size=(args.size,) * 3),
                            label=case.label)
    onehot = F.one_hot(torch.from_numpy(pre.label).long(), 3).permute(3, 0, 1, 2).float()[None]
    smooth = F.avg_pool3d(onehot, 5, 1, 2) * 6
    gen = torch.Generator().manual_seed(0)
    rules = args.rules.split(",")
    now = {rule: VoteAccumulator(3, rules=(rule,)) for rule in rules}
    old = before.VoteAccumulator(3)
    seconds = {"update_now": 0.0, "update_before": 0.0}
    for start in range(0, args.samples, 2):
        probs = torch.softmax(smooth + torch.randn(min(2, args.samples - start), 3, *(args.size,) * 3, generator=gen), 1)
        t0 = time.perf_counter()
        now[rules[0]].update(probs)
        seconds["update_now"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        old.update(probs)
        seconds["update_before"] += time.perf_counter() - t0
        for rule in rules[1:]:
            now[rule].update(probs)
    results = []
    for rule in rules:
        timings = {}
        for mode in ("now", "before"):
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                labels = ScanVotes(now[rule], pre.geometry).labels(rule) if mode == "now" else before.scan_labels(old, pre.geometry, rule)
                best = min(best, time.perf_counter() - t0)
            timings[mode] = (round(best, 3), labels)
        results.append({"rule": rule, "now_s": timings["now"][0], "before_s": timings["before"][0],
                        "differing_voxels": int((timings["now"][1] != timings["before"][1]).sum())})
        print(json.dumps(results[-1]), flush=True)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"benchmark": "restore", "shape": list(case.image.shape), "crop": list(pre.geometry.crop_shape), "size": args.size,
                      "samples": args.samples, "threads": threads, "cpus": os.cpu_count(), "load": load,
                      f"update_{rules[0]}_now_s": round(seconds["update_now"], 3), "update_every_rule_before_s": round(seconds["update_before"], 3),
                      "results": results}))


if __name__ == "__main__":
    main()
