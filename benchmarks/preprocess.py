"""Preprocessing throughput and peak memory on CT-sized scans (512 x 512 x ~100), ssl3d vs before vs MONAI.

    python benchmarks/preprocess.py [--cases 6] [--workers 1,2] [--size 128] [--modes ssl3d,ssl3d-before,monai,monai-aa] [--repeat 1]

Writes synthetic CT-like scans of clinical size (images and labels) into a temporary folder, then preprocesses them,
each mode in a fresh process:

- ssl3d: ``ssl3d preprocess`` (the stage) with each ``--workers`` count; the recipe: reorient to RAS, body mask (HU
  threshold, largest component, holes filled), crop, clip to the foreground's 0.5/99.5 percentiles, z-score, resize to
  ``--size`` with anti-aliasing, float16 cache; labels nearest-neighbour.
- ssl3d-before: the same stage with the preprocessing as it was before issue 14 (``benchmarks/_baseline.py``), one worker.
- monai / monai-aa: the strongest simple chain a user writes with MONAI (when it is installed; it is not a dependency):
  LoadImaged, EnsureChannelFirstd, Orientationd(RAS), CropForegroundd(HU > -500), ClipIntensityPercentilesd(0.5, 99.5),
  NormalizeIntensityd, Resized(trilinear / nearest), float16 .npy; ``monai-aa`` adds Resized's anti-aliasing. It fills
  no holes and keeps every component, and its statistics are over the whole crop, so it does less than ssl3d.
Memory: ``peak_rss_mib`` is the main process's peak RSS (VmHWM); ``worker_peak_rss_mib`` is each worker process's, read
from /proc by a watcher thread while the pool runs (VmHWM only grows, so the last reading before a worker exits is its
peak up to then). With one worker (and for MONAI) the cases run in the main process: the worker is the main process.
Each ssl3d run gets its ratio to the MONAI chains' seconds in the same round (``ratio_vs_monai``, ``ratio_vs_monai_aa``);
with ``--repeat N`` the modes take turns N times and the last line's ``summary`` gives each mode's minimum, its peak
memory over the rounds, and the ratio of the minimums (``ratio_min_vs_monai_min``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_child  # noqa: E402

CHILD = """
import importlib, json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[6])
from _common import peak_rss_mib
from ssl3d_cli.config import PreprocessConfig
from ssl3d_cli.stages.preprocess import preprocess
mode, data, out, workers, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
if mode == "ssl3d-before":
    import _baseline as before
    importlib.import_module("ssl3d_cli.stages.preprocess").preprocess_arrays = before.preprocess_arrays
import os, threading
peaks, stop = {}, threading.Event()

def watch_workers():  # peak RSS (VmHWM, MiB) of each pool worker: a child of this process running spawn_main
    me = str(os.getpid())
    while True:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] != me:
                        continue
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"spawn_main" not in f.read():
                        continue
                with open(f"/proc/{pid}/status") as f:
                    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
                peaks[pid] = max(peaks.get(pid, 0.0), round(hwm / 1024, 1))
            except (OSError, StopIteration, IndexError):
                pass  # gone, or not ours
        if stop.wait(0.05):
            return

watcher = threading.Thread(target=watch_workers, daemon=True)
if workers > 1:
    watcher.start()
t0 = time.perf_counter()
res = preprocess(data, config=PreprocessConfig(size=(size,) * 3), cache_dir=Path(out), workers=workers)
dt = time.perf_counter() - t0
stop.set()
rss = peak_rss_mib()
per_worker = sorted(peaks.values(), reverse=True) if workers > 1 else [rss]
print(json.dumps({"mode": mode, "workers": workers, "cases": len(res.processed), "seconds": round(dt, 2),
                  "s_per_case": round(dt / len(res.processed), 2), "peak_rss_mib": rss, "worker_peak_rss_mib": per_worker}))
