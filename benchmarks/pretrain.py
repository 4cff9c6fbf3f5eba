"""SimCLR pretraining speed: the real training loop's time per step, and its share outside forward/backward.

    python benchmarks/pretrain.py [--device auto] [--size 64] [--patches-per-side 2] [--batch-size 2] [--steps 10]
        [--epochs 3] [--cases 8] [--workers 4] [--widths 16,32,64,128,256] [--precision auto] [--compile auto,off]

Headline: the real ``pretrain`` stage (DataLoader workers, device prefetch, augmentation, forward + backward, AdamW,
metrics) runs on a synthetic dataset (``--cases`` CT-like scans preprocessed to ``--size``^3) for ``--epochs`` epochs of
``--steps`` steps; the steady-state seconds per step come from the run's ``metrics.jsonl`` with the first epoch left
out (warm-up: cuDNN autotuning, the allocator, worker start-up). Then, in the same process, the compute floor: forward
+ NT-Xent + backward + AdamW step of the same model, precision and batch shape on a batch already on the device,
synchronised only at the end. ``share_outside_forward_backward`` = 1 - floor / step: the time the loop spends on
anything but the network's own work (data, augmentation, launches, host waits). ``--compile`` lists the augmentation
modes to run the loop (and the diagnostic) with, one after the other in this process (``auto`` compiles on CUDA only);
a mode ending in ``-inline`` makes each step's views inside the step on the compute stream, as before they were made a
step ahead on the copy stream (the baseline for that change).

Secondary (``diagnostic``): each step timed in parts with a synchronisation between them (data = cache read +
transfer, augmentation = two views, forward + backward, loss, optimiser step), on the main process. The
synchronisations themselves cost time and stop the overlap the real loop has, so this only says where time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import sync  # noqa: E402


def _inline_prefetcher() -> Any:
    """What the loop did before views were prepared ahead: a ``training.data.DevicePrefetcher`` that copies and
    prepares each batch on the compute stream, just before its step."""
    from ssl3d_cli.training.data import DevicePrefetcher

    class InlinePrefetcher(DevicePrefetcher):
        def __iter__(self) -> Any:
            for index, batch in enumerate(self.batches):
                yield self._ready(index, batch)

    return InlinePrefetcher


def real_loop(cache_dir: Path, run_dir: Path, args: argparse.Namespace, widths: tuple[int, ...], compile_mode: str,
              inline: bool = False) -> dict[str, Any]:
    """Run the ``pretrain`` stage; seconds per step over the epochs after the first, and the run's summary."""
    from ssl3d_cli.config import ModelConfig, PretrainConfig, RuntimeConfig
    from ssl3d_cli.stages.pretrain import pretrain
    from ssl3d_cli.training import run as run_module

    config = PretrainConfig(epochs=args.epochs, batch_size=args.batch_size, patches_per_side=args.patches_per_side,
                            warmup_epochs=1, checkpoint_every=args.epochs, steps_per_epoch=args.steps, workers=args.workers,
                            compile=compile_mode, model=ModelConfig(widths=widths))
    real_prefetcher = run_module.DevicePrefetcher
    run_module.DevicePrefetcher = _inline_prefetcher() if inline else real_prefetcher
    try:
        summary = pretrain(cache_dir, config=config, runtime=RuntimeConfig(device=args.device, precision=args.precision), output=run_dir)
    finally:
        run_module.DevicePrefetcher = real_prefetcher
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steady = lines[1:]  # the first epoch warms up
    seconds = sum(m["seconds"] for m in steady)
    return {"seconds_per_step": seconds / (len(steady) * args.steps), "epoch_seconds": [round(m["seconds"], 3) for m in lines],
            "summary": summary}


