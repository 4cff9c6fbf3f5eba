"""The preprocessed cache: ``manifest.json`` + per-case ``.npy`` arrays + per-case geometry records.

Layout::

    CACHE/manifest.json
    CACHE/cases/<case>.npy         (C, D, H, W) float16/float32, memory-mappable
    CACHE/cases/<case>_label.npy   (D, H, W) uint8 class indices (labelled cases)
    CACHE/cases/<case>.json        geometry, intensity statistics, sources (written last: the commit mark)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs

from ssl3d_cli import __version__
from ssl3d_cli.data.datasets import CaseSpec
from ssl3d_cli.data.preprocessing import CaseGeometry
from ssl3d_cli.data.summary import DatasetSummary
from ssl3d_cli.errors import InputDataError

CACHE_FORMAT = "ssl3d-cache"
CACHE_SCHEMA_VERSION = 1


def default_cache_root() -> Path:
    """``$SSL3D_CACHE_DIR`` or the platform's user cache dir (e.g. ``~/.cache/ssl3d``)."""
    env = os.environ.get("SSL3D_CACHE_DIR")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("ssl3d"))


def cache_dir_for(dataset_root: Path, settings_hash: str, cache_root: Path | None = None) -> Path:
    """The cache folder of a dataset, keyed by its absolute path and the preprocessing settings."""
    key = hashlib.sha256(str(dataset_root.resolve()).encode()).hexdigest()[:8]
    return (cache_root or default_cache_root()) / f"{dataset_root.name}-{key}-{settings_hash}"


def source_stats(paths: list[Path]) -> list[dict[str, Any]]:
    """Size and mtime of each source file: a changed file makes its cached case stale."""
    out = []
    for p in paths:
        st = p.stat()
        out.append({"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


class Cache:
    """Read access to a preprocessed cache folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        manifest_path = self.root / "manifest.json"
        if not manifest_path.exists():
            raise InputDataError(f"{self.root}: not an ssl3d cache (no manifest.json); run `ssl3d preprocess DATASET` first")
        with manifest_path.open() as fh:
            self.manifest: dict[str, Any] = json.load(fh)
        if self.manifest.get("format") != CACHE_FORMAT:
            raise InputDataError(f"{manifest_path}: not an ssl3d cache manifest (format {self.manifest.get('format')!r})")
        if self.manifest.get("schema_version") != CACHE_SCHEMA_VERSION:
            raise InputDataError(f"{manifest_path}: cache schema {self.manifest.get('schema_version')} is not {CACHE_SCHEMA_VERSION}; rerun `ssl3d preprocess`")
        self._records: dict[str, dict[str, Any]] = {}
        self._dataset: DatasetSummary | None = None

    @property
    def case_ids(self) -> list[str]:
        return [c["case_id"] for c in self.manifest["cases"]]

    @property
    def labelled_ids(self) -> list[str]:
        return [c["case_id"] for c in self.manifest["cases"] if c["labelled"]]

    @property
    def dataset(self) -> DatasetSummary:
        """Classes, label values, regions, modality, channels and preprocessing settings of the cached dataset."""
        if self._dataset is None:
            self._dataset = DatasetSummary.from_manifest(self.manifest, cache=str(self.root))
        return self._dataset

    def record(self, case_id: str) -> dict[str, Any]:
        if case_id not in self._records:
            path = self.root / "cases" / f"{case_id}.json"
            if not path.exists():
                raise InputDataError(f"{self.root}: case {case_id} is not preprocessed yet; run `ssl3d preprocess` again")
            with path.open() as fh:
                self._records[case_id] = json.load(fh)
        return self._records[case_id]

    def geometry(self, case_id: str) -> CaseGeometry:
        return CaseGeometry.from_dict(self.record(case_id)["geometry"])

    def image(self, case_id: str, *, mmap: bool = True) -> np.ndarray:
        """(C, D, H, W) float16/float32, memory-mapped by default."""
        return np.load(self.root / "cases" / f"{case_id}.npy", mmap_mode="r" if mmap else None)

    def label(self, case_id: str) -> np.ndarray:
        """(D, H, W) uint8 class indices."""
        path = self.root / "cases" / f"{case_id}_label.npy"
        if not path.exists():
            raise InputDataError(f"{self.root}: case {case_id} has no label")
        return np.load(path)

    def missing_cases(self) -> list[str]:
        return [c for c in self.case_ids if not (self.root / "cases" / f"{c}.json").exists()]

    def case_spec(self, case_id: str) -> CaseSpec:
        """The case's source scans as a :class:`CaseSpec` (image files only; the label file, if any, is not included)."""
        record = self.record(case_id)
        sources = [Path(s["path"]) for s in record["sources"]]
        return CaseSpec(case_id, sources[:-1] if record["labelled"] else sources)

    def label_source(self, case_id: str) -> Path | None:
        """The case's source label file (None for unlabelled cases)."""
        record = self.record(case_id)
        return Path(record["sources"][-1]["path"]) if record["labelled"] else None


def build_manifest(*, dataset_summary: dict[str, Any], settings: dict[str, Any], settings_hash: str, modality: str,
                   channel_names: list[str], class_names: list[str], label_values: list[int],
                   regions: dict[str, list[int]], cases: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "schema_version": CACHE_SCHEMA_VERSION,
        "tool_version": __version__,
        "settings": settings,
        "settings_hash": settings_hash,
        "dataset": dataset_summary,
        "modality": modality,
        "channel_names": channel_names,
        "class_names": class_names,
        "label_values": label_values,
        "regions": regions,
        "cases": cases,
    }
