"""Where a prediction came from: one record per case, written after the case's files, compared before keeping them.

``ssl3d predict`` writes ``<case>.provenance.json`` beside ``<case>.nii.gz``. The record is written last, once the
case's NIfTI files are in place, and the old record is removed before a case's files are replaced, so a record never
vouches for files it did not see written. A later run keeps an existing case only when its record equals what this
run would compute and every file this run asks for exists; otherwise the case is recomputed and the reason logged.
``ssl3d uncertainty`` writes the same record for the segmentation, entropy and mutual information it computes from
its MC samples (so ``predict`` with equal settings keeps them), and ``<case>_<target>.provenance.json`` for the maps of
one target: the same fields plus ``target`` (its classes; with the figure, its percentiles and what it outlines).

Compared: the model file (SHA-256, not its path), the resolved MC settings (samples, dropout rates, vote rule, vote
weights, union classes, seed), the tool version and the input files (resolved path, size, mtime; for a DICOM series
folder the total size, newest mtime and count of its files and the series UID, :func:`ssl3d_cli.files.source_stat`). Recorded but not
compared: ``mc_batch``, ``compile``, device and precision (how a case was computed, not what was asked for).

This module imports neither torch nor numpy.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssl3d_cli import __version__
from ssl3d_cli.files import atomic_write_json, source_stat

FORMAT = "ssl3d-prediction-provenance"
SCHEMA_VERSION = 1
SUFFIX = ".provenance.json"
#: MC settings that change how a case is computed, not what: recorded, never a reason to recompute.
EXECUTION_ONLY = ("mc_batch", "compile")


def file_sha256(path: Path | str, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks.

    Args:
        path: the file (e.g. ``model.pt``).
        chunk_bytes: read size.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def input_stats(paths: list[Path], *, series_uid: str | None = None) -> list[dict[str, Any]]:
    """Resolved path, size and mtime of each input file: a changed or moved scan makes its prediction stale.

    Args:
        paths: the case's image files in channel order, or its DICOM folder.
        series_uid: the DICOM series read from the folder (recorded with it).

    Returns:
        One ``{"path", "size", "mtime_ns"}`` per file (a folder adds ``files`` and ``series_uid``).
    """
    return [{"path": str(Path(p).resolve()), **source_stat(Path(p), series_uid=series_uid)} for p in paths]


def provenance_path(out_dir: Path, case_id: str) -> Path:
    """``<out_dir>/<case>.provenance.json``."""
    return out_dir / f"{case_id}{SUFFIX}"


@dataclass(frozen=True)
class RunProvenance:
    """What every case of one prediction run shares: the model, the settings, the tool, how it ran.

    Attributes:
        model_path: the model file as resolved.
        model_sha256: its hash (computed once per run).
        model_dataset: the dataset the model was fine-tuned on.
        mc: ``MCConfig.to_dict()`` after the dropout rates were resolved to concrete values.
        union_class_indices: the ``--union-class`` classes as class indices.
        device: where the run computes (recorded only).
        precision: fp32 / bf16 / fp16 (recorded only).
    """

    model_path: str
    model_sha256: str
    model_dataset: str
    mc: dict[str, Any]
    union_class_indices: tuple[int, ...]
    device: str
    precision: str

    def identity(self, image_paths: list[Path], *, series_uid: str | None = None) -> dict[str, Any]:
        """The compared part of a case's record: equal identities mean the same outputs would be computed.

        Args:
            image_paths: the case's input files (or DICOM folder); ``series_uid``: its DICOM series.
        """
        mc = {k: v for k, v in self.mc.items() if k not in EXECUTION_ONLY}
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "tool_version": __version__,
            "model": {"sha256": self.model_sha256},
            "mc": mc,
            "vote": {"rule": mc.get("vote"), "weights": list(mc.get("vote_weights") or []), "union_classes": list(self.union_class_indices)},
            "seed": mc.get("seed"),
            "inputs": input_stats(image_paths, series_uid=series_uid),
        }

    def case_record(self, case_id: str, image_paths: list[Path], outputs: dict[str, str], seconds: float, *,
                    series_uid: str | None = None) -> dict[str, Any]:
        """The full record of one computed case.

        Args:
            case_id: the case.
            image_paths: its input files (statted now, after the outputs were written).
            outputs: output kind -> file name inside the output folder (``segmentation``, ``probabilities``).
            seconds: time the case took.
            series_uid: the DICOM series read from the case's folder.
        """
        record = self.identity(image_paths, series_uid=series_uid)
        record["case"] = case_id
        record["model"] = {"sha256": self.model_sha256, "path": self.model_path, "dataset": self.model_dataset}
        record["mc"] = dict(self.mc)
        record["outputs"] = dict(outputs)
        record["computed"] = {"device": self.device, "precision": self.precision, "seconds": round(seconds, 3),
                              "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        return record


def read_provenance(path: Path) -> dict[str, Any] | None:
    """A case's record, or None when it is missing or unreadable (either way the case is recomputed)."""
    try:
        with path.open() as fh:
            record = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def write_provenance(path: Path, record: dict[str, Any]) -> None:
    """Write a case's record atomically (call after the case's NIfTI files are in place)."""
    atomic_write_json(path, record)


def remove_provenance(path: Path) -> None:
    """Remove a case's record before its files are replaced, so it never vouches for half-replaced outputs."""
    path.unlink(missing_ok=True)


def _changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def stale_reasons(record: dict[str, Any] | None, current: dict[str, Any], out_dir: Path, required: dict[str, str]) -> list[str]:
    """Why an existing case cannot be kept; empty when its record equals ``current`` and every required file exists.

    Args:
        record: the case's stored record (None: missing or unreadable).
        current: :meth:`RunProvenance.identity` for this run and case.
        out_dir: the output folder.
        required: output kind -> file name this run must find (``segmentation``, and ``probabilities`` when asked).

    Returns:
        Short reasons, e.g. ``["model changed"]`` or ``["settings changed: mc_samples 2 -> 3"]``.
    """
    if record is None:
        return ["no provenance record"]
    if (record.get("format"), record.get("schema_version")) != (FORMAT, SCHEMA_VERSION):
        return ["provenance record of another format"]
    reasons = []
    if (record.get("model") or {}).get("sha256") != current["model"]["sha256"]:
        reasons.append("model changed")
    if record.get("tool_version") != current["tool_version"]:
        reasons.append(f"ssl3d version changed ({record.get('tool_version')} -> {current['tool_version']})")
    old_mc = {k: v for k, v in (record.get("mc") or {}).items() if k not in EXECUTION_ONLY}
    changed = _changed_settings(old_mc, current["mc"])  # the vote rule, weights, union classes and seed are MC settings too
    if changed:
        reasons.append("settings changed: " + ", ".join(changed))
    if record.get("inputs") != current["inputs"]:
        reasons.append("input file changed")
    recorded = record.get("outputs") or {}
    for kind, name in required.items():
        if recorded.get(kind) != name:
            reasons.append(f"no recorded {kind} file")
        elif not (out_dir / name).exists():
            reasons.append(f"{kind} file missing")
    return reasons
