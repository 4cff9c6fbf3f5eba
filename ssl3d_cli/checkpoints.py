"""The on-disk contract between stages: atomic writes, weights-only loading, format checks.

Every checkpoint is a dict of plain types and tensors with a ``format`` tag and ``schema_version``:
``ssl3d-encoder`` (pretrain -> finetune), ``ssl3d-segmenter`` (finetune -> predict/uncertainty),
``ssl3d-train-state`` (``last.pt``, for --resume).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ssl3d_cli import __version__
from ssl3d_cli.errors import CheckpointError

SCHEMA_VERSION = 1
ENCODER = "ssl3d-encoder"
SEGMENTER = "ssl3d-segmenter"
TRAIN_STATE = "ssl3d-train-state"
_DESCRIPTIONS = {
    ENCODER: "a pretrained SimCLR encoder (encoder.pt from `ssl3d pretrain`)",
    SEGMENTER: "a fine-tuned segmenter (model.pt from `ssl3d finetune`)",
    TRAIN_STATE: "a training state (last.pt, for --resume)",
}


def save_checkpoint(obj: dict[str, Any], path: Path, *, fmt: str) -> Path:
    """Write atomically (temporary file in the same folder, then rename)."""
    payload = {"format": fmt, "schema_version": SCHEMA_VERSION, "tool_version": __version__, **obj}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: Path | str, *, fmt: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True`` (never runs code from the file) and check its format tag.

    Raises:
        CheckpointError: missing file, not a torch file, or a checkpoint of another kind.
    """
    path = Path(path).expanduser()
    expected = _DESCRIPTIONS[fmt]
    if not path.exists():
        raise CheckpointError(f"{path}: file not found; expected {expected}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be loaded as a weights-only checkpoint ({exc.__class__.__name__}); expected {expected}") from None
    found = obj.get("format") if isinstance(obj, dict) else None
    if found != fmt:
        what = _DESCRIPTIONS.get(found, "not an ssl3d checkpoint") if found else "not an ssl3d checkpoint"
        raise CheckpointError(f"{path}: this is {what}; expected {expected}")
    if obj.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(f"{path}: checkpoint schema {obj.get('schema_version')} is not {SCHEMA_VERSION}; retrain or use a matching ssl3d version")
    return obj
