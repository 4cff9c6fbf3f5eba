"""``ssl3d pretrain``: 3D SimCLR (paper section 2.1) on every scan of a dataset, labelled or not.

Recipe per step: M scans -> K^3 non-overlapping patches each (N = M K^3) -> two random composite
augmentations per patch, batched on the device -> encoder + projection head -> NT-Xent over the 2N
views (gathered across ranks under torchrun) -> AdamW step, warm-up + cosine schedule. The views need no model: the
run makes them one step ahead (``SimCLRRecipe.prepare``), on CUDA on the copy stream beside the previous step's passes,
with the augmentation's blend pass compiled under ``--compile auto`` on CUDA (``augment.simclr.ViewAugmenter``).

On a native-resolution cache (issue 15) the scans keep their own sizes at the target spacing, so "a scan" of the recipe
becomes one random region of it, drawn per step with the step's generator (``training.patches.sample_regions``: uniform
position, a smaller case padded with its minimum): the region is split into the same K^3 non-overlapping patches, and a
positive pair is the two augmented views of one patch, as on the fixed grid. The region (``--region-size``, default
from the cases' median shape: :func:`native_region_size`) is recorded in the run's settings and in ``encoder.pt``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ssl3d_cli import checkpoints
from ssl3d_cli.augment.simclr import VIEW_POLICY, ViewAugmenter, split_into_patches
from ssl3d_cli.config import PreprocessConfig, PretrainConfig, RuntimeConfig
from ssl3d_cli.data.cache import Cache
from ssl3d_cli.errors import ConfigError, InputDataError
from ssl3d_cli.losses.ntxent import nt_xent
from ssl3d_cli.models.unet import SimCLRModel
from ssl3d_cli.runtime.compiling import compile_wanted
from ssl3d_cli.runtime.device import seed_everything
from ssl3d_cli.runtime.distributed import DistInfo, all_gather_with_grad
from ssl3d_cli.stages.preprocess import open_cache_on_all_ranks
from ssl3d_cli.training.data import CacheCases
from ssl3d_cli.training.patches import collate_images, default_region_size, sample_regions
from ssl3d_cli.training.run import Recipe, Schedule, TrainingRun, start_training, unwrap

log = logging.getLogger("ssl3d")


def simclr_views(volumes: torch.Tensor, *, config: PretrainConfig, gen: torch.Generator,
                 augment: ViewAugmenter | None = None) -> torch.Tensor:
    """The two views of every patch of one step: no model involved, so the run prepares them a step ahead.

    Args:
        volumes: (M, C, D, H, W) this rank's scans, on the device.
        augment: draws and applies one view (default: ``config.augmentations``, not compiled).
    Returns:
        (2n, C, p, p, p) float32, n = M K^3 patches (volume-major): the first views, then the second views.
    """
    patches = split_into_patches(volumes.float(), config.patches_per_side)  # (n, C, p, p, p), volume-major
    augment = augment or ViewAugmenter(config.augmentations)
    view1 = augment(patches, gen)
    view2 = augment(patches, gen)
    return torch.cat([view1, view2])


def simclr_loss(model: torch.nn.Module, views: torch.Tensor, *, config: PretrainConfig, precision: Any,
                dist: DistInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and positive-pair accuracy of one step from :func:`simclr_views`' (2n, C, p, p, p) views.

    Returns:
        (loss, accuracy): NT-Xent of this rank's anchors against all 2N global views.
    """
    n = views.shape[0] // 2
    k = config.patches_per_side
    with precision.autocast():
        z = model(views)
    z1 = all_gather_with_grad(z[:n].float())
    z2 = all_gather_with_grad(z[n:].float())
    groups = None
    if config.negatives == "volume":
        groups = torch.arange(z1.shape[0], device=z1.device) // (k**3)
    rows = slice(dist.rank * n, (dist.rank + 1) * n)
    return nt_xent(z1, z2, temperature=config.temperature, groups=groups, rows=rows)


