"""Inputs through SimpleITK: a real DICOM series (prediction on the grid of SimpleITK's own conversion), NRRD and MetaImage
round trips of real scans (identical predictions), folders with several series, broken series, unsupported files, and
``images/`` + ``labels/`` datasets mixing formats."""

from __future__ import annotations

import json
import locale
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from ssl3d_cli.cli.app import app
from ssl3d_cli.data.cache import Cache
from ssl3d_cli.data.datasets import discover_dataset, discover_inputs
from ssl3d_cli.data.nifti import load_scan
from ssl3d_cli.errors import InputDataError

runner = CliRunner()
RUN = ["--device", "cpu", "--no-progress", "--json"]
SECOND_UID = "1.2.826.0.1.3680043.2.1125.7"


def run(*args: str | Path):
    return runner.invoke(app, [*map(str, args), *RUN])


def write_dicom_series(folder: Path, volume: np.ndarray, *, uid: str, description: str = "synthetic", number: int = 7,
                       spacing: tuple[float, float, float] = (0.8, 0.9, 2.5), origin: tuple[float, float, float] = (-10.0, -20.0, 30.0),
                       prefix: str = "s", first_index: int = 0) -> Path:
    """Write ``volume`` (z, y, x) as one single-frame CT file per slice with SimpleITK, with the series tags set."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(volume.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    # GDCM's DICOM writer switches the process locale to "C" (seen with SimpleITK 2.5), after which open() without an
    # encoding reads ASCII only: later tests in this process (torch.compile loads UTF-8 templates so) would fail
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_slices(writer, image, folder, uid=uid, description=description, number=number, spacing=spacing, prefix=prefix,
                      first_index=first_index)
    finally:
        locale.setlocale(locale.LC_ALL, saved)
    return folder


def _write_slices(writer: sitk.ImageFileWriter, image: sitk.Image, folder: Path, *, uid: str, description: str, number: int,
                  spacing: tuple[float, float, float], prefix: str, first_index: int) -> None:
    for k in range(image.GetDepth()):
        index = first_index + k
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {"0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{uid}.{prefix}{index + 1}",
                "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": uid, "0008|103e": description, "0020|0011": str(number),
                "0020|0013": str(index + 1), "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0032": "\\".join(f"{v:g}" for v in position),
                "0018|0050": f"{spacing[2]:g}"}
        piece = image[:, :, k]
        for key, value in tags.items():
            piece.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{prefix}{index:03d}.dcm"))
        writer.Execute(piece)


def simpleitk_conversion(folder: Path, out: Path, uid: str = "") -> nib.Nifti1Image:
    """SimpleITK's own DICOM -> NIfTI conversion of a series, read back by nibabel."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
    sitk.WriteImage(reader.Execute(), str(out))
    return nib.load(str(out))


def small_volume(shape: tuple[int, int, int] = (6, 12, 10)) -> np.ndarray:
    """(z, y, x) int16 with a bright block inside (something for the CT model to crop and segment)."""
    vol = np.full(shape, -1000, np.int16)
    vol[1:-1, 2:-2, 2:-2] = 40
    vol[2:-2, 4:-4, 3:-3] = 200
    return vol


# --- a real DICOM series --------------------------------------------------------------------------------------------


