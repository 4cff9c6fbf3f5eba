"""``ssl3d uncertainty``: percentile heat maps, entropy, mutual information and std from MC dropout, and from the same
samples the segmentation, so that labels and maps cost one MC pass.

Files in the output folder, all in the scan's geometry (``<target>`` is the target as a file name, see
:func:`ssl3d_cli.inference.uncertainty.target_file_name`: ``organ``, ``WT``, ``organ+lesion``, ``foreground``):

- ``<case>.nii.gz``: the segmentation by ``--vote`` in the dataset's label values, exactly as ``ssl3d predict`` writes it;
- ``<case>_entropy.nii.gz``, ``<case>_mutual_information.nii.gz``: over all classes, so without a target in the name;
- ``<case>.provenance.json``: the record of those three, the record ``ssl3d predict`` writes (``predict`` with the
  same model and settings into the same folder keeps the case);
- ``<case>_<target>_p05.nii.gz`` (one per ``--percentiles``), ``<case>_<target>_std.nii.gz`` and
  ``<case>_<target>_uncertainty.png``: of p(target);
- ``<case>_<target>.provenance.json``: their record (the shared part plus the target, and for the figure the
  percentiles and what it outlines), so maps of several targets live side by side, each vouched for by its own record;
- ``uncertainty_args.json`` (``uncertainty_args.shard-I-of-N.json`` with ``--shard``): this run, as ``predict_args.json``.

A case is kept when both its records equal this run's and every file asked for exists; otherwise it is computed again
(all of its files, in one MC pass) and the reason logged.

A native-resolution model (issue 15) is sampled by Gaussian-weighted sliding window of its training patch on the
native cache grid (:func:`ssl3d_cli.inference.pipeline.sliding_votes`), and its maps restored onto the scan's grid by
the same functions as the fixed grid's. Labels, entropy and mutual information come from the fused running sums
(the labels are those of ``ssl3d predict``; where windows overlap the mutual information pools the windows' samples,
so it also counts their disagreement). A percentile is not a running sum: where windows overlap, the percentile
and std maps are by default those of the window whose centre is nearest (``percentile_fusion`` ``nearest``: the
exact percentile of that window's N samples, with seams where the owner changes), or the windows' maps averaged with
the Gaussian weights (``gaussian``: no seams, an average of percentiles, not a percentile of any sample set). The rule
is named in the target record (``target.sliding_window``), in ``uncertainty_args.json``, in each case's result and in
the maps' NIfTI descriptions, so a map never claims to be more than it is.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from ssl3d_cli import __version__
from ssl3d_cli.config import MCConfig, RuntimeConfig
from ssl3d_cli.data import imageio
from ssl3d_cli.data.datasets import CaseSpec
from ssl3d_cli.data.nifti import GEOMETRY_ATOL_MM, Scan, write_like
from ssl3d_cli.data.preprocessing import CaseGeometry, restore_scores
from ssl3d_cli.data.shards import take_shard
from ssl3d_cli.errors import ConfigError, InputDataError
from ssl3d_cli.files import check_writable
from ssl3d_cli.inference.figures import uncertainty_figure
from ssl3d_cli.inference.pipeline import (
    ScanVotes,
    Segmenter,
    accumulate,
    native_patch,
    open_segmenter,
    prepare_scan,
    read_case_scan,
    sampling_rates,
    segmentation,
    sliding_votes,
    sliding_window_settings,
    validate_vote_options,
)
from ssl3d_cli.inference.sliding_window import PERCENTILE_FUSIONS, entropy_maps
from ssl3d_cli.inference.uncertainty import TargetStore, entropy, percentile_name, target_file_name
from ssl3d_cli.inference.votes import VoteAccumulator
from ssl3d_cli.provenance import RunProvenance, input_stats, provenance_path, read_provenance, remove_provenance, stale_reasons, write_provenance
from ssl3d_cli.stages.predict import (
    NEW_CASE,
    PreparedCase,
    StagedWork,
    args_path,
    check_prefetch,
    inputs_dataset,
    logged_recompute,
    output_names,
    resolve_cases,
    run_provenance,
    run_recorded,
    write_viewer_tables,
)

log = logging.getLogger("ssl3d")

#: The default target's name: every foreground class, their probabilities summed (= 1 - p(background)).
FOREGROUND = "foreground"
#: How each percentile-fusion rule is named in the maps' NIfTI descriptions (native-resolution models).
FUSION_NOTES = {"nearest": "nearest window", "gaussian": "window-weighted mean"}


@dataclass(frozen=True)
class Target:
    """What the percentile maps and std are of: p summed over ``indices``.

    Attributes:
        indices: class indices, ascending.
        name: as the user knows it: class names joined by ``+`` in class order, a region (``WT``), or ``foreground``.
        file_name: ``name`` made safe for file names (:func:`target_file_name`).
    """

    indices: tuple[int, ...]
    name: str

    @property
    def file_name(self) -> str:
        return target_file_name(self.name)

    def to_dict(self, class_names: list[str]) -> dict[str, Any]:
        return {"name": self.name, "file_name": self.file_name, "classes": [class_names[i] for i in self.indices],
                "class_indices": list(self.indices)}


def resolve_target(seg: Segmenter, classes: list[str]) -> Target:
    """The target whose probabilities are summed.

    ``classes`` holds class names/values, or one region name (WT/TC/ET for BraTS-like models); classes are named
    canonically (by name, in class order), so ``--class 1`` and ``--class organ`` write the same files.
    Default: every foreground class (``foreground``).
    """
    data = seg.dataset
    if not classes:
        return Target(tuple(range(1, data.num_classes)), FOREGROUND)
    if len(classes) == 1 and classes[0].upper() in data.regions:
        values = data.regions[classes[0].upper()]
        return Target(tuple(sorted(data.label_values.index(v) for v in values)), classes[0].upper())
    indices = tuple(sorted({data.class_index(c) for c in classes}))
    return Target(indices, "+".join(data.class_names[i] for i in indices))


def read_case(seg: Segmenter, case: CaseSpec) -> tuple[Scan, torch.Tensor, CaseGeometry]:
    """:func:`ssl3d_cli.inference.pipeline.prepare_case`, also returning the scan as read, so the figure can show it
    without reading the scan a second time.

    Returns:
        the scan (C, X, Y, Z) on its own grid, the image (1, C, D, H, W) on the device, the geometry that maps results back.
    """
    scan = read_case_scan(seg, case)
    image, geometry = prepare_scan(seg, scan)
    return scan, image, geometry


def display_channel(seg: Segmenter, scan: Scan) -> tuple[np.ndarray, str]:
    """The channel drawn under the maps (FLAIR when there is one, as in the paper's Figure 7, else the first) and its name."""
    names = [n.upper() for n in seg.dataset.channel_names]
    index = names.index("FLAIR") if "FLAIR" in names else 0
    return scan.data[index].copy(), seg.dataset.channel_names[index]  # a copy: the other channels need not stay in memory


def read_truth(label: Path, scan: Scan) -> np.ndarray:
    """The ``--label`` map of a case, refused unless it lies on the grid of its scan.

    Raises:
        InputDataError: an unreadable file, another shape or affine.
    """
    if imageio.is_itk_file(label):  # NRRD / MetaImage
        array, affine = imageio.read_itk_label(label)
    else:
        try:
            limg = nib.load(str(label))
        except Exception as exc:  # nibabel raises several types for bad files
            raise InputDataError(f"{label}: --label cannot be read as NIfTI ({exc.__class__.__name__}); give the case's label file") from None
        array, affine = np.asarray(limg.dataobj), limg.affine
    if array.shape[:3] != scan.spatial_shape or not np.allclose(affine, scan.affine, atol=GEOMETRY_ATOL_MM):
        raise InputDataError(f"{label}: --label does not lie on the grid of {scan.paths[0]}")
    return np.rint(array).astype(np.int64).reshape(array.shape[:3])


def match_labels(label: Path | str | None, cases: list[CaseSpec]) -> dict[str, Path]:
    """Case -> its ``--label`` file.

    ``label`` is one label file (one input case), or a folder matched by case name as ``ssl3d evaluate`` matches
    predictions: a dataset folder, a folder of label files, or a cache. Cases without a label are named in a
    warning (their figures outline the prediction).

    Raises:
        InputDataError: ``label`` missing, or a folder in which no input case has a label.
        ConfigError: one label file for several cases.
    """
    if label is None:
        return {}
    from ssl3d_cli.stages.evaluate import label_sources

    label = Path(label).expanduser()
    if not label.exists():
        raise InputDataError(f"{label}: --label not found")
    if not label.is_dir():
        if len(cases) != 1:
            raise ConfigError(f"--label {label} is one label file but {len(cases)} cases are given; give a folder of labels "
                              "(or the dataset folder), matched to the cases by name")
        return {cases[0].case_id: label}
    files = label_sources(label)[0]
    found = {c.case_id: Path(files[c.case_id]) for c in cases if c.case_id in files}
    if not found:
        raise InputDataError(f"{label}: no label matches an input case by name (e.g. {cases[0].case_id}.nii.gz)" if cases
                             else f"{label}: no input case to match")
    missing = [c.case_id for c in cases if c.case_id not in found]
    if missing:
        log.warning("%d case(s) have no label in %s (%s%s): their figures outline the prediction", len(missing), label,
                    ", ".join(missing[:5]), ", ..." if len(missing) > 5 else "")
    return found


def case_outputs(case_id: str) -> dict[str, str]:
    """The target-free files of a case (kind -> file name): the segmentation, entropy and mutual information."""
    return {**output_names(case_id, False), "entropy": f"{case_id}_entropy.nii.gz",
            "mutual_information": f"{case_id}_mutual_information.nii.gz"}


def target_outputs(case_id: str, target: Target, percentiles: list[float], figure: bool) -> dict[str, str]:
    """The files of p(target) of a case (kind -> file name): one per percentile, std, and the figure."""
    stem = f"{case_id}_{target.file_name}"
    names = {percentile_name(q): f"{stem}_{percentile_name(q)}.nii.gz" for q in percentiles}
    names["std"] = f"{stem}_std.nii.gz"
    if figure:
        names["figure"] = f"{stem}_uncertainty.png"
    return names


def target_record_path(out_dir: Path, case_id: str, target: Target) -> Path:
    """``<out_dir>/<case>_<target>.provenance.json``."""
    return provenance_path(out_dir, f"{case_id}_{target.file_name}")


def target_identity(target: Target, percentiles: list[float], figure: bool, label: Path | None,
                    sliding: dict[str, Any] | None = None) -> dict[str, Any]:
    """The compared part of a target record beyond the shared provenance (with the figure: its panels and outline).

    Args:
        sliding: a native-resolution model's :func:`~ssl3d_cli.inference.pipeline.sliding_window_settings` (patch,
            overlap, sigma, percentile fusion): recorded, so maps made by another rule are not kept as these.
    """
    ident: dict[str, Any] = {"name": target.name, "class_indices": list(target.indices)}
    if sliding is not None:
        ident["sliding_window"] = dict(sliding)
    if figure:
        ident["figure"] = {"percentiles": [float(q) for q in percentiles], "outline": input_stats([label])[0] if label else "prediction"}
    return ident


def target_stale(record: dict[str, Any] | None, ident: dict[str, Any]) -> list[str]:
    """Why a target record differs from ``ident`` (only the keys ``ident`` holds are compared)."""
    old = (record or {}).get("target") or {}
    return [f"{key} changed" for key in ident if old.get(key) != ident[key]]


def plan_cases(cases: list[CaseSpec], out_dir: Path, provenance: RunProvenance, *, target: Target, percentiles: list[float],
               figure: bool, labels: dict[str, Path], overwrite: bool,
               sliding: dict[str, Any] | None = None) -> tuple[list[tuple[CaseSpec, str]], list[CaseSpec]]:
    """Split the cases into those to compute (each with why) and those kept: both records equal this run's, all files there."""
    todo: list[tuple[CaseSpec, str]] = []
    kept: list[CaseSpec] = []
    for case in cases:
        shared, own = case_outputs(case.case_id), target_outputs(case.case_id, target, percentiles, figure)
        record_path, target_path = provenance_path(out_dir, case.case_id), target_record_path(out_dir, case.case_id, target)
        if not any(p.exists() for p in (record_path, target_path, out_dir / shared["segmentation"], out_dir / own["std"])):
            todo.append((case, NEW_CASE))
            continue
        if overwrite:
            todo.append((case, "--overwrite"))
            continue
        identity = provenance.identity(case.image_paths, series_uid=case.series_uid)
        reasons = stale_reasons(read_provenance(record_path), identity, out_dir, shared)
        if not reasons:
            record = read_provenance(target_path)
            reasons = [f"{target.name} maps: {r}" for r in stale_reasons(record, identity, out_dir, own)]
            if record is not None and not reasons:
                ident = target_identity(target, percentiles, figure, labels.get(case.case_id), sliding)
                reasons = [f"{target.name} maps: {r}" for r in target_stale(record, ident)]
        if reasons:
            todo.append((case, "; ".join(reasons)))
        else:
            kept.append(case)
    return todo, kept


def map_header(kind: str, target: Target, num_classes: int, percentile_fusion: str | None = None) -> dict[str, Any]:
    """The header of one uncertainty map (:func:`ssl3d_cli.data.nifti.write_like` options).

    Percentiles of p(target) and their std are probabilities' statistics: NIFTI_INTENT_ESTIMATE, display range 0..1.
    Entropy and mutual information (nats, over all classes) are estimates shown on 0..ln(C), their largest possible
    value, so maps of different cases share one scale.

    Args:
        percentile_fusion: a native-resolution model's rule for percentiles / std where windows overlap, named in
            their description (``p05 of p(organ), nearest window``); None: the fixed grid (nothing added).
    """
    if kind in ("entropy", "mutual_information"):
        name = "entropy" if kind == "entropy" else "mutual info"
        return {"kind": "estimate", "intent_name": name, "display_range": (0.0, float(np.log(num_classes))),
                "description": f"{name.replace('info', 'information')} over {num_classes} classes (nats)"}
    stat = "std" if kind == "std" else kind
    note = f", {FUSION_NOTES[percentile_fusion]}" if percentile_fusion is not None else ""
    return {"kind": "estimate", "intent_name": stat, "display_range": (0.0, 1.0), "description": f"{stat} of p({target.name}){note}"}


@dataclass
class ComputedMaps:
    """A case's labels and restored maps (percentiles, std, entropy, mutual information) on its scan's grid, ready to write."""

    prepared: PreparedCase
    labels: np.ndarray
    restored: np.ndarray
    seconds: float
    windows: int | None = None  # sliding windows sampled (native-resolution models); None on the fixed grid


def prepare_uncertainty_input(seg: Segmenter, case: CaseSpec, *, label: Path | None, figure: bool) -> PreparedCase:
    """Read and check a case's scan (and its ``--label``) and preprocess it; touches no file (a bad scan raises here)."""
    t0 = time.perf_counter()
    scan, image, geometry = read_case(seg, case)
    truth = read_truth(label, scan) if figure and label is not None else None
    underlay, underlay_name = display_channel(seg, scan) if figure else (None, "")
    return PreparedCase(case, scan.grid, image, geometry, time.perf_counter() - t0,
                        extra={"truth": truth, "underlay": underlay, "underlay_name": underlay_name})


def whole_volume_maps(seg: Segmenter, image: torch.Tensor, *, mc: MCConfig, percentiles: list[float],
                      target: Target) -> tuple[VoteAccumulator, torch.Tensor]:
    """A fixed-grid model's votes and maps from one MC pass over the whole (1, C, D, H, W) cache image.

    Returns:
        the accumulator (with entropy sums), and (Q + 3, D, H, W): the Q percentiles and std of p(target) over the
        N samples (kept as uint8), entropy and mutual information (nats).
    """
    store = TargetStore(list(target.indices), mc.mc_samples)
    acc = accumulate(seg, image, mc, track_entropy=True, extra=store)
    h = entropy(acc.mean_prob())
    maps = torch.cat([store.percentiles(percentiles), store.std()[None], h[None], (h - acc.entropy_sum / acc.n)[None].clamp_min(0)])
    return acc, maps


def sliding_window_maps(seg: Segmenter, image: torch.Tensor, *, mc: MCConfig, percentiles: list[float], target: Target,
                        percentile_fusion: str) -> tuple[VoteAccumulator, torch.Tensor, int]:
    """A native-resolution model's votes and maps by sliding window over the (1, C, D, H, W) native cache image.

    Memory does not grow with N: labels, entropy and mutual information come from the fused running sums, and each
    window's uint8 store of p(target) is reduced to its percentile / std maps and freed before the next window.

    Returns:
        the fused accumulator (n = samples per window), the (Q + 3, D, H, W) maps in :func:`whole_volume_maps`'s
        order (percentiles and std fused by ``percentile_fusion``), and the number of windows.
    """
    result = sliding_votes(seg, image, mc, track_entropy=True, target=target.indices, percentiles=percentiles,
                           percentile_fusion=percentile_fusion)
    assert result.percentiles is not None and result.std is not None  # percentiles were asked for
    h, mi = entropy_maps(result.votes)  # the whole-volume formula, on the fused sums
    maps = torch.cat([result.percentiles, result.std[None], h[None], mi[None]])
    return result.votes, maps, result.windows


def compute_maps(seg: Segmenter, prepared: PreparedCase, *, mc: MCConfig, union_classes: list[int], percentiles: list[float],
                 target: Target, percentile_fusion: str = "nearest") -> ComputedMaps:
    """Sample a prepared case once; restore its maps and decide its labels on the scan's grid.

    Args:
        percentile_fusion: for a native-resolution model, how percentile / std maps combine where windows overlap
            (module docstring); unused on the fixed grid.
    """
    t0 = time.perf_counter()
    windows = None
    if native_patch(seg) is None:
        acc, maps = whole_volume_maps(seg, prepared.image, mc=mc, percentiles=percentiles, target=target)
    else:
        acc, maps, windows = sliding_window_maps(seg, prepared.image, mc=mc, percentiles=percentiles, target=target,
                                                 percentile_fusion=percentile_fusion)
    restored = restore_scores(maps.cpu(), prepared.geometry, background=0.0)
    labels = segmentation(seg, ScanVotes(acc, prepared.geometry), mc.vote, union_classes)
    prepared.image = None  # the device copy is not needed to write
    return ComputedMaps(prepared, labels, restored, prepared.seconds + time.perf_counter() - t0, windows)


def write_maps(seg: Segmenter, computed: ComputedMaps, out_dir: Path, *, mc: MCConfig, percentiles: list[float], target: Target,
               label: Path | None, figure: bool, provenance: RunProvenance, sliding: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a computed case's segmentation, maps, figure and records; returns its record.

    Both records are removed before files are replaced and written last.

    Args:
        sliding: a native-resolution model's sliding-window settings (named in the records and map descriptions).
    """
    t0 = time.perf_counter()
    case, grid, labels, restored = computed.prepared.case, computed.prepared.grid, computed.labels, computed.restored
    truth, underlay, underlay_name = (computed.prepared.extra[k] for k in ("truth", "underlay", "underlay_name"))
    fusion = None if sliding is None else sliding["percentile_fusion"]
    shared, own = case_outputs(case.case_id), target_outputs(case.case_id, target, percentiles, figure)
    record_path, target_path = provenance_path(out_dir, case.case_id), target_record_path(out_dir, case.case_id, target)
    remove_provenance(record_path)
    remove_provenance(target_path)
    files = {"segmentation": str(write_like(labels, grid, out_dir / shared["segmentation"], kind="label", description="label map"))}
    probabilities = out_dir / output_names(case.case_id, True)["probabilities"]
    if probabilities.exists():  # from ssl3d predict --save-probabilities: it would not match the new segmentation
        probabilities.unlink()
        log.info("case %s: removed %s of an earlier run (it would not match the new segmentation)", case.case_id, probabilities.name)
    for kind, volume in zip([percentile_name(q) for q in percentiles] + ["std", "entropy", "mutual_information"], restored):
        files[kind] = str(write_like(volume.astype(np.float32), grid, out_dir / (own.get(kind) or shared[kind]),
                                     **map_header(kind, target, seg.dataset.num_classes, fusion)))
    record: dict[str, Any] = {"case": case.case_id, "target": target.name, "label": str(label) if label else None, "files": files}
    if sliding is not None:
        record.update(percentile_fusion=fusion, windows=computed.windows)
    if figure:
        values = [seg.dataset.label_values[i] for i in target.indices]
        outline = np.isin(truth if truth is not None else labels, values)
        record["outline"] = "label" if truth is not None else "prediction"
        # averaged windows' percentiles are no percentile of the N samples the title names: the panels say so
        averaged = " (windows averaged)" if fusion == "gaussian" else ""
        pmaps = {f"{q:g}th percentile{averaged}": restored[i] for i, q in enumerate(percentiles)}
        png = uncertainty_figure(pmaps, outline, case_id=case.case_id, target=target.name,
                                 outline_label=f"{'true' if truth is not None else 'predicted'} {target.name}", out_path=out_dir / own["figure"],
                                 scan=underlay, scan_label=underlay_name, samples=mc.mc_samples)
        record["figure"] = str(png)
    seconds = computed.seconds + time.perf_counter() - t0
    write_provenance(record_path, provenance.case_record(case.case_id, case.image_paths, shared, seconds, series_uid=case.series_uid))
    target_record = provenance.case_record(case.case_id, case.image_paths, own, seconds, series_uid=case.series_uid)
    target_record["target"] = {**target_identity(target, percentiles, figure, label, sliding), "file_name": target.file_name,
                               "classes": [seg.dataset.class_names[i] for i in target.indices]}
    write_provenance(target_path, target_record)
    record.update(seconds=round(seconds, 3), provenance=str(record_path), target_provenance=str(target_path))
    return record


def uncertainty_stages(seg: Segmenter, out_dir: Path, *, mc: MCConfig, union_classes: list[int], percentiles: list[float],
                       target: Target, labels: dict[str, Path], figure: bool, provenance: RunProvenance,
                       percentile_fusion: str = "nearest") -> StagedWork:
    """:func:`uncertainty_one` as its three stages (``labels``: each case's ``--label``), for :func:`run_cases` to overlap."""
    sliding = sliding_window_settings(seg, percentile_fusion)
    return StagedWork(
        prepare=lambda case: prepare_uncertainty_input(seg, case, label=labels.get(case.case_id), figure=figure),
        compute=lambda prepared: compute_maps(seg, prepared, mc=mc, union_classes=union_classes, percentiles=percentiles, target=target,
                                              percentile_fusion=percentile_fusion),
        write=lambda computed: write_maps(seg, computed, out_dir, mc=mc, percentiles=percentiles, target=target,
                                          label=labels.get(computed.prepared.case.case_id), figure=figure, provenance=provenance,
                                          sliding=sliding))


def uncertainty_one(seg: Segmenter, case: CaseSpec, out_dir: Path, *, mc: MCConfig, union_classes: list[int], percentiles: list[float],
                    target: Target, label: Path | None, figure: bool, provenance: RunProvenance,
                    percentile_fusion: str = "nearest") -> dict[str, Any]:
    """Sample one case once and write its segmentation, maps, figure and records.

    The scan and its label are read and checked, and the case sampled, before any file is touched: a bad scan leaves
    the case's earlier files as they were. Both records are removed before files are replaced and written last.
    """
    labels = {case.case_id: label} if label is not None else {}
    return uncertainty_stages(seg, out_dir, mc=mc, union_classes=union_classes, percentiles=percentiles, target=target, labels=labels,
                              figure=figure, provenance=provenance, percentile_fusion=percentile_fusion)(case)


def check_percentile_fusion(seg: Segmenter, percentile_fusion: str | None) -> str:
    """The percentile-fusion rule to use: ``nearest`` unless another is named.

    Raises:
        ConfigError: an unknown rule, or a rule named for a fixed-grid model (it samples the whole volume: no windows).
    """
    if percentile_fusion is None:
        return "nearest"
    if percentile_fusion not in PERCENTILE_FUSIONS:
        raise ConfigError(f"--percentile-fusion {percentile_fusion}: choose one of {', '.join(PERCENTILE_FUSIONS)}")
    if native_patch(seg) is None:
        raise ConfigError(f"--percentile-fusion {percentile_fusion}: only for a native-resolution model (sliding windows); {seg.path} "
                          "samples the whole volume at once, so its percentiles are those of its N samples")
    return percentile_fusion


def uncertainty(
    inputs: list[Path | str],
    *,
    output: Path | str,
    model: Path | None = None,
    mc: MCConfig | None = None,
    runtime: RuntimeConfig | None = None,
    classes: list[str] | None = None,
    percentiles: list[float] | None = None,
    label: Path | str | None = None,
    figure: bool = True,
    overwrite: bool = False,
    shard: str | None = None,
    split: str | None = None,
    skip_bad: bool = False,
    series: str | None = None,
    prefetch: int = 1,
    percentile_fusion: str | None = None,
) -> dict[str, Any]:
    """Write per-voxel uncertainty maps (and a PNG) for each input case in the scan's geometry, and from the same MC
    samples its segmentation, with per-case provenance records and ``uncertainty_args.json`` (see the module doc).

    Args:
        model: ``model.pt`` or its run folder; default: the newest run fine-tuned on the inputs' dataset (for loose
            scans: the only fine-tuned run), named in a WARNING line.
        mc: MC settings; at least 2 samples (default 100); ``vote`` (default majority), ``vote_weights`` and
            ``union_classes`` decide the segmentation as in ``ssl3d predict``.
        classes: the target (class names or values, summed; or one region such as ``WT``); default every foreground
            class summed (``foreground``).
        label: the truth outlined in the figure: one label file (one case), or a folder matched by case name
            (a dataset folder, a folder of label files, or a cache).
        overwrite: compute every case, even those whose records match this run.
        skip_bad: continue past cases that fail (listed in ``failed``); the CLI then exits 4.
        series: a SeriesInstanceUID: read only that series of each DICOM folder (default: every series, one case each).
        prefetch: cases read ahead while the current one is sampled, files written behind (0: one after the other);
            see :func:`ssl3d_cli.stages.predict.run_cases`.
        percentile_fusion: a native-resolution model's rule for percentile / std maps where windows overlap,
            ``nearest`` (default) or ``gaussian`` (module docstring); refused for a fixed-grid model (no windows).

    Returns:
        ``cases`` (records of the cases computed), ``written`` (with why), ``kept``, ``failed``, the target, ``args``;
        for a native-resolution model also ``sliding_window`` (patch, overlap, sigma, ``percentile_fusion``).
    """
    mc = (mc or MCConfig(mc_samples=100)).validate()
    if mc.mc_samples < 2:
        raise ConfigError(f"--mc-samples {mc.mc_samples}: uncertainty needs at least 2 MC samples (the paper uses 100)")
    percentiles = [float(q) for q in (percentiles or [5.0, 50.0, 95.0])]
    bad = [q for q in percentiles if not 0 <= q <= 100]
    if bad:
        raise ConfigError(f"--percentiles {bad}: percentiles must lie in 0..100")
    runtime = (runtime or RuntimeConfig()).validate()
    check_prefetch(prefetch)
    paths = [Path(p) for p in inputs]
    seg = open_segmenter(model, runtime, dataset_name=inputs_dataset(paths, model_given=model is not None))
    fusion = check_percentile_fusion(seg, percentile_fusion)
    sliding = sliding_window_settings(seg, fusion)
    mc = sampling_rates(seg, mc)
    union_classes = validate_vote_options(seg, mc)
    target = resolve_target(seg, list(classes or []))
    cases = take_shard(resolve_cases(paths, split=split, model_path=seg.path, series_uid=series), shard)
    labels = match_labels(label, cases)
    if label is not None and not figure:
        log.warning("--label only outlines the truth in the figure; with --no-figure it is not used")
    out_dir = Path(output).expanduser()
    check_writable(out_dir)
    provenance = run_provenance(seg, mc, union_classes)
    todo, kept = plan_cases(cases, out_dir, provenance, target=target, percentiles=percentiles, figure=figure, labels=labels,
                            overwrite=overwrite, sliding=sliding)
    why = {case.case_id: reason for case, reason in todo}
    log.info("Uncertainty of p(%s) and %s-vote labels from %d MC samples (dropout encoder %g, decoder %g): %d case(s) to compute, "
             "%d kept (same model, settings and inputs)", target.name, mc.vote, mc.mc_samples, mc.dropout_encoder, mc.dropout_decoder,
             len(todo), len(kept))
    record_file = args_path(out_dir, shard, stem="uncertainty_args")
    description = {
        "tool_version": __version__, "model": {"path": provenance.model_path, "sha256": provenance.model_sha256,
                                               "dataset": seg.dataset.name, "chosen_by": seg.chosen_by or "--model"},
        "mc": mc.to_dict(), "runtime": runtime.to_dict(), "inputs": [str(p) for p in inputs], "split": split, "shard": shard,
        "series": series, "overwrite": overwrite, "skip_bad": skip_bad, "prefetch": prefetch, "class_names": list(seg.dataset.class_names),
        "label_values": list(seg.dataset.label_values), "target": target.to_dict(list(seg.dataset.class_names)),
        "percentiles": percentiles, "figure": figure, "label": str(label) if label is not None else None,
        "outputs": {**case_outputs("<case>"), **target_outputs("<case>", target, percentiles, figure)},
    }
    if sliding is not None:  # only for native models, so a fixed-grid run's record stays as it was
        description["sliding_window"] = sliding
    kept_records = [{"case": c.case_id, "provenance": provenance_path(out_dir, c.case_id).name,
                     "target_provenance": target_record_path(out_dir, c.case_id, target).name} for c in kept]
    description["label_tables"] = write_viewer_tables(seg, out_dir)

    work = logged_recompute(uncertainty_stages(seg, out_dir, mc=mc, union_classes=union_classes, percentiles=percentiles, target=target,
                                               labels=labels, figure=figure, provenance=provenance, percentile_fusion=fusion), why)
    batch = run_recorded(todo, work, record_file=record_file, description=description, kept=kept_records, progress_label="Uncertainty",
                         skip_bad=skip_bad, provenance_keys=("provenance", "target_provenance"), prefetch=prefetch)
    result = {"output": str(out_dir), "model": str(seg.path), "model_chosen_by": seg.chosen_by, "target": target.name,
              "target_file": target.file_name, "mc_samples": mc.mc_samples, "vote": mc.vote, "percentiles": percentiles,
              "cases": batch.done, "written": [{"case": r["case"], "why": why[r["case"]]} for r in batch.done],
              "kept": [c.case_id for c in kept], "failed": batch.failed, "args": str(record_file), "label_tables": description["label_tables"]}
    if sliding is not None:
        result["sliding_window"] = sliding
    return result
