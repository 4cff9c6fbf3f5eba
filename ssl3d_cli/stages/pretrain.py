"""``ssl3d pretrain``: 3D SimCLR (paper section 2.1) on every scan of a dataset, labelled or not.

Recipe per step: M scans -> K^3 non-overlapping patches each (N = M K^3) -> two random composite
augmentations per patch, batched on the device -> encoder + projection head -> NT-Xent over the 2N
views (gathered across ranks under torchrun) -> AdamW step, warm-up + cosine schedule.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ssl3d_cli import checkpoints
from ssl3d_cli.augment.simclr import augment_view, split_into_patches
from ssl3d_cli.config import PreprocessConfig, PretrainConfig, RuntimeConfig
from ssl3d_cli.data.cache import Cache, atomic_write_json
from ssl3d_cli.errors import ConfigError, InputDataError
from ssl3d_cli.losses.ntxent import nt_xent
from ssl3d_cli.models.unet import SimCLRModel
from ssl3d_cli.runtime import progress
from ssl3d_cli.runtime.device import (
    describe_device,
    seed_everything,
)
from ssl3d_cli.runtime.distributed import DistInfo, all_gather_with_grad, all_reduce_mean, any_rank
from ssl3d_cli.training.loop import (
    EpochBatches,
    SignalGuard,
    StopRequested,
    append_metrics,
    attach_log_file,
    checked_last_path,
    choose_run_dir,
    detach_log_file,
    optimisation_step,
    restore_train_state,
    save_train_state,
    start_training,
    step_generator,
    truncate_metrics,
    unwrap,
    warmup_cosine,
    wrap_ddp,
)

log = logging.getLogger("ssl3d")

# Settings that may change between a run and its --resume.
RESUME_MUTABLE = ("epochs", "checkpoint_every", "workers", "device", "threads")


class CacheVolumes(Dataset):
    """Whole preprocessed scans from the cache (memory-mapped). Item: (C, D, H, W) float16/float32 tensor."""

    def __init__(self, cache: Cache, case_ids: list[str]) -> None:
        self.cache = cache
        self.case_ids = case_ids

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.cache.image(self.case_ids[i])))  # copy out of the memory map


def simclr_step_loss(
    model: torch.nn.Module,
    volumes: torch.Tensor,
    *,
    config: PretrainConfig,
    gen: torch.Generator,
    precision: Any,
    dist: DistInfo,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and positive-pair accuracy of one step.

    Args:
        volumes: (M, C, D, H, W) this rank's scans, on the device.
    Returns:
        (loss, accuracy): NT-Xent of this rank's anchors against all 2N global views.
    """
    k = config.patches_per_side
    patches = split_into_patches(volumes.float(), k)  # (n, C, p, p, p), volume-major
    n = patches.shape[0]
    view1 = augment_view(patches, augmentations=config.augmentations, gen=gen)
    view2 = augment_view(patches, augmentations=config.augmentations, gen=gen)
    with precision.autocast():
        z = model(torch.cat([view1, view2]))
    z1 = all_gather_with_grad(z[:n].float())
    z2 = all_gather_with_grad(z[n:].float())
    groups = None
    if config.negatives == "volume":
        groups = torch.arange(z1.shape[0], device=z1.device) // (k**3)
    rows = slice(dist.rank * n, (dist.rank + 1) * n)
    return nt_xent(z1, z2, temperature=config.temperature, groups=groups, rows=rows)


def encoder_payload(model: torch.nn.Module, *, config: PretrainConfig, cache: Cache, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """What ``encoder.pt`` holds: plain types and tensors only."""
    net = unwrap(model)
    return {
        "architecture": net.config.architecture(),
        "model": net.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in net.encoder.state_dict().items()},
        "preprocess": cache.manifest["settings"],
        "modality": cache.manifest["modality"],
        "channel_names": cache.manifest["channel_names"],
        "dataset": cache.summary(),
        "training": config.to_dict(),
        "epoch": epoch,
        "metrics": metrics,
    }


