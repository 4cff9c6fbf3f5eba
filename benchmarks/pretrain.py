"""SimCLR pretraining speed: patches per second and the share of step time outside forward/backward.

    python benchmarks/pretrain.py [--device auto] [--size 64] [--patches-per-side 2] [--batch-size 2] [--steps 5]

Each step is timed in parts (synchronised on GPU): data (cache read + transfer), augmentation (two
views, batched on the device), forward + backward, NT-Xent loss, optimiser step. The loss is timed
separately from the network because it is outside the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import sync  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--patches-per-side", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--widths", default="16,32,64,128,256")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()

    import numpy as np
    import torch

    from ssl3d_cli.augment.simclr import augment_view, split_into_patches
    from ssl3d_cli.config import DEFAULT_SIMCLR_AUGMENTATIONS, ModelConfig, PreprocessConfig
    from ssl3d_cli.data.cache import Cache
    from ssl3d_cli.losses.ntxent import nt_xent
    from ssl3d_cli.models.unet import SimCLRModel
    from ssl3d_cli.runtime.device import describe_device, resolve_device, resolve_precision, set_threads
    from ssl3d_cli.stages.preprocess import preprocess
    from ssl3d_cli.stages.synth import synth

    device = resolve_device(args.device)
    set_threads(0)
    precision = resolve_precision(args.precision, device)
    widths = tuple(int(w) for w in args.widths.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        synth(Path(tmp) / "d", kind="ct", cases=max(4, args.batch_size), unlabelled=0, shape=(96, 96, 48))
        cache = Cache(preprocess(Path(tmp) / "d", config=PreprocessConfig(size=(args.size,) * 3), cache_dir=Path(tmp) / "c").cache_dir)
        model = SimCLRModel(ModelConfig(widths=widths)).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_scaler)
        gen = torch.Generator(device=device).manual_seed(0)
        parts = {"data": 0.0, "augment": 0.0, "forward_backward": 0.0, "loss": 0.0, "optimizer": 0.0}
        ids = cache.case_ids
        n_patches = 0
        for step in range(args.steps + 1):  # step 0 warms up (cudnn autotune, allocator)
            t = {}
            sync(device)
            t0 = time.perf_counter()
            batch = torch.stack([torch.from_numpy(np.array(cache.image(ids[(step * args.batch_size + i) % len(ids)])))
                                 for i in range(args.batch_size)]).to(device, non_blocking=True).float()
            sync(device)
            t["data"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            patches = split_into_patches(batch, args.patches_per_side)
            v1 = augment_view(patches, augmentations=DEFAULT_SIMCLR_AUGMENTATIONS, gen=gen)
            v2 = augment_view(patches, augmentations=DEFAULT_SIMCLR_AUGMENTATIONS, gen=gen)
            sync(device)
            t["augment"] = time.perf_counter() - t0
            n = patches.shape[0]
            t0 = time.perf_counter()
            with precision.autocast():
                z = model(torch.cat([v1, v2]))
            sync(device)
            t_fwd = time.perf_counter() - t0
            t0 = time.perf_counter()
            loss, _ = nt_xent(z[:n].float(), z[n:].float(), temperature=0.05)
            sync(device)
            t["loss"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            sync(device)
            t["forward_backward"] = t_fwd + time.perf_counter() - t0
            t0 = time.perf_counter()
            scaler.step(opt)
            scaler.update()
            sync(device)
            t["optimizer"] = time.perf_counter() - t0
            if step > 0:
                for k, v in t.items():
                    parts[k] += v
                n_patches += n
        total = sum(parts.values())
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        print(json.dumps({
            "benchmark": "pretrain", "device": describe_device(device), "precision": precision.name, "size": args.size,
            "patch": args.size // args.patches_per_side, "patches_per_step": args.batch_size * args.patches_per_side**3,
            "widths": list(widths), "steps": args.steps, "patches_per_s": round(n_patches / total, 2),
            "seconds_per_step": round(total / args.steps, 4),
            "share_outside_forward_backward": round((total - parts["forward_backward"] - parts["optimizer"]) / total, 4),
            "parts_s_per_step": {k: round(v / args.steps, 4) for k, v in parts.items()},
            "peak_gpu_gib": None if peak is None else round(peak, 2),
        }))


if __name__ == "__main__":
    main()
