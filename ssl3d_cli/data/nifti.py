"""Reading scans and label maps with their exact geometry, and writing outputs on a scan's grid with clean headers.

NIfTI files are read by nibabel; NRRD, MetaImage and DICOM series folders by SimpleITK
(:mod:`ssl3d_cli.data.imageio`), converted to the same convention: (C, X, Y, Z) arrays and a RAS+ affine.
Arrays are kept in the file's voxel order here; reorientation to the network's canonical (RAS) order happens in
:mod:`ssl3d_cli.data.preprocessing` and is undone there.

Outputs are NIfTI-1 written by :func:`write_like` with the header of :func:`output_header`: the source's geometry
(affine, qform and sform with their codes) exactly, and nothing else of the source header; the viewer-relevant
fields (display range, intent, description, units, scaling) describe the written map. See the README's table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ssl3d_cli import __version__
from ssl3d_cli.data import imageio
from ssl3d_cli.errors import InputDataError
from ssl3d_cli.files import atomic_output

NIFTI_SUFFIXES = (".nii.gz", ".nii")
GEOMETRY_ATOL_MM = 1e-3


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_image_file(path: Path) -> bool:
    """True for a file name ssl3d reads as a scan: NIfTI, NRRD or MetaImage."""
    return is_nifti(path) or imageio.is_itk_file(path)


def strip_image_suffix(name: str) -> str:
    """The case name of an image file: ``x.nii.gz`` -> ``x``, ``scan.nrrd`` -> ``scan``, ``a.b.mha`` -> ``a.b``."""
    lowered = name.lower()
    for suffix in imageio.ITK_SUFFIXES:
        if lowered.endswith(suffix):
            return name[: -len(suffix)]
    return strip_nifti_suffix(name)


def unsupported_file_message(path: Path) -> str:
    """The one line for a file that is no scan ssl3d reads (a lone DICOM slice is told to give its folder)."""
    if imageio.is_dicom_file(path):
        return f"{path}: a single DICOM file; give the folder holding its series (supported: {imageio.SUPPORTED_INPUTS})"
    return f"{path}: not a NIfTI, NRRD or MetaImage file; supported: {imageio.SUPPORTED_INPUTS}"


@dataclass(frozen=True)
class ImageGrid:
    """The voxel grid of a scan and what writing an output on it needs; holds no voxel data.

    Attributes:
        shape: (X, Y, Z) voxels.
        affine: (4, 4) voxel-to-world (RAS+ mm) matrix.
        header: a NIfTI-1 header holding only the grid: qform and sform (matrices and codes), voxel sizes, the
            spatial unit. From a NIfTI source its raw fields are copied, so outputs carry them bit for bit; from a
            SimpleITK source both forms are the converted affine with code 1, as SimpleITK's NIfTI writer sets them.
        source: the file or DICOM folder (for messages).
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    header: nib.Nifti1Header
    source: Path


#: The raw NIfTI fields that make up a grid (besides pixdim[0:4] and the spatial unit).
_GEOMETRY_FIELDS = ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z",
                    "srow_x", "srow_y", "srow_z", "qform_code", "sform_code")


def geometry_header(source: nib.Nifti1Header) -> nib.Nifti1Header:
    """A fresh NIfTI-1 header carrying only the grid fields of ``source`` (a NIfTI-1 or NIfTI-2 header)."""
    out = nib.Nifti1Header()
    for name in _GEOMETRY_FIELDS:
        out[name] = source[name]
    out["pixdim"][:4] = source["pixdim"][:4]
    out.set_xyzt_units(xyz=source.get_xyzt_units()[0] if source.get_xyzt_units()[0] != "unknown" else "mm")
    return out


def affine_header(affine: np.ndarray, code: int = imageio.ITK_XFORM_CODE) -> nib.Nifti1Header:
    """A fresh NIfTI-1 header whose qform and sform are ``affine`` with ``code`` (SimpleITK's writer: 1 and 1), in mm."""
    out = nib.Nifti1Header()
    out.set_qform(affine, code)
    out.set_sform(affine, code)
    out.set_xyzt_units(xyz="mm")
    return out


