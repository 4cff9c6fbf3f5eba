"""The on-disk contract between stages: atomic writes, weights-only loading, format checks.

Every checkpoint is a dict of plain types and tensors with a ``format`` tag and ``schema_version``:
``ssl3d-encoder`` (pretrain -> finetune), ``ssl3d-segmenter`` (finetune -> predict/uncertainty),
``ssl3d-train-state`` (``last.pt``, for --resume).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ssl3d_cli import __version__
from ssl3d_cli.errors import CheckpointError
from ssl3d_cli.files import atomic_output

ENCODER = "ssl3d-encoder"
SEGMENTER = "ssl3d-segmenter"
TRAIN_STATE = "ssl3d-train-state"
#: Schema written per format. Schema 2 of encoder.pt/model.pt holds the dataset as one ``"dataset"``
#: record (:class:`~ssl3d_cli.data.summary.DatasetSummary`) where schema 1 held six loose fields.
SCHEMA_VERSIONS = {ENCODER: 2, SEGMENTER: 2, TRAIN_STATE: 1}
#: Older schemas still read (upgraded in memory on load).
_READABLE = {ENCODER: (1, 2), SEGMENTER: (1, 2), TRAIN_STATE: (1,)}
_DESCRIPTIONS = {
    ENCODER: "a pretrained SimCLR encoder (encoder.pt from `ssl3d pretrain`)",
    SEGMENTER: "a fine-tuned segmenter (model.pt from `ssl3d finetune`)",
    TRAIN_STATE: "a training state (last.pt, for --resume)",
}


def save_checkpoint(obj: dict[str, Any], path: Path, *, fmt: str) -> Path:
    """Write atomically (temporary file in the same folder, then rename), readable as the umask allows."""
    payload = {"format": fmt, "schema_version": SCHEMA_VERSIONS[fmt], "tool_version": __version__, **obj}
    path = Path(path)
    with atomic_output(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)
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
    if obj.get("schema_version") not in _READABLE[fmt]:
        raise CheckpointError(f"{path}: checkpoint schema {obj.get('schema_version')} is not one this ssl3d reads "
                              f"({', '.join(map(str, _READABLE[fmt]))}); retrain or use a matching ssl3d version")
    if fmt in (ENCODER, SEGMENTER) and obj["schema_version"] == 1:
        obj = _upgrade_schema1(obj)
    return obj


def _upgrade_schema1(obj: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 encoder.pt/model.pt in the schema-2 shape: its loose dataset fields as one ``"dataset"`` record."""
    from ssl3d_cli.data.summary import DatasetSummary

    loose = ("preprocess", "modality", "channel_names", "class_names", "label_values", "regions")
    dataset = DatasetSummary.from_schema1_payload(obj).to_dict()
    return {**{k: v for k, v in obj.items() if k not in loose}, "dataset": dataset, "schema_version": 2}
