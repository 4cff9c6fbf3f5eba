"""``ssl3d finetune``."""

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
    PrecisionOpt,
    QuietOpt,
    SeedOpt,
    ThreadsOpt,
    VerboseOpt,
    run_stage,
)
from ssl3d_cli.cli.evaluate import print_table
from ssl3d_cli.cli.preprocess import SpacingOpt, grid_config

NAME = "finetune"
HELP = ("Fine-tune the U-Net from a pretrained encoder (or --from-scratch: the baseline) with the weighted soft Dice; "
        "encoder frozen for the first epochs; seeded nested label fractions; test table at the end.")
EPILOG = ("Examples: ssl3d finetune ./Task07_Pancreas --encoder runs/pretrain-.../encoder.pt --label-fraction 0.1 --epochs 400  |  "
          "ssl3d finetune ./Task07_Pancreas --from-scratch --label-fraction 0.1 --epochs 400")


def command(
    dataset: Annotated[Path, typer.Argument(help="Labelled dataset folder (preprocessed on demand) or its cache.")],
    encoder: Annotated[Path | None, typer.Option(help="encoder.pt from `ssl3d pretrain` (default: the newest pretraining run of this dataset).")] = None,
    from_scratch: Annotated[bool, typer.Option("--from-scratch/--no-from-scratch", help="Random initialisation: the paper's baseline.")] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Run folder (default runs/finetune-<dataset>-<time>).")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs. The paper: 400.")] = 400,
    freeze_epochs: Annotated[int, typer.Option("--freeze-epochs", help="Epochs with the pretrained encoder frozen (warm-up).")] = 25,
    label_fraction: Annotated[float, typer.Option("--label-fraction", help="Share of the training cases used (0.05 ... 1.0; nested).")] = 1.0,
    test_fraction: Annotated[float, typer.Option("--test-fraction", help="Held-out test share of the labelled cases (seeded, fixed).")] = 0.3,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Validation share of the rest (for the best checkpoint).")] = 0.1,
    split: Annotated[Path | None, typer.Option("--split", help="Reuse a split.json from another run of this dataset.")] = None,
    class_weights: Annotated[str | None, typer.Option("--class-weights", help="Dice weight per class, e.g. 1,2,2 (default uniform).")] = None,
    exclude_background: Annotated[bool, typer.Option("--exclude-background/--no-exclude-background", help="Leave class 0 out of the Dice loss.")] = False,
    dice_smooth: Annotated[float, typer.Option("--dice-smooth", help="Smoothing s of Eq. 2.")] = 1e-5,
    loss: Annotated[str, typer.Option(help="dice (Eq. 2) or dice-ce.")] = "dice",
    dropout_encoder: Annotated[float, typer.Option("--dropout-encoder", help="Encoder dropout while training; MC-dropout prediction samples "
                                                   "at the training rates (the paper's best: 0.3).")] = 0.3,
    dropout_decoder: Annotated[float, typer.Option("--dropout-decoder", help="Decoder dropout while training (the paper's best: 0.0).")] = 0.0,
    size: Annotated[str | None, typer.Option("--size", help="Cache grid (default, the paper: 128).")] = None,
    resolution: Annotated[str | None, typer.Option("--resolution", help="'native': train on patches of a cache at the dataset's "
                                                   "target spacing (pretrain with --resolution native for a matching encoder); "
                                                   "a size: --size.")] = None,
    spacing: SpacingOpt = None,
    patch_size: Annotated[str | None, typer.Option("--patch-size", help="Native resolution: training patch D,H,W in voxels (default: "
                                                   "the cases' median shape scaled to at most 128^3 voxels).")] = None,
    foreground_oversampling: Annotated[float, typer.Option("--foreground-oversampling", help="Native resolution: share of patches "
                                                           "centred on a foreground voxel (nnU-Net: 1/3).")] = 1.0 / 3.0,
    widths: Annotated[str, typer.Option("--widths", help="Channels per U-Net level; must match the encoder.")] = "16,32,64,128,256",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Volumes per step per GPU.")] = 2,
    lr: Annotated[float, typer.Option("--lr", help="Peak AdamW learning rate.")] = 1e-3,
    warmup_epochs: Annotated[int, typer.Option("--warmup-epochs")] = 5,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Flips, small rotations and intensity jitter while training.")] = True,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every")] = 10,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from last.pt (of -o or the newest run of this dataset).")] = False,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 2,
    test: Annotated[bool, typer.Option("--test/--no-test", help="Predict the held-out test set and print its table at the end.")] = True,
    deterministic: Annotated[bool, typer.Option("--deterministic/--no-deterministic", help="Deterministic kernels (slower on GPU).")] = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
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
        from ssl3d_cli.config import FinetuneConfig, ModelConfig, RuntimeConfig, parse_float_list, parse_int_list, parse_size
        from ssl3d_cli.errors import ConfigError
        from ssl3d_cli.stages.finetune import finetune

        if from_scratch and encoder is not None:
            raise ConfigError("--from-scratch and --encoder exclude each other")
        model = ModelConfig(widths=parse_int_list(widths, option="--widths"), dropout_encoder=dropout_encoder, dropout_decoder=dropout_decoder)
        config = FinetuneConfig(
            epochs=epochs, freeze_epochs=freeze_epochs, batch_size=batch_size, label_fraction=label_fraction, test_fraction=test_fraction,
            val_fraction=val_fraction, class_weights=parse_float_list(class_weights, option="--class-weights") if class_weights else (),
            include_background=not exclude_background, dice_smooth=dice_smooth, loss=loss, learning_rate=lr, warmup_epochs=warmup_epochs,
            checkpoint_every=checkpoint_every, augment=augment, from_scratch=from_scratch, workers=workers, model=model,
            patch_size=parse_size(patch_size, option="--patch-size") if patch_size else None, foreground_oversampling=foreground_oversampling)
        runtime = RuntimeConfig(device=device, precision=precision, threads=threads, seed=seed, deterministic=deterministic)
        preprocess_config = grid_config(size, resolution, spacing)
        return finetune(dataset, encoder=encoder, config=config, runtime=runtime, preprocess_config=preprocess_config,
                        output=output, resume=resume, split_file=split, cache_root=cache_dir, evaluate_test=test)

    def human(r: dict) -> None:
        used = r["labelled_used"]
        chosen = (f"best selection Dice {r['best_val_dice']:.3f} at epoch {r['best_epoch']}" if r["best_val_dice"] is not None
                  else f"last epoch {r['best_epoch']}, no selection scans")
        typer.echo(f"Model: {r['model']}  ({chosen}; {used['training']} labelled scan(s) trained it, {used['selection']} selected it; "
                   f"{r['seconds']:.0f}s)")
        if "test" in r:
            typer.echo(f"Test set ({r['test']['cases']} cases, table in {r['test']['metrics_json']}):")
            print_table({"mean": r["test"]["mean"], "class_names": r["test"]["class_names"], "regions": r["test"]["regions"]}, cases=False)
            typer.echo(f"Next: ssl3d predict SCAN.nii.gz --model {r['model']} --mc-samples 100 --vote majority")

    run_stage(body, as_json=json_out, quiet=quiet, verbose=verbose, no_progress=no_progress, debug=debug, human=human)
