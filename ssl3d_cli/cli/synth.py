"""``ssl3d synth``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ssl3d_cli.cli.common import DebugOpt, JsonOpt, NoProgressOpt, QuietOpt, VerboseOpt, run_stage

NAME = "synth"
HELP = "Write a synthetic CT-like (pancreas) or MR-like (BraTS) dataset in the MSD layout."
EPILOG = "Example: ssl3d synth ./Task99_Synth --kind ct --cases 12"

SynthSeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the synthetic data: every case's voxel spacing, field of view, "
                                           "anatomy and lesion shapes, intensities and noise. The same seed and options write the same "
                                           "dataset.")]


def command(
    out: Annotated[Path, typer.Argument(help="Folder to create.")],
    kind: Annotated[str, typer.Option(help="ct (labels background/organ/lesion) or mr (4 channels, BraTS labels 0/1/2/4).")] = "ct",
    cases: Annotated[int, typer.Option(help="Labelled cases (imagesTr/labelsTr).")] = 12,
    unlabelled: Annotated[int | None, typer.Option(help="Unlabelled cases in imagesTs (default: cases/4, at least 1).")] = None,
    shape: Annotated[tuple[int, int, int] | None, typer.Option(help="Base voxel shape X Y Z (each case varies around it).")] = None,
    layout: Annotated[str, typer.Option(help="msd, or brats (one folder per case; --kind mr).")] = "msd",
    overwrite: Annotated[bool, typer.Option("--overwrite/--no-overwrite", help="Replace a non-empty folder.")] = False,
    seed: SynthSeedOpt = 0,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    no_progress: NoProgressOpt = False,
    debug: DebugOpt = False,
) -> None:
    def body() -> dict:
        from ssl3d_cli.stages.synth import synth

        return synth(out, kind=kind, cases=cases, unlabelled=unlabelled, seed=seed, shape=shape, layout=layout,
                     overwrite=overwrite).to_dict()

    def human(r: dict) -> None:
        typer.echo(f"Wrote {r['labelled']} labelled + {r['unlabelled']} unlabelled cases to {r['dataset']}")
        typer.echo(f"Next: ssl3d preprocess {r['dataset']}")

    run_stage(body, as_json=json_out, quiet=quiet, verbose=verbose, no_progress=no_progress, debug=debug, human=human)