@dataclass
class Scan:
    """An image read from one 4D file or several 3D files (one per channel), or one DICOM series.

    Attributes:
        data: (C, X, Y, Z) float32 intensities in file voxel order.
        affine: (4, 4) voxel-to-world (RAS+ mm) matrix of the (first) file.
        paths: the files read, in channel order (a DICOM series: its folder).
        header: the grid header (:attr:`ImageGrid.header`); None: built from ``affine`` with code 1.
    """

    data: np.ndarray
    affine: np.ndarray
    paths: list[Path]
    header: nib.Nifti1Header | None = None

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape[1:])  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return spacing_from_affine(self.affine)

    @property
    def grid(self) -> ImageGrid:
        """What :func:`write_like` needs to write an output on this scan's grid (keep it, drop the scan's data)."""
        header = self.header if self.header is not None else affine_header(self.affine)
        return ImageGrid(self.spatial_shape, self.affine, header, self.paths[0])


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    s = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return (float(s[0]), float(s[1]), float(s[2]))


def _load_image(path: Path) -> nib.Nifti1Image:
    if not path.exists():
        raise InputDataError(f"{path}: file not found")
    if not is_nifti(path):
        raise InputDataError(unsupported_file_message(path))
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for bad headers
        raise InputDataError(f"{path}: cannot be read as NIfTI ({exc.__class__.__name__}: {exc}); re-export or re-download it") from None
    return img  # type: ignore[return-value]


def _read_array(img: nib.Nifti1Image, path: Path, dtype: type = np.float32) -> np.ndarray:
    try:
        return np.asarray(img.get_fdata(dtype=dtype))
    except Exception as exc:  # truncated gzip -> EOFError / zlib.error / OSError
        raise InputDataError(f"{path}: the voxel data cannot be read ({exc.__class__.__name__}: {exc}); the file is probably truncated, re-download it") from None


def check_finite(array: np.ndarray, path: Path) -> None:
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise InputDataError(f"{path}: {bad} voxel(s) are NaN or infinite; fix or remove this scan (or use --skip-bad)")


def _check_channels(data: np.ndarray, path: Path, expected_channels: int | None) -> None:
    if expected_channels is None or data.shape[0] == expected_channels:
        return
    if expected_channels == 1:
        raise InputDataError(
            f"{path}: 4D image with {data.shape[0]} channels where a 3D scan is expected; "
            "this dataset declares one channel per file"
        )
    raise InputDataError(
        f"{path}: has {data.shape[0]} channel(s) but the dataset declares {expected_channels}; "
        "give one 4D file with all channels (MSD) or one file per channel (nnU-Net, BraTS)"
    )


def _read_one(path: Path, series_uid: str | None) -> Scan:
    """One file or DICOM folder as a scan of (C, X, Y, Z) (not yet checked for channels or finite values)."""
    if path.is_dir():
        data, affine = imageio.read_itk_volume(path, series_uid)
        return Scan(data=data, affine=affine, paths=[path], header=affine_header(affine))
    if not path.exists():
        raise InputDataError(f"{path}: file not found")
    if imageio.is_itk_file(path):
        data, affine = imageio.read_itk_volume(path)
        return Scan(data=data, affine=affine, paths=[path], header=affine_header(affine))
    img = _load_image(path)
    ndim = len(img.shape)
    if ndim == 2 or (ndim >= 3 and min(img.shape[:3]) == 1 and ndim == 3):
        raise InputDataError(f"{path}: image is 2D (shape {tuple(img.shape)}); ssl3d needs 3D scans")
    if ndim == 3:
        data = _read_array(img, path)[None]
    elif ndim == 4:
        data = np.moveaxis(_read_array(img, path), -1, 0)
    else:
        raise InputDataError(f"{path}: image has {ndim} dimensions (shape {tuple(img.shape)}); expected 3D or 4D")
    return Scan(data=np.ascontiguousarray(data, dtype=np.float32), affine=np.asarray(img.affine, dtype=np.float64), paths=[path],
                header=geometry_header(img.header))


