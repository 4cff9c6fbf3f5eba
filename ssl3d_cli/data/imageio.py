"""Images that SimpleITK reads (NRRD, MetaImage, DICOM series), converted exactly to the NIfTI convention.

ITK describes a grid in LPS+ millimetres by origin, spacing and direction, and arrays come out of
``sitk.GetArrayFromImage`` in (z, y, x) order. ssl3d works like nibabel: RAS+ millimetres and (x, y, z) arrays.
The conversion is exact and is the one SimpleITK's own NIfTI writer makes::

    affine = diag(-1, -1, 1, 1) @ [[direction * spacing, origin], [0, 0, 0, 1]]

so a prediction on a DICOM series lies voxel for voxel on ``sitk.WriteImage(series, "x.nii.gz")``. Images with
vector pixels (RGB, multi-component NRRD) and 4D images become channels.

DICOM: a folder holds one or more series (grouped by SeriesInstanceUID, files ordered by slice position, both as
SimpleITK's GDCM reader does). Before a series is read its slices are checked here, since SimpleITK only warns:
every slice has the same size, and consecutive slice positions (along the slice normal) are equally spaced
(a larger gap is a missing slice, a zero gap a duplicated one).

NIfTI files are read by nibabel (:mod:`ssl3d_cli.data.nifti`), never here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssl3d_cli.errors import InputDataError

#: File formats read through SimpleITK (``.nhdr`` / ``.mhd`` are headers next to their raw data file).
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
#: Named in every message about an unsupported input.
SUPPORTED_INPUTS = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd) files, or a folder holding a DICOM series"
#: Suffixes DICOM files often carry (many carry none: the file's preamble is checked too).
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: How many files of a folder are probed for DICOM before it is taken for something else.
DICOM_PROBE_FILES = 20
#: Consecutive slice gaps may differ by this much (mm) or this fraction of the median gap, whichever is larger.
SLICE_GAP_ATOL_MM = 0.01
SLICE_GAP_RTOL = 0.01
#: ITK's LPS+ world to NIfTI's RAS+ world.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: The qform and sform codes SimpleITK's NIfTI writer gives a converted image (NIFTI_XFORM_SCANNER_ANAT for both).
ITK_XFORM_CODE = 1
_SERIES_DESCRIPTION = "0008|103e"
_SERIES_NUMBER = "0020|0011"
DCM2NIIX_HINT = "convert the series with dcm2niix (`dcm2niix -z y -o OUT FOLDER`) and give the NIfTI file"


def _sitk():  # type: ignore[no-untyped-def]
    import SimpleITK as sitk  # imported on use: reading NIfTI never needs it

    return sitk


def is_itk_file(path: Path) -> bool:
    """True for a file name SimpleITK reads here (NRRD or MetaImage)."""
    return path.name.lower().endswith(ITK_SUFFIXES)


def is_dicom_file(path: Path) -> bool:
    """True for a DICOM-looking file: a DICOM suffix, or the ``DICM`` mark after the 128-byte preamble."""
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def probe_files(folder: Path, limit: int = DICOM_PROBE_FILES) -> list[Path]:
    """Up to ``limit`` regular, non-hidden files directly in ``folder`` (sorted by name)."""
    out: list[Path] = []
    for p in sorted(folder.iterdir()):
        if not p.name.startswith(".") and p.is_file():
            out.append(p)
            if len(out) >= limit:
                break
    return out


def has_dicom_files(folder: Path) -> bool:
    """True when one of the first files of ``folder`` looks like DICOM (cheap: no header is parsed)."""
    return any(is_dicom_file(p) for p in probe_files(folder))


def folder_label(text: str) -> str:
    """``text`` as a case name: letters, digits, ``-`` and ``_`` kept, anything else run together as ``_``."""
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9-]", "_", text.strip())).strip("_-")


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series of a folder.

    Attributes:
        folder: the folder holding its files.
        uid: SeriesInstanceUID (may be empty in anonymised data).
        files: the series' files in SimpleITK's slice order.
        description: SeriesDescription (stripped; may be empty).
        number: SeriesNumber (stripped; may be empty).
    """

    folder: Path
    uid: str
    files: tuple[Path, ...]
    description: str
    number: str

    @property
    def name(self) -> str:
        """How messages name the series: description and number, else its UID."""
        parts = [p for p in (self.number and f"#{self.number}", self.description and repr(self.description)) if p]
        return " ".join(parts) or (f"UID {self.uid}" if self.uid else "(no UID)")

    @property
    def label(self) -> str:
        """The series as part of a case name: ``<number>_<description>`` sanitised, else the UID's tail."""
        text = folder_label(f"{self.number}_{self.description}")
        return text or folder_label(self.uid[-12:]) or "series"


