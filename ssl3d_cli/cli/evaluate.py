"""``ssl3d evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ssl3d_cli.cli.common import DebugOpt, JsonOpt, NoProgressOpt, QuietOpt, VerboseOpt, run_stage, stdout_console

NAME = "evaluate"
HELP = ("Dice per class, foreground mean, BraTS regions WT/TC/ET, HD95 (mm) and normalised surface Dice (NSD) of predictions "
        "against labels, matched by case name, in original label values. Surfaces are 6-connected with the outside of the "
        "array as background; HD95 = max of the two directed 95th percentiles; NSD counts surface voxels within the "
        "tolerance. Empty masks: Dice 1 when both are empty; HD95 0 (both) or the volume diagonal (one); NSD 1 (both) or 0 "
        "(one). The JSON output records these conventions and the tolerance.")
EPILOG = ("Examples: ssl3d evaluate preds/ ./Task07_Pancreas  |  ssl3d evaluate preds/ labels/ --csv scores.csv -o scores.json  |  "
          "ssl3d evaluate preds/ labels/ --nsd-tolerance 1.  Classes are named as the labels' dataset names them; for a plain "
          "folder of label files, as PREDICTIONS/predict_args.json (written by ssl3d predict) names them.")


def print_table(result: dict[str, Any], *, cases: bool = True) -> None:
    """Dice/HD95/NSD table on stdout (rich)."""
    from rich.table import Table

    names = [n for n in result["class_names"][1:]] + list(result.get("regions") or {})
    tolerance = (result.get("conventions") or {}).get("nsd_tolerance_mm")
    table = Table(show_edge=False, caption=f"HD95 in mm; NSD at {tolerance:g} mm" if tolerance is not None else None)
    table.add_column("case")
    for n in names:
        table.add_column(f"Dice {n}", justify="right")
    table.add_column("Dice mean", justify="right")
    for n in names:
        table.add_column(f"HD95 {n}", justify="right")
    for n in names:
        table.add_column(f"NSD {n}", justify="right")

    def row(label: str, r: dict[str, Any]) -> list[str]:
        cells = [label] + [f"{r.get(f'dice_{n}', float('nan')):.3f}" for n in names] + [f"{r['dice_mean_fg']:.3f}"]
        cells += [f"{r[f'hd95_{n}']:.1f}" if f"hd95_{n}" in r else "" for n in names]
        return cells + [f"{r[f'nsd_{n}']:.3f}" if f"nsd_{n}" in r else "" for n in names]

    if cases:
        for r in result.get("cases", []):
            table.add_row(*row(r["case"], r))
    table.add_row(*row("mean", result["mean"]), style="bold")
    stdout_console().print(table)
    if "calibration" in result:
        for where, c in (("scan", result["calibration"]["scan"]), ("region of interest", result["calibration"]["region_of_interest"])):
            stdout_console().print(f"Calibration over the {where} (all cases pooled): ECE {c['ece_pooled']:.4f}, Brier {c['brier_pooled']:.4f}, "
                                   f"NLL {c['nll_pooled']:.4f} (case means {c['ece_case_mean']:.4f} / {c['brier_case_mean']:.4f} / "
                                   f"{c['nll_case_mean']:.4f}); reliability diagram {result['reliability_figure']}")
    if "uncertainty_error" in result:
        u = result["uncertainty_error"]
        stdout_console().print(f"Uncertainty vs errors: Dice {u['best_dice']:.3f} at entropy > {u['threshold_nats']:.3f} nats (pooled)")


def command(
    predictions: Annotated[Path, typer.Argument(help="Folder of <case>.nii.gz predictions.")],
    labels: Annotated[Path, typer.Argument(help="Dataset folder, folder of label files, or a cache.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", metavar="FILE.json", help="Also write the summary (what --json prints: "
                                                "per-case rows, means, class names, conventions) to this JSON file.")] = None,
    csv: Annotated[Path | None, typer.Option("--csv", help="Also write the table as CSV.")] = None,
    hd95: Annotated[bool, typer.Option("--hd95/--no-hd95", help="The surface metrics, HD95 and NSD (--no-hd95: Dice only, faster; both "
                                     "share the distance maps, the slow part).")] = True,
    nsd_tolerance: Annotated[float, typer.Option("--nsd-tolerance", metavar="MM", min=0.0,
                                                 help="Tolerance of the normalised surface Dice, in mm.")] = 2.0,
    probabilities: Annotated[Path | None, typer.Option("--probabilities", help="Folder of <case>_probabilities.nii.gz (predict "
                                                       "--save-probabilities): adds ECE (15 bins), Brier and NLL over each scan and a "
                                                       "region around truth and prediction, pooled values and a reliability diagram.")] = None,
    uncertainty: Annotated[Path | None, typer.Option("--uncertainty", help="Folder of <case>_entropy.nii.gz (ssl3d uncertainty): adds the "
                                                     "Dice between high-entropy voxels and errors (best over 50 thresholds, with it).")] = None,
    reliability_figure: Annotated[Path | None, typer.Option("--reliability-figure", help="Where the reliability diagram goes "
                                                            "(default: PREDICTIONS/reliability.png).")] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    no_progress: NoProgressOpt = False,
    debug: DebugOpt = False,
) -> None:
    def body() -> dict:
        from ssl3d_cli.stages.evaluate import evaluate

        return evaluate(predictions, labels, csv_path=csv, with_hd95=hd95, nsd_tolerance_mm=nsd_tolerance,
                        probabilities=probabilities, uncertainty=uncertainty, reliability_figure=reliability_figure,
                        json_path=output)

    def human(r: dict) -> None:
        print_table(r)
        if r.get("json"):
            typer.echo(f"Summary written to {r['json']}")

    run_stage(body, as_json=json_out, quiet=quiet, verbose=verbose, no_progress=no_progress, debug=debug, human=human)