def compute_floor(model: Any, batch: Any, *, steps: int, precision: Any, temperature: float = 0.05, repeats: int = 3) -> float:
    """Seconds per step of forward + NT-Xent + backward + AdamW on ``batch`` (2N, C, p, p, p) already on the device.

    Two warm-up steps, then ``repeats`` rounds of ``steps`` steps queued back to back, each synchronised only at its
    end; the fastest round counts.
    """
    import torch

    from ssl3d_cli.losses.ntxent import nt_xent

    device = batch.device
    n = batch.shape[0] // 2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_scaler)

    def step() -> None:
        with precision.autocast():
            z = model(batch)
        loss, _ = nt_xent(z[:n].float(), z[n:].float(), temperature=temperature)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(2):
        step()
    sync(device)
    best = float("inf")
    for _ in range(repeats):  # the fastest of a few rounds: a floor, and a shared machine only ever slows a round down
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def diagnostic_parts(cache: Any, model: Any, *, device: Any, precision: Any, args: argparse.Namespace, compile_mode: str) -> dict[str, float]:
    """Seconds per step of each part, synchronised between parts (step 0 warms up, and compiles, and is not counted)."""
    import numpy as np
    import torch

    from ssl3d_cli.augment.simclr import ViewAugmenter, split_into_patches
    from ssl3d_cli.config import DEFAULT_SIMCLR_AUGMENTATIONS
    from ssl3d_cli.losses.ntxent import nt_xent
    from ssl3d_cli.runtime.compiling import compile_wanted

    augment = ViewAugmenter(DEFAULT_SIMCLR_AUGMENTATIONS, compile=compile_wanted(compile_mode, device))

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_scaler)
    gen = torch.Generator(device=device).manual_seed(0)
    parts = {"data": 0.0, "augment": 0.0, "forward_backward": 0.0, "loss": 0.0, "optimizer": 0.0}
    ids = cache.case_ids

    def timed(name: str, t0: float) -> float:
        sync(device)
        now = time.perf_counter()
        if counting:
            parts[name] += now - t0
        return now

    for i in range(args.steps + 1):
        counting = i > 0
        sync(device)
        t0 = time.perf_counter()
        batch = torch.stack([torch.from_numpy(np.array(cache.image(ids[(i * args.batch_size + j) % len(ids)])))
                             for j in range(args.batch_size)]).to(device, non_blocking=True).float()
        t0 = timed("data", t0)
        patches = split_into_patches(batch, args.patches_per_side)
        v1 = augment(patches, gen)
        v2 = augment(patches, gen)
        t0 = timed("augment", t0)
        n = patches.shape[0]
        with precision.autocast():
            z = model(torch.cat([v1, v2]))
        t_fwd = timed("forward_backward", t0)
        loss, _ = nt_xent(z[:n].float(), z[n:].float(), temperature=0.05)
        t0 = timed("loss", t_fwd)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        t0 = timed("forward_backward", t0)
        scaler.step(opt)
        scaler.update()
        timed("optimizer", t0)
    return {k: v / args.steps for k, v in parts.items()}


