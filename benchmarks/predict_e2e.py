"""``ssl3d predict`` end to end on CT-sized scans: seconds per scan split into read / preprocess / sample /
restore+decide / write, and peak memory, now and before issue 14's speed work (in the same run).

    python benchmarks/predict_e2e.py [--cases 3] [--shape 512,512,96] [--device auto] [--mc-samples 4] [--vote borda]
                                     [--widths 4,8,16,16,16] [--size 128] [--threads 0] [--modes now,before] [--prefetch 0]
                                     [--compile auto]

A folder of synthetic CT-like scans (``ssl3d_cli.data.synthetic``, about 512 x 512 x 96, int16 HU, several
orientations) is written once; each mode then predicts every scan in a fresh process through the real
``stages.predict.predict_one`` (read, preprocess, MC sampling and votes, restore and decide, write), with the names it
calls wrapped by timers (synchronised on a GPU). ``before`` swaps in the replaced code paths of
``benchmarks/_baseline.py`` (preprocessing, the every-rule accumulator, full-grid restore and decide). The network is a
tiny randomly initialised U-Net (``--widths``) so that CPU runs stay short: the sampling figure is the network's share
only at real widths. The first scan carries one-time costs; ``amortised`` averages the others.

``--prefetch 0,1`` runs each mode once per value through ``stages.predict.run_cases`` (what ``ssl3d predict
--prefetch N`` runs): 0 is one case after the other, N > 0 reads and preprocesses N cases ahead in a background thread
and writes behind in another. Stages then overlap, so the figure to compare is ``wall_per_scan`` (the whole batch's
wall time over the scans, first scan included; ``wall_after_first``: from the first case written to the last, per
scan, which leaves one-time costs such as compilation out); the stage columns become busy seconds summed over threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_child  # noqa: E402

CHILD = r"""
import json, sys, time
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
import _baseline as before
from _common import peak_rss_mib
from ssl3d_cli.config import MCConfig, ModelConfig, PreprocessConfig, settings_hash
from ssl3d_cli.data.datasets import discover_inputs
from ssl3d_cli.data.preprocessing import unmap_labels
from ssl3d_cli.data.summary import DatasetSummary
from ssl3d_cli.inference import pipeline
from ssl3d_cli.inference.mc import sample_probabilities
from ssl3d_cli.models.unet import UNet
from ssl3d_cli.runtime.device import resolve_device, resolve_precision, set_threads
import importlib
stage = importlib.import_module("ssl3d_cli.stages.predict")  # the module: the package binds the stage function to the name
_, _, mode, data, out, device_spec, mc_samples, vote, widths, size, threads, prefetch, compile_mode = sys.argv
prefetch = int(prefetch)
device = resolve_device(device_spec); threads = set_threads(int(threads))
precision = resolve_precision("auto", device)
pre = PreprocessConfig(size=(int(size),) * 3).to_dict()
dataset = DatasetSummary("Synth", "ct", ("CT",), ("background", "organ", "lesion"), (0, 1, 2), pre, settings_hash(pre))
torch.manual_seed(0)
model = UNet(ModelConfig(widths=tuple(int(w) for w in widths.split(",")), dropout_encoder=0.3), 3).to(device).eval()
seg = pipeline.Segmenter(model, dataset, {}, device, precision, Path("bench-model.pt"))
mc = MCConfig(mc_samples=int(mc_samples), vote=vote, union_classes=("lesion",) if vote == "union" else (), compile=compile_mode)
union = [2] if vote == "union" else []
times = {}

def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()

def timed(name, fn):
    def wrapper(*args, **kwargs):
        sync(); t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        sync(); times[name] = times.get(name, 0.0) + time.perf_counter() - t0
        return result
    return wrapper

if mode == "before":
    def prepare_scan(seg, scan):
        config = seg.dataset.preprocess_config()
        case = before.preprocess_arrays(scan.data, scan.affine, modality=seg.dataset.modality, config=config)
        return torch.from_numpy(case.image.astype(config.dtype).astype(np.float32))[None].to(seg.device), case.geometry
    def vote_case(seg, image, geometry, mc):
        acc = before.VoteAccumulator(seg.num_classes)
        sample_probabilities(seg.model, image, mc_samples=mc.mc_samples, autocast=seg.precision.autocast, seed=mc.seed,
                             dropout_encoder=0.3, dropout_decoder=0.0, consume=acc.update)
        return acc, geometry
    def segmentation(seg, votes, rule, union_classes):
        return unmap_labels(before.scan_labels(votes[0], votes[1], rule, union_classes), list(seg.dataset.label_values))
    stage.prepare_scan, stage.vote_case, stage.segmentation = prepare_scan, vote_case, segmentation
