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
from ssl3d_cli.cli.predict import CompileOpt, DropDecOpt, DropEncOpt, McBatchOpt, ModelOpt, PrefetchOpt, SeriesOpt, ShardOpt, SplitOpt

NAME = "uncertainty"
HELP = ("Per-voxel percentile heat maps (5th/50th/95th) over MC-dropout samples of the probability of a class (or classes, "
        "or a region), its std, predictive entropy and mutual information, a PNG in the style of the paper's Figure 7, and from "
        "the same samples the segmentation (--vote, as `ssl3d predict` writes it); all in the scan's geometry.")
EPILOG = ("Example: ssl3d uncertainty scan.nii.gz --mc-samples 100 --class tumour --percentiles 5,50,95 --label truth.nii.gz  |  "
          "ssl3d uncertainty ./Task07_Pancreas/imagesTr --class tumour --label ./Task07_Pancreas -o unc/.  "
          "Files: <case>.nii.gz (segmentation), <case>_entropy.nii.gz, <case>_mutual_information.nii.gz (over all classes), "
          "<case>_<target>_p05.nii.gz (one per percentile), <case>_<target>_std.nii.gz, <case>_<target>_uncertainty.png, where "
          "<target> is the class name (organ), names joined by + (organ+lesion), a region (WT) or foreground; "
          "<case>.provenance.json and <case>_<target>.provenance.json (an existing case is kept only when both match this run "
          "and its files exist, else recomputed); uncertainty_args.json describes the run.  " + BATCH_EXIT_CODES)


def command(
    inputs: Annotated[list[Path], typer.Argument(help="Scan file(s) (NIfTI .nii/.nii.gz, NRRD .nrrd/.nhdr, MetaImage "
                                                                 ".mha/.mhd), a DICOM series folder, a folder of scans, a BraTS case "
                                                                 "folder or a dataset.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")] = Path("uncertainty"),
    model: ModelOpt = None,
    mc_samples: Annotated[int, typer.Option("--mc-samples", help="MC-dropout samples N: at least 2, default 100 (the paper's). "
                                            "`ssl3d predict` defaults to one deterministic pass, which gives labels but no "
                                            "spread to measure.")] = 100,
    class_: Annotated[list[str] | None, typer.Option("--class", help="Target class (name or value; repeat to sum) or a region: WT, TC, "
                                                     "ET. Default: all foreground classes summed (files named 'foreground').")] = None,
    percentiles: Annotated[str, typer.Option(help="Comma list in 0..100.")] = "5,50,95",
    label: Annotated[Path | None, typer.Option("--label", help="Truth outlined in the figure: a label file (one input case), or a "
                                               "folder matched by case name as `ssl3d evaluate` matches (a dataset folder, a folder "
                                               "of label files, or a cache). Cases without a label get the prediction outlined.")] = None,
    figure: Annotated[bool, typer.Option("--figure/--no-figure", help="Write the PNG (percentile panels over the scan).")] = True,
    vote: Annotated[str, typer.Option(help="Vote rule of the segmentation (and the figure's predicted outline): majority | weighted | "
                                      "weighted-probs | borda | union | mean.")] = "majority",
    vote_weights: Annotated[str | None, typer.Option("--vote-weights", help="Per-class weights for weighted / weighted-probs, e.g. 1,2,2.")] = None,
    union_class: Annotated[list[str] | None, typer.Option("--union-class", help="Class for --vote union (name or value; repeat, first wins).")] = None,
    dropout_encoder: DropEncOpt = None,
    dropout_decoder: DropDecOpt = None,
    mc_batch: McBatchOpt = 0,
    compile_mode: CompileOpt = "auto",
    percentile_fusion: Annotated[str | None, typer.Option("--percentile-fusion", help="Native-resolution models: where windows "
                                                          "overlap, the percentile/std maps of the window whose centre is nearest "
                                                          "(nearest, the default: exact percentiles of one window's N samples) or the "
                                                          "windows' maps averaged with the Gaussian weights (gaussian: no seams, an "
                                                          "average of percentiles).")] = None,
    shard: ShardOpt = None,
    split: SplitOpt = None,
    series: SeriesOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite/--no-overwrite", help="Recompute every case, even those whose provenance matches this run.")] = False,
    skip_bad: SkipBadOpt = False,
    prefetch: PrefetchOpt = 1,
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
                      vote_weights=parse_float_list(vote_weights, option="--vote-weights") if vote_weights else (),
                      union_classes=tuple(union_class or ()), mc_batch=mc_batch, seed=seed, compile=compile_mode)
        runtime = RuntimeConfig(device=device, precision=precision, threads=threads, seed=seed)
        return uncertainty(inputs, output=output, model=model, mc=mc, runtime=runtime, classes=list(class_ or []),
                           percentile_fusion=percentile_fusion,
                           percentiles=list(parse_float_list(percentiles, option="--percentiles")), label=label, figure=figure,
                           overwrite=overwrite, shard=shard, split=split, skip_bad=skip_bad,
                           series=series, prefetch=prefetch)

    def human(r: dict) -> None:
        for c in r["cases"]:
            typer.echo(f"{c['case']}: " + ", ".join(Path(p).name for p in c["files"].values()) + (f", {Path(c['figure']).name}" if "figure" in c else ""))
        if r["kept"]:
            typer.echo(f"{len(r['kept'])} case(s) kept (same model, settings and inputs): " + ", ".join(r["kept"][:5])
                       + (", ..." if len(r["kept"]) > 5 else ""))
        for f in r["failed"]:
            typer.echo(f"failed {f['case']}: {f['error']}")
        typer.echo(f"Maps of p({r['target']}) and {r['vote']}-vote labels from {r['mc_samples']} samples in {r['output']} "
                   f"(model {r['model']}; {Path(r['args']).name})")

    run_stage(body, as_json=json_out, quiet=quiet, verbose=verbose, no_progress=no_progress, debug=debug, human=human,
              check=raise_if_cases_failed)
