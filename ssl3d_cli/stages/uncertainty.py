"""``ssl3d uncertainty``: percentile heat maps, entropy, mutual information and std from MC dropout."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from ssl3d_cli.config import MCConfig, RuntimeConfig
from ssl3d_cli.data.datasets import CaseSpec
from ssl3d_cli.data.nifti import GEOMETRY_ATOL_MM, write_like
from ssl3d_cli.data.preprocessing import restore_scores
from ssl3d_cli.data.shards import take_shard
from ssl3d_cli.errors import ConfigError, InputDataError
from ssl3d_cli.files import check_writable
from ssl3d_cli.inference.figures import uncertainty_figure
from ssl3d_cli.inference.pipeline import Segmenter, accumulate, labels_on_scan, open_segmenter, prepare_case, sampling_rates
from ssl3d_cli.inference.uncertainty import TargetStore, entropy, percentile_name
from ssl3d_cli.stages.predict import inputs_dataset, resolve_cases, run_cases

log = logging.getLogger("ssl3d")


def resolve_target(seg: Segmenter, classes: list[str]) -> tuple[list[int], str]:
    """Class indices whose probabilities are summed, and the target's display name.

    ``classes`` holds class names/values, or one region name (WT/TC/ET for BraTS-like models).
    Default: every foreground class.
    """
    data = seg.dataset
    if not classes:
        return list(range(1, data.num_classes)), "foreground"
    if len(classes) == 1 and classes[0].upper() in data.regions:
        values = data.regions[classes[0].upper()]
        return [data.label_values.index(v) for v in values], classes[0].upper()
    return [data.class_index(c) for c in classes], "+".join(classes)


def check_label_grid(label: Path, ref: Path) -> nib.Nifti1Image:
    """The ``--label`` image, refused unless it lies on the grid of the scan ``ref``.

    Raises:
        InputDataError: another shape or affine.
    """
    try:
        limg = nib.load(str(label))
    except Exception as exc:  # nibabel raises several types for bad files
        raise InputDataError(f"{label}: --label cannot be read as NIfTI ({exc.__class__.__name__}); give the case's label file") from None
    rimg = nib.load(str(ref))  # already read once by prepare_case
    if limg.shape[:3] != rimg.shape[:3] or not np.allclose(limg.affine, rimg.affine, atol=GEOMETRY_ATOL_MM):
        raise InputDataError(f"{label}: --label does not lie on the grid of {ref}")
    return limg


def uncertainty_one(seg: Segmenter, case: CaseSpec, out_dir: Path, *, mc: MCConfig, percentiles: list[float], target: list[int],
                    target_name: str, label: Path | None, figure: bool) -> dict[str, Any]:
    """Sample one case and write its maps (and figure); the scan and ``--label`` are checked before any file is written."""
    image, geometry = prepare_case(seg, case)
    limg = check_label_grid(label, case.image_paths[0]) if figure and label is not None else None
    store = TargetStore(target, mc.mc_samples)
    acc = accumulate(seg, image, mc, track_entropy=True, extra=store)
    mean = acc.mean_prob()
    h = entropy(mean)
    maps = torch.cat([store.percentiles(percentiles), h[None], (h - acc.entropy_sum / acc.n)[None].clamp_min(0), store.std()[None]])
    names = [percentile_name(q) for q in percentiles] + ["entropy", "mutual_information", "std"]
    restored = restore_scores(maps.cpu(), geometry, background=0.0)
    ref = case.image_paths[0]
    written = {}
    for name, volume in zip(names, restored):
        written[name] = str(write_like(volume.astype(np.float32), ref, out_dir / f"{case.case_id}_{name}.nii.gz"))
    record: dict[str, Any] = {"case": case.case_id, "target": target_name, "files": written}
    if figure:
        if limg is not None:
            values = [seg.dataset.label_values[i] for i in target]
            outline = np.isin(np.asarray(limg.dataobj).astype(np.int64), values)
            outline_label = f"true {target_name}"
        else:
            labels = labels_on_scan(acc, geometry, rule=mc.vote, union_classes=[])
            outline = np.isin(labels, target)
            outline_label = f"predicted {target_name}"
        pmaps = {f"{q:g}th percentile": restored[i] for i, q in enumerate(percentiles)}
        png = uncertainty_figure(pmaps, outline, case_id=case.case_id, target=target_name, outline_label=outline_label,
                                 out_path=out_dir / f"{case.case_id}_uncertainty.png")
        record["figure"] = str(png)
    return record


def uncertainty(
    inputs: list[Path | str],
    *,
    output: Path | str,
    model: Path | None = None,
    mc: MCConfig | None = None,
    runtime: RuntimeConfig | None = None,
    classes: list[str] | None = None,
    percentiles: list[float] | None = None,
    label: Path | None = None,
    figure: bool = True,
    shard: str | None = None,
    split: str | None = None,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Write per-voxel uncertainty maps (and a PNG) for each input case in the scan's geometry.

    Args:
        model: ``model.pt`` or its run folder; default: the newest run fine-tuned on the inputs' dataset (for loose
            scans: the only fine-tuned run), named in a WARNING line.
        skip_bad: continue past cases that fail (listed in ``failed``); the CLI then exits 4.
    """
    mc = (mc or MCConfig(mc_samples=100)).validate()
    if mc.mc_samples < 2:
        raise ConfigError(f"--mc-samples {mc.mc_samples}: uncertainty needs at least 2 MC samples (the paper uses 100)")
    percentiles = list(percentiles or [5.0, 50.0, 95.0])
    bad = [q for q in percentiles if not 0 <= q <= 100]
    if bad:
        raise ConfigError(f"--percentiles {bad}: percentiles must lie in 0..100")
    runtime = (runtime or RuntimeConfig()).validate()
    paths = [Path(p) for p in inputs]
    seg = open_segmenter(model, runtime, dataset_name=inputs_dataset(paths, model_given=model is not None))
    mc = sampling_rates(seg, mc)
    target, target_name = resolve_target(seg, list(classes or []))
    cases = take_shard(resolve_cases(paths, split=split, model_path=seg.path), shard)
    if label is not None:
        if len(cases) != 1:
            raise ConfigError("--label goes with a single input scan")
        if not Path(label).exists():
            raise InputDataError(f"{label}: --label file not found")
    out_dir = Path(output).expanduser()
    check_writable(out_dir)
    log.info("Uncertainty of p(%s) from %d MC samples (dropout encoder %g, decoder %g) for %d case(s)", target_name, mc.mc_samples,
             mc.dropout_encoder, mc.dropout_decoder, len(cases))

    def work(case: CaseSpec) -> dict[str, Any]:
        return uncertainty_one(seg, case, out_dir, mc=mc, percentiles=percentiles, target=target, target_name=target_name,
                               label=Path(label) if label else None, figure=figure)

    batch = run_cases(cases, work, description="Uncertainty", skip_bad=skip_bad)
    return {"output": str(out_dir), "model": str(seg.path), "model_chosen_by": seg.chosen_by, "target": target_name,
            "mc_samples": mc.mc_samples, "cases": batch.done, "failed": batch.failed}
