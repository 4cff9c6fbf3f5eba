"""``ssl3d preprocess``: dataset folder -> cache (crop to foreground, resize, normalise), resumable."""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ssl3d_cli.config import PreprocessConfig
from ssl3d_cli.data.cache import Cache, build_manifest, cache_dir_for, source_stats
from ssl3d_cli.data.datasets import CaseSpec, DatasetSpec, discover_dataset, evaluation_regions
from ssl3d_cli.data.nifti import load_label, load_scan, read_grid, read_label_values
from ssl3d_cli.data.preprocessing import map_labels, preprocess_arrays
from ssl3d_cli.data.shards import parse_shard
from ssl3d_cli.data.spacing import canonical_spacing, target_spacing
from ssl3d_cli.errors import ConfigError, InputDataError, Ssl3dError
from ssl3d_cli.files import atomic_save_npy, atomic_write_json, check_writable
from ssl3d_cli.runtime import progress

log = logging.getLogger("ssl3d")


@dataclass
class PreprocessResult:
    cache_dir: Path
    processed: list[str] = field(default_factory=list)
    skipped_up_to_date: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)
    total_cases: int = 0
    spacing_mm: tuple[float, float, float] | None = None  # the native-resolution mode's target spacing

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "cache_dir": str(self.cache_dir),
            "processed": len(self.processed),
            "up_to_date": len(self.skipped_up_to_date),
            "bad": [{"case": c, "error": e} for c, e in self.bad],
            "cases": self.total_cases,
        }
        if self.spacing_mm is not None:
            out["spacing_mm"] = list(self.spacing_mm)
        return out


def dataset_target_spacing(spec: DatasetSpec, *, skip_bad: bool = False) -> tuple[float, float, float]:
    """The native-resolution target spacing of a dataset: nnU-Net's rule over its scans' canonical spacings and shapes
    (``data.spacing.target_spacing``; a NIfTI's header alone is read, other formats whole).

    Raises:
        Ssl3dError: an unreadable scan (with ``skip_bad`` it is left out of the statistics; the case itself fails later).
    """
    spacings, shapes = [], []
    for case in spec.cases:
        try:
            grid = read_grid(case.image_paths[0])
        except Ssl3dError as exc:
            if not skip_bad:
                raise
            log.warning("case %s: left out of the target spacing (%s)", case.case_id, exc)
            continue
        ornt = nib.orientations.io_orientation(grid.affine)  # voxel axis i -> canonical axis ornt[i, 0]
        canonical_shape = [0, 0, 0]
        for axis, (world, _) in enumerate(ornt):
            canonical_shape[int(world)] = int(grid.shape[axis])
        spacings.append(canonical_spacing(grid.affine))
        shapes.append(canonical_shape)
    if not spacings:
        raise InputDataError(f"{spec.root}: no readable scan to compute a target spacing from")
    return target_spacing(spacings, shapes)


def resolve_modality(spec: DatasetSpec, config: PreprocessConfig) -> str:
    """The option wins; then the dataset's declaration; else a look at the first scan (CT has air < -200 HU)."""
    if config.modality != "auto":
        return config.modality
    if spec.modality:
        return spec.modality
    scan = load_scan(spec.cases[0].image_paths, series_uid=spec.cases[0].series_uid)
    return "ct" if float(scan.data.min()) < -200 else "mr"


def resolve_label_values(spec: DatasetSpec) -> list[int]:
    """Declared values, or (plain folders) the union of values found in the label files."""
    if spec.label_values is not None:
        return spec.label_values
    values: set[int] = {0}
    for case in spec.labelled_cases:
        assert case.label_path is not None
        values.update(int(v) for v in read_label_values(case.label_path))
    return sorted(values)


def verify_dataset(spec: DatasetSpec, label_values: list[int] | None = None) -> list[str]:
    """Check every case (readable, geometry agrees, channels complete, labels declared, finite). Returns all problems."""
    problems: list[str] = []
    values = label_values if label_values is not None else spec.label_values
    with progress.task("Verifying", total=len(spec.cases)) as bar:
        for case in spec.cases:
            try:
                scan = load_scan(case.image_paths, expected_channels=spec.num_channels, series_uid=case.series_uid)
                if case.label_path is not None:
                    label = load_label(case.label_path, shape=scan.spatial_shape, affine=scan.affine, image_path=case.image_paths[0])
                    if values is not None:
                        map_labels(label, values, str(case.label_path))
            except Ssl3dError as exc:
                problems.append(str(exc))
            bar.advance(1)
    return problems


