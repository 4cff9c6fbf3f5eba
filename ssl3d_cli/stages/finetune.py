"""``ssl3d finetune``: the U-Net from a SimCLR encoder (or from scratch: the baseline), weighted soft Dice.

Recipe: fixed seeded test split -> validation split -> nested label-fraction subset of the rest ->
U-Net (encoder weights from encoder.pt) -> encoder frozen for ``freeze_epochs`` -> Dice (or Dice+CE)
with on-device augmentation -> best checkpoint by validation Dice -> test-set predictions in each
scan's geometry and the test table.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ssl3d_cli import checkpoints
from ssl3d_cli.augment.segmentation import augment_pair
from ssl3d_cli.config import FinetuneConfig, MCConfig, PreprocessConfig, RuntimeConfig
from ssl3d_cli.data.cache import Cache, atomic_write_bytes, atomic_write_json
from ssl3d_cli.data.datasets import CaseSpec
from ssl3d_cli.data.nifti import write_like
from ssl3d_cli.data.preprocessing import unmap_labels
from ssl3d_cli.errors import CheckpointError, ConfigError, InputDataError
from ssl3d_cli.inference.pipeline import accumulate, labels_on_scan, load_segmenter, prepare_case
from ssl3d_cli.losses.dice import dice_ce_loss, soft_dice_loss
from ssl3d_cli.metrics import dice_per_class_indices
from ssl3d_cli.models.unet import UNet
from ssl3d_cli.runtime import progress
from ssl3d_cli.runtime.device import (
    describe_device,
    seed_everything,
)
from ssl3d_cli.runtime.distributed import all_reduce_mean, any_rank, barrier
from ssl3d_cli.stages.evaluate import evaluate, to_csv_text
from ssl3d_cli.training.loop import (
    EpochBatches,
    SignalGuard,
    StopRequested,
    append_metrics,
    attach_log_file,
    checked_last_path,
    choose_run_dir,
    detach_log_file,
    latest_run,
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
RESUME_MUTABLE = ("epochs", "checkpoint_every", "workers", "device", "threads")
SPLIT_FORMAT = "ssl3d-split"


class CacheSegmentation(Dataset):
    """(image (C, D, H, W), label (D, H, W)) pairs from the cache."""

    def __init__(self, cache: Cache, case_ids: list[str]) -> None:
        self.cache, self.case_ids = cache, case_ids

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        cid = self.case_ids[i]
        return torch.from_numpy(np.array(self.cache.image(cid))), torch.from_numpy(self.cache.label(cid))


def make_split(labelled: list[str], *, seed: int, test_fraction: float, val_fraction: float, label_fraction: float) -> dict[str, list[str]]:
    """Seeded, nested splits of the labelled cases.

    The test cases depend only on (seed, test_fraction, case list); the validation cases on the
    rest; the training pool is ordered once by the seed and a label fraction takes its first
    round(fraction * pool) cases (halves up), so smaller fractions are subsets of larger ones.
    """
    ids = sorted(labelled)
    rng = np.random.default_rng(seed)
    order = [ids[i] for i in rng.permutation(len(ids))]
    n_test = int(round(test_fraction * len(ids)))
    test, rest = order[:n_test], order[n_test:]
    n_val = int(round(val_fraction * len(rest)))
    if val_fraction > 0 and n_val == 0 and len(rest) >= 3:
        n_val = 1
    val, pool = rest[:n_val], rest[n_val:]
    n_train = math.floor(label_fraction * len(pool) + 0.5)
    if n_train < 1:
        raise ConfigError(f"--label-fraction {label_fraction}: leaves no training case ({len(pool)} case(s) in the training pool "
                          f"would take {label_fraction * len(pool):.2f} case(s); use a fraction of at least {0.5 / max(len(pool), 1):.3f})")
    return {"train": pool[:n_train], "val": val, "test": test, "unused": pool[n_train:]}


def load_split(path: Path, cache: Cache) -> dict[str, list[str]]:
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputDataError(f"{path}: cannot read split file ({exc})") from None
    if data.get("format") != SPLIT_FORMAT:
        raise InputDataError(f"{path}: not an ssl3d split.json")
    roles = data["cases"]
    unknown = sorted(set(roles) - set(cache.case_ids))
    if unknown or data.get("dataset") != cache.manifest["dataset"]["name"]:
        raise InputDataError(f"{path}: split of dataset {data.get('dataset')!r} names case(s) not in {cache.manifest['dataset']['name']!r} "
                             f"(e.g. {unknown[:3]}); use a split made for this dataset")
    return {role: sorted(c for c, r in roles.items() if r == role) for role in ("train", "val", "test", "unused")}


def split_record(split: dict[str, list[str]], cache: Cache, *, seed: int, config: FinetuneConfig) -> dict[str, Any]:
    roles = {c: "unlabelled" for c in cache.case_ids}
    for role, ids in split.items():
        for c in ids:
            roles[c] = role
    return {"format": SPLIT_FORMAT, "dataset": cache.manifest["dataset"]["name"], "seed": seed, "test_fraction": config.test_fraction,
            "val_fraction": config.val_fraction, "label_fraction": config.label_fraction,
            "counts": {r: len(v) for r, v in split.items()}, "cases": roles}


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
                    precision: Any) -> tuple[float, list[float]]:
    """Mean foreground Dice (and per class) of the deterministic model on the cache grid."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    per_case = []
    for image, label in cases:
        with precision.autocast():
            pred = net(image.to(device).float()).argmax(1)[0].cpu().numpy()
        per_case.append(dice_per_class_indices(pred, label, num_classes))
    net.train(was_training)
    per_class = np.mean(per_case, axis=0).tolist() if per_case else [0.0] * num_classes
    fg = float(np.mean(per_class[1:])) if len(per_class) > 1 else float(per_class[0])
    return fg, per_class


