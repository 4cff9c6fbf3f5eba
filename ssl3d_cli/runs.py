"""Where runs live and how a stage finds an earlier one (an encoder to fine-tune, a model to predict with).

A run folder is ``<runs root>/<stage>-<dataset>-<YYYYmmdd-HHMMSS>`` (stage: ``pretrain``,
``finetune`` or ``scratch``); the runs root is ``$SSL3D_RUNS_DIR`` or ``./runs``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ssl3d_cli.errors import CheckpointError, ConfigError

log = logging.getLogger("ssl3d")

#: Run stages whose folders hold a fine-tuned ``model.pt``.
SEGMENTER_STAGES = ("finetune", "scratch")


def default_runs_root() -> Path:
    """``$SSL3D_RUNS_DIR`` or ``./runs``."""
    env = os.environ.get("SSL3D_RUNS_DIR")
    return Path(env).expanduser() if env else Path.cwd() / "runs"


def latest_run(stage: str, dataset_name: str | None = None, root: Path | None = None, marker: str = "last.pt") -> Path | None:
    """Newest ``<root>/<stage>-<dataset>-*`` folder holding ``marker`` (by the marker's mtime)."""
    root = root or default_runs_root()
    if not root.is_dir():
        return None
    pattern = f"{stage}-{dataset_name}-*" if dataset_name else f"{stage}-*"
    runs = [p for p in root.glob(pattern) if (p / marker).exists()]
    return max(runs, key=lambda p: (p / marker).stat().st_mtime) if runs else None


def find_encoder(dataset_name: str) -> Path:
    """``encoder.pt`` of the newest pretraining run of ``dataset_name``."""
    run = latest_run("pretrain", dataset_name, marker="encoder.pt")
    if run is None:
        raise ConfigError(f"no --encoder given and no pretraining run of {dataset_name} found under {default_runs_root()}; "
                          "give --encoder PATH/encoder.pt, or --from-scratch for the baseline")
    return run / "encoder.pt"


#: How ``training.run.choose_run_dir`` names a run: ``<stage>-<dataset>-<YYYYmmdd-HHMMSS>``.
RUN_NAME = re.compile(r"^(?P<stage>[a-z]+)-(?P<dataset>.+)-(?P<stamp>\d{8}-\d{6})$")


def model_file(model: Path | str) -> Path:
    """``--model``: a ``model.pt``, or a run folder holding one.

    Raises:
        CheckpointError: a folder without ``model.pt``.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model.pt").is_file():
            raise CheckpointError(f"{path}: this folder holds no model.pt; give a fine-tuning run folder (finetune-*, scratch-*) or its model.pt")
        return path / "model.pt"
    return path


def segmenter_runs(root: Path | None = None) -> list[Path]:
    """Every fine-tuned run folder (``finetune-*``, ``scratch-*`` holding ``model.pt``) under the runs root, newest first."""
    root = root or default_runs_root()
    if not root.is_dir():
        return []
    runs = [p for stage in SEGMENTER_STAGES for p in root.glob(f"{stage}-*") if (p / "model.pt").is_file()]
    return sorted(runs, key=lambda p: (p / "model.pt").stat().st_mtime, reverse=True)


def run_dataset(run: Path) -> str | None:
    """The dataset a run was fine-tuned on: its ``split.json``'s record, else its folder name; None when neither says."""
    try:
        with (run / "split.json").open() as fh:
            name = json.load(fh).get("dataset")
        if isinstance(name, str) and name:
            return name
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    match = RUN_NAME.match(run.name)
    return match["dataset"] if match else None


@dataclass(frozen=True)
class ModelChoice:
    """The model a prediction uses and how it was chosen (``how`` is None when given with ``--model``)."""

    path: Path
    how: str | None = None


def find_model(model: Path | None, dataset_name: str | None = None, *, root: Path | None = None) -> ModelChoice:
    """The given model (a ``model.pt`` or its run folder), or one fine-tuned on the inputs' dataset.

    Without ``model``: the newest fine-tuned run of ``dataset_name``; for inputs of no known dataset
    (``dataset_name`` None) the only fine-tuned run under the runs root. The automatic choice is logged
    at WARNING level, so ``-q`` still shows which model predicted.

    Raises:
        ConfigError: no matching run, or (no dataset) several runs to choose from.
    """
    if model is not None:
        return ModelChoice(model_file(model))
    root = root or default_runs_root()
    runs = segmenter_runs(root)
    if dataset_name is not None:
        same = [r for r in runs if run_dataset(r) == dataset_name]
        if not same:
            others = sorted({d for d in map(run_dataset, runs) if d})
            raise ConfigError(f"no --model given and no run fine-tuned on {dataset_name} under {root}"
                              + (f" (only on {', '.join(others)})" if others else "") + "; pass --model RUN or RUN/model.pt")
        choice = ModelChoice(same[0] / "model.pt", f"newest fine-tuned run of {dataset_name}"
                             + (f", {len(same) - 1} older" if len(same) > 1 else ""))
    else:
        if len(runs) != 1:
            raise ConfigError(f"no --model given, the inputs belong to no dataset folder and {len(runs)} fine-tuned runs are under {root}; "
                              "pass --model RUN or RUN/model.pt")
        choice = ModelChoice(runs[0] / "model.pt", "the only fine-tuned run; the inputs belong to no dataset folder")
    log.warning("Model: %s (no --model given: %s); pass --model to choose another", choice.path, choice.how)
    return choice
