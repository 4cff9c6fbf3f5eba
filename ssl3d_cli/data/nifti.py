"""NIfTI reading and writing that keeps every scan's geometry exactly.

Arrays are kept in the file's voxel order here; reorientation to the network's canonical (RAS)
order happens in :mod:`ssl3d_cli.data.preprocessing` and is undone there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

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


@dataclass
class Scan:
    """An image read from one 4D file or several 3D files (one per channel).

    Attributes:
        data: (C, X, Y, Z) float32 intensities in file voxel order.
        affine: (4, 4) voxel-to-world (RAS+ mm) matrix of the (first) file.
        paths: the files read, in channel order.
    """

    data: np.ndarray
    affine: np.ndarray
    paths: list[Path]

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape[1:])  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return spacing_from_affine(self.affine)


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    s = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return (float(s[0]), float(s[1]), float(s[2]))


def _load_image(path: Path) -> nib.Nifti1Image:
    if not path.exists():
        raise InputDataError(f"{path}: file not found")
    if not is_nifti(path):
        raise InputDataError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
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


def load_scan(paths: list[Path], *, expected_channels: int | None = None) -> Scan:
    """Read an image: one 3D file, one 4D file (channels last), or several 3D files (one per channel).

    Raises:
        InputDataError: unreadable file, 2D image, channel count or geometry mismatch, NaN/inf.
    """
    if len(paths) == 1:
        path = paths[0]
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
        if expected_channels is not None and data.shape[0] != expected_channels:
            if expected_channels == 1:
                raise InputDataError(
                    f"{path}: 4D image with {data.shape[0]} channels where a 3D scan is expected; "
                    "this dataset declares one channel per file"
                )
            raise InputDataError(
                f"{path}: has {data.shape[0]} channel(s) but the dataset declares {expected_channels}; "
                "give one 4D file with all channels (MSD) or one file per channel (nnU-Net, BraTS)"
            )
        check_finite(data, path)
        return Scan(data=np.ascontiguousarray(data, dtype=np.float32), affine=np.asarray(img.affine, dtype=np.float64), paths=[path])

    channels = []
    affine = None
    for path in paths:
        img = _load_image(path)
        if len(img.shape) != 3:
            raise InputDataError(
                f"{path}: expected a 3D image (one file per channel) but it has shape {tuple(img.shape)}"
            )
        arr = _read_array(img, path)
        check_finite(arr, path)
        if affine is None:
            affine = np.asarray(img.affine, dtype=np.float64)
            shape = arr.shape
        elif arr.shape != shape or not np.allclose(img.affine, affine, atol=GEOMETRY_ATOL_MM):
            raise InputDataError(f"{path}: shape or geometry differs from {paths[0].name}; all channels of a case must share one grid")
        channels.append(arr)
    assert affine is not None
    return Scan(data=np.stack(channels).astype(np.float32, copy=False), affine=affine, paths=list(paths))


def load_label(path: Path, *, shape: tuple[int, int, int], affine: np.ndarray, image_path: Path) -> np.ndarray:
    """Read a label map and check it lies on the image grid. Returns (X, Y, Z) int32."""
    img = _load_image(path)
    lshape = tuple(int(s) for s in img.shape)
    if len(lshape) == 4 and lshape[3] == 1:
        lshape = lshape[:3]
    if lshape != tuple(shape):
        raise InputDataError(f"{path}: label shape {lshape} differs from image {image_path.name} shape {tuple(shape)}")
    if not np.allclose(img.affine, affine, atol=GEOMETRY_ATOL_MM):
        raise InputDataError(
            f"{path}: label geometry (affine) differs from image {image_path.name}; resample the label onto the image grid"
        )
    if np.issubdtype(img.get_data_dtype(), np.integer) and img.dataobj.slope in (1, None) and img.dataobj.inter in (0, None):
        try:  # integer labels stored without scaling: read them as they are (no float copy, no rounding check)
            return np.asarray(img.dataobj).reshape(lshape).astype(np.int32, copy=False)
        except Exception as exc:
            raise InputDataError(f"{path}: the voxel data cannot be read ({exc.__class__.__name__}: {exc}); the file is probably truncated") from None
    arr = _read_array(img, path, dtype=np.float32).reshape(lshape)
    check_finite(arr, path)
    rounded = np.rint(arr)
    if not np.array_equal(rounded, arr):
        raise InputDataError(f"{path}: label map holds non-integer values; labels must be integer class values")
    return rounded.astype(np.int32)


def write_like(array: np.ndarray, reference: Path, out_path: Path, *, dtype: type | None = None) -> Path:
    """Write ``array`` (X, Y, Z) or (X, Y, Z, C) with the reference scan's header geometry, atomically.

    The reference's affine, sform/qform codes and spatial zooms are kept so that the output lies
    voxel for voxel on the reference scan.
    """
    ref = _load_image(reference)
    if tuple(array.shape[:3]) != tuple(ref.shape[:3]):
        raise InputDataError(f"{out_path}: array shape {array.shape[:3]} differs from reference {reference} {ref.shape[:3]}")
    header = ref.header.copy()
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    header.set_data_dtype(array.dtype)
    header.set_slope_inter(1.0, 0.0)
    out = nib.Nifti1Image(array, ref.affine, header=header)
    sform, scode = ref.header.get_sform(coded=True)
    qform, qcode = ref.header.get_qform(coded=True)
    if scode:
        out.set_sform(sform, int(scode))
    if qcode:
        out.set_qform(qform, int(qcode))
    # The temporary file keeps the NIfTI suffix: nibabel picks the format (and gzip) from it.
    suffix = ".nii.gz" if out_path.name.endswith(".nii.gz") else out_path.suffix
    with atomic_output(out_path, suffix=suffix) as tmp:
        nib.save(out, str(tmp))
    return out_path