def segmenter_payload(model: torch.nn.Module, cache: Cache, *, config: FinetuneConfig, epoch: int, val_dice: float,
                      encoder_path: str | None) -> dict[str, Any]:
    net = unwrap(model)
    return {
        "model": net.config.to_dict(),
        "num_classes": net.num_classes,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "preprocess": cache.manifest["settings"],
        "modality": cache.manifest["modality"],
        "channel_names": cache.manifest["channel_names"],
        "class_names": cache.class_names,
        "label_values": cache.label_values,
        "regions": cache.manifest.get("regions") or {},
        "dataset": cache.summary(),
        "training": config.to_dict(),
        "epoch": epoch,
        "val_dice": val_dice,
        "encoder": encoder_path,
    }


def predict_test_cases(model_path: Path, cache: Cache, case_ids: list[str], out_dir: Path, *, device: torch.device, precision: Any) -> list[Path]:
    """Deterministic predictions of held-out cases, from their raw scans, in each scan's geometry."""
    seg = load_segmenter(model_path, device=device, precision=precision)
    written = []
    with progress.task("Test predictions", total=len(case_ids)) as bar:
        for cid in case_ids:
            sources = [Path(s["path"]) for s in cache.record(cid)["sources"]]
            images = sources[:-1] if cache.record(cid)["labelled"] else sources
            image, geometry = prepare_case(seg, CaseSpec(cid, images))
            acc = accumulate(seg, image, MCConfig(mc_samples=0))
            labels = unmap_labels(labels_on_scan(acc, geometry, rule="mean"), seg.label_values)
            written.append(write_like(labels, images[0], out_dir / f"{cid}.nii.gz"))
            bar.advance(1)
    return written