def _case_payload(case: CaseSpec, *, spec: DatasetSpec, modality: str, label_values: list[int],
                  config: PreprocessConfig, out_dir: Path) -> dict[str, Any]:
    return {
        "case_id": case.case_id,
        "image_paths": [str(p) for p in case.image_paths],
        "label_path": str(case.label_path) if case.label_path else None,
        "series_uid": case.series_uid,
        "num_channels": spec.num_channels,
        "modality": modality,
        "label_values": label_values,
        "config": config.to_dict(),
        "out_dir": str(out_dir),
    }


def preprocess_case(payload: dict[str, Any]) -> str:
    """Read one case, preprocess it, write its arrays then its record (atomic, record last)."""
    settings = payload["config"]
    spacing = settings.get("spacing")
    config = PreprocessConfig(**{**settings, "size": tuple(settings["size"]), "clip_percentiles": tuple(settings["clip_percentiles"]),
                                 "spacing": tuple(spacing) if isinstance(spacing, list) else spacing})
    image_paths = [Path(p) for p in payload["image_paths"]]
    scan = load_scan(image_paths, expected_channels=payload["num_channels"], series_uid=payload["series_uid"])
    label = None
    if payload["label_path"]:
        label_path = Path(payload["label_path"])
        raw = load_label(label_path, shape=scan.spatial_shape, affine=scan.affine, image_path=image_paths[0])
        label = map_labels(raw, payload["label_values"], str(label_path))
    case = preprocess_arrays(scan.data, scan.affine, modality=payload["modality"], config=config, label=label)
    out_dir = Path(payload["out_dir"])
    case_id = payload["case_id"]
    record_path = out_dir / f"{case_id}.json"
    if record_path.exists():  # a stale record must not vouch for half-replaced arrays
        record_path.unlink()
    atomic_save_npy(out_dir / f"{case_id}.npy", case.image.astype(config.dtype))
    if case.label is not None:
        atomic_save_npy(out_dir / f"{case_id}_label.npy", case.label)
    sources = image_paths + ([Path(payload["label_path"])] if payload["label_path"] else [])
    atomic_write_json(record_path, {
        "case_id": case_id,
        "labelled": case.label is not None,
        "settings_hash": config.hash(),
        "modality": payload["modality"],
        "sources": source_stats(sources, series_uid=payload["series_uid"]),
        "spacing_mm": [float(s) for s in np.sqrt((np.asarray(scan.affine)[:3, :3] ** 2).sum(0))],
        "geometry": case.geometry.to_dict(),
        "intensity": case.intensity,
    })
    return case_id


def _up_to_date(case: CaseSpec, out_dir: Path, settings_hash: str) -> bool:
    record_path = out_dir / f"{case.case_id}.json"
    if not record_path.exists() or not (out_dir / f"{case.case_id}.npy").exists():
        return False
    import json

    with record_path.open() as fh:
        record = json.load(fh)
    sources = case.image_paths + ([case.label_path] if case.label_path else [])
    return record.get("settings_hash") == settings_hash and record.get("sources") == source_stats(sources, series_uid=case.series_uid)


