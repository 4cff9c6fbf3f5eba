"""SimCLR augmentation: cost per call and how often the two views of a patch are the same.

    python benchmarks/augment.py [--baseline PATH] [--threads 1] [--n 16] [--size 32] [--repeats 40] [--pairs 4000]
        [--device cpu] [--strategies auto] [--parts]

``--baseline`` also loads ``augment_view`` from another file (e.g. an older ``simclr.py`` written out with
``git show REV:ssl3d_cli/augment/simclr.py > /tmp/old.py``); both are measured the same way, their timed calls
interleaved so that a busy machine slows both alike. Reports one JSON line per implementation: median,
mean and minimum milliseconds of ``augment_view`` on ``--n`` patches of ``--size``^3 with the default augmentations,
the share of views bit-identical to their input ("untouched"), and the share of positive pairs (view 1 and
view 2 of one patch, drawn from one generator as pretraining does) that are bit-identical (and nearly so:
max abs difference < 1e-3), over ``--pairs`` random 8^3 patches. ``--strategies auto,blend,subset`` measures the
current implementation once per way of applying the drawn transforms (``augment_view(blend=...)``; auto is the
device's default: blend off the CPU, subset on it); both give the same views.

``--parts`` instead times each transform of one view (every sample, as the blend pass computes it), the blur as
grouped convolutions (how it was computed before) beside the batched matrix products it is now, the whole view eager
and through ``torch.compile`` (``ViewAugmenter``; first call apart), and says how many graphs dynamo makes of the
view (1 with no graph break): milliseconds, best of ``--repeats``, synchronised.
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
    ap.add_argument("--parts", action="store_true", help="time each transform of a view, eager and compiled")
    args = ap.parse_args()
    if args.parts:
        parts(args)
        return

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


def _conv_blur(x, sigma, radius: int = 3):  # noqa: ANN001, ANN202 - the blur before: grouped convolutions, one group per sample
    import torch
    import torch.nn.functional as F

    n, c = x.shape[:2]
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None].float()) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0).to(x.dtype)
    v = x.reshape(1, n * c, *x.shape[2:])
    for axis in range(3):
        shape, pad = [1, 1, 1], [0] * 6
        shape[axis] = 2 * radius + 1
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        v = F.conv3d(F.pad(v, pad, mode="replicate"), k.view(n * c, 1, *shape), groups=n * c)
    return v.view_as(x)


def parts(args: argparse.Namespace) -> None:
    """Milliseconds of each part of one view (module docstring)."""
    import torch
    import torch._dynamo

    from ssl3d_cli.augment import simclr
    from ssl3d_cli.config import DEFAULT_SIMCLR_AUGMENTATIONS as AUGS

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    x = torch.randn(args.n, 1, args.size, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(dev)
    drawn, params = simclr.draw_view(x, augmentations=(*AUGS, "cutout"), gen=torch.Generator(device=dev).manual_seed(0))

    def best(fn) -> float:  # noqa: ANN001
        fn()
        times = []
        for _ in range(args.repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1000)
        return round(min(times), 3)

    out: dict[str, float | int | str] = {}
    for name in simclr.ORDER:
        out[name] = best(lambda name=name: simclr.apply_transform(name, x, params[name], blend=True))
    out["blur (grouped conv3d, before)"] = best(lambda: _conv_blur(x, params["blur"]["sigma"]))
    out["draws"] = best(lambda: simclr.draw_view(x, augmentations=AUGS, gen=torch.Generator(device=dev).manual_seed(1)))
    view = {k: v for k, v in params.items() if k in AUGS}
    out["view eager (blend)"] = best(lambda: simclr.blend_view(x, drawn, view))
    explained = torch._dynamo.explain(simclr.blend_view)(x, drawn, view)
    out["dynamo graphs"], out["dynamo graph breaks"] = explained.graph_count, explained.graph_break_count
    out["break reasons"] = "; ".join(str(b.reason)[:200] for b in explained.break_reasons)
    torch._dynamo.reset()
    augment = simclr.ViewAugmenter(AUGS, compile=True)
    t0 = time.perf_counter()
    augment(x, torch.Generator(device=dev).manual_seed(2))
    out["first compiled call s"] = round(time.perf_counter() - t0, 1)
    out["compiled"] = str(augment.compiled)
    out["view compiled (draws included)"] = best(lambda: augment(x, torch.Generator(device=dev).manual_seed(3)))
    print(json.dumps({"benchmark": "augment parts", "device": str(dev), "shape": list(x.shape), "ms": out}))


if __name__ == "__main__":
    main()