def load_scan(paths: list[Path], *, expected_channels: int | None = None, series_uid: str | None = None) -> Scan:
    """Read an image: one 3D file, one 4D file (channels last), several 3D files (one per channel), or a DICOM series.

    NIfTI is read by nibabel; NRRD / MetaImage files and DICOM series folders by SimpleITK (vector pixels become
    channels). Every path may be any of these formats.

    Args:
        paths: the case's image files in channel order, or one DICOM folder.
        expected_channels: refuse another channel count.
        series_uid: the series of a DICOM folder holding several (None: the folder's only series).

    Raises:
        InputDataError: unreadable file, 2D image, channel count or geometry mismatch, NaN/inf, bad DICOM series.
    """
    if len(paths) == 1:
        path = Path(paths[0])
        scan = _read_one(path, series_uid)
        _check_channels(scan.data, path, expected_channels)
        check_finite(scan.data, path)
        return scan

    channels = []
    first: Scan | None = None
    for path in paths:
        one = _read_one(Path(path), series_uid)
        if one.data.shape[0] != 1:
            raise InputDataError(
                f"{path}: expected a 3D image (one file per channel) but it has shape {one.data.shape[1:] + one.data.shape[:1]}"
            )
        check_finite(one.data, path)
        if first is None:
            first = one
        elif one.spatial_shape != first.spatial_shape or not np.allclose(one.affine, first.affine, atol=GEOMETRY_ATOL_MM):
            raise InputDataError(f"{path}: shape or geometry differs from {paths[0].name}; all channels of a case must share one grid")
        channels.append(one.data[0])
    assert first is not None
    return Scan(data=np.stack(channels).astype(np.float32, copy=False), affine=first.affine, paths=list(paths), header=first.header)


def _label_array(path: Path) -> tuple[np.ndarray, np.ndarray, bool]:
    """A label file's (X, Y, Z[, 1]) array, its affine, and whether it holds plain integers (no scaling)."""
    if imageio.is_itk_file(path):
        if not path.exists():
            raise InputDataError(f"{path}: file not found")
        arr, affine = imageio.read_itk_label(path)
        return arr, affine, bool(np.issubdtype(arr.dtype, np.integer))
    img = _load_image(path)
    plain = np.issubdtype(img.get_data_dtype(), np.integer) and img.dataobj.slope in (1, None) and img.dataobj.inter in (0, None)
    if not plain:
        return _read_array(img, path, dtype=np.float32), np.asarray(img.affine, dtype=np.float64), False
    try:
        arr = np.asarray(img.dataobj)
    except Exception as exc:
        raise InputDataError(f"{path}: the voxel data cannot be read ({exc.__class__.__name__}: {exc}); the file is probably truncated") from None
    return arr, np.asarray(img.affine, dtype=np.float64), plain