def _header_reader(path: Path):  # type: ignore[no-untyped-def]
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputDataError(f"{path}: cannot be read as DICOM ({_first_line(exc)}); {DCM2NIIX_HINT}") from None
    return reader


def _tag(reader, key: str) -> str:  # type: ignore[no-untyped-def]
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "Description:" in ln] or lines or [exc.__class__.__name__]
    return useful[-1].replace("Description:", "").strip()


def dicom_series(folder: Path) -> list[DicomSeries]:
    """The DICOM series directly inside ``folder`` (not its subfolders), ordered by series number then UID.

    Raises:
        InputDataError: no readable series in the folder (naming ``dcm2niix``).
    """
    sitk = _sitk()
    try:
        uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as exc:
        raise InputDataError(f"{folder}: cannot be scanned for DICOM series ({_first_line(exc)}); {DCM2NIIX_HINT}") from None
    if not uids:
        n = len(probe_files(folder, limit=1 << 30))
        raise InputDataError(f"{folder}: no readable DICOM series ({n} file(s), none readable as DICOM image slices); "
                             f"if they are DICOM, {DCM2NIIX_HINT}; otherwise give {SUPPORTED_INPUTS}")
    found = []
    for uid in uids:
        files = tuple(Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        if not files:
            continue
        first = _header_reader(files[0])
        found.append(DicomSeries(folder, uid, files, _tag(first, _SERIES_DESCRIPTION), _tag(first, _SERIES_NUMBER)))
    if not found:
        raise InputDataError(f"{folder}: no readable DICOM series; {DCM2NIIX_HINT}")

    def order(s: DicomSeries) -> tuple[int, str]:
        return (int(s.number) if s.number.isdigit() else 1 << 30, s.uid)

    return sorted(found, key=order)


def series_case_names(folder: Path, series: list[DicomSeries]) -> list[str]:
    """Case names of a folder's series: the folder's name for one series, ``<folder>_<series label>`` for several
    (a counter appended where labels repeat)."""
    if len(series) == 1:
        return [folder.name]
    names: list[str] = []
    for s in series:
        base = f"{folder.name}_{s.label}"
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def select_series(folder: Path, series_uid: str | None) -> DicomSeries:
    """The series of ``folder`` with ``series_uid`` (None: the folder's only series).

    Raises:
        InputDataError: no such series, or several series and no UID given (each listed with its UID).
    """
    series = dicom_series(folder)
    if series_uid is None:
        if len(series) == 1:
            return series[0]
        listing = "; ".join(f"{s.name} UID {s.uid or '(none)'}" for s in series)
        raise InputDataError(f"{folder}: holds {len(series)} DICOM series ({listing}); pick one with --series UID")
    for s in series:
        if s.uid == series_uid:
            return s
    listing = "; ".join(f"{s.name} UID {s.uid or '(none)'}" for s in series)
    raise InputDataError(f"{folder}: no DICOM series with UID {series_uid} (found: {listing}); check --series")


def check_series_slices(series: DicomSeries) -> None:
    """Refuse a series with slices of mixed sizes, or unequal gaps between consecutive slice positions.

    Positions are the slices' origins projected on the slice normal of the first slice (the cross product of the
    image orientation's row and column directions), sorted.

    Raises:
        InputDataError: one line naming the folder, the series and the problem.
    """
    where = f"{series.folder}: DICOM series {series.name}"
    sizes: dict[tuple[int, ...], list[Path]] = {}
    origins = []
    normal = None
    for f in series.files:
        reader = _header_reader(f)
        size = tuple(int(s) for s in reader.GetSize())
        sizes.setdefault(size[:2], []).append(f)
        origins.append(np.asarray(reader.GetOrigin(), dtype=np.float64)[:3])
        if normal is None and len(reader.GetDirection()) == 9:
            normal = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    if len(sizes) > 1:
        parts = sorted(sizes.items(), key=lambda kv: -len(kv[1]))
        desc = ", ".join(f"{'x'.join(map(str, size))} ({len(files)} file(s), e.g. {files[0].name})" for size, files in parts)
        raise InputDataError(f"{where} mixes slice sizes {desc}; remove the odd files or export the series again")
    if len(series.files) < 2 or normal is None:
        return  # one (possibly multi-frame) file: SimpleITK reads its grid as it is
    positions = np.sort(np.asarray(origins) @ normal)
    gaps = np.diff(positions)
    median = float(np.median(gaps))
    if float(gaps.min()) <= SLICE_GAP_ATOL_MM:
        i = int(np.argmin(gaps))
        raise InputDataError(f"{where} has two slices at position {positions[i]:.3f} mm (duplicated files, or several "
                             "acquisitions in one series); keep one copy of each slice or export the series again")
    tol = max(SLICE_GAP_ATOL_MM, SLICE_GAP_RTOL * median)
    if float(gaps.max() - gaps.min()) > tol:
        i = int(np.argmax(np.abs(gaps - median)))
        raise InputDataError(f"{where} has non-uniform slice spacing (gap {gaps[i]:.3f} mm between positions {positions[i]:.3f} and "
                             f"{positions[i + 1]:.3f} mm, {median:.3f} mm elsewhere): a slice is missing; restore it or export the series again")


def itk_affine(image) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The (4, 4) RAS+ voxel-to-world matrix of an ITK image's first three axes (see the module doc)."""
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)[:3]
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)[:3]
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def itk_to_channels(image, source: Path) -> np.ndarray:  # type: ignore[no-untyped-def]
    """A 3D image (scalar or vector pixels) or a 4D scalar image as (C, X, Y, Z) in file (x, y, z) order.

    Raises:
        InputDataError: a 2D image, or more dimensions than 3 + channels.
    """
    sitk = _sitk()
    dim, comps, size = image.GetDimension(), image.GetNumberOfComponentsPerPixel(), tuple(image.GetSize())
    if dim == 2 or (dim == 3 and min(size) == 1):
        raise InputDataError(f"{source}: image is 2D (size {size}); ssl3d needs 3D scans")
    if dim == 4:
        direction = np.asarray(image.GetDirection()).reshape(4, 4)
        if comps != 1 or np.abs(direction[:3, 3]).max() > 0 or np.abs(direction[3, :3]).max() > 0:
            raise InputDataError(f"{source}: 4D image whose 4th axis is not a plain channel axis; give a 3D image per channel")
    elif dim != 3:
        raise InputDataError(f"{source}: image has {dim} dimensions (size {size}); expected 3D")
    array = sitk.GetArrayViewFromImage(image)  # (z, y, x[, c]) or (c, z, y, x) for 4D
    if dim == 4:
        array = array.transpose(0, 3, 2, 1)
    elif comps > 1:
        array = array.transpose(3, 2, 1, 0)
    else:
        array = array.transpose(2, 1, 0)[None]
    return np.ascontiguousarray(array, dtype=np.float32)


