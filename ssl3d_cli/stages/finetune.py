"""``ssl3d finetune``: the U-Net from a SimCLR encoder (or from scratch: the baseline), weighted soft Dice.

Recipe: fixed seeded test split -> validation split -> nested label-fraction subset of the rest ->
U-Net (encoder weights from encoder.pt) -> encoder frozen for ``freeze_epochs`` -> Dice (or Dice+CE)
with on-device augmentation -> best checkpoint by validation Dice -> test-set predictions in each
scan's geometry and the test table.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl3d_cli import checkpoints
from ssl3d_cli.augment.segmentation import augment_pair
from ssl3d_cli.config import FinetuneConfig, MCConfig, PreprocessConfig, RuntimeConfig
from ssl3d_cli.data.cache import Cache
from ssl3d_cli.data.splits import SPLIT_FILE, labelled_used, make_split, read_split, selection_stride, write_split
from ssl3d_cli.data.summary import DatasetSummary
from ssl3d_cli.errors import CheckpointError, ConfigError, InputDataError
from ssl3d_cli.files import atomic_write_bytes, atomic_write_json
from ssl3d_cli.inference.pipeline import load_segmenter
from ssl3d_cli.inference.sliding_window import sliding_labels, sliding_window_votes
from ssl3d_cli.losses.dice import dice_ce_loss, soft_dice_loss
from ssl3d_cli.metrics import dice_per_class_indices
from ssl3d_cli.models.unet import UNet
from ssl3d_cli.provenance import file_sha256
from ssl3d_cli.runs import find_encoder
from ssl3d_cli.runtime.device import seed_everything
from ssl3d_cli.runtime.distributed import barrier
from ssl3d_cli.stages.evaluate import evaluate, to_csv_text
from ssl3d_cli.stages.predict import predict_cases
from ssl3d_cli.stages.preprocess import open_cache_on_all_ranks
from ssl3d_cli.training.data import CacheCases
from ssl3d_cli.training.patches import collate_cases, default_patch_size, sample_patches
from ssl3d_cli.training.run import Recipe, Schedule, TrainingRun, start_training, unwrap

log = logging.getLogger("ssl3d")


def load_encoder_weights(model: UNet, path: Path) -> dict[str, Any]:
    """Copy encoder.pt weights into the U-Net's encoder; refuse another architecture, naming the difference."""
    enc = checkpoints.load_checkpoint(path, fmt=checkpoints.ENCODER)
    expected = model.config.architecture()
    if enc["architecture"] != expected:
        diffs = [f"{k}: encoder {enc['architecture'].get(k)} vs U-Net {v}" for k, v in expected.items() if enc["architecture"].get(k) != v]
        raise CheckpointError(f"{path}: encoder architecture differs ({'; '.join(diffs)}); pass the same --widths as pretraining "
                              f"and a dataset with the same channels")
    model.encoder.load_state_dict(enc["state_dict"])
    return enc


def set_encoder_trainable(model: UNet, trainable: bool) -> None:
    for p in model.encoder.parameters():
        p.requires_grad_(trainable)


def load_validation_cases(cache: Cache, case_ids: list[str]) -> list[tuple[torch.Tensor, np.ndarray]]:
    """Validation images (1, C, D, H, W) in the cache dtype and labels (D, H, W), read once per run, not per epoch."""
    return [(torch.from_numpy(np.array(cache.image(cid)))[None], cache.label(cid)) for cid in case_ids]