def test_dicom_series_prediction_lies_on_simpleitk_conversion_grid(real_dir, model_path, tmp_path):
    dicom = real_dir / "example_ct_dicom"
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in dicom.iterdir()}
    ref = simpleitk_conversion(dicom, tmp_path / "sitk.nii.gz")
    scan = load_scan([dicom])
    assert scan.data.shape == (1, 512, 512, 20)
    np.testing.assert_array_equal(scan.data[0], np.asarray(ref.dataobj))  # same voxel order as SimpleITK's conversion

    r = run("predict", dicom, "--model", model_path, "-o", tmp_path / "p")
    assert r.exit_code == 0, r.output
    seg = nib.load(str(tmp_path / "p" / "example_ct_dicom.nii.gz"))
    assert seg.shape == ref.shape == (512, 512, 20)
    np.testing.assert_allclose(seg.affine, ref.affine, atol=1e-4)
    for form in ("qform", "sform"):  # SimpleITK's writer: code 1 (scanner) for both
        matrix, code = getattr(seg.header, f"get_{form}")(coded=True)
        ref_matrix, ref_code = getattr(ref.header, f"get_{form}")(coded=True)
        assert int(code) == int(ref_code) == 1
        np.testing.assert_allclose(matrix, ref_matrix, atol=1e-4)
    h = seg.header
    assert h.get_intent()[0] == "label" and h["cal_min"] == 0 and h["cal_max"] == np.asarray(seg.dataobj).max()
    assert h["descrip"].item().startswith(b"ssl3d ") and h.get_slope_inter() == (None, None)
    assert h.get_xyzt_units() == ("mm", "unknown")

    record = json.loads((tmp_path / "p" / "example_ct_dicom.provenance.json").read_text())
    (source,) = record["inputs"]
    assert source["path"] == str(dicom.resolve()) and source["files"] == 20 and source["series_uid"] == ""
    r = run("predict", dicom, "--model", model_path, "-o", tmp_path / "p")  # same inputs: kept
    assert r.exit_code == 0 and json.loads(r.stdout)["kept"] == ["example_ct_dicom"], r.output

    r = run("uncertainty", dicom, "--model", model_path, "--mc-samples", "2", "--no-figure", "-o", tmp_path / "u")
    assert r.exit_code == 0, r.output
    for name in ("example_ct_dicom_entropy.nii.gz", "example_ct_dicom_foreground_p50.nii.gz"):
        m = nib.load(str(tmp_path / "u" / name))
        assert m.shape == ref.shape
        np.testing.assert_allclose(m.affine, ref.affine, atol=1e-4)
    assert before == {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in dicom.iterdir()}  # inputs untouched


@pytest.mark.parametrize("name", ["example_ct_sm", "example_mr_sm"])  # RAS and LPS
def test_nrrd_and_mha_round_trips_give_identical_predictions(name, real_dir, model_path, tmp_path):
    src = real_dir / f"{name}.nii.gz"
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(src, scans / "as_nifti.nii.gz")
    image = sitk.ReadImage(str(src))
    sitk.WriteImage(image, str(scans / "as_nrrd.nrrd"))
    sitk.WriteImage(image, str(scans / "as_mha.mha"))
    r = run("predict", scans, "--model", model_path, "--mc-samples", "2", "--seed", "3", "-o", tmp_path / "p")
    assert r.exit_code == 0, r.output
    out = {k: nib.load(str(tmp_path / "p" / f"as_{k}.nii.gz")) for k in ("nifti", "nrrd", "mha")}
    truth = nib.load(str(src))
    for k, img in out.items():
        assert img.shape == truth.shape, k
        np.testing.assert_allclose(img.affine, truth.affine, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(out["nifti"].dataobj))
    r = run("uncertainty", scans / "as_nrrd.nrrd", scans / "as_mha.mha", "--model", model_path, "--mc-samples", "2", "--no-figure",
            "-o", tmp_path / "u")
    assert r.exit_code == 0, r.output
    p50 = [np.asarray(nib.load(str(tmp_path / "u" / f"as_{k}_foreground_p50.nii.gz")).dataobj) for k in ("nrrd", "mha")]
    np.testing.assert_array_equal(p50[0], p50[1])


# --- several series in one folder; --series ---------------------------------------------------------------------------


def test_folder_with_several_series_gives_one_case_each_and_series_picks_one(model_path, tmp_path):
    study = tmp_path / "study"
    write_dicom_series(study, small_volume(), uid=SECOND_UID, description="Abdomen 3.0 / B30f", number=7, prefix="a")
    write_dicom_series(study, small_volume((5, 10, 12)), uid=SECOND_UID + ".2", description="Abdomen 3.0 / B30f", number=7, prefix="b")
    write_dicom_series(study, small_volume(), uid=SECOND_UID + ".3", description="", number=2, prefix="c")
    cases, _ = discover_inputs([study])
    assert [(c.case_id, c.series_uid) for c in cases] == [
        ("study_2", SECOND_UID + ".3"), ("study_7_Abdomen_3_0_B30f", SECOND_UID), ("study_7_Abdomen_3_0_B30f_2", SECOND_UID + ".2")]
    with pytest.raises(InputDataError, match="holds 3 DICOM series.*--series"):
        load_scan([study])
    assert load_scan([study], series_uid=SECOND_UID + ".2").data.shape == (1, 12, 10, 5)

    r = run("predict", study, "--series", SECOND_UID, "--model", model_path, "-o", tmp_path / "p")
    assert r.exit_code == 0, r.output
    ref = simpleitk_conversion(study, tmp_path / "ref.nii.gz", SECOND_UID)
    seg = nib.load(str(tmp_path / "p" / "study.nii.gz"))  # one series picked: named after the folder
    assert seg.shape == ref.shape == (10, 12, 6)
    np.testing.assert_allclose(seg.affine, ref.affine, atol=1e-4)
    assert json.loads((tmp_path / "p" / "study.provenance.json").read_text())["inputs"][0]["series_uid"] == SECOND_UID
    r = run("predict", study, "--series", "9.9.9", "--model", model_path, "-o", tmp_path / "q")
    assert r.exit_code == 2 and "no DICOM series with UID 9.9.9" in r.output and SECOND_UID in r.output and "Traceback" not in r.output


