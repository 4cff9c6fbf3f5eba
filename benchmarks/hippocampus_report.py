"""Markdown tables of the Task04 Hippocampus experiments (what README's "Results on real data" shows).

Reads what ``benchmarks/hippocampus.sh`` and ``benchmarks/hippocampus_ablation.py`` wrote under OUT: every run's rows
(``OUT/label-fractions/rows/*.json``, ``OUT/mc-dropout/rows/*.json``), ``OUT/experiment.json`` and
``OUT/ablation/ablation.json``; nothing is typed in by hand.

Usage: python benchmarks/hippocampus_report.py OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def _rows(folder: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.json")):
        rows.extend(json.loads(path.read_text()))
    return rows


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def label_fraction_table(rows: list[dict[str, Any]]) -> str:
    """Foreground Dice per fraction and method (mean ± population std over seeds) and the paired SimCLR − scratch gap."""
    lines = ["| label fraction | labelled scans (train + selection) | from scratch | SimCLR | SimCLR − scratch, paired by seed | SimCLR better in | seeds |",
             "|---|---|---|---|---|---|---|"]
    for fraction in sorted({r["fraction"] for r in rows}):
        by = {m: {r["seed"]: r for r in rows if r["fraction"] == fraction and r["method"] == m} for m in ("scratch", "simclr")}
        seeds = sorted(set(by["scratch"]) & set(by["simclr"]))
        gaps = [by["simclr"][s]["dice_mean_fg"] - by["scratch"][s]["dice_mean_fg"] for s in seeds]
        any_run = next(iter([*by["scratch"].values(), *by["simclr"].values()]))
        budget = f"{any_run['train_cases']} + {any_run.get('selection_cases') or 0}"
        lines.append(f"| {fraction * 100:g} % | {budget} | {_mean_std([r['dice_mean_fg'] for r in by['scratch'].values()])} | "
                     f"{_mean_std([r['dice_mean_fg'] for r in by['simclr'].values()])} | {_mean_std(gaps)} | "
                     f"{sum(g > 0 for g in gaps)} of {len(gaps)} | {', '.join(map(str, seeds))} |")
    return "\n".join(lines)


def _group(rows: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def _seeds(group: list[dict[str, Any]]) -> str:
    return ", ".join(str(s) for s in sorted({r["seed"] for r in group}))


def _scores(group: list[dict[str, Any]], calibration: bool = True) -> str:
    cells = [_mean_std([r["dice_mean_fg"] for r in group])]
    if calibration:
        cells += [_mean_std([r[k] for r in group]) for k in ("roi_ece", "roi_brier", "roi_nll")]
    return " | ".join(cells)


def mc_tables(rows: list[dict[str, Any]]) -> str:
    """One table per figure: foreground Dice and the calibration of the mean probabilities in the region of interest
    (ECE, Brier, NLL; the same for every vote rule, since all rules come from one set of samples), mean ± std over seeds."""
    head = "| Dice | ECE (ROI) | Brier (ROI) | NLL (ROI) | seeds |"
    out = ["Figure 3: deterministic vs MC (models trained with dropout 0.3 / 0, sampled at those rates, majority vote)", "",
           "| init | inference " + head, "|---|---|---|---|---|---|---|"]
    for method in ("scratch", "simclr"):
        for label, match in (("one deterministic pass", {"setting": "deterministic"}),
                             ("MC, majority", {"setting": "site", "trained_encoder": 0.3, "trained_decoder": 0.0, "vote": "majority"})):
            group = _group(rows, method=method, **match)
            if group:
                out.append(f"| {method} | {label} | {_scores(group)} | {_seeds(group)} |")
    out += ["", "Figure 4: dropout site (SimCLR models trained with 0.3 in encoder and decoder, majority vote)", "",
            "| sampled in " + head, "|---|---|---|---|---|---|"]
    for label, (enc, dec) in (("encoder", (0.3, 0.0)), ("decoder", (0.0, 0.3)), ("both", (0.3, 0.3))):
        group = _group(rows, method="simclr", setting="site", trained_encoder=0.3, trained_decoder=0.3, dropout_encoder=enc,
                       dropout_decoder=dec, vote="majority")
        if group:
            out.append(f"| {label} | {_scores(group)} | {_seeds(group)} |")
    out += ["", "Figure 5: encoder dropout rate (SimCLR, one model per rate, trained and sampled at it, majority vote)", "",
            "| rate " + head, "|---|---|---|---|---|---|"]
    for rate in sorted({r["dropout_encoder"] for r in _group(rows, setting="rate")}):
        group = _group(rows, method="simclr", setting="rate", dropout_encoder=rate, vote="majority")
        out.append(f"| {rate:g} | {_scores(group)} | {_seeds(group)} |")
    out += ["", "Figure 6: vote rules (models trained 0.3 / 0, foreground Dice)", "", "| vote | from scratch | SimCLR | seeds |",
            "|---|---|---|---|"]
    for vote in ("majority", "weighted", "weighted-probs", "borda", "union", "mean"):
        groups = [_group(rows, method=m, setting="site", trained_encoder=0.3, trained_decoder=0.0, vote=vote) for m in ("scratch", "simclr")]
        if any(groups):
            out.append(f"| {vote} | {_scores(groups[0], False)} | {_scores(groups[1], False)} | {_seeds(groups[0] + groups[1])} |")
    return "\n".join(out)


def ablation_table(ablation: dict[str, Any]) -> str:
    lines = [f"Label fraction {ablation['fraction'] * 100:g} %, seeds {', '.join(map(str, ablation['seeds']))}; "
             "Dice on the scans held back for model selection inside the label budget (the test split is not used).", "",
             "| variant | what | selection Dice (mean ± std) | per seed |", "|---|---|---|---|"]
    for r in ablation["rows"]:
        per_seed = ", ".join(f"{run['best_val_dice']:.3f}" for run in r["runs"])
        lines.append(f"| {r['variant']} | {r['what']} | {r['mean']:.3f} ± {r['std']:.3f} | {per_seed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    out = parser.parse_args().out
    record = json.loads((out / "experiment.json").read_text()) if (out / "experiment.json").exists() else {}
    print(f"Settings: {json.dumps(record.get('settings', {}))}\n")
    lf = _rows(out / "label-fractions" / "rows")
    if lf:
        hours = sum(r.get("train_seconds") or 0 for r in lf) / 3600
        print(f"## Label fractions ({len(lf)} fine-tuning runs, {hours:.2f} h of fine-tuning and testing)\n")
        print(label_fraction_table(lf) + "\n")
    mc = _rows(out / "mc-dropout" / "rows")
    if mc:
        print("## MC dropout\n")
        print(mc_tables(mc) + "\n")
    if (out / "ablation" / "ablation.json").exists():
        print("## Ablations\n")
        print(ablation_table(json.loads((out / "ablation" / "ablation.json").read_text())))


if __name__ == "__main__":
    main()