"""

MONAI_CHILD = """
import json, sys, time
from pathlib import Path
import numpy as np
import monai.transforms as T
sys.path.insert(0, sys.argv[6])
from _common import peak_rss_mib
mode, data, out, workers, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
keys = ["image", "label"]
chain = T.Compose([
    T.LoadImaged(keys=keys, image_only=True), T.EnsureChannelFirstd(keys=keys), T.Orientationd(keys=keys, axcodes="RAS"),
    T.CropForegroundd(keys=keys, source_key="image", select_fn=lambda x: x > -500, allow_smaller=True),
    T.ClipIntensityPercentilesd(keys="image", lower=0.5, upper=99.5), T.NormalizeIntensityd(keys="image"),
    T.Resized(keys=keys, spatial_size=(size,) * 3, mode=("trilinear", "nearest"), anti_aliasing=(mode == "monai-aa", False)),
])
Path(out).mkdir(parents=True, exist_ok=True)
images = sorted((Path(data) / "imagesTr").glob("*.nii.gz"))
t0 = time.perf_counter()
for image in images:
    d = chain({"image": str(image), "label": str(Path(data) / "labelsTr" / image.name)})
    np.save(Path(out) / (image.name.split(".")[0] + ".npy"), np.asarray(d["image"]).astype(np.float16))
    np.save(Path(out) / (image.name.split(".")[0] + "_label.npy"), np.asarray(d["label"]).astype(np.uint8))
dt = time.perf_counter() - t0
print(json.dumps({"mode": mode, "workers": 1, "cases": len(images), "seconds": round(dt, 2), "s_per_case": round(dt / len(images), 2),
                  "peak_rss_mib": peak_rss_mib(), "worker_peak_rss_mib": [peak_rss_mib()]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--workers", default=f"1,{os.cpu_count()}", help="worker counts for the ssl3d mode (the others run one)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--modes", default="ssl3d,ssl3d-before,monai,monai-aa")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds, each running every mode once in turn: on a shared machine the load changes between runs, "
                         "so compare the minimum over rounds, or the ratio within a round")
    args = ap.parse_args()
    from ssl3d_cli.stages.synth import synth

    here = str(Path(__file__).resolve().parent)
    has_monai = importlib.util.find_spec("monai") is not None
    runs = []
    for mode in args.modes.split(","):
        if mode.startswith("monai") and not has_monai:
            print(f"# {mode}: MONAI is not installed (pip install monai), skipped", file=sys.stderr)
            continue
        runs += [(mode, w) for w in ([int(x) for x in args.workers.split(",")] if mode == "ssl3d" else [1])]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "ct"
        t0 = time.perf_counter()
        synth(data, kind="ct", cases=args.cases, unlabelled=0, shape=(512, 512, 100), seed=0)
        print(f"# wrote {args.cases} scans of ~512x512x100 in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        results = []
        for round_ in range(args.repeat):
            for mode, w in runs:
                out = str(Path(tmp) / f"cache-{mode}-{w}-{round_}")  # a fresh cache each round: nothing is up to date
                res = run_child(MONAI_CHILD if mode.startswith("monai") else CHILD, mode, str(data), out, str(w), str(args.size), here)
                res.pop("child_peak_rss_mib_at_least", None)
                res["round"] = round_
                results.append(res)
                print(json.dumps(res), flush=True)
    for r in results:  # the ratio to MONAI in the same round
        if r["mode"] == "ssl3d":
            for name, key in (("monai", "ratio_vs_monai"), ("monai-aa", "ratio_vs_monai_aa")):
                same = [m["seconds"] for m in results if m["mode"] == name and m["round"] == r["round"]]
                if same:
                    r[key] = round(r["seconds"] / same[0], 3)
    summary = []
    for mode, w in runs:
        rows = [r for r in results if r["mode"] == mode and r["workers"] == w]
        entry = {"mode": mode, "workers": w, "seconds_min": min(r["seconds"] for r in rows), "seconds": [r["seconds"] for r in rows],
                 "peak_rss_mib_max": max(r["peak_rss_mib"] for r in rows),
                 "worker_peak_rss_mib_max": max(max(r["worker_peak_rss_mib"], default=0.0) for r in rows)}
        for key in ("ratio_vs_monai", "ratio_vs_monai_aa"):
            if key in rows[0]:
                entry[key + "_per_round"] = [r[key] for r in rows]
        summary.append(entry)
    best = {e["mode"]: e["seconds_min"] for e in summary if e["workers"] == 1}
    for e in summary:
        if e["mode"] == "ssl3d":
            for name, key in (("monai", "ratio_min_vs_monai_min"), ("monai-aa", "ratio_min_vs_monai_aa_min")):
                if name in best:
                    e[key] = round(e["seconds_min"] / best[name], 3)
    print(json.dumps({"benchmark": "preprocess", "size": args.size, "cases": args.cases, "cpus": os.cpu_count(), "load": load,
                      "repeat": args.repeat, "summary": summary, "results": results}))


if __name__ == "__main__":
    main()