def find_encoder(dataset_name: str) -> Path:
    run = latest_run("pretrain", dataset_name, marker="encoder.pt")
    if run is None:
        raise ConfigError(f"no --encoder given and no pretraining run of {dataset_name} found under runs/; "
                          "give --encoder PATH/encoder.pt, or --from-scratch for the baseline")
    return run / "encoder.pt"


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
    ctx = start_training(dataset, runtime=runtime, preprocess_config=preprocess_config, cache_root=cache_root)
    device, dist, precision, cache = ctx.device, ctx.dist, ctx.precision, ctx.cache
    if not cache.labelled_ids:
        raise InputDataError(f"{cache.root}: no labelled cases; fine-tuning needs labels (labelsTr, _seg files or labels/)")
    config = replace(config, model=replace(config.model, in_channels=cache.num_channels))
    if config.class_weights and len(config.class_weights) != cache.num_classes:
        raise ConfigError(f"--class-weights has {len(config.class_weights)} value(s); the dataset has {cache.num_classes} classes "
                          f"({', '.join(cache.class_names)})")
    min_size = 2 ** len(config.model.widths)
    if any(s % (min_size // 2) or s < min_size for s in cache.size):
        raise ConfigError(f"--size {cache.size}: must be a multiple of {min_size // 2} and at least {min_size} for {len(config.model.widths)} levels")
    dataset_name = cache.manifest["dataset"]["name"]
    if config.from_scratch:
        encoder_path = None
    else:
        encoder_path = Path(encoder) if encoder else find_encoder(dataset_name)
        log.info("Encoder: %s", encoder_path)
    split = load_split(split_file, cache) if split_file else make_split(
        cache.labelled_ids, seed=runtime.seed, test_fraction=config.test_fraction, val_fraction=config.val_fraction,
        label_fraction=config.label_fraction)
    seed_everything(runtime.seed, deterministic=runtime.deterministic)

    model = UNet(config.model, cache.num_classes)
    encoder_meta = load_encoder_weights(model, encoder_path) if encoder_path else None
    if encoder_meta and encoder_meta["preprocess"]["size"] != cache.manifest["settings"]["size"]:
        log.warning("encoder was pretrained on %s volumes, fine-tuning on %s", encoder_meta["preprocess"]["size"], list(cache.size))
    model.to(device)
    stage_name = "finetune" if encoder_path else "scratch"
    run_dir = choose_run_dir(stage_name, dataset_name, output=output, resume=resume)
    full_config = {"finetune": config.to_dict(), "runtime": runtime.to_dict(), "preprocess": cache.manifest["settings"],
                   "cache": str(cache.root), "encoder": str(encoder_path) if encoder_path else None, "world_size": dist.world_size,
                   "split": {k: sorted(v) for k, v in split.items()}}
    last_path = checked_last_path(run_dir, resume=resume)

    freeze_epochs = config.freeze_epochs if encoder_path else 0  # a random encoder is not frozen (the baseline)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    batches = EpochBatches(len(split["train"]), config.batch_size, seed=runtime.seed, world=dist.world_size, rank=dist.rank)
    total_steps = config.epochs * batches.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, config.warmup_epochs * batches.steps))
    scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_scaler)
    start_epoch, start_step = 0, 0
    extra: dict[str, Any] = {"best": -1.0, "best_epoch": 0, "accum": {"loss": 0.0, "n": 0}}
    if resume:
        state = restore_train_state(last_path, stage=stage_name, full_config=full_config, mutable=RESUME_MUTABLE, model=model,
                                    optimizer=optimizer, scheduler=scheduler, scaler=scaler, rank=dist.rank)
        start_epoch, start_step, extra = state["epoch"], state["step"], state["extra"]
        log.info("Resuming %s at epoch %d step %d", run_dir, start_epoch + 1, start_step)
        if dist.is_main:
            truncate_metrics(run_dir / "metrics.jsonl", start_epoch)

    set_encoder_trainable(unwrap(model), start_epoch >= freeze_epochs)
    model = wrap_ddp(model, device)
    handler = attach_log_file(run_dir, "finetune") if dist.is_main else None
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", full_config)
        atomic_write_json(run_dir / "split.json", split_record(split, cache, seed=runtime.seed, config=config))
    log.info("Device: %s, precision %s", describe_device(device), precision.name)
    log.info("Dataset: %s: %d train (label fraction %g), %d validation, %d test case(s); %s; run folder %s",
             dataset_name, len(split["train"]), config.label_fraction, len(split["val"]), len(split["test"]),
             f"encoder frozen for {freeze_epochs} epoch(s)" if encoder_path else "from scratch (baseline)", run_dir)
    val_ids = split["val"] or split["train"]
    val_cases = load_validation_cases(cache, val_ids) if dist.is_main else []
    if not split["val"]:
        log.warning("no validation cases (too few labelled cases): the best checkpoint is chosen on the training cases")
    weights = torch.tensor(config.class_weights, dtype=torch.float32, device=device) if config.class_weights else None
    loss_fn = dice_ce_loss if config.loss == "dice-ce" else soft_dice_loss
    loader = DataLoader(CacheSegmentation(cache, split["train"]), batch_sampler=batches, num_workers=config.workers,
                        pin_memory=device.type == "cuda")
    model_path = run_dir / "model.pt"
    t_start = time.perf_counter()
    metrics: dict[str, Any] = {}
    model.train()
    try:
        with SignalGuard() as guard, progress.task("Fine-tuning", total=config.epochs) as bar:
            bar.advance(start_epoch)
            for epoch in range(start_epoch, config.epochs):
                if epoch == freeze_epochs and freeze_epochs > 0 and start_step == 0:
                    set_encoder_trainable(unwrap(model), True)
                    model = wrap_ddp(unwrap(model), device)  # DDP must see the newly trainable parameters
                    log.info("Epoch %d: encoder unfrozen", epoch + 1)
                batches.set_epoch(epoch, start_step)
                t_epoch = time.perf_counter()
                for offset, (image, label) in enumerate(loader):
                    step = start_step + offset
                    image = image.to(device, non_blocking=True).float()
                    label = label.to(device, non_blocking=True).long()
                    if config.augment:
                        image, label = augment_pair(image, label, step_generator(device, runtime.seed, epoch, step, dist.rank))

                    def compute(image: torch.Tensor = image, label: torch.Tensor = label, model: torch.nn.Module = model) -> torch.Tensor:
                        with precision.autocast():
                            logits = model(image)
                        return loss_fn(logits, label, weights=weights, smooth=config.dice_smooth, include_background=config.include_background)

                    loss = optimisation_step(compute, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                             oom_hint=f"lower --batch-size (now {config.batch_size}) or --size on {device}")
                    extra["accum"]["loss"] += float(all_reduce_mean(loss.detach()))
                    extra["accum"]["n"] += 1
                    if any_rank(guard.requested is not None, device):
                        save_train_state(last_path, stage=stage_name, full_config=full_config, epoch=epoch, step=step + 1, extra=extra,
                                         model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
                        raise StopRequested(f"signal {guard.requested or 'on another rank'}: state saved in {last_path}; rerun with --resume to continue")
                start_step = 0
                metrics = {"epoch": epoch + 1, "loss": extra["accum"]["loss"] / max(extra["accum"]["n"], 1),
                           "lr": scheduler.get_last_lr()[0], "encoder_frozen": epoch < freeze_epochs,
                           "seconds": time.perf_counter() - t_epoch}
                extra["accum"] = {"loss": 0.0, "n": 0}
                is_last = epoch + 1 == config.epochs
                if dist.is_main and ((epoch + 1) % config.validate_every == 0 or is_last):
                    val, per_class = validation_dice(model, val_cases, cache.num_classes, device, precision)
                    metrics.update(val_dice=val, val_dice_per_class=per_class)
                    if val > extra["best"]:
                        extra["best"], extra["best_epoch"] = val, epoch + 1
                        checkpoints.save_checkpoint(segmenter_payload(model, cache, config=config, epoch=epoch + 1, val_dice=val,
                                                                      encoder_path=str(encoder_path) if encoder_path else None),
                                                    model_path, fmt=checkpoints.SEGMENTER)
                if dist.is_main:
                    append_metrics(run_dir / "metrics.jsonl", metrics)
                barrier()
                bar.advance(1, loss=metrics["loss"], val_dice=metrics.get("val_dice", float("nan")), lr=metrics["lr"])
                if is_last or (epoch + 1) % config.checkpoint_every == 0:
                    save_train_state(last_path, stage=stage_name, full_config=full_config, epoch=epoch + 1, step=0, extra=extra,
                                     model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    finally:
        detach_log_file(handler)
    result: dict[str, Any] = {
        "run_dir": str(run_dir), "model": str(model_path), "encoder": str(encoder_path) if encoder_path else None,
        "best_val_dice": extra["best"], "best_epoch": extra["best_epoch"], "epochs": config.epochs,
        "train_cases": len(split["train"]), "val_cases": len(split["val"]), "test_cases": len(split["test"]),
        "seconds": round(time.perf_counter() - t_start, 2), "device": str(device),
    }
    if dist.is_main and evaluate_test and split["test"]:
        handler = attach_log_file(run_dir, "finetune")
        try:
            result["test"] = run_test_evaluation(model_path, cache, split["test"], run_dir, device=device, precision=precision)
        finally:
            detach_log_file(handler)
    barrier()
    return result


def run_test_evaluation(model_path: Path, cache: Cache, test_ids: list[str], run_dir: Path, *, device: torch.device,
                        precision: Any) -> dict[str, Any]:
    """Predict the held-out cases with the best model and write test_metrics.json/.csv."""
    pred_dir = run_dir / "test-predictions"
    predict_test_cases(model_path, cache, test_ids, pred_dir, device=device, precision=precision)
    table = evaluate(pred_dir, cache.root, case_ids=test_ids)
    atomic_write_json(run_dir / "test_metrics.json", table)
    atomic_write_bytes(run_dir / "test_metrics.csv", to_csv_text(table).encode())
    return {"mean": table["mean"], "cases": len(table["cases"]), "predictions": str(pred_dir),
            "metrics_json": str(run_dir / "test_metrics.json"), "class_names": table["class_names"], "regions": table["regions"]}


