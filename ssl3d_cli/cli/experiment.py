"""``ssl3d experiment``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ssl3d_cli.cli.common import (
    CacheDirOpt,
    DebugOpt,
    DeviceOpt,
    JsonOpt,
    NoProgressOpt,
    QuietOpt,
    SeedOpt,
    ThreadsOpt,
    VerboseOpt,
    run_stage,
    stdout_console,
)

NAME = "experiment"
HELP = ("Reproduce the paper's figures: label-fractions (SimCLR vs from scratch over 5-100 % labels) or mc-dropout "
        "(deterministic vs MC, dropout site, rate, vote rules). Resumable; --shard I/N for array jobs, --collect to merge.")
EPILOG = ("Examples: ssl3d experiment label-fractions ./Task07_Pancreas --repetitions 3  |  "
          "ssl3d experiment label-fractions ./Task99_Synth --quick  |  "
          "ssl3d experiment label-fractions ./Task04_Hippocampus --quick --finetune-epochs 100 --repetitions 3  |  "
          "ssl3d experiment mc-dropout ./Task07_Pancreas --encoder runs/.../encoder.pt")


def command(
    name: Annotated[str, typer.Argument(help="label-fractions | mc-dropout")],
    dataset: Annotated[Path, typer.Argument(help="Labelled dataset folder.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Experiment folder (runs, results.csv, summary.json, plots).")] = Path("experiments"),
    encoder: Annotated[Path | None, typer.Option(help="encoder.pt to reuse (default: pretrain one into OUTPUT/pretrain).")] = None,
    quick: Annotated[bool, typer.Option("--quick/--no-quick", help="CPU-sized settings (32^3, short training); the default is the paper's.")] = False,
    fractions: Annotated[str, typer.Option(help="Label fractions.")] = "0.05,0.1,0.25,0.5,1.0",
    repetitions: Annotated[int, typer.Option(help="Seeds per setting (mean and spread in the plots).")] = 1,
    size: Annotated[int | None, typer.Option(help="Cache grid edge in voxels (default: 32 with --quick, else 128).")] = None,
    resolution: Annotated[str | None, typer.Option("--resolution", help="'native': every run at the dataset's target spacing "
                                                   "(patch pretraining and fine-tuning, sliding-window inference); default: "
                                                   "the fixed --size grid.")] = None,
    pretrain_epochs: Annotated[int | None, typer.Option(help="SimCLR epochs (default: 20 with --quick, else 1000).")] = None,
    finetune_epochs: Annotated[int | None, typer.Option(help="Fine-tuning epochs (default: 30 with --quick, else 400).")] = None,
    freeze_epochs: Annotated[int | None, typer.Option(help="Epochs with the encoder frozen (default: 5 with --quick, else 25).")] = None,
    mc_samples: Annotated[int | None, typer.Option(help="MC samples per case in mc-dropout (default: 10 with --quick, else 100).")] = None,
    shard: Annotated[str | None, typer.Option("--shard", help="I/N: every N-th run from I (array jobs).")] = None,
    collect: Annotated[bool, typer.Option("--collect/--no-collect", help="Only merge finished runs into results.csv, summary.json and plots.")] = False,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = 0,
    seed: SeedOpt = 0,
    cache_dir: CacheDirOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    no_progress: NoProgressOpt = False,
    debug: DebugOpt = False,
) -> None:
    def body() -> dict:
        from ssl3d_cli.config import RuntimeConfig, parse_float_list
        from ssl3d_cli.errors import ConfigError
        from ssl3d_cli.stages.experiment import Settings, experiment

        if resolution is not None and resolution.strip().lower() not in ("native", "fixed"):
            raise ConfigError(f"--resolution {resolution!r}: native, or leave it out for the fixed --size grid")
        settings = Settings.make(quick, size=size, pretrain_epochs=pretrain_epochs, finetune_epochs=finetune_epochs,
                                 freeze_epochs=freeze_epochs, mc_samples=mc_samples,
                                 native=True if resolution is not None and resolution.strip().lower() == "native" else None)
        return experiment(name, dataset, output=output, encoder=encoder, quick=quick, settings=settings,
                          fractions=parse_float_list(fractions, option="--fractions"), repetitions=repetitions, seed=seed,
                          runtime=RuntimeConfig(device=device, threads=threads, seed=seed), shard=shard, collect_only=collect,
                          cache_root=cache_dir)

    def human(r: dict) -> None:
        if "summary" not in r:
            typer.echo(f"Shard {r['shard']} done ({r['runs']} runs). When all shards are done: {r['next']}")
            return
        from rich.table import Table

        mc = name == "mc-dropout"
        table = Table(title=f"{r['rows']} result rows; mean foreground test Dice (std over seeds)")
        for col in ("method", "fraction") + (("setting", "drop enc/dec", "vote") if mc else ()) + ("Dice", "n"):
            table.add_column(col)
        for s in r["summary"]:
            extra = (s["setting"], f"{s['dropout_encoder']:g}/{s['dropout_decoder']:g}", s["vote"]) if mc else ()
            table.add_row(s["method"], f"{s['fraction']:g}", *extra, f"{s['dice_mean_fg']:.3f} ({s['dice_std']:.3f})", str(s["n"]))
        stdout_console().print(table)
        typer.echo(f"results: {r['results']}")
        for p in r["plots"]:
            typer.echo(f"plot: {p}")

    run_stage(body, as_json=json_out, quiet=quiet, verbose=verbose, no_progress=no_progress, debug=debug, human=human)
