"""``ssl3d predict``: MC-dropout segmentation with a vote rule, written in each scan's own geometry."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ssl3d_cli import __version__
from ssl3d_cli.config import MCConfig, RuntimeConfig
from ssl3d_cli.data.datasets import CaseSpec, discover_dataset, discover_inputs
from ssl3d_cli.data.nifti import write_like
from ssl3d_cli.data.shards import take_shard
from ssl3d_cli.data.splits import SPLIT_FILE, split_cases
from ssl3d_cli.errors import ConfigError, InputDataError
from ssl3d_cli.files import atomic_write_json, check_writable
from ssl3d_cli.inference.pipeline import (
    Segmenter,
    open_segmenter,
    prepare_case,
    sampling_rates,
    segmentation,
    validate_vote_options,
    vote_case,
)
from ssl3d_cli.runtime import progress
from ssl3d_cli.runtime.device import describe_device

log = logging.getLogger("ssl3d")


def resolve_cases(inputs: list[Path], *, split: str | None, model_path: Path) -> list[CaseSpec]:
    """Cases from the inputs; ``split='test'`` takes the held-out test cases of the model's fine-tuning run."""
    if split is None:
        cases, _ = discover_inputs(inputs)
        return cases
    if split != "test":
        raise ConfigError(f"--split {split!r}: only 'test' is supported (the held-out cases of the fine-tuning run)")
    split_path = model_path.parent / SPLIT_FILE
    if not split_path.exists():
        raise InputDataError(f"{split_path}: not found; --split test needs the model's fine-tuning run folder")
    test_ids = set(split_cases(split_path, "test"))
    if len(inputs) != 1:
        raise ConfigError("--split test takes exactly one dataset folder")
    spec = discover_dataset(inputs[0])
    cases = [CaseSpec(c.case_id, c.image_paths) for c in spec.cases if c.case_id in test_ids]
    if not cases:
        raise InputDataError(f"{inputs[0]}: none of the test cases of {split_path} are in this dataset")
    return cases


def predict_one(seg: Segmenter, case: CaseSpec, out_dir: Path, *, mc: MCConfig, union_classes: list[int],
                save_probabilities: bool) -> dict[str, Any]:
    """Predict one case and write ``<case>.nii.gz`` (and ``<case>_probabilities.nii.gz``)."""
    t0 = time.perf_counter()
    image, geometry = prepare_case(seg, case)
    votes = vote_case(seg, image, geometry, mc)
    out = write_like(segmentation(seg, votes, mc.vote, union_classes), case.image_paths[0], out_dir / f"{case.case_id}.nii.gz")
    record: dict[str, Any] = {"case": case.case_id, "segmentation": str(out), "seconds": round(time.perf_counter() - t0, 3)}
    if save_probabilities:
        probs = votes.mean_prob().numpy()
        path = write_like(np.moveaxis(probs, 0, -1).astype(np.float32), case.image_paths[0], out_dir / f"{case.case_id}_probabilities.nii.gz")
        record["probabilities"] = str(path)
    return record


def predict_cases(seg: Segmenter, cases: list[CaseSpec], out_dir: Path, *, mc: MCConfig, union_classes: list[int] | None = None,
                  save_probabilities: bool = False, description: str = "Predicting") -> list[dict[str, Any]]:
    """Predict and write each case in turn (what ``ssl3d predict`` and fine-tuning's test table both run)."""
    records = []
    with progress.task(description, total=len(cases)) as bar:
        for case in cases:
            records.append(predict_one(seg, case, out_dir, mc=mc, union_classes=list(union_classes or []),
                                       save_probabilities=save_probabilities))
            bar.advance(1)
    return records


def predict(
    inputs: list[Path | str],
    *,
    output: Path | str,
    model: Path | None = None,
    mc: MCConfig | None = None,
    runtime: RuntimeConfig | None = None,
    overwrite: bool = False,
    shard: str | None = None,
    split: str | None = None,
    save_probabilities: bool = False,
) -> dict[str, Any]:
    """Segment every input case; existing outputs are skipped unless ``overwrite``.

    Args:
        inputs: NIfTI files, folders, BraTS case folders, nnU-Net ``_0000`` folders or a dataset.
        output: folder for ``<case>.nii.gz`` and ``predict_args.json``.
        split: ``"test"``: the held-out test cases of the model's fine-tuning run (inputs = the dataset).
    """
    mc = (mc or MCConfig()).validate()
    runtime = (runtime or RuntimeConfig()).validate()
    seg = open_segmenter(model, runtime)
    mc = sampling_rates(seg, mc)
    union_classes = validate_vote_options(seg, mc)
    cases = take_shard(resolve_cases([Path(p) for p in inputs], split=split, model_path=seg.path), shard)
    out_dir = Path(output).expanduser()
    check_writable(out_dir)
    todo = [c for c in cases if overwrite or not (out_dir / f"{c.case_id}.nii.gz").exists()]
    log.info("Device: %s, precision %s; %d case(s) to predict (%d already done) with %s", describe_device(seg.device), seg.precision.name,
             len(todo), len(cases) - len(todo),
             f"{mc.mc_samples} MC samples (dropout encoder {mc.dropout_encoder}, decoder {mc.dropout_decoder}), vote {mc.vote}"
             if mc.stochastic else "one deterministic pass")
    atomic_write_json(out_dir / "predict_args.json", {
        "tool_version": __version__, "model": str(seg.path.resolve()), "mc": mc.to_dict(), "runtime": runtime.to_dict(),
        "inputs": [str(p) for p in inputs], "split": split, "shard": shard, "class_names": list(seg.dataset.class_names),
        "label_values": list(seg.dataset.label_values),
    })
    records = predict_cases(seg, todo, out_dir, mc=mc, union_classes=union_classes, save_probabilities=save_probabilities)
    return {"output": str(out_dir), "model": str(seg.path), "predicted": len(records), "skipped_existing": len(cases) - len(todo),
            "vote": mc.vote if mc.stochastic else "deterministic", "mc_samples": mc.mc_samples, "cases": records}