def simclr_step_loss(
    model: torch.nn.Module,
    volumes: torch.Tensor,
    *,
    config: PretrainConfig,
    gen: torch.Generator,
    precision: Any,
    dist: DistInfo,
    augment: ViewAugmenter | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and positive-pair accuracy of one step from (M, C, D, H, W) scans: :func:`simclr_views`, then :func:`simclr_loss`."""
    views = simclr_views(volumes, config=config, gen=gen, augment=augment)
    return simclr_loss(model, views, config=config, precision=precision, dist=dist)


Region = tuple[int, int, int]


def pretrain_settings(config: PretrainConfig, region: Region | None) -> dict[str, Any]:
    """The run's pretraining settings (``config.json``, compared on ``--resume``; ``encoder.pt``'s ``training``):
    ``config.to_dict()``, plus ``region_size`` on a native-resolution cache only, so the fixed grid keeps its dict."""
    out = config.to_dict()
    if region is not None:
        out["region_size"] = list(region)
    return out


def native_region_size(cache: Cache, config: PretrainConfig, region_size: Sequence[int] | None) -> Region:
    """The region cut from each case of a native-resolution cache per step: ``region_size``, or chosen from the cases'
    median shape (``training.patches.default_region_size``).

    Raises:
        ConfigError: a side that is not a multiple of K * 2^(levels - 1) (K^3 equal patches of a size the U-Net
            takes), or patches too small for the U-Net's levels.
    """
    k, levels = config.patches_per_side, len(config.model.widths)
    if k < 1:
        raise ConfigError(f"--patches-per-side {k}: must be at least 1")
    step = k * 2 ** (levels - 1)
    if region_size is not None:
        region = tuple(int(s) for s in region_size)
    else:
        region = default_region_size([cache.record(cid)["geometry"]["size"] for cid in cache.case_ids], levels, k)
    text = ",".join(map(str, region))
    if len(region) != 3 or any(r < 1 or r % step for r in region):
        raise ConfigError(f"--region-size {text}: three sides, each a multiple of {step} (--patches-per-side {k} x "
                          f"2^{levels - 1} for {levels} U-Net levels)")
    if any(r // k < 2**levels for r in region):  # the bottleneck keeps at least 2 voxels per axis, as on the fixed grid
        raise ConfigError(f"--region-size {text}: patches of {[r // k for r in region]} are too small for {levels} U-Net levels "
                          f"(at least {2**levels} per side); use a larger --region-size, fewer --patches-per-side or fewer --widths")
    median = [sorted(int(cache.record(cid)["geometry"]["size"][a]) for cid in cache.case_ids)[len(cache.case_ids) // 2] for a in range(3)]
    patch = [r // k for r in region]
    padded = [a for a in range(3) if region[a] - median[a] >= patch[a]]
    if padded:  # a whole row of the K^3 patches would be padding for a typical scan: near-identical inputs for NT-Xent
        axes = ", ".join("RAS"[a] for a in padded)
        raise ConfigError(f"region {text} exceeds the median scan ({'x'.join(map(str, median))}) by a whole patch along {axes}: "
                          f"{k}^3 patches of {'x'.join(map(str, patch))} would include patches of padding only; use "
                          "--patches-per-side 1, fewer --widths levels, or a finer --spacing along that axis")
    return region[0], region[1], region[2]


def encoder_payload(model: torch.nn.Module, *, config: PretrainConfig, cache: Cache, epoch: int, metrics: dict[str, Any],
                    region: Region | None = None) -> dict[str, Any]:
    """What ``encoder.pt`` holds: plain types and tensors only (``training.region_size``: a native-resolution run's region)."""
    net = unwrap(model)
    return {
        "architecture": net.config.architecture(),
        "model": net.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in net.encoder.state_dict().items()},
        "dataset": cache.dataset.to_dict(),
        "training": pretrain_settings(config, region),
        "epoch": epoch,
        "metrics": metrics,
    }


