"""Dataset discovery: MSD task folders, nnU-Net v2 raw folders, BraTS downloads, plain folders of scans.

Every layout becomes a :class:`DatasetSpec`: cases (image files per channel, optional label),
modality, channel names and the label mapping (original values in class-index order).

Plain folders (and ``images/`` + ``labels/``) hold NIfTI, NRRD or MetaImage files (case = file name without its
suffix) and DICOM series folders (case = the folder's name; a folder with several series gives one case per series,
``<folder>_<number>_<description>``). A DICOM case's image path is its folder and :attr:`CaseSpec.series_uid` says
which series; the series' slices are checked when it is read (:mod:`ssl3d_cli.data.imageio`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ssl3d_cli.data import imageio
from ssl3d_cli.data.nifti import is_image_file, is_nifti, strip_image_suffix, strip_nifti_suffix, unsupported_file_message
from ssl3d_cli.errors import InputDataError

BRATS_CLASS_NAMES = ["background", "necrotic/non-enhancing core", "edema", "enhancing tumour"]
# Channel order is the same physical order for every BraTS release: FLAIR, T1, T1ce, T2.
BRATS_NAMINGS = {
    "brats2018": {"sep": "_", "channels": ["flair", "t1", "t1ce", "t2"], "seg": "seg", "labels": [0, 1, 2, 4]},
    "brats2023": {"sep": "-", "channels": ["t2f", "t1n", "t1c", "t2w"], "seg": "seg", "labels": [0, 1, 2, 3]},
}
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
#: Label files matched to a case ``<case><suffix>`` in ``labels/`` / ``labelsTr/``, first found wins.
LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class CaseSpec:
    """One case: image file(s) in channel order (or one DICOM folder) and an optional label file.

    Attributes:
        series_uid: for a DICOM folder, the SeriesInstanceUID of the case's series (None otherwise).
    """

    case_id: str
    image_paths: list[Path]
    label_path: Path | None = None
    series_uid: str | None = None

    @property
    def labelled(self) -> bool:
        return self.label_path is not None


@dataclass
class DatasetSpec:
    """A discovered dataset.

    ``label_values[i]`` is the original label value of internal class ``i`` (class 0 = background);
    ``None`` means the values are read from the label files (plain folders).
    """

    root: Path
    layout: str
    name: str
    modality: str | None
    channel_names: list[str]
    label_values: list[int] | None
    class_names: list[str]
    cases: list[CaseSpec] = field(default_factory=list)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def labelled_cases(self) -> list[CaseSpec]:
        return [c for c in self.cases if c.labelled]

    def summary(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "layout": self.layout,
            "name": self.name,
            "modality": self.modality,
            "channel_names": self.channel_names,
            "label_values": self.label_values,
            "class_names": self.class_names,
            "cases": len(self.cases),
            "labelled": len(self.labelled_cases),
        }


def evaluation_regions(class_names: list[str], label_values: list[int]) -> dict[str, list[int]]:
    """BraTS-style regions (original label values) when the classes are brain-tumour sub-regions.

    WT = every tumour class, TC = WT without edema, ET = the enhancing class.
    """
    lowered = [n.lower() for n in class_names]
    edema = [i for i, n in enumerate(lowered) if "edema" in n or "oedema" in n]
    enhancing = [i for i, n in enumerate(lowered) if "enhancing" in n and "non" not in n]
    if not edema or not enhancing or len(class_names) < 3:
        return {}
    tumour = list(range(1, len(class_names)))
    core = [i for i in tumour if i not in edema]
    return {
        "WT": [label_values[i] for i in tumour],
        "TC": [label_values[i] for i in core],
        "ET": [label_values[i] for i in enhancing],
    }


def _modality_from_names(names: list[str]) -> str:
    return "ct" if names and all(n.strip().upper() == "CT" for n in names) else "mr"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open() as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise InputDataError(f"{path}: not valid JSON ({exc}); fix the file") from None


def _inside(root: Path, rel: str, json_path: Path) -> Path:
    path = (root / rel).resolve()
    try:
        path.relative_to(root.resolve())
    except ValueError:
        raise InputDataError(f"{json_path}: path {rel!r} points outside the dataset folder; paths must be inside {root}") from None
    return path


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith("._"))


def _read_msd(root: Path, meta: dict[str, Any], json_path: Path) -> DatasetSpec:
    modality = meta.get("modality") or {}
    channel_names = [str(modality[k]) for k in sorted(modality, key=lambda k: int(k))] or ["image"]
    labels = meta.get("labels") or {"0": "background"}
    try:
        values = sorted(int(k) for k in labels)
    except ValueError:
        raise InputDataError(f"{json_path}: 'labels' keys must be integer label values (MSD layout), got {list(labels)}") from None
    names = [str(labels[str(v)]) if str(v) in labels else str(v) for v in values]
    cases: list[CaseSpec] = []
    seen: set[str] = set()
    for entry in meta.get("training", []):
        if not isinstance(entry, dict) or "image" not in entry:
            raise InputDataError(f"{json_path}: each 'training' entry needs an 'image' (and 'label') path")
        image = _inside(root, entry["image"], json_path)
        label = _inside(root, entry["label"], json_path) if entry.get("label") else None
        for p in [image] + ([label] if label else []):
            if not p.exists():
                raise InputDataError(f"{json_path}: names {p.relative_to(root.resolve())} which does not exist; fix dataset.json or restore the file")
        case_id = strip_nifti_suffix(image.name)
        seen.add(case_id)
        cases.append(CaseSpec(case_id, [image], label))
    for entry in meta.get("test", []):
        rel = entry["image"] if isinstance(entry, dict) else entry
        image = _inside(root, rel, json_path)
        if not image.exists():
            raise InputDataError(f"{json_path}: names {rel} which does not exist; fix dataset.json or restore the file")
        case_id = strip_nifti_suffix(image.name)
        if case_id not in seen:
            seen.add(case_id)
            cases.append(CaseSpec(case_id, [image], None))
    if not meta.get("training") and (root / "imagesTr").is_dir():  # dataset.json without a case list
        cases = _cases_from_folders(root / "imagesTr", root / "labelsTr")
    return DatasetSpec(root, "msd", meta.get("name") or root.name, _modality_from_names(channel_names),
                       channel_names, values, names, cases)


def _group_channel_files(files: list[Path], ending: str | None = None) -> dict[str, list[Path]]:
    """``CASE_0000.nii.gz, CASE_0001.nii.gz`` -> ``{CASE: [..0000, ..0001]}``; refuses gaps."""
    groups: dict[str, dict[int, Path]] = {}
    for f in files:
        stem = f.name[: -len(ending)] if ending and f.name.endswith(ending) else strip_image_suffix(f.name)
        m = CHANNEL_SUFFIX.match(stem)
        if not m:
            raise InputDataError(f"{f}: expected nnU-Net channel naming CASE_0000{ending or '.nii.gz'}")
        groups.setdefault(m["case"], {})[int(m["channel"])] = f
    out: dict[str, list[Path]] = {}
    for case, chans in groups.items():
        n = max(chans) + 1
        missing = [i for i in range(n) if i not in chans]
        if missing:
            raise InputDataError(f"case {case}: channel file(s) {', '.join(f'{case}_{i:04d}' for i in missing)} missing")
        out[case] = [chans[i] for i in range(n)]
    return out


def _read_nnunet(root: Path, meta: dict[str, Any], json_path: Path) -> DatasetSpec:
    channels = meta["channel_names"]
    channel_names = [str(channels[k]) for k in sorted(channels, key=lambda k: int(k))]
    labels = meta.get("labels") or {"background": 0}
    if any(not isinstance(v, int) for v in labels.values()):
        raise InputDataError(f"{json_path}: region-based labels (lists) are not supported; give one integer per class")
    by_value = sorted((int(v), str(k)) for k, v in labels.items())
    values = [v for v, _ in by_value]
    names = [n for _, n in by_value]
    ending = meta.get("file_ending", ".nii.gz")
    cases: list[CaseSpec] = []
    for images_dir, labels_dir in ((root / "imagesTr", root / "labelsTr"), (root / "imagesTs", None)):
        if not images_dir.is_dir():
            continue
        files = [f for f in sorted(images_dir.iterdir()) if f.name.endswith(ending) and not f.name.startswith("._")]
        for case, paths in sorted(_group_channel_files(files, ending).items()):
            if len(paths) != len(channel_names):
                raise InputDataError(f"{images_dir}/{case}: {len(paths)} channel file(s), dataset.json declares {len(channel_names)}")
            label = labels_dir / f"{case}{ending}" if labels_dir else None
            cases.append(CaseSpec(case, paths, label if label and label.exists() else None))
    return DatasetSpec(root, "nnunet", meta.get("name") or root.name, _modality_from_names(channel_names),
                       channel_names, values, names, cases)


def _brats_case(folder: Path) -> tuple[str, CaseSpec] | None:
    """Recognise a BraTS case folder; returns (naming, case) or None."""
    files = _nifti_files(folder)
    stems = {strip_nifti_suffix(f.name): f for f in files}
    for naming, spec in BRATS_NAMINGS.items():
        sep = spec["sep"]
        found: dict[str, Path] = {}
        for stem, f in stems.items():
            head, _, tail = stem.rpartition(sep)
            if head and tail.lower() in spec["channels"] + [spec["seg"]]:
                found[tail.lower()] = f
        if not any(ch in found for ch in spec["channels"]):
            continue
        missing = [ch for ch in spec["channels"] if ch not in found]
        if missing:
            raise InputDataError(f"{folder}: BraTS case is missing modality file(s) {', '.join(missing)}; every case needs {', '.join(spec['channels'])}")
        return naming, CaseSpec(folder.name, [found[ch] for ch in spec["channels"]], found.get(spec["seg"]))
    return None


def _read_brats(root: Path) -> DatasetSpec | None:
    case_dirs = [d for d in sorted(root.iterdir()) if d.is_dir()]
    # BraTS 2018 nests cases under HGG/ and LGG/.
    nested = [sub for d in case_dirs for sub in sorted(d.iterdir()) if sub.is_dir()]
    cases: list[CaseSpec] = []
    namings: set[str] = set()
    for d in case_dirs + nested:
        found = _brats_case(d)
        if found:
            namings.add(found[0])
            cases.append(found[1])
    if not cases:
        return None
    if len(namings) > 1:
        raise InputDataError(f"{root}: mixes BraTS namings ({', '.join(sorted(namings))}); keep one release per dataset folder")
    spec = BRATS_NAMINGS[namings.pop()]
    return DatasetSpec(root, "brats", root.name, "mr", list(spec["channels"]), list(spec["labels"]),
                       list(BRATS_CLASS_NAMES), cases)


def _image_files(folder: Path) -> list[Path]:
    """NIfTI, NRRD and MetaImage files directly in ``folder``."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith("._"))


