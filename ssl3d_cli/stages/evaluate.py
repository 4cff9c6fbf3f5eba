"""``ssl3d evaluate PREDICTIONS LABELS``: Dice / HD95 / NSD per case and mean, in original label values."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ssl3d_cli.data.cache import Cache
from ssl3d_cli.data.datasets import discover_dataset, evaluation_regions
from ssl3d_cli.data.nifti import (
    GEOMETRY_ATOL_MM,
    is_image_file,
    is_nifti,
    read_label_map,
    read_label_values,
    spacing_from_affine,
    strip_image_suffix,
    strip_nifti_suffix,
)
from ssl3d_cli.errors import ConfigError, InputDataError
from ssl3d_cli.files import atomic_write_json, atomic_write_text, check_writable
from ssl3d_cli.metrics import DEFAULT_NSD_TOLERANCE_MM, case_metrics, conventions, mean_metrics
from ssl3d_cli.runtime import progress

log = logging.getLogger("ssl3d")


def label_sources(labels: Path) -> tuple[dict[str, Path], list[int] | None, list[str] | None, dict[str, list[int]]]:
    """Case -> label file, with declared label values/class names/regions when known."""
    if (labels / "manifest.json").exists():
        cache = Cache(labels)
        files: dict[str, Path] = {cid: cache.label_source(cid) for cid in cache.labelled_ids}  # type: ignore[misc]
        data = cache.dataset
        return files, list(data.label_values), list(data.class_names), {k: list(v) for k, v in data.regions.items()}
    label_files = sorted(p for p in labels.iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith("._"))
    if label_files and not (labels / "dataset.json").exists():  # a plain folder of label files (NIfTI, NRRD, MetaImage)
        by_case: dict[str, Path] = {}
        for path in label_files:
            case = strip_image_suffix(path.name)
            if case in by_case:
                raise InputDataError(f"{labels}: case {case} has two label files, {by_case[case].name} and {path.name}; keep one")
            by_case[case] = path
        return by_case, None, None, {}
    spec = discover_dataset(labels)
    files = {c.case_id: c.label_path for c in spec.labelled_cases}  # type: ignore[misc]
    if not files:
        raise InputDataError(f"{labels}: dataset has no labelled cases to evaluate against")
    values = spec.label_values
    regions = evaluation_regions(spec.class_names, values) if values and spec.class_names else {}
    return files, values, spec.class_names or None, regions


def _prediction_classes(predictions: Path) -> tuple[list[int], list[str], Path] | None:
    """(label values, class names, the record) as ``ssl3d predict`` recorded them in ``predict_args.json`` (or a shard's
    ``predict_args.shard-I-of-N.json``), None when the folder has no such record or it names no classes."""
    records = [predictions / "predict_args.json"] + sorted(predictions.glob("predict_args.shard-*.json"))
    for path in records:
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text())
            values, names = [int(v) for v in record["label_values"]], [str(n) for n in record["class_names"]]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s: not a readable predict record with class_names and label_values; ignored", path)
            continue
        if len(values) == len(names) and values:
            return values, names, path
    return None


def evaluate(
    predictions: Path | str,
    labels: Path | str,
    *,
    csv_path: Path | None = None,
    with_hd95: bool = True,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    label_values: list[int] | None = None,
    class_names: list[str] | None = None,
    regions: dict[str, list[int]] | None = None,
    case_ids: list[str] | None = None,
    probabilities: Path | str | None = None,
    uncertainty: Path | str | None = None,
    reliability_figure: Path | str | None = None,
    json_path: Path | str | None = None,
) -> dict[str, Any]:
    """Compare every prediction with its label (matched by case name).

    Classes are named as the labels' dataset (or cache) names them; for a plain folder of label files, as the
    predictions' ``predict_args.json`` (written by ``ssl3d predict``) names them; else ``label<value>``.

    Args:
        predictions: folder of ``<case>.nii.gz``.
        labels: a dataset folder, a folder of label files, or a cache.
        with_hd95: also the surface metrics, HD95 (mm) and NSD; False gives Dice only (both surface metrics share
            the distance maps, the slow part).
        nsd_tolerance_mm: tolerance of the normalised surface Dice, in mm.
        case_ids: evaluate only these cases (e.g. a test split).
        probabilities: folder of ``<case>_probabilities.nii.gz`` (``predict --save-probabilities``): adds per-case ECE,
            Brier and NLL over the scan and the region of interest, pooled values, and a reliability diagram.
        uncertainty: folder of ``<case>_entropy.nii.gz`` (``ssl3d uncertainty``): adds the uncertainty-error overlap.
        reliability_figure: where the reliability diagram goes (default ``PREDICTIONS/reliability.png``).
        json_path: also write the result (what ``--json`` prints) to this JSON file, atomically.
    Returns:
        {"cases": [row per case], "mean": {...}, "class_names": [...], "missing": [...], "conventions": {...}}; a row
        holds dice_<name>, hd95_<name> (mm), nsd_<name> per class and region, and dice_mean_fg.
    """
    if not nsd_tolerance_mm >= 0:
        raise ConfigError(f"--nsd-tolerance {nsd_tolerance_mm}: the NSD tolerance must be a distance >= 0 mm")
    predictions, labels = Path(predictions).expanduser(), Path(labels).expanduser()
    for p, what in ((predictions, "predictions"), (labels, "labels")):
        if not p.is_dir():
            raise InputDataError(f"{p}: {what} folder not found")
    if json_path is not None:
        json_path = Path(json_path).expanduser()
        if json_path.is_dir():
            raise ConfigError(f"-o {json_path}: is a folder; give the JSON file to write, e.g. {json_path / 'evaluation.json'}")
        check_writable(json_path.parent)
    label_files, values, names, found_regions = label_sources(labels)
    if case_ids is not None:
        label_files = {c: p for c, p in label_files.items() if c in set(case_ids)}
    preds = {strip_nifti_suffix(p.name): p for p in predictions.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith(".")}
    matched = sorted(set(preds) & set(label_files))
    if not matched:
        raise InputDataError(f"{predictions}: no prediction matches a label in {labels} by case name (e.g. {next(iter(label_files), '?')}.nii.gz)")
    missing = sorted(set(label_files) - set(preds))
    if missing:
        log.warning("%d labelled case(s) have no prediction (e.g. %s); evaluating %d", len(missing), missing[0], len(matched))
    if names is None and class_names is None:
        recorded = _prediction_classes(predictions)
        if recorded is not None and (values is None or list(values) == recorded[0]):
            values, names = recorded[0], recorded[1]
            found_regions = found_regions or evaluation_regions(names, values)
            log.info("class names from %s: %s", recorded[2], ", ".join(names))
        elif recorded is not None:
            log.warning("%s names label values %s, the labels %s: classes named label<value>", recorded[2], recorded[0], values)
    values = label_values or values
    names = class_names or names
    regions = regions if regions is not None else found_regions
    if values is None:
        found: set[int] = {0}
        for cid in matched:
            found.update(read_label_values(label_files[cid]).astype(int).tolist())
        values = sorted(found)
    if names is None or len(names) != len(values):
        names = ["background"] + [f"label{v}" for v in values[1:]]
    quality = UncertaintyQuality(values, probabilities=probabilities, uncertainty=uncertainty)
    rows = []
    with progress.task("Evaluating", total=len(matched)) as bar:
        for cid in matched:
            p_img = nib.load(str(preds[cid]))
            truth, t_affine = read_label_map(label_files[cid])  # NIfTI, NRRD or MetaImage, its affine in RAS as NIfTI's
            if p_img.shape[:3] != truth.shape or not np.allclose(p_img.affine, t_affine, atol=GEOMETRY_ATOL_MM):
                raise InputDataError(f"case {cid}: prediction {preds[cid]} has shape {p_img.shape} / affine unlike the label "
                                     f"{label_files[cid]} {truth.shape}; predictions must lie on the label's grid")
            pred = np.rint(np.asarray(p_img.dataobj)).astype(np.int64).reshape(p_img.shape[:3])
            row = {"case": cid, **case_metrics(pred, truth, label_values=values, class_names=names,
                                               spacing_mm=spacing_from_affine(t_affine), regions=regions, with_hd95=with_hd95,
                                               nsd_tolerance_mm=nsd_tolerance_mm)}
            row.update(quality.case(cid, pred, truth, t_affine, label_files[cid]))
            rows.append(row)
            bar.advance(1)
    mean = mean_metrics([{k: v for k, v in r.items() if k != "case"} for r in rows])
    result = {"cases": rows, "mean": mean, "class_names": names, "label_values": values, "regions": regions,
              "missing": missing, "evaluated": len(rows), "conventions": conventions(nsd_tolerance_mm, with_surface=with_hd95)}
    result.update(quality.summary(reliability_figure or predictions / "reliability.png"))
    if csv_path is not None:
        write_csv(result, Path(csv_path))
        result["csv"] = str(csv_path)
    if json_path is not None:
        result["json"] = str(json_path)
        atomic_write_json(json_path, json.loads(json.dumps(result, default=str)))  # as --json prints it
    return result


class UncertaintyQuality:
    """Calibration of the saved mean probabilities and overlap of the uncertainty maps with the errors, case by case
    and pooled (conventions in :mod:`ssl3d_cli.calibration`)."""

    def __init__(self, label_values: list[int], *, probabilities: Path | str | None, uncertainty: Path | str | None) -> None:
        from ssl3d_cli.calibration import CalibrationAccumulator

        self.label_values = list(label_values)
        self.probabilities = Path(probabilities).expanduser() if probabilities else None
        self.uncertainty = Path(uncertainty).expanduser() if uncertainty else None
        for folder, flag in ((self.probabilities, "--probabilities"), (self.uncertainty, "--uncertainty")):
            if folder is not None and not folder.is_dir():
                raise InputDataError(f"{folder}: {flag} folder not found")
        self.whole, self.roi = CalibrationAccumulator(), CalibrationAccumulator()
        # entropy in nats lies in [0, log C]: one threshold grid for every case, so the overlap pools exactly
        self.thresholds = np.linspace(0.0, float(np.log(max(len(self.label_values), 2))), 50)
        self.overlap: Any = None

    def _map(self, folder: Path, cid: str, suffix: str, shape: tuple[int, ...], affine: np.ndarray, flag: str) -> np.ndarray:
        """The case's ``<case>_<suffix>.nii.gz`` in ``folder``, checked to lie on the label's grid (``shape``, ``affine``)."""
        path = folder / f"{cid}_{suffix}.nii.gz"
        if not path.exists():
            raise InputDataError(f"case {cid}: {path} not found; {flag} must hold a {suffix} map for every evaluated case")
        img = nib.load(str(path))
        if img.shape[:3] != tuple(shape) or not np.allclose(img.affine, affine, atol=GEOMETRY_ATOL_MM):
            raise InputDataError(f"case {cid}: {path} has shape {img.shape[:3]} / affine unlike the label {tuple(shape)}; "
                                 "maps must lie on the label's grid")
        return np.asarray(img.dataobj, dtype=np.float32)

    def case(self, cid: str, pred: np.ndarray, truth: np.ndarray, affine: np.ndarray, label_path: Path) -> dict[str, float]:
        """Calibration (and overlap) figures of one case; ``pred``/``truth`` (X, Y, Z) in label values on the label's grid
        (``affine`` (4, 4), RAS)."""
        if self.probabilities is None and self.uncertainty is None:
            return {}
        from ssl3d_cli.calibration import case_calibration, uncertainty_error_overlap
        from ssl3d_cli.data.preprocessing import map_labels

        truth_index = map_labels(truth, self.label_values, str(label_path))
        out: dict[str, float] = {}
        if self.probabilities is not None:
            probs = self._map(self.probabilities, cid, "probabilities", truth.shape, affine, "--probabilities")
            if probs.ndim != 4 or probs.shape[3] != len(self.label_values):
                raise InputDataError(f"case {cid}: the probability map has shape {probs.shape}; expected (X, Y, Z, {len(self.label_values)}) "
                                     "as `ssl3d predict --save-probabilities` writes")
            values, whole, roi = case_calibration(np.moveaxis(probs, -1, 0), truth_index, spacing_mm=spacing_from_affine(affine))
            self.whole.add(whole)
            self.roi.add(roi)
            out.update(values)
        if self.uncertainty is not None:
            entropy = self._map(self.uncertainty, cid, "entropy", truth.shape, affine, "--uncertainty").reshape(truth.shape)
            overlap = uncertainty_error_overlap(entropy, map_labels(pred, self.label_values, f"prediction of {cid}"), truth_index,
                                                thresholds=self.thresholds)
            self.overlap = overlap if self.overlap is None else self.overlap + overlap
            out.update(uncertainty_error_dice=overlap.best_dice, uncertainty_threshold=overlap.best_threshold)
        return out

    def summary(self, figure_path: Path | str) -> dict[str, Any]:
        """Pooled figures (all voxels of all cases together) beside the case means, and the reliability diagram."""
        out: dict[str, Any] = {}
        if self.probabilities is not None:
            from ssl3d_cli.calibration import reliability_figure

            out["calibration"] = {"scan": self.whole.summary(), "region_of_interest": self.roi.summary(),
                                  "conventions": "top-label ECE, 15 equal-width bins; multi-class Brier summed over classes; NLL in nats; "
                                                 "region of interest: bounding box of truth and predicted foreground + 10 mm"}
            out["reliability_figure"] = str(reliability_figure(self.roi.bins(), figure_path,
                                                               title="Reliability (region of interest, all cases pooled)"))
        if self.overlap is not None:
            out["uncertainty_error"] = {"best_dice": self.overlap.best_dice, "threshold_nats": self.overlap.best_threshold,
                                        "conventions": "Dice of (entropy > t) with (prediction != truth), t swept over 50 values in [0, ln C]"}
        return out


def to_csv_text(result: dict[str, Any]) -> str:
    """Per-case rows then a ``mean`` row; with NSD columns, a last ``nsd_tolerance_mm`` column says their tolerance."""
    rows = result["cases"]
    keys = list(rows[0].keys())
    tolerance = (result.get("conventions") or {}).get("nsd_tolerance_mm")
    extra = {"nsd_tolerance_mm": tolerance} if tolerance is not None and any(k.startswith("nsd_") for k in keys) else {}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys + list(extra))
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, **extra})
    writer.writerow({"case": "mean", **result["mean"], **extra})
    return buf.getvalue()


def write_csv(result: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, to_csv_text(result))