def profile_steps(cache: Any, model: Any, *, device: Any, precision: Any, args: argparse.Namespace, compile_mode: str,
                  top: int = 25) -> list[dict[str, Any]]:
    """The GPU kernels of ``--steps`` steps (views + forward + loss + backward + AdamW, batches already on the device,
    not synchronised): the ``top`` by GPU time, in milliseconds per step, with calls per step."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ssl3d_cli.augment.simclr import ViewAugmenter
    from ssl3d_cli.config import DEFAULT_SIMCLR_AUGMENTATIONS, PretrainConfig
    from ssl3d_cli.runtime.compiling import compile_wanted
    from ssl3d_cli.runtime.distributed import DistInfo
    from ssl3d_cli.stages.pretrain import simclr_loss, simclr_views

    config = PretrainConfig(batch_size=args.batch_size, patches_per_side=args.patches_per_side)
    augment = ViewAugmenter(DEFAULT_SIMCLR_AUGMENTATIONS, compile=compile_wanted(compile_mode, device))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = cache.case_ids
    volumes = torch.stack([torch.from_numpy(np.array(cache.image(ids[j % len(ids)]))) for j in range(args.batch_size)]).to(device)

    def step(i: int) -> None:
        views = simclr_views(volumes, config=config, gen=torch.Generator(device=device).manual_seed(i), augment=augment)
        loss, _ = simclr_loss(model, views, config=config, precision=precision, dist=DistInfo())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(3):
        step(i)
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(args.steps):
            step(i)
        sync(device)
    rows = []
    for e in prof.key_averages():
        gpu_us = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if gpu_us > 0:
            rows.append({"kernel": e.key[:120], "ms_per_step": round(gpu_us / 1000 / args.steps, 3), "calls_per_step": round(e.count / args.steps, 1)})
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = sum(r["ms_per_step"] for r in rows)
    return [{"kernel": "(all GPU time)", "ms_per_step": round(total, 3), "calls_per_step": None}, *rows[:top]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--patches-per-side", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--widths", default="16,32,64,128,256")
    ap.add_argument("--steps", type=int, default=10, help="steps per epoch of the real loop; steps of the floor and the diagnostic")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the real loop (at least 2: the first is left out)")
    ap.add_argument("--cases", type=int, default=8, help="synthetic scans (batches wrap around them)")
    ap.add_argument("--workers", type=int, default=4, help="DataLoader workers of the real loop")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--profile", default="", help="also profile the GPU kernels of a step with this augmentation compile mode")
    ap.add_argument("--compile", default="auto", help="comma list of augmentation compile modes, each run in turn (auto, on, off; "
                    "MODE-inline: views made inside each step, not a step ahead)")
    args = ap.parse_args()
    if args.epochs < 2 or args.steps < 1:
        ap.error("need --epochs >= 2 (the first epoch is warm-up) and --steps >= 1")

    import torch

    from ssl3d_cli.config import ModelConfig, PreprocessConfig
    from ssl3d_cli.data.cache import Cache
    from ssl3d_cli.models.unet import SimCLRModel
    from ssl3d_cli.runtime import progress
    from ssl3d_cli.runtime.device import describe_device, resolve_device, resolve_precision
    from ssl3d_cli.stages.preprocess import preprocess
    from ssl3d_cli.stages.synth import synth

    progress.configure(enabled=False)  # stdout's last line is the result
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    widths = tuple(int(w) for w in args.widths.split(","))
    patch = args.size // args.patches_per_side
    patches_per_step = args.batch_size * args.patches_per_side**3
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        synth(Path(tmp) / "d", kind="ct", cases=max(2, args.cases), unlabelled=0, shape=(96, 96, 48))
        result = preprocess(Path(tmp) / "d", config=PreprocessConfig(size=(args.size,) * 3), cache_dir=Path(tmp) / "c",
                            workers=min(8, os.cpu_count() or 1))
        cache = Cache(result.cache_dir)
        setup_s = time.perf_counter() - t0
        model = SimCLRModel(ModelConfig(widths=widths, in_channels=cache.dataset.num_channels)).to(device).train()
        batch = torch.randn(2 * patches_per_step, cache.dataset.num_channels, patch, patch, patch, device=device)
        floor = compute_floor(model, batch, steps=args.steps, precision=precision)
        del batch
        loops = {}
        for i, mode in enumerate(m.strip() for m in args.compile.split(",")):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            compile_mode = mode.removesuffix("-inline")
            loop = real_loop(cache.root, Path(tmp) / f"run{i}", args, widths, compile_mode, inline=mode.endswith("-inline"))
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            parts = diagnostic_parts(cache, model, device=device, precision=precision, args=args, compile_mode=compile_mode)
            step, total = loop["seconds_per_step"], sum(parts.values())
            loops[mode] = {
                "augmentation_compiled": loop["summary"]["augmentation_compiled"],
                "seconds_per_step": round(step, 4),
                "share_outside_forward_backward": round(1 - floor / step, 4),
                "patches_per_s": round(patches_per_step / step, 2),
                "epoch_seconds": loop["epoch_seconds"],
                "peak_gpu_gib": None if peak is None else round(peak, 2),
                "diagnostic": {
                    "seconds_per_step": round(total, 4),
                    "share_outside_forward_backward": round((total - parts["forward_backward"] - parts["optimizer"]) / total, 4),
                    "parts_s_per_step": {k: round(v, 4) for k, v in parts.items()},
                },
            }
        profiled = profile_steps(cache, model, device=device, precision=precision, args=args, compile_mode=args.profile) if args.profile else None
    print(json.dumps({
        "profile": profiled,
        "benchmark": "pretrain", "device": describe_device(device), "precision": precision.name, "size": args.size,
        "patch": patch, "patches_per_step": patches_per_step, "widths": list(widths), "cases": args.cases,
        "epochs": args.epochs, "steps_per_epoch": args.steps, "workers": args.workers,
        "floor_seconds_per_step": round(floor, 4),
        "floor_patches_per_s": round(patches_per_step / floor, 2),
        "setup_s": round(setup_s, 1),
        "loops": loops,
        "diagnostic_note": "synchronised between parts on the main process (no workers, no overlap): where the time goes, not the loop's speed",
    }))


if __name__ == "__main__":
    main()