def _dicom_cases(folder: Path, series_uid: str | None = None) -> list[CaseSpec]:
    """One case per DICOM series of ``folder`` (``series_uid``: that series only, named after the folder).

    Raises:
        InputDataError: no readable series, or no series with ``series_uid``.
    """
    if series_uid is not None:
        return [CaseSpec(folder.name, [folder], series_uid=imageio.select_series(folder, series_uid).uid)]
    series = imageio.dicom_series(folder)
    names = imageio.series_case_names(folder, series)
    return [CaseSpec(name, [folder], series_uid=s.uid) for name, s in zip(names, series)]


def _find_label(labels: Path | None, case_id: str) -> Path | None:
    if labels is None or not labels.is_dir():
        return None
    for suffix in LABEL_SUFFIXES:
        cand = labels / f"{case_id}{suffix}"
        if cand.exists():
            return cand
    return None


def _cases_from_folders(images: Path, labels: Path | None, *, series_uid: str | None = None) -> list[CaseSpec]:
    """Cases of a plain folder: its image files (nnU-Net ``_0000`` channel files grouped), its own DICOM series when it
    holds DICOM files, and the DICOM series of its subfolders; each with its label from ``labels`` when there.

    Raises:
        InputDataError: two files naming the same case, an unreadable DICOM folder.
    """
    files = _image_files(images)
    if files and all(CHANNEL_SUFFIX.match(strip_image_suffix(f.name)) for f in files):
        grouped = _group_channel_files(files)
    else:
        grouped = {}
        for f in files:
            case_id = strip_image_suffix(f.name)
            if case_id in grouped:
                raise InputDataError(f"{images}: {grouped[case_id][0].name} and {f.name} both give case {case_id}; keep one of them")
            grouped[case_id] = [f]
    cases = [CaseSpec(case_id, paths, _find_label(labels, case_id)) for case_id, paths in sorted(grouped.items())]
    folders = ([images] if imageio.has_dicom_files(images) else []) + [
        d for d in sorted(images.iterdir()) if d.is_dir() and not d.name.startswith(".") and imageio.has_dicom_files(d)]
    for folder in folders:
        for case in _dicom_cases(folder, series_uid):
            case.label_path = _find_label(labels, case.case_id)
            cases.append(case)
    return cases