stage.read_case_scan = timed("read", stage.read_case_scan)
stage.prepare_scan = timed("preprocess", stage.prepare_scan)
stage.vote_case = timed("sample", stage.vote_case)
stage.segmentation = timed("restore_decide", stage.segmentation)
stage.write_like = timed("write", stage.write_like)
cases, _ = discover_inputs([Path(data)])
rows = []
batch_t0 = time.perf_counter()
if prefetch == 0:
    for case in cases:
        times.clear()
        t0 = time.perf_counter()
        stage.predict_one(seg, case, Path(out), mc=mc, union_classes=union, save_probabilities=False, provenance=None)
        sync()
        row = {k: round(v, 3) for k, v in times.items()}
        row["total"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
        print(json.dumps({"case": case.case_id, **row}), file=sys.stderr, flush=True)
    later = rows[1:] or rows
    amortised = {k: round(sum(r[k] for r in later) / len(later), 3) for k in rows[0]}
else:  # stages overlap: busy seconds per stage over the batch, per scan
    work = stage.predict_stages(seg, Path(out), mc=mc, union_classes=union, save_probabilities=False, provenance=None)
    done_at = []
    stage.run_cases(cases, work, description="Predicting", skip_bad=None, prefetch=prefetch,
                    on_case=lambda batch: done_at.append(time.perf_counter()))
    sync()
    amortised = {k: round(v / len(cases), 3) for k, v in times.items()}
    if len(done_at) > 1:  # after the first case is written: one-time costs (compilation, cudnn autotune) are behind
        amortised["wall_after_first"] = round((done_at[-1] - done_at[0]) / (len(done_at) - 1), 3)
wall_per_scan = round((time.perf_counter() - batch_t0) / len(cases), 3)
name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
print(json.dumps({"mode": mode, "prefetch": prefetch, "compile": compile_mode, "wall_per_scan": wall_per_scan, "device": name,
                  "precision": precision.name,
                  "threads": threads, "per_case": rows, "amortised": amortised,
                  "peak_rss_mib": peak_rss_mib(),
                  "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--shape", default="512,512,96")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--mc-samples", type=int, default=4)
    ap.add_argument("--vote", default="borda")
    ap.add_argument("--widths", default="4,8,16,16,16")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--modes", default="now,before")
    ap.add_argument("--compile", default="auto", help="the sampler's --compile (auto: on CUDA)")
    ap.add_argument("--prefetch", default="0", help="comma list: each mode runs once per value (0: sequential; N: N cases read ahead)")
    args = ap.parse_args()
    from ssl3d_cli.stages.synth import synth

    here = str(Path(__file__).resolve().parent)
    shape = tuple(int(s) for s in args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "ct"
        t0 = time.perf_counter()
        synth(data, kind="ct", cases=args.cases, unlabelled=0, shape=shape, seed=0)  # type: ignore[arg-type]
        print(f"# wrote {args.cases} scans of ~{args.shape} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        results, folders = [], []
        for mode in args.modes.split(","):
            for prefetch in args.prefetch.split(","):
                out = Path(tmp) / f"out-{mode}-prefetch{prefetch}"
                out.mkdir()
                folders.append(out)
                res = run_child(CHILD, here, mode, str(data / "imagesTr"), str(out), args.device, str(args.mc_samples), args.vote,
                                args.widths, str(args.size), str(args.threads), prefetch, args.compile)
                res.pop("child_peak_rss_mib_at_least", None)
                results.append(res)
                print(json.dumps(res), flush=True)
        differing = _differing_voxels(folders)
        load_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"benchmark": "predict_e2e", "shape": args.shape, "cases": args.cases, "mc_samples": args.mc_samples, "vote": args.vote,
                      "widths": args.widths, "size": args.size, "cpus": os.cpu_count(), "load": load, "load_after": load_after,
                      "prefetch": args.prefetch, "differing_voxels": differing,
                      "results": results}))


def _differing_voxels(folders: list[Path]) -> dict[str, int]:
    """Per case, voxels whose label differs between the first mode's output and any other's (0: identical maps).

    ``now`` and ``before`` may differ in a few voxels: the cache-grid image moves within float tolerance (the anti-aliased
    resample rounds differently, and a float16 value can land one step away), so the network's input does too.
    """
    import nibabel as nib
    import numpy as np

    out: dict[str, int] = {}
    for path in sorted(folders[0].glob("*.nii.gz")):
        first = np.asarray(nib.load(str(path)).dataobj)
        out[path.name.split(".")[0]] = max((int((first != np.asarray(nib.load(str(f / path.name)).dataobj)).sum()) for f in folders[1:]),
                                           default=0)
    return out


if __name__ == "__main__":
    main()
