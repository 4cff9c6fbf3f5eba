"""Outputs open right in viewers: the source's geometry (affine, qform/sform and their codes) is kept bit for bit, and every
other header field describes the written map, not the scan (display range, description, scaling, intent, units).

The source is a real scan (RAS and LPS) given a scanner-like header: qform 1 / sform 2, cal -1024..3071, a descrip, a
stored scaling slope of 2, aux_file, db_name, an intent, seconds as time unit and a time offset."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from ssl3d_cli import __version__
from ssl3d_cli.cli.app import app
from ssl3d_cli.data.colour_tables import read_itksnap_labels, read_slicer_table

runner = CliRunner()
RUN = ["--device", "cpu", "--no-progress", "--json", "--mc-samples", "2", "--seed", "1"]
GEOMETRY = ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z",
            "qform_code", "sform_code")


def scanner_nifti(src: Path, out: Path) -> Path:
    """``src`` re-written with a scanner-like header, and scl_slope 2 stored in the file (the data read doubles)."""
    img = nib.load(str(src))
    raw = np.asarray(img.dataobj).astype(np.int16)
    new = nib.Nifti1Image(raw, img.affine)
    new.set_qform(img.affine, 1)
    new.set_sform(img.affine, 2)
    h = new.header
    h["cal_min"], h["cal_max"] = -1024, 3071
    h["descrip"] = b"SCANNER X"
    h["aux_file"] = b"scanner_lut.txt"
    h["db_name"] = b"PACS"
    h.set_intent("z score")
    h.set_xyzt_units("mm", "sec")
    h["toffset"] = 3.5
    nib.save(new, str(out))
    data = bytearray(out.read_bytes())
    data[112:120] = struct.pack("<ff", 2.0, 0.0)  # scl_slope, scl_inter: nibabel would not store a slope it does not need
    out.write_bytes(bytes(data))
    with out.open("rb") as fh:  # (nibabel moves a loaded file's scaling from img.header into img.dataobj)
        assert nib.Nifti1Header.from_fileobj(fh).get_slope_inter() == (2.0, 0.0)
    assert nib.load(str(out)).dataobj.slope == 2.0
    return out


def raw_header(path: Path) -> nib.Nifti1Header:
    """The header as stored in the file (nibabel's loaded ``img.header`` has the scaling moved into ``img.dataobj``)."""
    img = nib.load(str(path))
    return nib.Nifti1Header.from_fileobj(img.file_map["image"].get_prepare_fileobj("rb"))


def check_common(img: nib.Nifti1Image, source: nib.Nifti1Image, what: str) -> None:
    h, s = img.header, source.header
    stored = raw_header(Path(img.get_filename()))
    assert (float(stored["scl_slope"]), float(stored["scl_inter"])) == (1.0, 0.0), what  # identity: no scaling (the source had 2)
    assert img.dataobj.slope == 1.0 and img.dataobj.inter == 0.0, what
    for name in GEOMETRY:
        np.testing.assert_array_equal(h[name], s[name], err_msg=f"{what}: {name}")
    np.testing.assert_array_equal(img.affine, source.affine)
    np.testing.assert_array_equal(h["pixdim"][:4], s["pixdim"][:4])
    assert h.get_slope_inter() == (None, None), what
    assert h["descrip"].item().startswith(f"ssl3d {__version__} ".encode()) and b"SCANNER" not in h["descrip"].item(), what
    assert h["aux_file"].item() == b"" and h["db_name"].item() == b"", what
    assert h.get_xyzt_units() == ("mm", "unknown") and h["toffset"] == 0, what


@pytest.mark.parametrize("name", ["example_ct_sm", "example_mr_sm"])  # RAS and LPS
def test_every_output_header_is_clean_and_keeps_the_geometry(name, real_dir, model_path, tmp_path):
    source_path = scanner_nifti(real_dir / f"{name}.nii.gz", tmp_path / "scanner.nii")
    source = nib.load(str(source_path))

    r = runner.invoke(app, ["predict", str(source_path), "--model", str(model_path), "--save-probabilities", "-o", str(tmp_path / "p"), *RUN])
    assert r.exit_code == 0, r.output
    seg = nib.load(str(tmp_path / "p" / "scanner.nii.gz"))
    check_common(seg, source, "segmentation")
    values = np.asarray(seg.dataobj)
    assert seg.header.get_intent() == ("label", (), "labels")
    assert (seg.header["cal_min"], seg.header["cal_max"]) == (0, values.max())

    probs = nib.load(str(tmp_path / "p" / "scanner_probabilities.nii.gz"))
    check_common(probs, source, "probabilities")
    assert probs.ndim == 4 and probs.header["pixdim"][4] == 1.0
    assert probs.header.get_intent() == ("estimate", (), "class probs")
    assert (probs.header["cal_min"], probs.header["cal_max"]) == (0, 1)
    record = json.loads((tmp_path / "p" / "scanner.provenance.json").read_text())
    assert record["probabilities_axis"]["axis"] == 3
    assert record["probabilities_axis"]["class_names"][0] == "background"
    assert len(record["probabilities_axis"]["class_names"]) == probs.shape[3]
    # the segments open named: both viewer tables sit next to the predictions, one row per class value of the model
    out = json.loads(r.stdout.strip().splitlines()[-1])
    names = dict(zip(record["probabilities_axis"]["label_values"], record["probabilities_axis"]["class_names"]))
    slicer, itksnap = read_slicer_table(Path(out["label_tables"]["slicer"])), read_itksnap_labels(Path(out["label_tables"]["itksnap"]))
    assert Path(out["label_tables"]["slicer"]).parent == tmp_path / "p"
    assert {v: e.name for v, e in slicer.items()} == {v: n.replace("_", " ") for v, n in names.items()}
    assert {v: e.name for v, e in itksnap.items()} == names
    assert set(np.unique(values)) <= set(names)

    r = runner.invoke(app, ["uncertainty", str(source_path), "--model", str(model_path), "--no-figure", "-o", str(tmp_path / "u"), *RUN])
    assert r.exit_code == 0, r.output
    classes = len(record["probabilities_axis"]["class_names"])
    expected = {"scanner.nii.gz": ("label", "labels", None), "scanner_foreground_p05.nii.gz": ("estimate", "p05", 1.0),
                "scanner_foreground_p95.nii.gz": ("estimate", "p95", 1.0), "scanner_foreground_std.nii.gz": ("estimate", "std", 1.0),
                "scanner_entropy.nii.gz": ("estimate", "entropy", np.log(classes)),
                "scanner_mutual_information.nii.gz": ("estimate", "mutual info", np.log(classes))}
    for file, (intent, intent_name, top) in expected.items():
        img = nib.load(str(tmp_path / "u" / file))
        check_common(img, source, file)
        assert img.header.get_intent() == (intent, (), intent_name), file
        data = np.asarray(img.dataobj)
        assert img.header["cal_min"] == 0 and img.header["cal_max"] == pytest.approx(data.max() if top is None else top, rel=1e-6), file
        assert data.max() <= img.header["cal_max"] + 1e-6, file