def discover_dataset(path: Path | str) -> DatasetSpec:
    """Recognise the layout of ``path`` and list its cases.

    Raises:
        InputDataError: missing or empty folder, bad dataset.json, files it names are missing.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise InputDataError(f"{root}: dataset folder not found; check the path")
    if not root.is_dir():
        raise InputDataError(f"{root}: expected a dataset folder (MSD, nnU-Net, BraTS, or a folder of scans: {imageio.SUPPORTED_INPUTS})")
    root = root.resolve()
    json_path = root / "dataset.json"
    spec: DatasetSpec | None = None
    if json_path.exists():
        meta = _read_json(json_path)
        spec = _read_nnunet(root, meta, json_path) if "channel_names" in meta else _read_msd(root, meta, json_path)
    if spec is None:
        spec = _read_brats(root)
    if spec is None and (root / "images").is_dir():
        spec = DatasetSpec(root, "images-labels", root.name, None, ["image"], None, [],
                           _cases_from_folders(root / "images", root / "labels"))
    if spec is None:
        spec = DatasetSpec(root, "plain", root.name, None, ["image"], None, [], _cases_from_folders(root, None))
    if not spec.cases:
        raise InputDataError(f"{root}: no NIfTI scans or other images found (looked for an MSD/nnU-Net dataset.json, BraTS case folders, "
                             f"images/ and labels/, NIfTI/NRRD/MetaImage files and DICOM series folders)")
    if spec.layout in ("plain", "images-labels"):
        nch = {len(c.image_paths) for c in spec.cases}
        if len(nch) > 1:
            raise InputDataError(f"{root}: cases have different channel counts {sorted(nch)}")
        spec.channel_names = [f"channel{i}" for i in range(nch.pop())] if len(spec.cases[0].image_paths) > 1 else ["image"]
    return spec


def discover_inputs(inputs: list[Path], *, series_uid: str | None = None) -> tuple[list[CaseSpec], DatasetSpec | None]:
    """Cases to predict from files, folders, DICOM series folders, a BraTS case folder, an nnU-Net ``_0000`` folder or a
    dataset.

    A dataset contributes its unlabelled (``imagesTs``) cases; returns the dataset too when one was given.

    Args:
        inputs: scan files (NIfTI, NRRD, MetaImage) and folders.
        series_uid: in every DICOM folder, read only the series with this SeriesInstanceUID (``--series``).
    """
    cases: list[CaseSpec] = []
    dataset: DatasetSpec | None = None
    loose: list[Path] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if not path.exists():
            raise InputDataError(f"{path}: input not found; give {imageio.SUPPORTED_INPUTS}, a folder of scans or a dataset")
        if path.is_file():
            if not is_image_file(path):
                raise InputDataError(unsupported_file_message(path))
            loose.append(path)
            continue
        brats = _brats_case(path)
        if brats:
            cases.append(brats[1])
            continue
        if (path / "dataset.json").exists() or _read_brats_safe(path):
            dataset = discover_dataset(path)
            cases.extend(c for c in dataset.cases if not c.labelled)
            continue
        if (path / "images").is_dir():
            cases.extend(replace(c, label_path=None) for c in _cases_from_folders(path / "images", None, series_uid=series_uid))
            continue
        found = _cases_from_folders(path, None, series_uid=series_uid)
        if not found and any(p.is_file() and not p.name.startswith(".") for p in path.iterdir()):
            found = _dicom_cases(path, series_uid)  # DICOM without the DICM mark, or a clear "no readable DICOM series"
        if not found:
            raise InputDataError(f"{path}: no scans in this folder; give {imageio.SUPPORTED_INPUTS}")
        cases.extend(found)
    cases.extend(CaseSpec(strip_image_suffix(p.name), [p]) for p in loose)
    ids = [c.case_id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise InputDataError(f"input cases share names {', '.join(dupes[:5])}; outputs would overwrite each other")
    return cases, dataset


def _read_brats_safe(path: Path) -> bool:
    try:
        return _read_brats(path) is not None
    except InputDataError:
        return False