class SimCLRRecipe(Recipe):
    """Pretraining as a :class:`TrainingRun` recipe: SimCLR loss per step, ``encoder.pt`` at each checkpoint.

    With ``region`` (a native-resolution cache) the loader hands lists of whole cases and each step cuts one region per
    case from its generator before the SimCLR loss.
    """

    description = "Pretraining"
    shown = ("loss", "top1", "lr", "patches_per_s")

    def __init__(self, cache: Cache, *, config: PretrainConfig, ctx: Any, run_dir: Path, region: Region | None = None) -> None:
        self.cache, self.config, self.precision, self.dist, self.run_dir = cache, config, ctx.precision, ctx.dist, run_dir
        self.region = region
        self.model = SimCLRModel(config.model).to(ctx.device)
        self.augment = ViewAugmenter(config.augmentations, compile=compile_wanted(config.compile, ctx.device), strict=config.compile == "on")
        self.dataset = CacheCases(cache, cache.case_ids)
        self.state = {}
        self.patches_per_step = config.batch_size * config.patches_per_side**3 * ctx.dist.world_size
        self.oom_hint = (f"{self.patches_per_step} patches per step on {ctx.device}: lower --batch-size (now {config.batch_size}), "
                         "raise --patches-per-side or lower --size/--widths")
        if region is not None:
            self.collate = collate_images  # cases of different sizes: regions are cut in step()
            self.oom_hint = (f"{self.patches_per_step} patches per step on {ctx.device}: lower --batch-size (now {config.batch_size}) "
                             f"or --region-size (now {','.join(map(str, region))}), or raise --patches-per-side")

    def prepare(self, batch: torch.Tensor | list[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        """``batch``: (M, C, D, H, W) scans, or (native) a list of M cases (C, D_i, H_i, W_i) -> (M, C, *region);
        returns the step's (2n, C, p, p, p) views (:func:`simclr_views`), made a step ahead on the copy stream."""
        if self.region is not None:  # drawn first from this step's generator, so a resumed step cuts the same regions
            batch = sample_regions(list(batch), self.region, gen=gen)
        return simclr_views(batch, config=self.config, gen=gen, augment=self.augment)

    def step(self, model: torch.nn.Module, views: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """NT-Xent loss and positive-pair accuracy of ``prepare``'s (2n, C, p, p, p) views (``gen``: unused here)."""
        loss, acc = simclr_loss(model, views, config=self.config, precision=self.precision, dist=self.dist)
        return loss, {"acc": acc}

    def epoch_end(self, model: torch.nn.Module, epoch: int, metrics: dict[str, Any], *, steps: int) -> dict[str, Any]:
        top1 = metrics.pop("acc", 0.0)
        patches_per_s = steps * self.patches_per_step / max(metrics["seconds"], 1e-9)
        return {**metrics, "top1": top1, "patches_per_s": patches_per_s}

    def checkpoint(self, model: torch.nn.Module, epoch: int, metrics: dict[str, Any]) -> None:
        payload = encoder_payload(model, config=self.config, cache=self.cache, epoch=epoch, metrics=metrics, region=self.region)
        checkpoints.save_checkpoint(payload, self.run_dir / "encoder.pt", fmt=checkpoints.ENCODER)


def pretrain(
    dataset: Path | str,
    *,
    config: PretrainConfig | None = None,
    runtime: RuntimeConfig | None = None,
    preprocess_config: PreprocessConfig | None = None,
    output: Path | None = None,
    resume: bool = False,
    cache_root: Path | None = None,
    region_size: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Train a SimCLR encoder; returns a summary (run folder, final loss, timings).

    Args:
        dataset: a dataset folder (preprocessed on demand) or a cache folder.
        output: run folder (default ``runs/pretrain-<dataset>-<time>``; with ``resume`` the newest one).
        region_size: native-resolution caches only: the (D, H, W) region cut from each case per step (None: from the
            cases' median shape, :func:`native_region_size`).
    Raises:
        StopRequested: SIGTERM/SIGUSR1 arrived; the state was saved and ``--resume`` continues.
    """
    runtime = (runtime or RuntimeConfig()).validate()
    preprocess_config = (preprocess_config or PreprocessConfig()).validate()
    ctx = start_training(runtime)
    cache = open_cache_on_all_ranks(dataset, config=preprocess_config, cache_root=cache_root)
    config = config or PretrainConfig()
    config = replace(config, model=replace(config.model, in_channels=cache.dataset.num_channels))
    region: Region | None = None
    if cache.dataset.preprocess_config().native:
        config.model.validate()  # the widths first: the region's rounding depends on their number
        region = native_region_size(cache, config, region_size)
    elif region_size is not None:
        raise ConfigError(f"--region-size {','.join(map(str, region_size))}: only for a native-resolution cache (preprocess "
                          f"--resolution native); {cache.root} holds the fixed {cache.dataset.size} grid, split whole")
    config = config.validate(region or cache.dataset.size)
    if len(cache.case_ids) < 2:
        raise InputDataError(f"{cache.root}: SimCLR needs at least 2 scans for negatives, found {len(cache.case_ids)}")
    if config.negatives == "volume" and config.patches_per_side == 1:
        raise ConfigError("--negatives volume with --patches-per-side 1 leaves no negatives; use --negatives batch or more patches")
    seed_everything(runtime.seed, deterministic=runtime.deterministic)
    # the cache's folder is provenance; --resume compares its content fingerprint, so the cache may move or be re-made
    full_config = {"pretrain": pretrain_settings(config, region), "runtime": runtime.to_dict(), "preprocess": cache.dataset.preprocess,
                   "cache": str(cache.root), "cache_content": cache.content_fingerprint(), "world_size": ctx.dist.world_size,
                   "simclr_view_policy": VIEW_POLICY}
    t_start = time.perf_counter()
    with TrainingRun("pretrain", cache.dataset.name, config=full_config, output=output, resume=resume, device=ctx.device, dist=ctx.dist,
                     precision=ctx.precision, seed=runtime.seed) as run:
        recipe = SimCLRRecipe(cache, config=config, ctx=ctx, run_dir=run.dir, region=region)
        size = region or cache.dataset.size
        log.info("Dataset: %s (%d scans, %s%s), %d patch(es) of %s per step (%d scans x %d patches x %d ranks), run folder %s",
                 cache.dataset.name, len(cache.case_ids), "x".join(map(str, size)), " regions" if region else "", recipe.patches_per_step,
                 "x".join(str(s // config.patches_per_side) for s in size), config.batch_size, config.patches_per_side**3,
                 ctx.dist.world_size, run.dir)
        if region is not None:  # in the run's log: which region (and so which patches) the encoder learnt from
            log.info("Native resolution: a random %s region per scan and step at %s mm (uniform position, a smaller scan padded "
                     "with its minimum), split into the %d patches", "x".join(map(str, region)),
                     "x".join(f"{s:.3g}" for s in cache.dataset.preprocess.get("spacing") or []), config.patches_per_side**3)
        metrics = run.fit(recipe, Schedule(epochs=config.epochs, batch_size=config.batch_size, learning_rate=config.learning_rate,
                                           weight_decay=config.weight_decay, warmup_epochs=config.warmup_epochs,
                                           checkpoint_every=config.checkpoint_every, workers=config.workers,
                                           steps_per_epoch=config.steps_per_epoch))
    result: dict[str, Any] = {
        "run_dir": str(run.dir),
        "encoder": str(run.dir / "encoder.pt"),
        "epochs": config.epochs,
        "final_loss": metrics.get("loss"),
        "final_top1": metrics.get("top1"),
        "patches_per_step": recipe.patches_per_step,
        "seconds": round(time.perf_counter() - t_start, 2),
        "device": str(ctx.device),
        "precision": ctx.precision.name,
        "augmentation_compiled": recipe.augment.compiled,
    }
    if region is not None:
        result["region_size"] = list(region)
    return result
