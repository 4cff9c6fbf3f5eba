"""SimCLR augmentation: cost per call and how often the two views of a patch are the same.

    python benchmarks/augment.py [--baseline PATH] [--threads 1] [--n 16] [--size 32] [--repeats 40] [--pairs 4000]
        [--device cpu] [--strategies auto]

``--baseline`` also loads ``augment_view`` from another file (e.g. an older ``simclr.py`` written out with
``git show REV:ssl3d_cli/augment/simclr.py > /tmp/old.py``); both are measured the same way, their timed calls
interleaved so that a busy machine slows both alike. Reports one JSON line per implementation: median,
mean and minimum milliseconds of ``augment_view`` on ``--n`` patches of ``--size``^3 with the default augmentations,
the share of views bit-identical to their input ("untouched"), and the share of positive pairs (view 1 and
view 2 of one patch, drawn from one generator as pretraining does) that are bit-identical (and nearly so:
max abs difference < 1e-3), over ``--pairs`` random 8^3 patches. ``--strategies auto,blend,subset`` measures the
current implementation once per way of applying the drawn transforms (``augment_view(blend=...)``; auto is the
device's default: blend off the CPU, subset on it); both give the same views.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default="", help="path of another simclr.py to measure the same way")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--pairs", type=int, default=4000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--strategies", default="auto", help="comma-separated: auto, blend, subset")
    args = ap.parse_args()

    import torch

    from ssl3d_cli.augment.simclr import augment_view
    from ssl3d_cli.config import DEFAULT_SIMCLR_AUGMENTATIONS as AUGS

    torch.set_num_threads(args.threads)
    blend = {"auto": None, "blend": True, "subset": False}
    impls = {"ssl3d_cli.augment.simclr" + ("" if s == "auto" else f" ({s})"): functools.partial(augment_view, blend=blend[s])
             for s in args.strategies.split(",")}
    if args.baseline:
        spec = importlib.util.spec_from_file_location("simclr_baseline", args.baseline)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        impls = {args.baseline: mod.augment_view, **impls}
    dev = torch.device(args.device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    x = torch.randn(args.n, 1, args.size, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(dev)
    gens = {name: torch.Generator(device=dev).manual_seed(0) for name in impls}
    times: dict[str, list[float]] = {name: [] for name in impls}
    for i in range(args.repeats + 3):
        for name, fn in impls.items():
            sync()
            t0 = time.perf_counter()
            fn(x, augmentations=AUGS, gen=gens[name])
            sync()
            if i >= 3:  # warm-up
                times[name].append((time.perf_counter() - t0) * 1000)

    patches = torch.randn(args.pairs, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1)).to(dev)
    same = lambda a, b: (a == b).flatten(1).all(1)  # noqa: E731
    for name, fn in impls.items():
        gen = torch.Generator(device=dev).manual_seed(1)
        v1 = fn(patches, augmentations=AUGS, gen=gen)
        v2 = fn(patches, augmentations=AUGS, gen=gen)
        untouched = torch.cat([same(v1, patches), same(v2, patches)]).float().mean().item()
        record = {
            "impl": name,
            "threads": args.threads,
            "shape": [args.n, 1, args.size, args.size, args.size],
            "median_ms": round(statistics.median(times[name]), 2),
            "mean_ms": round(statistics.mean(times[name]), 2),
            "min_ms": round(min(times[name]), 2),
            "untouched_views": round(untouched, 4),
            "identical_pairs": round(same(v1, v2).float().mean().item(), 4),
            "near_identical_pairs": round(((v1 - v2).flatten(1).abs().amax(1) < 1e-3).float().mean().item(), 4),
            "pairs": args.pairs,
        }
        print(json.dumps(record))


if __name__ == "__main__":
    main()
