"""Seeded ablations of SimCLR pretraining on MSD Task04 Hippocampus, chosen by validation Dice inside the label budget.

Why: ``benchmarks/hippocampus.sh`` (``ssl3d experiment label-fractions --quick``) may show SimCLR not helping. This
script varies one thing at a time against the quick settings (pretraining length, NT-Xent temperature, the freeze
schedule, fine-tuning length, the fine-tuning learning rate) at one label fraction and ranks the variants by the Dice on
the scans held back for model selection *inside* that label budget (``best_val_dice`` of each run: at 25 % of the
70-scan pool, 15 training + 3 selection scans per seed). The test split is never predicted here (``--no-test``): a
chosen variant is reported on the test split once, by ``ssl3d experiment`` with its settings.

Every run goes through the command line (``python -m ssl3d_cli pretrain|finetune``) into ``OUT/ablation``; finished
runs are skipped, so rerunning the same command resumes. ``OUT/pretrain/encoder.pt`` (the experiment's own encoder,
made with the quick settings) and the experiment's own runs of the two base variants (``OUT/runs/simclr-f0.25-s0`` ...)
are reused when they exist.

Usage: python benchmarks/hippocampus_ablation.py OUT [--fraction 0.25] [--seeds 0,1,2] [--only NAME,...] [--threads N]
(OUT: the folder of ``benchmarks/hippocampus.sh``, holding ``Task04_Hippocampus/`` and ``cache/``.)
Writes OUT/ablation/ablation.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

#: The quick settings of ``ssl3d experiment`` (stages/experiment.py ``Settings.make(quick=True)`` and ``_train``).
QUICK_PRETRAIN = {"--epochs": "20", "--patches-per-side": "2", "--widths": "8,16,32", "--size": "32", "--temperature": "0.1",
                  "--workers": "0"}
QUICK_FINETUNE = {"--epochs": "30", "--freeze-epochs": "5", "--widths": "8,16,32", "--size": "32", "--lr": "0.003",
                  "--val-fraction": "0.2", "--batch-size": "2", "--workers": "0", "--dropout-encoder": "0.3", "--dropout-decoder": "0"}


@dataclass(frozen=True)
class Variant:
    """One ablation row: pretraining flags over the quick ones (None: from scratch) and fine-tuning flags over the quick ones."""

    name: str
    what: str
    pretrain: dict[str, str] | None = field(default_factory=dict)
    finetune: dict[str, str] = field(default_factory=dict)


VARIANTS = [
    Variant("scratch", "from scratch, quick fine-tuning (30 epochs)", None),
    Variant("simclr", "SimCLR 20 epochs, T 0.1, frozen 5 epochs (the quick experiment)"),
    Variant("simclr-freeze0", "as simclr, encoder never frozen", {}, {"--freeze-epochs": "0"}),
    Variant("simclr-T0.05", "SimCLR temperature 0.05 (the paper's)", {"--temperature": "0.05"}),
    Variant("simclr-pre60", "SimCLR 60 epochs", {"--epochs": "60"}),
    Variant("scratch-ft100", "from scratch, 100 fine-tuning epochs", None, {"--epochs": "100"}),
    Variant("simclr-ft100", "SimCLR 20 epochs, 100 fine-tuning epochs", {}, {"--epochs": "100"}),
]


def _flags(options: dict[str, str]) -> list[str]:
    return [part for key, value in options.items() for part in (key, value)]


#: Extra flags for every command (``--threads N`` from the command line).
COMMON: list[str] = []


def _run(args: list[str], log: Path) -> dict:
    """Run one ssl3d command with ``--json`` and return its JSON line; stderr goes to ``log``."""
    with log.open("a") as err:
        proc = subprocess.run([sys.executable, "-m", "ssl3d_cli", *args, "--json", "--device", "cpu", "--no-progress", *COMMON],
                              stdout=subprocess.PIPE, stderr=err, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed (exit {proc.returncode}); see {log}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def encoder_for(variant: Variant, out: Path, dataset: Path, log: Path) -> Path | None:
    """The encoder of a variant: pretrained once per distinct pretraining setting, the experiment's own reused."""
    if variant.pretrain is None:
        return None
    options = {**QUICK_PRETRAIN, **variant.pretrain}
    if not variant.pretrain and (out / "pretrain" / "encoder.pt").exists():
        return out / "pretrain" / "encoder.pt"
    tag = "-".join(f"{k.strip('-')}{v}" for k, v in sorted(variant.pretrain.items())) or "quick"
    run = out / "ablation" / "pretrain" / tag
    if not (run / "encoder.pt").exists():
        resume = ["--resume"] if (run / "last.pt").exists() else []
        _run(["pretrain", str(dataset), "-o", str(run), *_flags(options), *resume], log)
    return run / "encoder.pt"