def read_itk_image(path: Path):  # type: ignore[no-untyped-def]
    """A NRRD / MetaImage file as a SimpleITK image.

    Raises:
        InputDataError: missing or unreadable file (e.g. an ``.nhdr`` / ``.mhd`` whose data file is missing).
    """
    sitk = _sitk()
    if not path.exists():
        raise InputDataError(f"{path}: file not found")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputDataError(f"{path}: cannot be read ({_first_line(exc)}); re-export it (for .nhdr/.mhd keep the data file beside it)") from None


def read_dicom_image(folder: Path, series_uid: str | None = None):  # type: ignore[no-untyped-def]
    """One DICOM series of ``folder`` (checked by :func:`check_series_slices`) as a SimpleITK image.

    Raises:
        InputDataError: no readable series, several without ``series_uid``, mixed sizes, missing slices.
    """
    sitk = _sitk()
    series = select_series(folder, series_uid)
    check_series_slices(series)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in series.files])
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # the checks above replace ITK's warnings; the engine never prints
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputDataError(f"{folder}: DICOM series {series.name} cannot be read ({_first_line(exc)}); {DCM2NIIX_HINT}") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)


def read_itk_volume(path: Path, series_uid: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A NRRD / MetaImage file or a DICOM series folder as ((C, X, Y, Z) float32, (4, 4) RAS affine)."""
    image = read_dicom_image(path, series_uid) if path.is_dir() else read_itk_image(path)
    return itk_to_channels(image, path), itk_affine(image)


def read_itk_label(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NRRD / MetaImage label map as ((X, Y, Z) array in its stored type, (4, 4) RAS affine).

    Raises:
        InputDataError: unreadable, vector-valued or not 3D.
    """
    sitk = _sitk()
    image = read_itk_image(path)
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise InputDataError(f"{path}: a label map must be one 3D scalar image (got {image.GetDimension()}D with "
                             f"{image.GetNumberOfComponentsPerPixel()} component(s))")
    return np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0)), itk_affine(image)
