"""``ssl3d preprocess``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ssl3d_cli.cli.common import (
    CacheDirOpt,
    DebugOpt,
    JsonOpt,
    NoProgressOpt,
    QuietOpt,
    VerboseOpt,
    run_stage,
)

NAME = "preprocess"
HELP = ("Crop each scan to its foreground (from the image alone), resize to 128^3, normalise and cache it; "
        "exactly invertible to the scan's geometry. Reads MSD, nnU-Net v2, BraTS and plain folders (or images/ + labels/) "
        "of NIfTI, NRRD, MetaImage files and DICOM series folders.")
EPILOG = ("Examples: ssl3d preprocess ./Task07_Pancreas --workers 8  |  "
          "ssl3d preprocess ./BraTS2018 --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT")

SizeOpt = Annotated[str | None, typer.Option("--size", help="Cache grid: one number or three (D,H,W). Default (the paper): 128.")]


SpacingOpt = Annotated[str | None, typer.Option("--spacing", help="With --resolution native: the target spacing in mm along R, A, S "
                                                "(default: the dataset's median, nnU-Net's rule for anisotropic data).")]


def grid_config(size: str | None, resolution: str | None, spacing: str | None, **settings: Any) -> Any:
    """``--size`` / ``--resolution`` / ``--spacing`` (and other ``PreprocessConfig`` fields) -> a ``PreprocessConfig``.

    ``--resolution native`` selects the target spacing (``--spacing`` or the dataset's); ``--resolution N`` is ``--size N``;
    neither: ``--size`` (default 128).

    Raises:
        ConfigError: ``--size`` with ``--resolution native``, or two different sizes.
    """
    from ssl3d_cli.config import PreprocessConfig, parse_size
    from ssl3d_cli.errors import ConfigError

    native = resolution is not None and resolution.strip().lower() == "native"
    if native and size is not None:
        raise ConfigError(f"--size {size} with --resolution native: a native cache has no fixed grid; leave --size out")
    if resolution is not None and not native and size is not None and parse_size(resolution) != parse_size(size):
        raise ConfigError(f"--resolution {resolution} and --size {size}: two grid sizes; give one")
    fixed = resolution if resolution is not None and not native else size if size is not None else "128"
    return PreprocessConfig(size=parse_size(fixed), spacing=resolution_spacing(resolution, spacing), **settings)


def resolution_spacing(resolution: str | None, spacing: str | None) -> tuple[float, float, float] | str | None:
    """``--resolution`` / ``--spacing`` -> ``PreprocessConfig.spacing``: None (a fixed grid), ``"auto"`` or three mm values.

    Raises:
        ConfigError: ``--spacing`` without ``--resolution native``, or not three positive numbers.
    """
    from ssl3d_cli.data.spacing import parse_spacing
    from ssl3d_cli.errors import ConfigError

    native = resolution is not None and resolution.strip().lower() == "native"
    if spacing is not None and not native:
        raise ConfigError(f"--spacing {spacing}: only with --resolution native (a fixed grid has no target spacing)")
    if not native:
        return None
    if spacing is None:
        return "auto"
    try:
        return parse_spacing(spacing)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def command(
    dataset: Annotated[Path, typer.Argument(help="MSD / nnU-Net / BraTS folder, or a plain folder of scans (NIfTI, NRRD, MetaImage, "
                                            "DICOM series folders).")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Exact cache folder (default: keyed by dataset path and settings).")] = None,
    size: SizeOpt = None,
    resolution: Annotated[str | None, typer.Option("--resolution", help="'native': resample each crop to a target spacing and keep "
                                                   "its own size (patch training, sliding-window inference); a size (e.g. 128): "
                                                   "the paper's fixed grid, as --size.")] = None,
    spacing: SpacingOpt = None,
    modality: Annotated[str, typer.Option(help="auto | ct | mr (how the foreground and intensities are found).")] = "auto",
    dtype: Annotated[str, typer.Option(help="float16 (half the disk) or float32.")] = "float16",
    workers: Annotated[int, typer.Option(help="Parallel processes.")] = 1,
    shard: Annotated[str | None, typer.Option(help="I/N: only every N-th case from I (array jobs).")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad/--no-skip-bad", help="Continue past bad cases and list them at the end.")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check the whole dataset first and list every problem.")] = False,
    cache_dir: CacheDirOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    no_progress: NoProgressOpt = False,
    debug: DebugOpt = False,
) -> None:
    def body() -> dict:
        from ssl3d_cli.stages.preprocess import preprocess

        config = grid_config(size, resolution, spacing, modality=modality, dtype=dtype)
        return preprocess(dataset, config=config, cache_dir=output, cache_root=cache_dir, workers=workers,
                          shard=shard, skip_bad=skip_bad, verify=verify).to_dict()

    def human(r: dict) -> None:
        typer.echo(f"Cache: {r['cache_dir']}  ({r['processed']} processed, {r['up_to_date']} up to date, {r['cases']} cases)")
        if r.get("spacing_mm"):
            typer.echo("Target spacing: " + " x ".join(f"{v:.3g}" for v in r["spacing_mm"]) + " mm (R, A, S)")
        for bad in r["bad"]:
            typer.echo(f"  skipped {bad['case']}: {bad['error']}")
        if r["bad"]:
            raise typer.Exit(1)

    run_stage(body, as_json=json_out, quiet=quiet, verbose=verbose, no_progress=no_progress, debug=debug, human=human)
