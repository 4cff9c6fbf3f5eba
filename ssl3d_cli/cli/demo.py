"""``ssl3d demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ssl3d_cli.cli.common import DebugOpt, DeviceOpt, JsonOpt, NoProgressOpt, QuietOpt, SeedOpt, ThreadsOpt, VerboseOpt, run_stage, stdout_console

NAME = "demo"
HELP = ("Run the whole chain on built-in synthetic CT-like data: preprocess, SimCLR pretraining, fine-tuning from the encoder and "
        "from scratch, MC-dropout prediction, evaluation and an uncertainty figure. A few minutes on a CPU.")
EPILOG = "Examples: ssl3d demo  |  ssl3d demo -o /tmp/ssl3d-demo --device cuda  |  ssl3d demo --full (paper-sized; a GPU)"
NO_ARGS_HELP = False


def command(
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for everything the demo writes.")] = Path("ssl3d-demo"),
    full: Annotated[bool, typer.Option("--full/--no-full", help="Paper-sized settings (128^3, 5 levels, K=4, long training): use a GPU.")] = False,
    tiny: Annotated[bool, typer.Option("--tiny/--no-tiny", help="Smallest settings (seconds; for tests and CI).")] = False,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = 0,
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    no_progress: NoProgressOpt = False,
    debug: DebugOpt = False,
) -> None:
    def body() -> dict:
        from ssl3d_cli.stages.demo import demo

        preset = "full" if full else "tiny" if tiny else "default"
        return demo(output, preset=preset, device=device, seed=seed, threads=threads)

    def human(r: dict) -> None:
        from rich.table import Table

        table = Table(title=f"Test Dice, {r['test_cases']} test cases, fine-tuned on {r['train_cases']} labelled cases "
                            f"(label fraction {r['label_fraction']:g})")
        keys = [k for k in r["table"][0] if k.startswith("dice_")]
        for col in ["init", "inference"] + keys:
            table.add_column(col.replace("dice_", "Dice ").replace("mean_fg", "mean"), justify="right" if col.startswith("dice") else "left")
        for row in r["table"]:
            table.add_row(row["init"], row["inference"], *[f"{row[k]:.3f}" for k in keys])
        stdout_console().print(table)
        typer.echo(f"Finished in {r['seconds']:.0f}s. Everything is in {r['output']}:")
        typer.echo(f"  dataset      {r['dataset']}")
        typer.echo(f"  encoder      {r['encoder']}")
        typer.echo(f"  models       {r['model_simclr']}  |  {r['model_scratch']}")
        typer.echo(f"  predictions  {Path(r['table'][0]['predictions']).parent}")
        typer.echo(f"  uncertainty  {r['uncertainty']}  (figure {r['figure']})")
        typer.echo("On real data next:")
        typer.echo("  ssl3d pretrain ./Task07_Pancreas --epochs 1000")
        typer.echo("  ssl3d finetune ./Task07_Pancreas --label-fraction 0.1 --epochs 400")
        typer.echo("  ssl3d predict ./Task07_Pancreas/imagesTs -o preds/ --mc-samples 100 --vote majority")

    run_stage(body, as_json=json_out, quiet=quiet, verbose=verbose, no_progress=no_progress, debug=debug, human=human)