@torch.no_grad()
def validation_dice(model: torch.nn.Module, cases: list[tuple[torch.Tensor, np.ndarray]], num_classes: int, device: torch.device,
                    precision: Any, patch: tuple[int, int, int] | None = None) -> tuple[float, list[float]]:
    """Mean foreground Dice (and per class) of the deterministic model on the cache grid; with ``patch`` (a native
    cache) by a Gaussian-weighted sliding window over each whole case, as prediction does."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    per_case = []
    for image, label in cases:
        if patch is not None:
            votes = sliding_window_votes(net, image.to(device).float(), patch=patch, mc_samples=1, autocast=precision.autocast).votes
            pred = sliding_labels(votes, "mean").cpu().numpy()
        else:
            with precision.autocast():
                pred = net(image.to(device).float()).argmax(1)[0].cpu().numpy()
        per_case.append(dice_per_class_indices(pred, label, num_classes))
    net.train(was_training)  # every module, the dropout ones the sliding window switched too
    per_class = np.mean(per_case, axis=0).tolist() if per_case else [0.0] * num_classes
    fg = float(np.mean(per_class[1:])) if len(per_class) > 1 else float(per_class[0])
    return fg, per_class


def grid_description(data: DatasetSummary) -> str:
    """``"128x128x128 volumes"`` or ``"the native grid at 0.8x0.8x2.5 mm"``: what a model or encoder was trained on."""
    config = data.preprocess_config()
    if config.native:
        return "the native grid at " + "x".join(f"{v:.3g}" for v in config.spacing) + " mm"  # type: ignore[union-attr]
    return "x".join(map(str, data.size)) + " volumes"


def native_patch_config(cache: Cache, config: FinetuneConfig) -> FinetuneConfig:
    """``config`` with the training patch of a native-resolution cache: ``--patch-size``, or chosen from the cases' median
    shape (``training.patches.default_patch_size``); logged, and refused unless each side is a multiple of 2^(levels - 1).

    Raises:
        ConfigError: a patch the U-Net cannot take.
    """
    levels = len(config.model.widths)
    factor = 2 ** (levels - 1)
    patch = tuple(int(p) for p in config.patch_size) if config.patch_size is not None else default_patch_size(
        [cache.record(cid)["geometry"]["size"] for cid in cache.case_ids], levels)
    if any(p % factor for p in patch):
        raise ConfigError(f"--patch-size {','.join(map(str, patch))}: each side must be a multiple of {factor} for {levels} U-Net levels")
    if all(p == factor for p in patch):  # instance norm cannot train on the single bottleneck voxel this leaves
        raise ConfigError(f"--patch-size {','.join(map(str, patch))}: leaves one voxel at the U-Net's bottleneck; make a side at "
                          f"least {2 * factor}")
    log.info("Native resolution: training on %s patches (%.0f%% centred on foreground), validating by sliding window",
             "x".join(map(str, patch)), 100 * config.foreground_oversampling)
    return replace(config, patch_size=patch)  # type: ignore[arg-type]


def segmenter_payload(model: torch.nn.Module, dataset: DatasetSummary, *, config: FinetuneConfig, epoch: int, val_dice: float | None,
                      encoder_path: str | None) -> dict[str, Any]:
    """What ``model.pt`` holds: plain types and tensors only (``val_dice`` None: the last epoch, no selection scans).

    ``model`` records the dropout rates it was trained with: prediction samples at them by default.
    """
    net = unwrap(model)
    return {
        "model": net.config.to_dict(),
        "num_classes": net.num_classes,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "dataset": dataset.to_dict(),
        "training": config.to_dict(),
        "epoch": epoch,
        "val_dice": val_dice,
        "encoder": encoder_path,
    }


class SegmentationRecipe(Recipe):
    """Fine-tuning as a :class:`TrainingRun` recipe: weighted soft Dice per step, the encoder frozen for the
    first ``freeze_epochs``, and model selection: with selection scans, their Dice after each epoch and
    ``model.pt`` whenever it improves; without (a small label budget), ``model.pt`` of the last epoch."""

    description = "Fine-tuning"
    shown = ("loss", "val_dice", "lr")

    def __init__(self, model: UNet, cache: Cache, split: dict[str, list[str]], *, config: FinetuneConfig, ctx: Any,
                 freeze_epochs: int, model_path: Path, encoder_path: Path | None) -> None:
        self.cache, self.config, self.ctx, self.freeze_epochs = cache, config, ctx, freeze_epochs
        self.model_path, self.encoder_path = model_path, encoder_path
        self.model = model.to(ctx.device)
        self.dataset = CacheCases(cache, split["train"], labels=True)
        self.patch = tuple(config.patch_size) if config.patch_size is not None else None  # a native cache: patch training
        self.state = {"best": -1.0, "best_epoch": 0}
        self.oom_hint = f"lower --batch-size (now {config.batch_size}) or --size on {ctx.device}"
        if self.patch is not None:
            self.collate = collate_cases  # cases of different sizes: patches are cut in prepare()
            self.oom_hint = f"lower --batch-size (now {config.batch_size}) or --patch-size (now {','.join(map(str, self.patch))}) on {ctx.device}"
        self.weights = torch.tensor(config.class_weights, dtype=torch.float32, device=ctx.device) if config.class_weights else None
        self.loss_fn = dice_ce_loss if config.loss == "dice-ce" else soft_dice_loss
        self.val_cases = load_validation_cases(cache, split["val"]) if ctx.dist.is_main else []
        self._encoder_frozen: bool | None = None

    def prepare(self, batch: tuple[Any, Any], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's (B, C, D, H, W) float32 images and (B, D, H, W) int64 labels: patches cut (a native cache) and
        augmented with this step's generator, one step ahead (on CUDA on the copy stream, where the host waits for
        the patch draws and the augmentation's subset only behind that stream, not behind the previous step)."""
        if self.patch is not None:  # lists of whole cases: one patch each, drawn with this step's generator
            image, label = sample_patches(list(batch[0]), list(batch[1]), self.patch, foreground=self.config.foreground_oversampling,
                                          gen=gen)
        else:
            image, label = batch
        image, label = image.float(), label.long()
        if self.config.augment:
            image, label = augment_pair(image, label, gen)
        return image, label

    def step(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Segmentation loss of ``prepare``'s images (B, C, D, H, W) and labels (B, D, H, W) (``gen``: unused here)."""
        image, label = batch
        with self.ctx.precision.autocast():
            logits = model(image)
        loss = self.loss_fn(logits, label, weights=self.weights, smooth=self.config.dice_smooth,
                            include_background=self.config.include_background)
        return loss, {}

    def epoch_start(self, epoch: int) -> bool:
        frozen = epoch < self.freeze_epochs
        if frozen == self._encoder_frozen:
            return False
        if self._encoder_frozen and not frozen:
            log.info("Epoch %d: encoder unfrozen", epoch + 1)
        set_encoder_trainable(self.model, not frozen)
        self._encoder_frozen = frozen
        return True

    def epoch_end(self, model: torch.nn.Module, epoch: int, metrics: dict[str, Any], *, steps: int) -> dict[str, Any]:
        metrics["encoder_frozen"] = epoch < self.freeze_epochs
        is_last = epoch + 1 == self.config.epochs
        if not self.ctx.dist.is_main:
            return metrics
        if self.val_cases and ((epoch + 1) % self.config.validate_every == 0 or is_last):
            val, per_class = validation_dice(model, self.val_cases, self.cache.dataset.num_classes, self.ctx.device, self.ctx.precision,
                                             patch=self.patch)
            metrics.update(val_dice=val, val_dice_per_class=per_class)
            if val > self.state["best"]:
                self.state.update(best=val, best_epoch=epoch + 1)
                self._save_model(model, epoch + 1, val)
        return metrics

    def checkpoint(self, model: torch.nn.Module, epoch: int, metrics: dict[str, Any]) -> None:
        """Without selection scans the latest epoch is the model: written at every checkpoint, so a run resumed
        past its last epoch (or killed after it) still has its ``model.pt``."""
        if not self.val_cases:
            self.state.update(best_epoch=epoch)
            self._save_model(model, epoch, None)

    def _save_model(self, model: torch.nn.Module, epoch: int, val_dice: float | None) -> None:
        payload = segmenter_payload(model, self.cache.dataset, config=self.config, epoch=epoch, val_dice=val_dice,
                                    encoder_path=str(self.encoder_path) if self.encoder_path else None)
        checkpoints.save_checkpoint(payload, self.model_path, fmt=checkpoints.SEGMENTER)


def finetune(
    dataset: Path | str,
    *,
    encoder: Path | None = None,
    config: FinetuneConfig | None = None,
    runtime: RuntimeConfig | None = None,
    preprocess_config: PreprocessConfig | None = None,
    output: Path | None = None,
    resume: bool = False,
    split_file: Path | None = None,
    cache_root: Path | None = None,
    evaluate_test: bool = True,
) -> dict[str, Any]:
    """Fine-tune a U-Net; returns a summary with the test table.

    Args:
        encoder: encoder.pt from ``pretrain``; None with ``config.from_scratch`` for the baseline, or
            None to use the newest pretraining run of this dataset.
        split_file: reuse a split.json (e.g. the baseline's) instead of making one from the seed.
    """
    runtime = (runtime or RuntimeConfig()).validate()
    config = (config or FinetuneConfig()).validate()
    ctx = start_training(runtime)
    cache = open_cache_on_all_ranks(dataset, config=preprocess_config, cache_root=cache_root)
    data = cache.dataset
    if not cache.labelled_ids:
        raise InputDataError(f"{cache.root}: no labelled cases; fine-tuning needs labels (labelsTr, _seg files or labels/)")
    config = replace(config, model=replace(config.model, in_channels=data.num_channels))
    if config.class_weights and len(config.class_weights) != data.num_classes:
        raise ConfigError(f"--class-weights has {len(config.class_weights)} value(s); the dataset has {data.num_classes} classes "
                          f"({', '.join(data.class_names)})")
    min_size = 2 ** len(config.model.widths)
    if data.preprocess_config().native:
        config = native_patch_config(cache, config)
    elif any(s % (min_size // 2) or s < min_size for s in data.size):
        raise ConfigError(f"--size {data.size}: must be a multiple of {min_size // 2} and at least {min_size} for {len(config.model.widths)} levels")
    elif config.patch_size is not None or config.foreground_oversampling != FinetuneConfig.foreground_oversampling:
        flag = (f"--patch-size {','.join(map(str, config.patch_size))}" if config.patch_size is not None
                else f"--foreground-oversampling {config.foreground_oversampling:g}")
        raise ConfigError(f"{flag}: only for a native-resolution cache (--resolution native); {cache.root} holds the fixed "
                          f"{'x'.join(map(str, data.size))} grid")
    encoder_path = None if config.from_scratch else Path(encoder) if encoder else find_encoder(data.name)
    if encoder_path:
        log.info("Encoder: %s", encoder_path)
    split = read_split(split_file, dataset_name=data.name, case_ids=cache.case_ids) if split_file else make_split(
        cache.labelled_ids, seed=runtime.seed, test_fraction=config.test_fraction, val_fraction=config.val_fraction,
        label_fraction=config.label_fraction)
    seed_everything(runtime.seed, deterministic=runtime.deterministic)
    model = UNet(config.model, data.num_classes)
    if encoder_path:
        encoder_data = DatasetSummary.from_dict(load_encoder_weights(model, encoder_path)["dataset"])
        if grid_description(encoder_data) != grid_description(data):
            log.warning("encoder was pretrained on %s, fine-tuning on %s", grid_description(encoder_data), grid_description(data))
    freeze_epochs = config.freeze_epochs if encoder_path else 0  # a random encoder is not frozen (the baseline)
    # the cache's folder is provenance; --resume compares its content fingerprint, so the cache may move or be re-made
    full_config = {"finetune": config.to_dict(), "runtime": runtime.to_dict(), "preprocess": data.preprocess,
                   "cache": str(cache.root), "cache_content": cache.content_fingerprint(),
                   "encoder": str(encoder_path) if encoder_path else None,
                   "encoder_sha256": file_sha256(encoder_path) if encoder_path else None, "world_size": ctx.dist.world_size,
                   "split": {k: sorted(v) for k, v in split.items()}}
    t_start = time.perf_counter()
    with TrainingRun("finetune" if encoder_path else "scratch", data.name, config=full_config, output=output, resume=resume,
                     device=ctx.device, dist=ctx.dist, precision=ctx.precision, seed=runtime.seed) as run:
        if ctx.dist.is_main:
            write_split(run.dir / SPLIT_FILE, split, dataset_name=data.name, case_ids=cache.case_ids, seed=runtime.seed,
                        test_fraction=config.test_fraction, val_fraction=config.val_fraction, label_fraction=config.label_fraction)
        log.info("Dataset: %s: %d train (label fraction %g), %d validation, %d test case(s); %s; run folder %s",
                 data.name, len(split["train"]), config.label_fraction, len(split["val"]), len(split["test"]),
                 f"encoder frozen for {freeze_epochs} epoch(s)" if encoder_path else "from scratch (baseline)", run.dir)
        if not split["val"]:
            log.info("no scans held back for model selection in a label budget of %d scan(s) (every %s-th would be): the last "
                     "epoch is kept", len(split["train"]), selection_stride(config.val_fraction) or "--val-fraction 0: no")
        if config.model.dropout_encoder == 0 and config.model.dropout_decoder == 0:
            log.warning("training without dropout: MC-dropout prediction from this model would be noise injection, not approximate "
                        "Bayesian inference (the paper trains with --dropout-encoder 0.3)")
        recipe = SegmentationRecipe(model, cache, split, config=config, ctx=ctx, freeze_epochs=freeze_epochs,
                                    model_path=run.dir / "model.pt", encoder_path=encoder_path)
        run.fit(recipe, Schedule(epochs=config.epochs, batch_size=config.batch_size, learning_rate=config.learning_rate,
                                 weight_decay=config.weight_decay, warmup_epochs=config.warmup_epochs,
                                 checkpoint_every=config.checkpoint_every, workers=config.workers))
        result: dict[str, Any] = {
            "run_dir": str(run.dir), "model": str(recipe.model_path), "encoder": str(encoder_path) if encoder_path else None,
            "best_val_dice": recipe.state["best"] if split["val"] else None, "best_epoch": recipe.state["best_epoch"], "epochs": config.epochs,
            "train_cases": len(split["train"]), "val_cases": len(split["val"]), "test_cases": len(split["test"]),
            "labelled_used": labelled_used(split),
            "seconds": round(time.perf_counter() - t_start, 2), "device": str(ctx.device),
        }
        if ctx.dist.is_main and evaluate_test and split["test"]:
            result["test"] = run_test_evaluation(recipe.model_path, cache, split, run.dir, device=ctx.device, precision=ctx.precision)
    barrier()
    return result


def run_test_evaluation(model_path: Path, cache: Cache, split: dict[str, list[str]], run_dir: Path, *, device: torch.device,
                        precision: Any) -> dict[str, Any]:
    """Predict the held-out cases with the selected model, deterministically and as ``ssl3d predict`` would, and
    write test_metrics.json/.csv (recording how many labelled scans trained and selected the model)."""
    test_ids = split["test"]
    pred_dir = run_dir / "test-predictions"
    seg = load_segmenter(model_path, device=device, precision=precision)
    predict_cases(seg, [cache.case_spec(cid) for cid in test_ids], pred_dir, mc=MCConfig(mc_samples=0), description="Test predictions")
    table = evaluate(pred_dir, cache.root, case_ids=test_ids)
    table["labelled_used"] = labelled_used(split)
    atomic_write_json(run_dir / "test_metrics.json", table)
    atomic_write_bytes(run_dir / "test_metrics.csv", to_csv_text(table).encode())
    return {"mean": table["mean"], "cases": len(table["cases"]), "predictions": str(pred_dir), "labelled_used": table["labelled_used"],
            "metrics_json": str(run_dir / "test_metrics.json"), "class_names": table["class_names"], "regions": table["regions"]}
