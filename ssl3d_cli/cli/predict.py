"""``ssl3d predict``."""

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

NAME = "predict"
HELP = ("Segment scans with Monte-Carlo dropout and a vote rule (majority, weighted, weighted-probs, borda, union, mean); "
        "outputs lie exactly on each scan's grid, in the dataset's original label values.")
EPILOG = ("Examples: ssl3d predict scan.nii.gz --mc-samples 100 --vote borda  |  "
          "ssl3d predict ./Task07_Pancreas/imagesTs -o preds/ --model runs/finetune-.../model.pt --vote union --union-class tumour  |  "
          "ssl3d predict ./Task07_Pancreas --split test --model runs/finetune-.../model.pt -o preds/.  "
          "Each case gets <case>.provenance.json (model SHA-256, MC settings, vote, seed, version, inputs); an existing case is kept "
          "only when its record matches this run and its files exist, else recomputed (the reason is logged); predict_args.json "
          "lists the cases written, kept and failed.  " + BATCH_EXIT_CODES)

ModelOpt = Annotated[Path | None, typer.Option("--model", help="model.pt from `ssl3d finetune`, or its run folder (default: the newest "
                                              "run fine-tuned on the inputs' dataset; for scans outside a dataset folder, the only "
                                              "fine-tuned run; the choice is printed even with -q).")]
McSamplesOpt = Annotated[int, typer.Option("--mc-samples", help="MC-dropout samples N (0 or 1: one deterministic pass, dropout off). "
                                            "Default 0: one pass, the fastest segmentation and the paper's deterministic baseline; the "
                                            "paper's MC-dropout results vote over 100. `ssl3d uncertainty` defaults to 100 because its "
                                            "maps are statistics over the samples.")]
DropEncOpt = Annotated[float | None, typer.Option("--dropout-encoder", help="Encoder dropout rate while sampling (default: the rate the "
                                                  "model was trained with; another rate is noise injection and is warned about).")]
DropDecOpt = Annotated[float | None, typer.Option("--dropout-decoder", help="Decoder dropout rate while sampling (default: the model's "
                                                  "training rate).")]
McBatchOpt = Annotated[int, typer.Option("--mc-batch", help="Samples per forward batch (0: from the model, grid and the GPU's total "
                                         "memory, at most 16). The dropout masks depend on it.")]
CompileOpt = Annotated[str, typer.Option("--compile", help="torch.compile the MC sampler: auto (on CUDA), on, off. Same dropout "
                                         "masks either way; compiling costs time once per process and batch shape.")]
ShardOpt = Annotated[str | None, typer.Option("--shard", help="I/N: every N-th input from I (array jobs).")]
SplitOpt = Annotated[str | None, typer.Option("--split", help="'test': the held-out test cases of the model's fine-tuning run.")]
PrefetchOpt = Annotated[int, typer.Option("--prefetch", help="Cases read and preprocessed ahead, each in its own background "
                                          "thread, while the current one is sampled; its files are written behind in another (0: one "
                                          "case after the other; 2 suits a GPU node with many cores). Outputs are the same either way.")]
SeriesOpt = Annotated[str | None, typer.Option("--series", help="SeriesInstanceUID: read only this series of a DICOM folder (default: "
                                              "each series of a folder is its own case, named <folder>_<number>_<description>).")]


def command(
    inputs: Annotated[list[Path], typer.Argument(help="Scan file(s) (NIfTI .nii/.nii.gz, NRRD .nrrd/.nhdr, "
                                                                 "MetaImage .mha/.mhd), a DICOM series folder, a folder of scans, a "
                                                                 "BraTS case folder, an nnU-Net _0000 folder or a dataset.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder for <case>.nii.gz.")] = Path("predictions"),
    model: ModelOpt = None,
    mc_samples: McSamplesOpt = 0,
    vote: Annotated[str, typer.Option(help="majority | weighted | weighted-probs | borda | union | mean.")] = "majority",
    vote_weights: Annotated[str | None, typer.Option("--vote-weights", help="Per-class weights for weighted / weighted-probs, e.g. 1,2,2.")] = None,
    union_class: Annotated[list[str] | None, typer.Option("--union-class", help="Class for --vote union (name or value; repeat, first wins).")] = None,
    dropout_encoder: DropEncOpt = None,
    dropout_decoder: DropDecOpt = None,
    mc_batch: McBatchOpt = 0,
    compile_mode: CompileOpt = "auto",
    save_probabilities: Annotated[bool, typer.Option("--save-probabilities/--no-save-probabilities",
                                                    help="Also write mean class probabilities (4D NIfTI, classes on the "
                                                         "4th axis, their order in <case>.provenance.json).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite/--no-overwrite", help="Recompute every case, even those whose provenance matches this run.")] = False,
    skip_bad: SkipBadOpt = False,
    shard: ShardOpt = None,
    split: SplitOpt = None,
    series: SeriesOpt = None,
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
        from ssl3d_cli.stages.predict import predict

        mc = MCConfig(mc_samples=mc_samples, dropout_encoder=dropout_encoder, dropout_decoder=dropout_decoder, vote=vote,
                      vote_weights=parse_float_list(vote_weights, option="--vote-weights") if vote_weights else (),
                      union_classes=tuple(union_class or ()), mc_batch=mc_batch, seed=seed, compile=compile_mode)
        runtime = RuntimeConfig(device=device, precision=precision, threads=threads, seed=seed)
        return predict(inputs, output=output, model=model, mc=mc, runtime=runtime, overwrite=overwrite, shard=shard, split=split,
                       save_probabilities=save_probabilities, skip_bad=skip_bad, series=series, prefetch=prefetch)

    def human(r: dict) -> None:
        for c in r["cases"]:
            typer.echo(c["segmentation"])
        for f in r["failed"]:
            typer.echo(f"failed {f['case']}: {f['error']}")
        typer.echo(f"{r['predicted']} case(s) written to {r['output']} ({r['skipped_existing']} kept: same model, settings and inputs; "
                   f"{len(r['failed'])} failed; vote {r['vote']}; model {r['model']})")

    run_stage(body, as_json=json_out, quiet=quiet, verbose=verbose, no_progress=no_progress, debug=debug, human=human,
              check=raise_if_cases_failed)
