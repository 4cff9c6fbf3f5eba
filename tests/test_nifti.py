import nibabel as nib
import numpy as np
import pytest

from ssl3d_cli.data.nifti import load_label, load_scan, write_like
from ssl3d_cli.errors import InputDataError
from tests.conftest import save_nifti


def test_write_like_keeps_geometry_exactly(tmp_path):
    ref = save_nifti(tmp_path / "ref.nii.gz", np.random.rand(7, 5, 4).astype(np.float32))
    out = write_like(np.ones((7, 5, 4), np.uint8), ref, tmp_path / "out.nii.gz", dtype=np.uint8)
    a, b = nib.load(str(ref)), nib.load(str(out))
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.affine, b.affine)
    assert b.header.get_data_dtype() == np.uint8
    assert int(b.header["sform_code"]) == int(a.header["sform_code"])
    np.testing.assert_allclose(a.header.get_zooms()[:3], b.header.get_zooms()[:3])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_load_scan_3d_4d_and_channel_files(tmp_path):
    a = save_nifti(tmp_path / "a.nii.gz", np.random.rand(6, 5, 4).astype(np.float32))
    b = save_nifti(tmp_path / "b.nii.gz", np.random.rand(6, 5, 4).astype(np.float32))
    four = save_nifti(tmp_path / "c.nii.gz", np.random.rand(6, 5, 4, 2).astype(np.float32))
    assert load_scan([a]).data.shape == (1, 6, 5, 4)
    assert load_scan([a, b]).data.shape == (2, 6, 5, 4)
    assert load_scan([four], expected_channels=2).data.shape == (2, 6, 5, 4)
    with pytest.raises(InputDataError, match="c.nii.gz.*4D image"):
        load_scan([four], expected_channels=1)
    with pytest.raises(InputDataError, match="c.nii.gz.*3D image"):
        load_scan([a, four])


@pytest.mark.parametrize("kind", ["2d", "nan", "truncated", "not-nifti"])
def test_bad_images_name_the_file(tmp_path, kind):
    path = tmp_path / "bad.nii.gz"
    if kind == "2d":
        save_nifti(path, np.zeros((8, 8), np.float32), np.eye(4))
    elif kind == "nan":
        arr = np.zeros((4, 4, 4), np.float32)
        arr[1, 1, 1] = np.nan
        save_nifti(path, arr)
    elif kind == "truncated":
        save_nifti(path, np.random.rand(20, 20, 20).astype(np.float32))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path = tmp_path / "bad.txt"
        path.write_text("hello")
    with pytest.raises(InputDataError, match="bad"):
        load_scan([path])


def test_label_grid_mismatch(tmp_path):
    img = save_nifti(tmp_path / "img.nii.gz", np.zeros((6, 5, 4), np.float32))
    lab = save_nifti(tmp_path / "lab.nii.gz", np.zeros((6, 5, 4), np.uint8), np.eye(4))
    scan = load_scan([img])
    with pytest.raises(InputDataError, match="lab.nii.gz.*geometry"):
        load_label(lab, shape=scan.spatial_shape, affine=scan.affine, image_path=img)
    lab2 = save_nifti(tmp_path / "lab2.nii.gz", np.zeros((6, 5, 3), np.uint8))
    with pytest.raises(InputDataError, match="lab2.nii.gz.*shape"):
        load_label(lab2, shape=scan.spatial_shape, affine=scan.affine, image_path=img)


def test_gzip_sanity(tmp_path):
    # a .nii.gz that is not gzip at all is also reported with the file name
    path = tmp_path / "plain.nii.gz"
    path.write_bytes(b"\x00" * 400)
    with pytest.raises(InputDataError, match="plain.nii.gz"):
        load_scan([path])