# --- what is refused, in one line -------------------------------------------------------------------------------------


def _broken_folder(problem: str, root: Path) -> Path:
    folder = root / problem.replace(" ", "_")
    if problem == "missing slice":
        write_dicom_series(folder, small_volume((6, 12, 10)), uid=SECOND_UID)
        (folder / "s003.dcm").unlink()
    elif problem == "mixed sizes":
        write_dicom_series(folder, small_volume((4, 12, 10)), uid=SECOND_UID)
        write_dicom_series(folder, small_volume((1, 8, 8)), uid=SECOND_UID, prefix="t", first_index=4, origin=(-10.0, -20.0, 40.0))
    elif problem == "duplicate slice":
        write_dicom_series(folder, small_volume((4, 12, 10)), uid=SECOND_UID)
        shutil.copy(folder / "s001.dcm", folder / "s001_copy.dcm")
    elif problem == "unreadable":
        folder.mkdir()
        (folder / "x.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)
    return folder


@pytest.mark.parametrize("problem,needle", [
    ("missing slice", "non-uniform slice spacing"),
    ("mixed sizes", "mixes slice sizes 10x12 (4 file(s)"),
    ("duplicate slice", "two slices at position"),
    ("unreadable", "no readable DICOM series"),
])
def test_broken_dicom_folders_are_refused_in_one_line(problem, needle, model_path, tmp_path):
    folder = _broken_folder(problem, tmp_path)
    r = run("predict", folder, "--model", model_path, "-o", tmp_path / "p")
    assert r.exit_code == 2, r.output
    assert needle in r.output and str(folder) in r.output and "Traceback" not in r.output, r.output
    if problem == "unreadable":
        assert "dcm2niix" in r.output
    assert not list((tmp_path / "p").glob("*.nii.gz")) if (tmp_path / "p").exists() else True


def test_unsupported_files_name_the_supported_formats(model_path, real_dir, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    r = run("predict", notes, "--model", model_path, "-o", tmp_path / "p")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert all(s in r.output for s in (".nii.gz", ".nrrd", ".mha", "DICOM series")), r.output
    one_slice = sorted((real_dir / "example_ct_dicom").iterdir())[0]
    r = run("predict", one_slice, "--model", model_path, "-o", tmp_path / "p")
    assert r.exit_code == 2 and "a single DICOM file; give the folder" in r.output, r.output
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match="no scans in this folder"):
        discover_inputs([tmp_path / "empty"])


# --- datasets: images/ + labels/ mixing NRRD, MetaImage and DICOM ----------------------------------------------------------


def test_images_labels_dataset_with_nrrd_labels_and_dicom_cases(tmp_path):
    from ssl3d_cli.config import PreprocessConfig
    from ssl3d_cli.stages.preprocess import preprocess

    root = tmp_path / "ds"
    vol = small_volume((6, 12, 10))
    image = sitk.GetImageFromArray(vol)
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    sitk.WriteImage(image, str(root / "images" / "a.nrrd"))
    label = sitk.GetImageFromArray((vol > 100).astype(np.uint8))
    label.CopyInformation(image)
    sitk.WriteImage(label, str(root / "labels" / "a.nrrd"))
    dicom = write_dicom_series(root / "images" / "b", vol, uid=SECOND_UID)
    series = sitk.ImageSeriesReader()
    series.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(dicom), SECOND_UID))
    blabel = sitk.Cast(series.Execute() > 100, sitk.sitkUInt8)
    sitk.WriteImage(blabel, str(root / "labels" / "b.mha"))

    spec = discover_dataset(root)
    assert spec.layout == "images-labels" and [(c.case_id, c.label_path.name, c.series_uid) for c in spec.cases] == [
        ("a", "a.nrrd", None), ("b", "b.mha", SECOND_UID)]
    result = preprocess(root, config=PreprocessConfig(size=(8, 8, 8)), cache_dir=tmp_path / "cache")
    assert sorted(result.processed) == ["a", "b"]
    cache = Cache(tmp_path / "cache")
    assert cache.label("b").max() == 1 and list(cache.dataset.label_values) == [0, 1]
    source = cache.record("b")["sources"][0]
    assert source["files"] == 6 and source["series_uid"] == SECOND_UID and source["path"] == str(dicom)
    assert cache.case_spec("b").series_uid == SECOND_UID and cache.case_spec("a").series_uid is None
    kept = preprocess(root, config=PreprocessConfig(size=(8, 8, 8)), cache_dir=tmp_path / "cache").skipped_up_to_date
    assert [c.case_id for c in kept] == ["a", "b"]
    (dicom / "s002.dcm").touch()  # a changed slice makes the DICOM case stale, not the other one
    again = preprocess(root, config=PreprocessConfig(size=(8, 8, 8)), cache_dir=tmp_path / "cache")
    assert again.processed == ["b"] and [c.case_id for c in again.skipped_up_to_date] == ["a"]

    shifted = sitk.GetImageFromArray((vol > 100).astype(np.uint8))
    shifted.CopyInformation(image)
    shifted.SetOrigin((5.0, 0.0, 0.0))
    sitk.WriteImage(shifted, str(root / "labels" / "a.nrrd"))
    with pytest.raises(InputDataError, match="label geometry .* differs"):
        preprocess(root, config=PreprocessConfig(size=(8, 8, 8)), cache_dir=tmp_path / "cache2")