def finetune_run(variant: Variant, seed: int, fraction: float, encoder: Path | None, out: Path, dataset: Path, log: Path) -> dict:
    """Fine-tune one seed of a variant (skipped when finished) and return its selection Dice and time."""
    run = out / "ablation" / "runs" / f"{variant.name}-f{fraction:g}-s{seed}"
    result_file = run / "ablation_result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    reused = experiment_run(variant, seed, fraction, out)
    if reused is not None:
        return reused
    init = ["--from-scratch"] if encoder is None else ["--encoder", str(encoder)]
    resume = ["--resume"] if (run / "last.pt").exists() else []
    t0 = time.perf_counter()
    res = _run(["finetune", str(dataset), "-o", str(run), *init, "--label-fraction", str(fraction), "--seed", str(seed), "--no-test",
                *_flags({**QUICK_FINETUNE, **variant.finetune}), *resume], log)
    result = {"variant": variant.name, "seed": seed, "fraction": fraction, "best_val_dice": res.get("best_val_dice"),
              "best_epoch": res.get("best_epoch"), "seconds": round(time.perf_counter() - t0, 1)}
    result_file.write_text(json.dumps(result))
    return result


def experiment_run(variant: Variant, seed: int, fraction: float, out: Path) -> dict | None:
    """The selection Dice of the experiment's own finished run when the variant is exactly the quick setting.

    ``ssl3d experiment label-fractions --quick`` fine-tunes these with the same flags, seed and split (a rerun gives the
    same selection Dice to the last digit on the CPU), so they are read rather than trained again.
    """
    if variant.finetune or variant.pretrain not in (None, {}):
        return None
    run = out / "runs" / f"{'scratch' if variant.pretrain is None else 'simclr'}-f{fraction:g}-s{seed}"
    if not (run / "model.pt").exists() or not (run / "metrics.jsonl").exists():
        return None
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    scored = [e for e in epochs if e.get("val_dice") is not None]
    if not scored:
        return None
    best = max(scored, key=lambda e: e["val_dice"])  # the first epoch reaching the maximum, as fine-tuning keeps it
    return {"variant": variant.name, "seed": seed, "fraction": fraction, "best_val_dice": best["val_dice"], "best_epoch": best["epoch"],
            "seconds": round(sum(e.get("seconds", 0.0) for e in epochs), 1), "reused": str(run)}


def table(rows: list[dict]) -> str:
    lines = ["| variant | what | selection Dice, mean ± std over seeds | seeds | fine-tuning s/run |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['what']} | {r['mean']:.3f} ± {r['std']:.3f} | {r['n']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default="", help="comma list of variant names (default: all)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per run (0: ssl3d's default)")
    args = parser.parse_args()
    if args.threads:
        COMMON.extend(["--threads", str(args.threads)])
    out = args.out.resolve()
    dataset = out / "Task04_Hippocampus"
    if not dataset.is_dir():
        raise SystemExit(f"{dataset}: not found; run benchmarks/hippocampus.sh {out} first (it copies the data)")
    os.environ.setdefault("SSL3D_CACHE_DIR", str(out / "cache"))
    (out / "ablation").mkdir(parents=True, exist_ok=True)
    log = out / "ablation" / "ablation.log"
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = [v for v in VARIANTS if not args.only or v.name in args.only.split(",")]
    summary = []
    for variant in chosen:
        encoder = encoder_for(variant, out, dataset, log)
        results = [finetune_run(variant, seed, args.fraction, encoder, out, dataset, log) for seed in seeds]
        dice = [r["best_val_dice"] for r in results]
        summary.append({"variant": variant.name, "what": variant.what, "pretrain": variant.pretrain, "finetune": variant.finetune,
                        "mean": statistics.mean(dice), "std": statistics.pstdev(dice), "n": len(dice),
                        "seconds": statistics.mean(r["seconds"] for r in results), "runs": results})
        (out / "ablation" / "ablation.json").write_text(json.dumps({"fraction": args.fraction, "seeds": seeds, "rows": summary}, indent=1))
    print(table(summary))


if __name__ == "__main__":
    main()
