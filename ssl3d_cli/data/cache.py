"""The preprocessed cache: ``manifest.json`` + per-case ``.npy`` arrays + per-case geometry records.

Layout::

    CACHE/manifest.json
    CACHE/cases/<case>.npy         (C, D, H, W) float16/float32, memory-mappable
    CACHE/cases/<case>_label.npy   (D, H, W) uint8 class indices (labelled cases)
    CACHE/cases/<case>.json        geometry, intensity statistics, sources (written last: the commit mark)

A cache's identity for ``--resume`` is its content, not its folder: :meth:`Cache.content_fingerprint`.
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
from ssl3d_cli.files import source_stat

CACHE_FORMAT = "ssl3d-cache"
CACHE_SCHEMA_VERSION = 1
#: Names what :meth:`Cache.content_fingerprint` covers; a fingerprint of another scheme is never equal to this one.
CONTENT_FINGERPRINT_SCHEME = "ssl3d-cache-content-1"
#: The fields of a case record that describe its content (the rest, the sources' folders and mtimes, describe where it came from).
_CONTENT_FIELDS = ("case_id", "labelled", "settings_hash", "modality", "spacing_mm", "geometry", "intensity")
#: The manifest fields that decide what the arrays mean (channels, classes and their label values).
_DATASET_FIELDS = ("modality", "channel_names", "class_names", "label_values")


def default_cache_root() -> Path:
    """``$SSL3D_CACHE_DIR`` or the platform's user cache dir (e.g. ``~/.cache/ssl3d``)."""
    env = os.environ.get("SSL3D_CACHE_DIR")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("ssl3d"))


def cache_dir_for(dataset_root: Path, settings_hash: str, cache_root: Path | None = None) -> Path:
    """The cache folder of a dataset, keyed by its absolute path and the preprocessing settings."""
    key = hashlib.sha256(str(dataset_root.resolve()).encode()).hexdigest()[:8]
    return (cache_root or default_cache_root()) / f"{dataset_root.name}-{key}-{settings_hash}"


def source_stats(paths: list[Path], *, series_uid: str | None = None) -> list[dict[str, Any]]:
    """Size and mtime of each source file: a changed file makes its cached case stale.

    A DICOM folder's entry sums its files and adds their count and ``series_uid`` (:func:`ssl3d_cli.files.source_stat`).
    """
    return [{"path": str(p), **source_stat(Path(p), series_uid=series_uid if Path(p).is_dir() else None)} for p in paths]


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
        return CaseSpec(case_id, sources[:-1] if record["labelled"] else sources, series_uid=record["sources"][0].get("series_uid"))

    def label_source(self, case_id: str) -> Path | None:
        """The case's source label file (None for unlabelled cases)."""
        record = self.record(case_id)
        return Path(record["sources"][-1]["path"]) if record["labelled"] else None

    def case_fingerprint(self, case_id: str) -> str:
        """16 hex digits of SHA-256 over what the case's cached arrays depend on, without reading them.

        Covered: the record's settings hash, modality, labelled flag, geometry (source shape and affine, crop box,
        grid), voxel spacing and intensity statistics (per channel: clip range, mean, std of the foreground), each
        source file's name and size, and the byte sizes of the cached ``.npy`` files. Not covered: the folders of the
        cache and of the sources, and file times, so a copied, moved or re-made cache of the same scans has the same
        fingerprint, while a re-made case whose scan or label changed does not. Floats count to 6 significant digits:
        a cache re-made on another machine, whose float sums may differ in the last bits, still matches.
        """
        record = self.record(case_id)
        content: dict[str, Any] = {k: _rounded(record.get(k)) for k in _CONTENT_FIELDS}
        content["sources"] = [{"name": Path(s["path"]).name, "size": s["size"]} for s in record["sources"]]
        arrays = (self.root / "cases" / f"{case_id}.npy", self.root / "cases" / f"{case_id}_label.npy")
        content["array_bytes"] = [p.stat().st_size if p.exists() else None for p in arrays]
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    def content_fingerprint(self) -> dict[str, Any]:
        """What a training run compares on ``--resume`` instead of the cache's path (see :func:`content_differences`).

        Returns:
            ``{"scheme", "settings_hash", "dataset": {modality, channel_names, class_names, label_values},
            "cases": {case_id: case_fingerprint, ...} in the manifest's order, "sha256": over all of it}``. One small
            JSON record per case is read (no arrays), so it costs about as much as listing the cache.
        """
        out: dict[str, Any] = {
            "scheme": CONTENT_FINGERPRINT_SCHEME,
            "settings_hash": self.manifest["settings_hash"],
            "dataset": {k: self.manifest.get(k) for k in _DATASET_FIELDS},
            "cases": {cid: self.case_fingerprint(cid) for cid in self.case_ids},
        }
        out["sha256"] = hashlib.sha256(json.dumps([out["settings_hash"], out["dataset"], list(out["cases"].items())]).encode()).hexdigest()
        return out


def _rounded(value: Any) -> Any:
    """``value`` with every float rounded to 6 significant digits (nested lists and dicts too)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def _some(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def content_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two :meth:`Cache.content_fingerprint` records, one phrase each (empty: the same content)."""
    if saved.get("scheme") != current.get("scheme"):
        return [f"cache fingerprint scheme {saved.get('scheme')!r} vs now {current.get('scheme')!r}"]
    out: list[str] = []
    if saved["settings_hash"] != current["settings_hash"]:
        out.append(f"cache settings hash: checkpoint {saved['settings_hash']!r} vs now {current['settings_hash']!r}")
    for key in _DATASET_FIELDS:
        a, b = saved["dataset"].get(key), current["dataset"].get(key)
        if a != b:
            out.append(f"cache {key}: checkpoint {a!r} vs now {b!r}")
    before, now = saved["cases"], current["cases"]
    missing = [c for c in before if c not in now]
    added = [c for c in now if c not in before]
    changed = [c for c in before if c in now and before[c] != now[c]]
    if missing:
        out.append(f"{len(missing)} case(s) no longer in the cache ({_some(missing)})")
    if added:
        out.append(f"{len(added)} case(s) new in the cache ({_some(added)})")
    if changed:
        out.append(f"{len(changed)} case(s) with other content: source size, geometry or intensities ({_some(changed)})")
    if not (missing or added or changed) and list(before) != list(now):
        out.append("the cases are listed in another order")
    return out


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