def pretrain(
    dataset: Path | str,
    *,
    config: PretrainConfig | None = None,
    runtime: RuntimeConfig | None = None,
    preprocess_config: PreprocessConfig | None = None,
    output: Path | None = None,
    resume: bool = False,
    cache_root: Path | None = None,
) -> dict[str, Any]:
    """Train a SimCLR encoder; returns a summary (run folder, final loss, timings).

    Args:
        dataset: a dataset folder (preprocessed on demand) or a cache folder.
        output: run folder (default ``runs/pretrain-<dataset>-<time>``; with ``resume`` the newest one).
    Raises:
        StopRequested: SIGTERM/SIGUSR1 arrived; the state was saved and ``--resume`` continues.
    """
    runtime = (runtime or RuntimeConfig()).validate()
    preprocess_config = (preprocess_config or PreprocessConfig()).validate()
    ctx = start_training(dataset, runtime=runtime, preprocess_config=preprocess_config, cache_root=cache_root)
    device, dist, precision, cache = ctx.device, ctx.dist, ctx.precision, ctx.cache
    config = config or PretrainConfig()
    config = replace(config, model=replace(config.model, in_channels=cache.num_channels)).validate(cache.size)
    if len(cache.case_ids) < 2:
        raise InputDataError(f"{cache.root}: SimCLR needs at least 2 scans for negatives, found {len(cache.case_ids)}")
    if config.negatives == "volume" and config.patches_per_side == 1:
        raise ConfigError("--negatives volume with --patches-per-side 1 leaves no negatives; use --negatives batch or more patches")
    seed_everything(runtime.seed, deterministic=runtime.deterministic)

    dataset_name = cache.manifest["dataset"]["name"]
    run_dir = choose_run_dir("pretrain", dataset_name, output=output, resume=resume)
    full_config = {"pretrain": config.to_dict(), "runtime": runtime.to_dict(), "preprocess": cache.manifest["settings"],
                   "cache": str(cache.root), "world_size": dist.world_size}
    last_path = checked_last_path(run_dir, resume=resume)

    model = SimCLRModel(config.model).to(device)
    model = wrap_ddp(model, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    batches = EpochBatches(len(cache.case_ids), config.batch_size, seed=runtime.seed, world=dist.world_size, rank=dist.rank,
                           steps=config.steps_per_epoch)
    total_steps = config.epochs * batches.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, config.warmup_epochs * batches.steps))
    scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_scaler)

    start_epoch, start_step, accum = 0, 0, {"loss": 0.0, "acc": 0.0, "n": 0}
    if resume:
        state = restore_train_state(last_path, stage="pretrain", full_config=full_config, mutable=RESUME_MUTABLE, model=model,
                                    optimizer=optimizer, scheduler=scheduler, scaler=scaler, rank=dist.rank)
        start_epoch, start_step, accum = state["epoch"], state["step"], state["extra"]["accum"]
        if config.epochs != state["config"]["pretrain"]["epochs"]:  # a longer run keeps the schedule shape
            scheduler.lr_lambdas = [warmup_cosine(total_steps, config.warmup_epochs * batches.steps)]
        log.info("Resuming %s at epoch %d step %d", run_dir, start_epoch + 1, start_step)
        if dist.is_main:
            truncate_metrics(run_dir / "metrics.jsonl", start_epoch)

    handler = attach_log_file(run_dir, "pretrain") if dist.is_main else None
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", full_config)
    patches_per_step = config.batch_size * config.patches_per_side**3 * dist.world_size
    log.info("Device: %s, precision %s", describe_device(device), precision.name)
    log.info("Dataset: %s (%d scans, %s), %d patch(es) of %s per step (%d scans x %d patches x %d ranks), run folder %s",
             dataset_name, len(cache.case_ids), "x".join(map(str, cache.size)), patches_per_step,
             "x".join(str(s // config.patches_per_side) for s in cache.size), config.batch_size, config.patches_per_side**3,
             dist.world_size, run_dir)
    loader = DataLoader(CacheVolumes(cache, cache.case_ids), batch_sampler=batches, num_workers=config.workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)

    def save_state(epoch: int, step: int) -> None:
        save_train_state(last_path, stage="pretrain", full_config=full_config, epoch=epoch, step=step, extra={"accum": accum},
                         model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)

    metrics: dict[str, Any] = {}
    t_start = time.perf_counter()
    model.train()
    try:
        with SignalGuard() as guard, progress.task("Pretraining", total=config.epochs) as bar:
            bar.advance(start_epoch)
            for epoch in range(start_epoch, config.epochs):
                batches.set_epoch(epoch, start_step)
                t_epoch, patches_seen = time.perf_counter(), 0
                for step_offset, volumes in enumerate(loader):
                    step = start_step + step_offset
                    volumes = volumes.to(device, non_blocking=True)
                    gen = step_generator(device, runtime.seed, epoch, step, dist.rank)
                    loss, acc = optimisation_step(
                        lambda volumes=volumes, gen=gen: simclr_step_loss(model, volumes, config=config, gen=gen, precision=precision, dist=dist),
                        optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                        oom_hint=f"{patches_per_step} patches per step on {device}: lower --batch-size (now {config.batch_size}), "
                                 "raise --patches-per-side or lower --size/--widths")
                    accum["loss"] += float(all_reduce_mean(loss.detach()))
                    accum["acc"] += float(all_reduce_mean(acc.detach()))
                    accum["n"] += 1
                    patches_seen += volumes.shape[0] * config.patches_per_side**3 * dist.world_size
                    if any_rank(guard.requested is not None, device):
                        save_state(epoch, step + 1)
                        raise StopRequested(f"signal {guard.requested or 'on another rank'}: state saved in {last_path}; rerun with --resume to continue")
                start_step = 0
                elapsed = time.perf_counter() - t_epoch
                metrics = {"epoch": epoch + 1, "loss": accum["loss"] / max(accum["n"], 1), "top1": accum["acc"] / max(accum["n"], 1),
                           "lr": scheduler.get_last_lr()[0], "patches_per_s": patches_seen / max(elapsed, 1e-9), "seconds": elapsed}
                accum = {"loss": 0.0, "acc": 0.0, "n": 0}
                if dist.is_main:
                    append_metrics(run_dir / "metrics.jsonl", metrics)
                bar.advance(1, loss=metrics["loss"], top1=metrics["top1"], lr=metrics["lr"], patches_s=round(metrics["patches_per_s"], 1))
                last_epoch = epoch + 1 == config.epochs
                if last_epoch or (epoch + 1) % config.checkpoint_every == 0:
                    save_state(epoch + 1, 0)
                    if dist.is_main:
                        checkpoints.save_checkpoint(encoder_payload(model, config=config, cache=cache, epoch=epoch + 1, metrics=metrics),
                                                    run_dir / "encoder.pt", fmt=checkpoints.ENCODER)
    finally:
        detach_log_file(handler)
    return {
        "run_dir": str(run_dir),
        "encoder": str(run_dir / "encoder.pt"),
        "epochs": config.epochs,
        "final_loss": metrics.get("loss"),
        "final_top1": metrics.get("top1"),
        "patches_per_step": patches_per_step,
        "seconds": round(time.perf_counter() - t_start, 2),
        "device": str(device),
        "precision": precision.name,
    }

