"""``ssl3d evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ssl3d_cli.cli.common import DebugOpt, JsonOpt, NoProgressOpt, QuietOpt, VerboseOpt, run_stage, stdout_console

NAME = "evaluate"
HELP = ("Dice per class, foreground mean, BraTS regions WT/TC/ET and HD95 (mm) of predictions against labels, "
        "matched by case name, in original label values.")
EPILOG = "Examples: ssl3d evaluate preds/ ./Task07_Pancreas  |  ssl3d evaluate preds/ labels/ --csv scores.csv --json"


def print_table(result: dict[str, Any], *, cases: bool = True) -> None:
    """Dice/HD95 table on stdout (rich)."""
    from rich.table import Table

    names = [n for n in result["class_names"][1:]] + list(result.get("regions") or {})
    table = Table(show_edge=False)
    table.add_column("case")
    for n in names:
        table.add_column(f"Dice {n}", justify="right")
    table.add_column("Dice mean", justify="right")
    for n in names:
        table.add_column(f"HD95 {n}", justify="right")

    def row(label: str, r: dict[str, Any]) -> list[str]:
        cells = [label] + [f"{r.get(f'dice_{n}', float('nan')):.3f}" for n in names] + [f"{r['dice_mean_fg']:.3f}"]
        return cells + [f"{r[f'hd95_{n}']:.1f}" if f"hd95_{n}" in r else "" for n in names]

    if cases:
        for r in result.get("cases", []):
            table.add_row(*row(r["case"], r))
    table.add_row(*row("mean", result["mean"]), style="bold")
    stdout_console().print(table)


def command(
    predictions: Annotated[Path, typer.Argument(help="Folder of <case>.nii.gz predictions.")],
    labels: Annotated[Path, typer.Argument(help="Dataset folder, folder of label files, or a cache.")],
    csv: Annotated[Path | None, typer.Option("--csv", help="Also write the table as CSV.")] = None,
    no_hd95: Annotated[bool, typer.Option("--no-hd95", help="Dice only (faster).")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    no_progress: NoProgressOpt = False,
    debug: DebugOpt = False,
) -> None:
    def body() -> dict:
        from ssl3d_cli.stages.evaluate import evaluate

        return evaluate(predictions, labels, csv_path=csv, with_hd95=not no_hd95)

    run_stage(body, as_json=json_out, quiet=quiet, verbose=verbose, no_progress=no_progress, debug=debug, human=print_table)