def read_label_map(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A label file (NIfTI, NRRD or MetaImage) as it lies: (X, Y, Z) int64 class values and its RAS affine (4, 4).

    Unlike :func:`load_label` it checks no image grid (``ssl3d evaluate`` compares it with the prediction's own).

    Raises:
        InputDataError: an unreadable file, non-finite or non-integer values.
    """
    arr, affine, plain = _label_array(path)
    shape = tuple(int(s) for s in arr.shape[:3])
    if plain:
        return arr.reshape(shape).astype(np.int64, copy=False), affine
    arr = np.asarray(arr, dtype=np.float32).reshape(shape)
    check_finite(arr, path)
    rounded = np.rint(arr)
    if not np.array_equal(rounded, arr):
        raise InputDataError(f"{path}: label map holds non-integer values; labels must be integer class values")
    return rounded.astype(np.int64), affine


def read_label_values(path: Path) -> np.ndarray:
    """The distinct values of a label file (NIfTI, NRRD or MetaImage), without grid checks."""
    return np.unique(_label_array(path)[0])


def load_label(path: Path, *, shape: tuple[int, int, int], affine: np.ndarray, image_path: Path) -> np.ndarray:
    """Read a label map (NIfTI, NRRD or MetaImage) and check it lies on the image grid. Returns (X, Y, Z) int32."""
    arr, label_affine, plain = _label_array(path)
    lshape = tuple(int(s) for s in arr.shape)
    if len(lshape) == 4 and lshape[3] == 1:
        lshape = lshape[:3]
    if lshape != tuple(shape):
        raise InputDataError(f"{path}: label shape {lshape} differs from image {image_path.name} shape {tuple(shape)}")
    if not np.allclose(label_affine, affine, atol=GEOMETRY_ATOL_MM):
        raise InputDataError(
            f"{path}: label geometry (affine) differs from image {image_path.name}; resample the label onto the image grid"
        )
    if plain:  # integer labels stored without scaling: read them as they are (no float copy, no rounding check)
        return arr.reshape(lshape).astype(np.int32, copy=False)
    arr = np.asarray(arr, dtype=np.float32).reshape(lshape)
    check_finite(arr, path)
    rounded = np.rint(arr)
    if not np.array_equal(rounded, arr):
        raise InputDataError(f"{path}: label map holds non-integer values; labels must be integer class values")
    return rounded.astype(np.int32)


def read_grid(path: Path) -> ImageGrid:
    """The grid of a scan file or DICOM folder (a NIfTI's header alone is read; other formats are read whole)."""
    if path.is_file() and is_nifti(path):
        img = _load_image(path)
        return ImageGrid(tuple(int(s) for s in img.shape[:3]), np.asarray(img.affine, dtype=np.float64),  # type: ignore[arg-type]
                         geometry_header(img.header), path)
    return load_scan([path]).grid


#: Output kinds of :func:`write_like`: the NIfTI intent each gets and its display range.
#: ``label``: NIFTI_INTENT_LABEL (1002), cal 0..max label value written. ``probability``: NIFTI_INTENT_ESTIMATE
#: (1001; NIfTI has no "probability" intent, and its p-value intents mean a test statistic's p), cal 0..1.
#: ``estimate``: NIFTI_INTENT_ESTIMATE, cal ``display_range`` or 0..the map's maximum. ``image``: no intent, cal the data range.
OUTPUT_KINDS = ("label", "probability", "estimate", "image")
INTENT_LABEL = 1002
INTENT_ESTIMATE = 1001
_INTENTS = {"label": (INTENT_LABEL, "labels"), "probability": (INTENT_ESTIMATE, "probability"), "estimate": (INTENT_ESTIMATE, ""),
            "image": (0, "")}


def _fit_bytes(text: str, limit: int) -> bytes:
    return text.encode("ascii", "replace")[:limit]


def output_header(grid: ImageGrid, array: np.ndarray, *, kind: str = "image", description: str | None = None,
                  intent_name: str | None = None, display_range: tuple[float, float] | None = None) -> nib.Nifti1Header:
    """The header of an output on ``grid``: the grid's geometry exactly, every other field set for the written map.

    Nothing else of the source header survives (its display range, description, scaling, intent, aux_file, db_name,
    slice timing and time units describe the scan, not the output). Set here:

    - ``cal_min``/``cal_max``: by ``kind`` (:data:`OUTPUT_KINDS`); viewers honouring them (FSLeyes, MRIcroGL) then
      show the map's own range.
    - ``intent_code`` / ``intent_name``: by ``kind``; ``intent_name`` (16 bytes) may be given (``p05``, ``entropy``).
    - ``descrip``: ``ssl3d <version> <description>`` cut to 80 bytes.
    - ``scl_slope`` / ``scl_inter``: no scaling, stored as 1 / 0 (nibabel writes the identity when the data need no
      scaling; it and viewers read it as unscaled, ``img.dataobj.slope == 1``), whatever the source's scaling was.
    - ``xyzt_units``: the grid's spatial unit, no time unit; a 4D output's 4th axis (classes) gets ``pixdim[4] = 1``.

    Args:
        grid: the scan's grid (:attr:`Scan.grid` or :func:`read_grid`).
        array: (X, Y, Z) or (X, Y, Z, C) data as it will be written (its type and range are used).
        kind: ``label`` | ``probability`` | ``estimate`` | ``image``.
        description: what the map is (``label map``, ``p05 of p(organ)``).
        intent_name: overrides the kind's intent name.
        display_range: overrides the kind's ``cal_min``/``cal_max``.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind {kind!r} is not one of {OUTPUT_KINDS}")
    header = grid.header.copy()
    header.set_data_dtype(array.dtype)
    header.set_data_shape(array.shape)
    if array.ndim == 4:
        zooms = header.get_zooms()
        header.set_zooms(tuple(zooms[:3]) + (1.0,))
    header.set_xyzt_units(xyz=grid.header.get_xyzt_units()[0], t="unknown")
    header.set_slope_inter(None, None)  # nibabel stores the identity (1 / 0) for data written as they are
    code, name = _INTENTS[kind]
    header.set_intent(code, (), name=_fit_bytes(intent_name if intent_name is not None else name, 16).decode("ascii"), allow_unknown=True)
    finite = array[np.isfinite(array)] if np.issubdtype(array.dtype, np.floating) else array
    top = float(finite.max()) if finite.size else 0.0
    if display_range is not None:
        low, high = display_range
    elif kind == "label":
        low, high = 0.0, top
    elif kind == "probability":
        low, high = 0.0, 1.0
    elif kind == "estimate":
        low, high = min(0.0, float(finite.min()) if finite.size else 0.0), top
    else:
        low, high = (float(finite.min()) if finite.size else 0.0), top
    header["cal_min"], header["cal_max"] = low, high
    header["descrip"] = _fit_bytes(f"ssl3d {__version__} {description or kind}", 80)
    return header


def write_like(array: np.ndarray, reference: Path | Scan | ImageGrid, out_path: Path, *, dtype: type | None = None,
               kind: str = "image", description: str | None = None, intent_name: str | None = None,
               display_range: tuple[float, float] | None = None) -> Path:
    """Write ``array`` (X, Y, Z) or (X, Y, Z, C) on the reference scan's grid, atomically, with :func:`output_header`.

    The reference's affine and its qform/sform (matrices and codes) are kept, so the output lies voxel for voxel on
    the reference scan; every other header field describes the output (``kind`` etc., see :func:`output_header`).

    Args:
        reference: the scan's grid (:attr:`Scan.grid`, cheapest), the scan, or its file / DICOM folder (read again).
    """
    grid = reference if isinstance(reference, ImageGrid) else reference.grid if isinstance(reference, Scan) else read_grid(Path(reference))
    if tuple(array.shape[:3]) != tuple(grid.shape):
        raise InputDataError(f"{out_path}: array shape {array.shape[:3]} differs from reference {grid.source} {grid.shape}")
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    header = output_header(grid, array, kind=kind, description=description, intent_name=intent_name, display_range=display_range)
    out = nib.Nifti1Image(array, header.get_best_affine(), header=header)
    for name in _GEOMETRY_FIELDS:  # raw fields again: the image's own affine handling must not round them
        out.header[name] = grid.header[name]
    # The temporary file keeps the NIfTI suffix: nibabel picks the format (and gzip) from it.
    suffix = ".nii.gz" if out_path.name.endswith(".nii.gz") else out_path.suffix
    with atomic_output(out_path, suffix=suffix) as tmp:
        nib.save(out, str(tmp))
    return out_path
