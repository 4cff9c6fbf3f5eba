"""``ssl3d synth``: write a synthetic dataset in the MSD (or BraTS) layout."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ssl3d_cli.data.synthetic import CT_CLASSES, MR_CHANNELS, MR_CLASSES, make_ct_case, make_mr_case
from ssl3d_cli.errors import ConfigError, InputDataError
from ssl3d_cli.files import atomic_output, atomic_write_json
from ssl3d_cli.runtime import progress

log = logging.getLogger("ssl3d")


@dataclass
class SynthResult:
    root: Path
    labelled: int
    unlabelled: int

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": str(self.root), "labelled": self.labelled, "unlabelled": self.unlabelled}


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    # Atomically: an interrupted run leaves no truncated scan that `ssl3d preprocess` would later trip over.
    with atomic_output(path, suffix=".nii.gz" if path.name.endswith(".nii.gz") else path.suffix) as tmp:
        nib.save(img, str(tmp))


def synth(out: Path | str, *, kind: str = "ct", cases: int = 12, unlabelled: int | None = None, seed: int = 0,
          shape: tuple[int, int, int] | None = None, layout: str = "msd", overwrite: bool = False) -> SynthResult:
    """Write ``cases`` labelled and ``unlabelled`` unlabelled synthetic cases.

    Args:
        kind: ``ct`` (pancreas-like, labels 0/1/2) or ``mr`` (BraTS-like, 4 channels, labels 0/1/2/4).
        layout: ``msd`` (dataset.json, imagesTr/labelsTr/imagesTs) or ``brats`` (one folder per case, mr only).
        shape: base (X, Y, Z); each case varies its field of view around it.
    """
    if kind not in ("ct", "mr"):
        raise ConfigError(f"--kind {kind!r}: choose ct or mr")
    if layout not in ("msd", "brats") or (layout == "brats" and kind != "mr"):
        raise ConfigError(f"--layout {layout!r}: choose msd, or brats with --kind mr")
    if cases < 1:
        raise ConfigError(f"--cases {cases}: must be at least 1")
    if shape is not None and (len(shape) != 3 or min(shape) < 12):
        raise ConfigError(f"--shape {shape}: need three sizes of at least 12")
    n_unlabelled = max(1, cases // 4) if unlabelled is None else unlabelled
    root = Path(out).expanduser()
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise InputDataError(f"{root}: folder exists and is not empty; choose a new folder or pass --overwrite")
        shutil.rmtree(root)
    rng = np.random.default_rng(seed)
    prefix = "synthct" if kind == "ct" else "synthmr"
    maker = make_ct_case if kind == "ct" else make_mr_case
    base = tuple(shape) if shape else ((64, 64, 32) if kind == "ct" else (48, 56, 48))
    training, test = [], []
    total = cases + n_unlabelled
    with progress.task("Synthesising", total=total) as bar:
        for i in range(total):
            case = maker(rng, base)  # type: ignore[arg-type]
            case_id = f"{prefix}_{i:03d}"
            labelled = i < cases
            if layout == "brats":
                folder = root / f"Brats18_SYN_{i:03d}_1"
                folder.mkdir(parents=True, exist_ok=True)
                for c, name in enumerate(["flair", "t1", "t1ce", "t2"]):
                    _save(case.image[..., c], case.affine, folder / f"{folder.name}_{name}.nii.gz")
                if labelled:
                    _save(case.label, case.affine, folder / f"{folder.name}_seg.nii.gz")
            else:
                sub = "imagesTr" if labelled else "imagesTs"
                (root / sub).mkdir(parents=True, exist_ok=True)
                _save(case.image, case.affine, root / sub / f"{case_id}.nii.gz")
                if labelled:
                    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
                    _save(case.label, case.affine, root / "labelsTr" / f"{case_id}.nii.gz")
                    training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
                else:
                    test.append(f"./imagesTs/{case_id}.nii.gz")
            bar.advance(1)
    if layout == "msd":
        classes = CT_CLASSES if kind == "ct" else MR_CLASSES
        meta = {
            "name": root.name,
            "description": f"ssl3d synthetic {kind.upper()}-like dataset (seed {seed})",
            "tensorImageSize": "3D" if kind == "ct" else "4D",
            "modality": {"0": "CT"} if kind == "ct" else {str(i): n for i, n in enumerate(MR_CHANNELS)},
            "labels": {str(k): v for k, v in classes.items()},
            "numTraining": len(training),
            "numTest": len(test),
            "training": training,
            "test": test,
        }
        atomic_write_json(root / "dataset.json", meta)
    return SynthResult(root, cases, n_unlabelled)
