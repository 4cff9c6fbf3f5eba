"""Sliding-window MC-dropout inference (issue 15): seconds per scan and peak memory, printed as one JSON line.

    python benchmarks/sliding_window.py [--device auto] [--shape 512,512,100] [--patch 64,64,64] [--mc-samples 10]
                                        [--widths 16,32,64,128,256] [--overlap 0.5] [--mc-batch 0] [--vote majority]
                                        [--uncertainty] [--compile off] [--threads 0]

A random-weight U-Net (3 classes, encoder dropout 0.3 as the paper's best) on a random image of ``--shape``:
``sliding_window_votes`` (one window at a time, ``--mc-batch`` samples per forward, 0 = chosen from free memory) and
the labels of ``--vote``; with ``--uncertainty`` also entropy / mutual information and the p05/p50/p95 + std maps of
p(foreground) (per-window sample stores). Speed does not depend on the weights or the image, only on shapes.
A warm-up on one window (allocator, cuDNN autotuning) runs first and is not timed. CPU peak memory is the
process's peak RSS (VmHWM); GPU peak is ``torch.cuda.max_memory_allocated``. Keep CPU runs small, e.g.
``--shape 128,128,64 --patch 32,32,32 --widths 4,8,16 --mc-samples 4``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import peak_rss_mib, sync  # noqa: E402

from ssl3d_cli.config import ModelConfig  # noqa: E402
from ssl3d_cli.inference.mc import sample_probabilities  # noqa: E402
from ssl3d_cli.inference.sliding_window import entropy_maps, sliding_labels, sliding_window_votes, window_grid  # noqa: E402
from ssl3d_cli.models.unet import UNet  # noqa: E402
from ssl3d_cli.runtime.device import describe_device, resolve_device, resolve_precision, set_threads  # noqa: E402


def triple(text: str) -> tuple[int, int, int]:
    values = tuple(int(v) for v in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{text}: three integers, e.g. 64,64,64")
    return values  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shape", type=triple, default=(512, 512, 100))
    ap.add_argument("--patch", type=triple, default=(64, 64, 64))
    ap.add_argument("--mc-samples", type=int, default=10)
    ap.add_argument("--widths", default="16,32,64,128,256")
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--mc-batch", type=int, default=0, help="samples per forward pass (0: chosen from free memory)")
    ap.add_argument("--vote", default="majority")
    ap.add_argument("--uncertainty", action="store_true", help="also entropy, mutual information, p05/p50/p95 and std maps")
    ap.add_argument("--compile", default="off", help="sample_probabilities' compile mode, where this checkout has it")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: the cores this process may use)")
    args = ap.parse_args()

    device = resolve_device(args.device)
    threads = set_threads(args.threads)
    precision = resolve_precision(args.precision, device)
    torch.manual_seed(args.seed)
    widths = tuple(int(w) for w in args.widths.split(","))
    model = UNet(ModelConfig(widths=widths, dropout_encoder=0.3), 3).to(device).eval()
    image = torch.randn(1, 1, *args.shape, device=device)
    options = {}
    if "compile" in inspect.signature(sample_probabilities).parameters:
        options["compile"] = args.compile
    elif args.compile != "off":
        raise SystemExit("--compile: this checkout's sample_probabilities has no compile option")
    percentiles = [5.0, 50.0, 95.0] if args.uncertainty else []

    def run(img: torch.Tensor) -> tuple[dict[str, float], int]:
        t0 = time.perf_counter()
        res = sliding_window_votes(model, img, patch=args.patch, overlap=args.overlap, mc_samples=args.mc_samples, mc_batch=args.mc_batch,
                                   autocast=precision.autocast, seed=args.seed, rules=(args.vote,), track_entropy=args.uncertainty,
                                   target=[1, 2] if args.uncertainty else None, percentiles=percentiles, sample_options=options)
        sync(device)
        t1 = time.perf_counter()
        labels = sliding_labels(res.votes, args.vote, [2])
        if args.uncertainty:
            entropy_maps(res.votes)
        sync(device)
        t2 = time.perf_counter()
        assert labels.shape == tuple(img.shape[2:])
        return {"sample_and_fuse_s": t1 - t0, "labels_and_maps_s": t2 - t1}, res.windows

    run(image[..., : args.patch[0], : args.patch[1], : args.patch[2]])  # warm-up: one window
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    parts, windows = run(image)
    seconds = time.perf_counter() - t0
    samples = max(1, args.mc_samples)
    print(json.dumps({
        "benchmark": "sliding_window", "device": describe_device(device), "precision": precision.name, "threads": threads,
        "shape": list(args.shape), "patch": list(args.patch), "overlap": args.overlap, "widths": list(widths),
        "mc_samples": args.mc_samples, "mc_batch": args.mc_batch, "vote": args.vote, "uncertainty": args.uncertainty,
        "compile": options.get("compile", "n/a"), "windows": windows, "expected_windows": len(window_grid(args.shape, args.patch, args.overlap)),
        "seconds_per_scan": round(seconds, 2), **{k: round(v, 2) for k, v in parts.items()},
        "ms_per_window_sample": round(1000 * parts["sample_and_fuse_s"] / (windows * samples), 3),
        "peak_rss_mib": peak_rss_mib(),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "load": os.getloadavg()[0],
    }))


if __name__ == "__main__":
    main()
