"""MC-dropout inference: seconds per scan and peak memory, ssl3d vs a hand-written batched loop vs a naive loop.

    python benchmarks/mc_dropout.py [--device auto] [--sizes 64,128] [--samples 1,10,100] [--widths 16,32,64,128,256]
                                    [--vote majority] [--batch 16] [--repeats 3]
                                    [--modes ssl3d,ssl3d-compiled,ssl3d-before,batched,batched-compiled,naive]

ssl3d: eval mode with only dropout modules sampling, the deterministic prefix computed once,
samples in batches, running vote sums of the asked rule only (memory flat in N).
ssl3d-before: the same sampler with the accumulator as it was before issue 14 (every rule's sums for every sample:
arg-max counts, weighted arg-max, a double argsort for Borda, sums), from ``benchmarks/_baseline.py``.
ssl3d-compiled: ``ssl3d`` with ``--compile on`` (the sampled part and the softmax through torch.compile).
batched: the strongest simple loop a user writes by hand: eval mode, only the dropout modules put in training mode,
the input repeated into batches of ``--batch``, full forward passes, running vote counts, arg-max at the end.
batched-compiled: the batched loop with the model through ``torch.compile`` (same inductor settings).
naive: ``model.train()`` (all modules), N full forward passes, every sample's probabilities kept, then a majority vote.
Each configuration runs in a fresh process: one full first run (``first_seconds``: with compilation for the compiled
modes, so ``first_seconds - seconds`` is the compile cost), then ``--repeats`` timed runs (``seconds``: the minimum).
CPU peak memory is that process's peak RSS (VmHWM), GPU peak
is torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_child  # noqa: E402

CHILD = """
import json, sys, time
import torch
sys.path.insert(0, sys.argv[8])
import _baseline as before
from _common import peak_rss_mib
from ssl3d_cli.config import ModelConfig
from ssl3d_cli.models.unet import LevelDropout, UNet
from ssl3d_cli.inference.mc import sample_probabilities
from ssl3d_cli.inference.votes import VoteAccumulator, vote_labels
from ssl3d_cli.runtime.device import resolve_device, resolve_precision, set_threads
mode, size, n, device_spec, widths = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], tuple(int(w) for w in sys.argv[5].split(","))
vote, batch, repeats = sys.argv[6], int(sys.argv[7]), int(sys.argv[9])
device = resolve_device(device_spec); set_threads(0)
precision = resolve_precision("auto", device)
torch.manual_seed(0)
model = UNet(ModelConfig(widths=widths, dropout_encoder=0.3), 3).to(device)
x = torch.randn(1, 1, size, size, size, device=device)
weights = torch.tensor([1.0, 2.0, 2.0])
def sync():
    if device.type == "cuda": torch.cuda.synchronize()
def ours(n=n, compile="off"):
    acc = VoteAccumulator(3, weights=weights, rules=(vote,))
    sample_probabilities(model, x, mc_samples=n, mc_batch=batch, autocast=precision.autocast, consume=acc.update, dropout_encoder=0.3,
                         compile=compile)
    return vote_labels(acc, vote, [2])
def ours_before(n=n):
    acc = before.VoteAccumulator(3, weights=weights)
    sample_probabilities(model, x, mc_samples=n, mc_batch=batch, autocast=precision.autocast, consume=acc.update, dropout_encoder=0.3)
    return before.decide(acc.scores(vote), acc.mean_prob())
forward = model
@torch.no_grad()
def batched(n=n):
    model.eval()
    for m in model.modules():  # only dropout samples; normalisation stays in inference mode
        if isinstance(m, LevelDropout) and m.p > 0:
            m.train()
    votes = torch.zeros(3, size, size, size, device=device)
    done = 0
    while done < max(n, 1):
        b = min(batch, max(n, 1) - done)
        with precision.autocast():
            logits = forward(x.expand(b, -1, -1, -1, -1))
        votes += torch.nn.functional.one_hot(logits.argmax(1), 3).sum(0).permute(3, 0, 1, 2)
        done += b
    return votes.argmax(0)
@torch.no_grad()
def naive(n=n):
    model.train()
    probs = []
    for _ in range(max(n, 1)):
        with precision.autocast():
            probs.append(torch.softmax(model(x).float(), 1))
    stack = torch.cat(probs)
    votes = torch.nn.functional.one_hot(stack.argmax(1), 3).sum(0)
    return votes.argmax(-1)
if mode == "batched-compiled":
    import torch._inductor.config as inductor_config
    inductor_config.fallback_random = True  # as ssl3d's sampler: eager's dropout masks
    forward = torch.compile(model, dynamic=False)
fn = {"ssl3d": ours, "ssl3d-compiled": lambda: ours(compile="on"), "ssl3d-before": ours_before, "batched": batched,
      "batched-compiled": batched, "naive": naive}[mode]
sync(); t0 = time.perf_counter(); fn(); sync(); first = time.perf_counter() - t0  # compiles; warms the allocator and cudnn
if device.type == "cuda": torch.cuda.reset_peak_memory_stats()
times = []
for _ in range(max(repeats, 1)):
    t0 = time.perf_counter(); fn(); sync(); times.append(time.perf_counter() - t0)
gpu = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
rss = peak_rss_mib()
name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
print(json.dumps({"mode": mode, "vote": vote, "size": size, "samples": n, "batch": batch, "seconds": round(min(times), 3),
                  "first_seconds": round(first, 3), "peak_rss_mib": rss, "peak_gpu_mib": None if gpu is None else round(gpu, 1),
                  "device": name, "precision": precision.name}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sizes", default="64,128")
    ap.add_argument("--samples", default="1,10,100")
    ap.add_argument("--widths", default="16,32,64,128,256")
    ap.add_argument("--modes", default="ssl3d,ssl3d-compiled,ssl3d-before,batched,batched-compiled,naive")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after the first (the minimum is reported)")
    ap.add_argument("--vote", default="majority", help="the rule ssl3d / ssl3d-before count (batched and naive: majority)")
    ap.add_argument("--batch", type=int, default=16, help="samples per forward pass (the batched loop and ssl3d's --mc-batch)")
    args = ap.parse_args()
    here = str(Path(__file__).resolve().parent)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        for n in [int(s) for s in args.samples.split(",")]:
            for mode in args.modes.split(","):
                try:
                    res = run_child(CHILD, mode, str(size), str(n), args.device, args.widths, args.vote, str(args.batch), here, str(args.repeats))
                except RuntimeError as exc:  # one failed configuration (e.g. a compiler missing) must not lose the others
                    res = {"mode": mode, "size": size, "samples": n, "error": str(exc).strip().splitlines()[-1][:300]}
                res.pop("child_peak_rss_mib_at_least", None)
                results.append(res)
                print(json.dumps(res), flush=True)
    print(json.dumps({"benchmark": "mc_dropout", "widths": args.widths, "vote": args.vote, "load": load, "results": results}))


if __name__ == "__main__":
    main()
