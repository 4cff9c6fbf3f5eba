"""``ssl3d uncertainty``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ssl3d_cli.cli.common import (
    BATCH_EXIT_CODES,
    DebugOpt,
    DeviceOpt,
    JsonOpt,
    NoProgressOpt,
    PrecisionOpt,
    QuietOpt,
    SeedOpt,
    SkipBadOpt,
    ThreadsOpt,
    VerboseOpt,
    raise_if_cases_failed,
    run_stage,
)
from ssl3d_cli.cli.predict import DropDecOpt, DropEncOpt, McBatchOpt, ModelOpt, ShardOpt, SplitOpt

NAME = "uncertainty"
HELP = ("Per-voxel percentile heat maps (5th/50th/95th) of a class's probability over MC-dropout samples, predictive entropy, "
        "mutual information, std, and a PNG in the style of the paper's Figure 7; all in the scan's geometry.")
EPILOG = ("Example: ssl3d uncertainty scan.nii.gz --mc-samples 100 --class tumour --percentiles 5,50,95 --label truth.nii.gz.  "
          + BATCH_EXIT_CODES)


def command(
    inputs: Annotated[list[Path], typer.Argument(help="NIfTI file(s), a folder, a BraTS case folder or a dataset.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")] = Path("uncertainty"),
    model: ModelOpt = None,
    mc_samples: Annotated[int, typer.Option("--mc-samples", help="MC-dropout samples (at least 2; the paper: 100).")] = 100,
    class_: Annotated[list[str] | None, typer.Option("--class", help="Target class (name or value; repeat to sum) or a region: WT, TC, ET.")] = None,
    percentiles: Annotated[str, typer.Option(help="Comma list in 0..100.")] = "5,50,95",
    label: Annotated[Path | None, typer.Option("--label", help="Truth label file: its region is outlined in the figure.")] = None,
    no_figure: Annotated[bool, typer.Option("--no-figure", help="Skip the PNG.")] = False,
    vote: Annotated[str, typer.Option(help="Vote rule for the predicted outline when no --label is given.")] = "majority",
    dropout_encoder: DropEncOpt = None,
    dropout_decoder: DropDecOpt = None,
    mc_batch: McBatchOpt = 0,
    shard: ShardOpt = None,
    split: SplitOpt = None,
    skip_bad: SkipBadOpt = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    threads: ThreadsOpt = 0,
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    no_progress: NoProgressOpt = False,
    debug: DebugOpt = False,
) -> None:
    def body() -> dict:
        from ssl3d_cli.config import MCConfig, RuntimeConfig, parse_float_list
        from ssl3d_cli.stages.uncertainty import uncertainty

        mc = MCConfig(mc_samples=mc_samples, dropout_encoder=dropout_encoder, dropout_decoder=dropout_decoder, vote=vote,
                      mc_batch=mc_batch, seed=seed)
        runtime = RuntimeConfig(device=device, precision=precision, threads=threads, seed=seed)
        return uncertainty(inputs, output=output, model=model, mc=mc, runtime=runtime, classes=list(class_ or []),
                           percentiles=list(parse_float_list(percentiles, option="--percentiles")), label=label, figure=not no_figure,
                           shard=shard, split=split, skip_bad=skip_bad)

    def human(r: dict) -> None:
        for c in r["cases"]:
            typer.echo(f"{c['case']}: " + ", ".join(Path(p).name for p in c["files"].values()) + (f", {Path(c['figure']).name}" if "figure" in c else ""))
        for f in r["failed"]:
            typer.echo(f"failed {f['case']}: {f['error']}")
        typer.echo(f"Maps of p({r['target']}) from {r['mc_samples']} samples in {r['output']} (model {r['model']})")

    run_stage(body, as_json=json_out, quiet=quiet, verbose=verbose, no_progress=no_progress, debug=debug, human=human,
              check=raise_if_cases_failed)