def preprocess(
    dataset: Path | str,
    *,
    config: PreprocessConfig | None = None,
    cache_dir: Path | None = None,
    cache_root: Path | None = None,
    workers: int = 1,
    shard: str | tuple[int, int] | None = None,
    skip_bad: bool = False,
    verify: bool = False,
) -> PreprocessResult:
    """Preprocess every case of a dataset into its cache; only missing or stale cases are redone.

    Args:
        dataset: an MSD / nnU-Net / BraTS folder, or a plain folder (or ``images/`` + ``labels/``) of NIfTI, NRRD,
            MetaImage files and DICOM series folders.
        cache_dir: exact output folder; default: keyed by dataset path and settings under ``cache_root``.
        workers: parallel processes.
        shard: ``"I/N"``: every N-th case starting at I (array jobs).
        skip_bad: continue past bad cases, listing them in the result.
        verify: check the whole dataset first and report every problem found.
    """
    config = (config or PreprocessConfig()).validate()
    spec = discover_dataset(dataset)
    index, count = parse_shard(shard)
    label_values = resolve_label_values(spec)
    if verify:
        problems = verify_dataset(spec, label_values)
        if problems:
            raise InputDataError(f"{spec.root}: --verify found {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    modality = resolve_modality(spec, config)
    if config.spacing == "auto":
        config = replace(config, spacing=dataset_target_spacing(spec, skip_bad=skip_bad))
        log.info("Target spacing of %s: %s mm (R, A, S), from its %d scans", spec.name, " x ".join(f"{v:.3g}" for v in config.spacing),
                 len(spec.cases))
    out = Path(cache_dir) if cache_dir else cache_dir_for(spec.root, config.hash(), cache_root)
    check_writable(out / "cases")
    result = PreprocessResult(cache_dir=out, total_cases=len(spec.cases),
                              spacing_mm=tuple(config.spacing) if config.native else None)  # type: ignore[arg-type]
    mine = spec.cases[index::count]
    todo = []
    for case in mine:
        (result.skipped_up_to_date if _up_to_date(case, out / "cases", config.hash()) else todo).append(case)
    payloads = [_case_payload(c, spec=spec, modality=modality, label_values=label_values, config=config, out_dir=out / "cases") for c in todo]
    log.info("Preprocessing %d case(s) of %s (%s, %s) into %s; %d already up to date",
             len(todo), spec.name, spec.layout, modality, out, len(result.skipped_up_to_date))
    with progress.task("Preprocessing", total=len(payloads)) as bar:
        if workers <= 1 or len(payloads) <= 1:
            for payload in payloads:
                _run_one(payload, result, skip_bad)
                bar.advance(1)
        else:
            ctx = multiprocessing.get_context("spawn")  # fork after torch threads start can deadlock
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_single_threaded) as pool:
                futures = {pool.submit(preprocess_case, p): p["case_id"] for p in payloads}
                for fut in as_completed(futures):
                    try:
                        result.processed.append(fut.result())
                    except Ssl3dError as exc:
                        if not skip_bad:
                            for other in futures:
                                other.cancel()
                            raise
                        result.bad.append((futures[fut], str(exc)))
                    bar.advance(1)
    bad_ids = {c for c, _ in result.bad}
    regions = evaluation_regions(spec.class_names, label_values) if spec.class_names else {}
    class_names = spec.class_names or ["background"] + [f"label{v}" for v in label_values[1:]]
    manifest = build_manifest(
        dataset_summary=spec.summary(), settings=config.to_dict(), settings_hash=config.hash(), modality=modality,
        channel_names=spec.channel_names, class_names=class_names, label_values=label_values, regions=regions,
        cases=[{"case_id": c.case_id, "labelled": c.labelled} for c in spec.cases if c.case_id not in bad_ids],
    )
    atomic_write_json(out / "manifest.json", manifest)
    return result


def _single_threaded() -> None:
    """Pool workers use one torch thread each: parallelism comes from the processes."""
    import torch

    torch.set_num_threads(1)


def _run_one(payload: dict[str, Any], result: PreprocessResult, skip_bad: bool) -> None:
    try:
        result.processed.append(preprocess_case(payload))
    except Ssl3dError as exc:
        if not skip_bad:
            raise
        result.bad.append((payload["case_id"], str(exc)))


def ensure_cache(source: Path | str, *, config: PreprocessConfig | None = None, cache_root: Path | None = None,
                 workers: int = 1) -> Cache:
    """A cache for ``source``: the cache itself when given one, else the dataset preprocessed on demand."""
    source = Path(source).expanduser()
    if (source / "manifest.json").exists():
        cache = Cache(source)
        if config is not None and config.native and not cache.dataset.preprocess_config().native:
            raise ConfigError(f"{source}: a fixed-grid cache ({'x'.join(map(str, cache.dataset.size))}), but --resolution native was "
                              "asked; give the dataset folder (it is preprocessed at native resolution on demand) or a native cache")
    else:
        result = preprocess(source, config=config, cache_root=cache_root, workers=workers)
        cache = Cache(result.cache_dir)
    missing = cache.missing_cases()
    if missing:
        raise InputDataError(f"{cache.root}: {len(missing)} case(s) not preprocessed (e.g. {missing[0]}); run `ssl3d preprocess` without --shard")
    return cache


def open_cache_on_all_ranks(source: Path | str, *, config: PreprocessConfig | None = None, cache_root: Path | None = None) -> Cache:
    """:func:`ensure_cache` under torch.distributed: rank 0 preprocesses on demand while the other ranks wait,
    then every rank opens the cache (a lone process simply calls it)."""
    from ssl3d_cli.runtime.distributed import barrier, is_main_process

    cache = ensure_cache(source, config=config, cache_root=cache_root) if is_main_process() else None
    barrier()
    return cache if cache is not None else ensure_cache(source, config=config, cache_root=cache_root)
