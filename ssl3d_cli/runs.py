"""Where runs live and how a stage finds an earlier one (an encoder to fine-tune, a model to predict with).

A run folder is ``<runs root>/<stage>-<dataset>-<YYYYmmdd-HHMMSS>`` (stage: ``pretrain``,
``finetune`` or ``scratch``); the runs root is ``$SSL3D_RUNS_DIR`` or ``./runs``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ssl3d_cli.errors import ConfigError

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


def find_model(model: Path | None) -> Path:
    """The given model, or the newest fine-tuned run's ``model.pt`` under the runs root (named in the log)."""
    if model is not None:
        return Path(model).expanduser()
    candidates = [r for r in (latest_run(stage, marker="model.pt") for stage in SEGMENTER_STAGES) if r is not None]
    if not candidates:
        raise ConfigError(f"no --model given and no fine-tuned run with model.pt under {default_runs_root()}; pass --model RUN/model.pt")
    run = max(candidates, key=lambda p: (p / "model.pt").stat().st_mtime)
    log.info("Model: %s (newest fine-tuned run)", run / "model.pt")
    return run / "model.pt"
