"""``ssl3d evaluate PREDICTIONS LABELS``: Dice / HD95 per case and mean, in original label values."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ssl3d_cli.data.cache import Cache
from ssl3d_cli.data.datasets import discover_dataset, evaluation_regions
from ssl3d_cli.data.nifti import GEOMETRY_ATOL_MM, is_nifti, spacing_from_affine, strip_nifti_suffix
from ssl3d_cli.errors import InputDataError
from ssl3d_cli.files import atomic_write_text
from ssl3d_cli.metrics import case_metrics, mean_metrics
from ssl3d_cli.runtime import progress

log = logging.getLogger("ssl3d")


def _label_sources(labels: Path) -> tuple[dict[str, Path], list[int] | None, list[str] | None, dict[str, list[int]]]:
    """Case -> label file, with declared label values/class names/regions when known."""
    if (labels / "manifest.json").exists():
        cache = Cache(labels)
        files: dict[str, Path] = {cid: cache.label_source(cid) for cid in cache.labelled_ids}  # type: ignore[misc]
        data = cache.dataset
        return files, list(data.label_values), list(data.class_names), {k: list(v) for k, v in data.regions.items()}
    has_nifti = any(is_nifti(p) for p in labels.iterdir() if p.is_file())
    if has_nifti and not (labels / "dataset.json").exists():
        files = {strip_nifti_suffix(p.name): p for p in labels.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith("._")}
        return files, None, None, {}
    spec = discover_dataset(labels)
    files = {c.case_id: c.label_path for c in spec.labelled_cases}  # type: ignore[misc]
    if not files:
        raise InputDataError(f"{labels}: dataset has no labelled cases to evaluate against")
    values = spec.label_values
    regions = evaluation_regions(spec.class_names, values) if values and spec.class_names else {}
    return files, values, spec.class_names or None, regions


def evaluate(
    predictions: Path | str,
    labels: Path | str,
    *,
    csv_path: Path | None = None,
    with_hd95: bool = True,
    label_values: list[int] | None = None,
    class_names: list[str] | None = None,
    regions: dict[str, list[int]] | None = None,
    case_ids: list[str] | None = None,
) -> dict[str, Any]:
    """Compare every prediction with its label (matched by case name).

    Args:
        predictions: folder of ``<case>.nii.gz``.
        labels: a dataset folder, a folder of label files, or a cache.
        case_ids: evaluate only these cases (e.g. a test split).
    Returns:
        {"cases": [row per case], "mean": {...}, "class_names": [...], "missing": [...]}.
    """
    predictions, labels = Path(predictions).expanduser(), Path(labels).expanduser()
    for p, what in ((predictions, "predictions"), (labels, "labels")):
        if not p.is_dir():
            raise InputDataError(f"{p}: {what} folder not found")
    label_files, values, names, found_regions = _label_sources(labels)
    if case_ids is not None:
        label_files = {c: p for c, p in label_files.items() if c in set(case_ids)}
    preds = {strip_nifti_suffix(p.name): p for p in predictions.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith(".")}
    matched = sorted(set(preds) & set(label_files))
    if not matched:
        raise InputDataError(f"{predictions}: no prediction matches a label in {labels} by case name (e.g. {next(iter(label_files), '?')}.nii.gz)")
    missing = sorted(set(label_files) - set(preds))
    if missing:
        log.warning("%d labelled case(s) have no prediction (e.g. %s); evaluating %d", len(missing), missing[0], len(matched))
    values = label_values or values
    names = class_names or names
    regions = regions if regions is not None else found_regions
    if values is None:
        found: set[int] = {0}
        for cid in matched:
            found.update(np.unique(np.asarray(nib.load(str(label_files[cid])).dataobj)).astype(int).tolist())
        values = sorted(found)
    if names is None or len(names) != len(values):
        names = ["background"] + [f"label{v}" for v in values[1:]]
    rows = []
    with progress.task("Evaluating", total=len(matched)) as bar:
        for cid in matched:
            p_img, t_img = nib.load(str(preds[cid])), nib.load(str(label_files[cid]))
            if p_img.shape[:3] != t_img.shape[:3] or not np.allclose(p_img.affine, t_img.affine, atol=GEOMETRY_ATOL_MM):
                raise InputDataError(f"case {cid}: prediction {preds[cid]} has shape {p_img.shape} / affine unlike the label "
                                     f"{label_files[cid]} {t_img.shape}; predictions must lie on the label's grid")
            pred = np.rint(np.asarray(p_img.dataobj)).astype(np.int64).reshape(p_img.shape[:3])
            truth = np.rint(np.asarray(t_img.dataobj)).astype(np.int64).reshape(t_img.shape[:3])
            row = {"case": cid, **case_metrics(pred, truth, label_values=values, class_names=names,
                                               spacing_mm=spacing_from_affine(t_img.affine), regions=regions, with_hd95=with_hd95)}
            rows.append(row)
            bar.advance(1)
    mean = mean_metrics([{k: v for k, v in r.items() if k != "case"} for r in rows])
    result = {"cases": rows, "mean": mean, "class_names": names, "label_values": values, "regions": regions,
              "missing": missing, "evaluated": len(rows)}
    if csv_path is not None:
        write_csv(result, Path(csv_path))
        result["csv"] = str(csv_path)
    return result


def to_csv_text(result: dict[str, Any]) -> str:
    rows = result["cases"]
    keys = list(rows[0].keys())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for r in rows:
        writer.writerow(r)
    writer.writerow({"case": "mean", **result["mean"]})
    return buf.getvalue()


def write_csv(result: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, to_csv_text(result))