def test_evaluate_reads_nrrd_and_mha_labels_as_their_nifti(ct_dataset, model_path, tmp_path):
    """``ssl3d evaluate`` against labels in NRRD / MetaImage (a plain folder) gives what the same labels in NIfTI give."""
    cases = ["synthct_000", "synthct_001"]
    r = run("predict", *[ct_dataset / "imagesTr" / f"{c}.nii.gz" for c in cases], "--model", model_path, "-o", tmp_path / "p")
    assert r.exit_code == 0, r.output
    folders = {"nifti": tmp_path / "nifti", "itk": tmp_path / "itk"}
    for folder in folders.values():
        folder.mkdir()
    for case, suffix in zip(cases, (".nrrd", ".mha")):
        source = ct_dataset / "labelsTr" / f"{case}.nii.gz"
        shutil.copy(source, folders["nifti"] / source.name)
        sitk.WriteImage(sitk.ReadImage(str(source)), str(folders["itk"] / f"{case}{suffix}"))
    results = {}
    for name, folder in folders.items():
        r = runner.invoke(app, ["evaluate", str(tmp_path / "p"), str(folder), "--json", "--no-progress"])
        assert r.exit_code == 0, r.output
        results[name] = json.loads(r.stdout)
    assert results["itk"]["evaluated"] == 2
    assert results["itk"]["cases"] == results["nifti"]["cases"] and results["itk"]["label_values"] == results["nifti"]["label_values"]
    shifted = sitk.ReadImage(str(folders["itk"] / "synthct_000.nrrd"))
    shifted.SetOrigin(tuple(o + 5.0 for o in shifted.GetOrigin()))
    sitk.WriteImage(shifted, str(folders["itk"] / "synthct_000.nrrd"))
    r = runner.invoke(app, ["evaluate", str(tmp_path / "p"), str(folders["itk"]), "--no-progress"])
    assert r.exit_code == 2 and "case synthct_000" in r.output and "label's grid" in r.output and "Traceback" not in r.output
    shutil.copy(folders["nifti"] / "synthct_001.nii.gz", folders["itk"])  # the same case twice, in two formats
    r = runner.invoke(app, ["evaluate", str(tmp_path / "p"), str(folders["itk"]), "--no-progress"])
    assert r.exit_code == 2 and "case synthct_001 has two label files, synthct_001.mha and synthct_001.nii.gz" in r.output
