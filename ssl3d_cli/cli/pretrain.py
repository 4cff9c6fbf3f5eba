"""``ssl3d pretrain``."""

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
from ssl3d_cli.cli.preprocess import SpacingOpt, grid_config

NAME = "pretrain"
HELP = ("3D SimCLR pretraining of the U-Net encoder on every scan (labelled or not): non-overlapping 3D patches, "
        "two random augmentations each, NT-Xent. Resumable; multi-GPU with torchrun.")
EPILOG = ("Examples: ssl3d pretrain ./Task07_Pancreas --epochs 1000  |  ssl3d pretrain ./Task07_Pancreas --epochs 1000 --resume  |  "
          "torchrun --nproc-per-node 4 -m ssl3d_cli pretrain ./Task07_Pancreas --epochs 1000  |  "
          "ssl3d pretrain ./Task07_Pancreas --resolution native --region-size 128,128,64")

WidthsOpt = Annotated[str, typer.Option("--widths", help="Channels per U-Net level, e.g. 16,32,64,128,256 (same flag on finetune).")]
SizeOpt = Annotated[str | None, typer.Option("--size", help="Cache grid the dataset is preprocessed to (default, the paper: 128).")]


def command(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder (preprocessed on demand) or a cache folder.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Run folder (default runs/pretrain-<dataset>-<time>).")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs (passes over the scans). The paper: 1000.")] = 1000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Scans per step per GPU (M).")] = 4,
    patches_per_side: Annotated[int, typer.Option("--patches-per-side", help="K: each scan is split into K^3 patches (2: 8 of 64^3; 4: 64 of 32^3).")] = 2,
    size: SizeOpt = None,
    resolution: Annotated[str | None, typer.Option("--resolution", help="'native': pretrain on a cache at the dataset's target "
                                                   "spacing, one random region per scan and step split into the K^3 patches; "
                                                   "a size: --size.")] = None,
    spacing: SpacingOpt = None,
    region_size: Annotated[str | None, typer.Option("--region-size", help="Native resolution: region D,H,W in voxels cut from each "
                                                    "scan per step, each side a multiple of K x 2^(levels-1) (default: the scans' "
                                                    "median shape scaled to at most 128^3 voxels).")] = None,
    widths: WidthsOpt = "16,32,64,128,256",
    temperature: Annotated[float, typer.Option(help="NT-Xent temperature (the paper: 0.05; also 0.1, 0.5).")] = 0.05,
    negatives: Annotated[str, typer.Option(help="batch: all other views (paper text); volume: only patches of the same scan (authors code).")] = "batch",
    augmentations: Annotated[str, typer.Option(help="Comma list from rotate,colour,identity,noise,blur,sobel,cutout.")] = "rotate,colour,identity,noise,blur,sobel",
    lr: Annotated[float, typer.Option("--lr", help="Peak AdamW learning rate (not scaled with the number of GPUs).")] = 1e-3,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 1e-5,
    warmup_epochs: Annotated[int, typer.Option("--warmup-epochs", help="Linear warm-up, then cosine decay.")] = 10,
    projection_dim: Annotated[int, typer.Option("--projection-dim", help="Output size of the projection head.")] = 128,
    dropout: Annotated[float, typer.Option("--dropout", help="Encoder dropout rate while pretraining (0: off).")] = 0.0,
    steps_per_epoch: Annotated[int, typer.Option("--steps-per-epoch", help="0: one pass over the scans.")] = 0,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Save last.pt and encoder.pt every N epochs.")] = 10,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from last.pt (of -o, or the newest run of this dataset).")] = False,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 2,
    compile: Annotated[str, typer.Option("--compile", help="torch.compile the augmentation pass: auto (on CUDA), on, off. "
                                         "Views differ from eager ones by float rounding only.")] = "auto",
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
        from ssl3d_cli.config import ModelConfig, PretrainConfig, RuntimeConfig, parse_int_list, parse_size
        from ssl3d_cli.stages.pretrain import pretrain

        model = ModelConfig(widths=parse_int_list(widths, option="--widths"), dropout_encoder=dropout, projection_dim=projection_dim)
        config = PretrainConfig(
            epochs=epochs, batch_size=batch_size, patches_per_side=patches_per_side, temperature=temperature, negatives=negatives,
            augmentations=tuple(a.strip() for a in augmentations.split(",") if a.strip()), learning_rate=lr, weight_decay=weight_decay,
            warmup_epochs=warmup_epochs, checkpoint_every=checkpoint_every, steps_per_epoch=steps_per_epoch, workers=workers, compile=compile,
            model=model)
        runtime = RuntimeConfig(device=device, precision=precision, threads=threads, seed=seed, deterministic=deterministic)
        preprocess_config = grid_config(size, resolution, spacing)
        return pretrain(dataset, config=config, runtime=runtime, preprocess_config=preprocess_config, output=output, resume=resume,
                        cache_root=cache_dir, region_size=parse_size(region_size, option="--region-size") if region_size else None)

    def human(r: dict) -> None:
        loss = "n/a" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        typer.echo(f"Encoder: {r['encoder']}  (final loss {loss}, {r['seconds']:.0f}s on {r['device']})")
        native = " --resolution native" if "region_size" in r else ""  # fine-tune at the resolution it was pretrained at
        typer.echo(f"Next: ssl3d finetune DATASET{native} --encoder {r['encoder']} --label-fraction 0.1")

    run_stage(body, as_json=json_out, quiet=quiet, verbose=verbose, no_progress=no_progress, debug=debug, human=human)
