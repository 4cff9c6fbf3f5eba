"""``ssl3d uncertainty`` as a first-class output: label folders, file names per target, the segmentation and provenance
from the same MC pass, the help text, and a figure that shows the scan and says what its colours mean."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from ssl3d_cli.cli.app import app

runner = CliRunner()
MC = ["--mc-samples", "3", "--seed", "5", "--device", "cpu", "--no-progress"]


def uncertainty(*args: str | Path, figure: bool = False):
    return runner.invoke(app, ["uncertainty", *map(str, args), *MC, "--json", *([] if figure else ["--no-figure"])])


def scan(ct_dataset: Path, case: str) -> Path:
    folder = "imagesTr" if int(case.rsplit("_", 1)[1]) < 8 else "imagesTs"
    return ct_dataset / folder / f"{case}.nii.gz"


def flat(text: str) -> str:
    """Help text with rich's box characters and line breaks folded away."""
    return " ".join(text.replace("│", " ").split())


# --- 1. --label: a file for one case, a folder matched by case name for several ------------------------------------


@pytest.mark.parametrize("where", ["labels folder", "dataset folder"])
def test_label_folder_is_matched_by_case_name_for_several_inputs(where, ct_dataset, model_path, tmp_path):
    labels = ct_dataset / "labelsTr" if where == "labels folder" else ct_dataset
    cases = ["synthct_000", "synthct_001", "synthct_008"]  # synthct_008 (imagesTs) has no label
    r = uncertainty(*[scan(ct_dataset, c) for c in cases], "--model", model_path, "--class", "organ", "--label", labels,
                    "-o", tmp_path / "u", figure=True)
    assert r.exit_code == 0, r.output
    by_case = {c["case"]: c for c in json.loads(r.stdout)["cases"]}
    assert sorted(by_case) == cases
    for case in ("synthct_000", "synthct_001"):
        assert Path(by_case[case]["label"]).resolve() == (ct_dataset / "labelsTr" / f"{case}.nii.gz").resolve()
        assert by_case[case]["outline"] == "label"
    assert by_case["synthct_008"]["label"] is None and by_case["synthct_008"]["outline"] == "prediction"
    assert "1 case(s) have no label" in r.stderr and "synthct_008" in r.stderr
    assert all(Path(c["figure"]).exists() for c in by_case.values())
    r = uncertainty(scan(ct_dataset, "synthct_001"), "--model", model_path, "--label", labels, "-o", tmp_path / "one")  # one input
    assert r.exit_code == 0, r.output
    assert Path(json.loads(r.stdout)["cases"][0]["label"]).name == "synthct_001.nii.gz"


def test_label_file_with_several_cases_and_a_folder_that_matches_nothing_are_refused(ct_dataset, model_path, tmp_path):
    two = [scan(ct_dataset, "synthct_000"), scan(ct_dataset, "synthct_001")]
    r = uncertainty(*two, "--model", model_path, "--label", ct_dataset / "labelsTr" / "synthct_000.nii.gz", "-o", tmp_path / "a")
    assert r.exit_code == 2 and "give a folder" in r.output and "Traceback" not in r.output, r.output
    other = tmp_path / "other_labels"
    other.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), str(other / "someone_else.nii.gz"))
    r = uncertainty(*two, "--model", model_path, "--label", other, "-o", tmp_path / "b")
    assert r.exit_code == 2 and "no label matches" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").glob("*.nii.gz"))


def test_label_on_another_grid_is_refused_before_any_file_is_written(ct_dataset, model_path, tmp_path):
    r = uncertainty(scan(ct_dataset, "synthct_000"), "--model", model_path, "--label", ct_dataset / "labelsTr" / "synthct_001.nii.gz",
                    "-o", tmp_path / "u", figure=True)
    assert r.exit_code == 2 and "does not lie on the grid" in r.output, r.output
    assert not list((tmp_path / "u").glob("synthct_000*"))


# --- 2. file names carry the target ----------------------------------------------------------------------------------


def test_maps_of_each_target_have_their_own_files(ct_dataset, model_path, tmp_path):
    out, case = tmp_path / "u", "synthct_000"
    for classes in (["organ"], ["lesion"], [], ["2", "organ"]):
        r = uncertainty(scan(ct_dataset, case), "--model", model_path, *[a for c in classes for a in ("--class", c)], "-o", out)
        assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["target"] == "organ+lesion" and res["target_file"] == "organ+lesion"  # canonical: class order, names not values
    for target in ("organ", "lesion", "foreground", "organ+lesion"):
        for kind in ("p05", "p50", "p95", "std"):
            assert (out / f"{case}_{target}_{kind}.nii.gz").exists(), (target, kind)
    for kind in ("entropy", "mutual_information"):  # over all classes: one file whatever the target
        assert (out / f"{case}_{kind}.nii.gz").exists()
    assert not list(out.glob(f"{case}_p05*")) and not list(out.glob(f"{case}_std*"))
    p95 = {t: np.asarray(nib.load(str(out / f"{case}_{t}_p95.nii.gz")).dataobj) for t in ("organ", "lesion", "foreground")}
    assert not np.array_equal(p95["organ"], p95["lesion"])  # the second run did not overwrite the first
    assert (p95["foreground"] >= p95["organ"] - 1e-6).all()
    r = uncertainty(scan(ct_dataset, case), "--model", model_path, "--class", "1", "-o", out)  # a class value names the class
    assert json.loads(r.stdout)["target_file"] == "organ"


def test_target_names_are_safe_file_names():
    from ssl3d_cli.inference.uncertainty import target_file_name

    assert target_file_name("organ") == "organ" and target_file_name("WT") == "WT"
    assert target_file_name("organ+lesion") == "organ+lesion"
    assert target_file_name("left kidney/cortex") == "left-kidney-cortex"
    assert target_file_name("..") == "target"


# --- 3. one MC pass: the segmentation, per-case provenance and uncertainty_args.json ------------------------------


def test_one_pass_writes_the_segmentation_as_predict_does_with_provenance(ct_dataset, model_path, tmp_path):
    case, out = "synthct_000", tmp_path / "u"
    base = [scan(ct_dataset, case), "--model", model_path, "--class", "organ", "-o", out]
    r = uncertainty(*base)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["vote"] == "majority" and res["written"] == [{"case": case, "why": "new"}]
    r = runner.invoke(app, ["predict", str(scan(ct_dataset, case)), "--model", str(model_path), "-o", str(tmp_path / "p"), "--json", *MC])
    assert r.exit_code == 0, r.output
    ours, theirs = nib.load(str(out / f"{case}.nii.gz")), nib.load(str(tmp_path / "p" / f"{case}.nii.gz"))
    assert ours.get_data_dtype() == theirs.get_data_dtype()
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
    np.testing.assert_array_equal(ours.affine, theirs.affine)

    record = json.loads((out / f"{case}.provenance.json").read_text())
    predicted = json.loads((tmp_path / "p" / f"{case}.provenance.json").read_text())
    assert record["model"]["sha256"] == predicted["model"]["sha256"] and record["mc"] == predicted["mc"]
    assert record["outputs"] == {"segmentation": f"{case}.nii.gz", "entropy": f"{case}_entropy.nii.gz",
                                 "mutual_information": f"{case}_mutual_information.nii.gz"}
    maps = json.loads((out / f"{case}_organ.provenance.json").read_text())
    assert maps["target"]["name"] == "organ" and maps["target"]["class_indices"] == [1]
    assert maps["outputs"]["p05"] == f"{case}_organ_p05.nii.gz" and maps["outputs"]["std"] == f"{case}_organ_std.nii.gz"
    args = json.loads((out / "uncertainty_args.json").read_text())
    assert args["status"] == "finished" and args["target"]["name"] == "organ" and args["percentiles"] == [5.0, 50.0, 95.0]
    assert args["model"]["sha256"] == record["model"]["sha256"] and args["mc"]["mc_samples"] == 3
    assert [w["case"] for w in args["written"]] == [case] and args["written"][0]["provenance"] == f"{case}.provenance.json"

    # equal provenance: kept, nothing rewritten; predict with the same settings keeps the segmentation too
    stamp = (out / f"{case}_organ_p05.nii.gz").stat().st_mtime_ns
    r = uncertainty(*base)
    assert json.loads(r.stdout)["kept"] == [case] and json.loads(r.stdout)["cases"] == []
    assert (out / f"{case}_organ_p05.nii.gz").stat().st_mtime_ns == stamp
    r = uncertainty(*base, "--overwrite")
    assert json.loads(r.stdout)["written"] == [{"case": case, "why": "--overwrite"}]
    r = runner.invoke(app, ["predict", str(scan(ct_dataset, case)), "--model", str(model_path), "-o", str(out), "--json", *MC])
    assert json.loads(r.stdout)["skipped_existing"] == 1, r.output
    # another target needs its own maps: recomputed; other settings: recomputed, and the reason says which
    r = uncertainty(scan(ct_dataset, case), "--model", model_path, "--class", "lesion", "-o", out)
    assert "organ" not in json.loads(r.stdout)["written"][0]["why"] and json.loads(r.stdout)["written"][0]["why"]
    r = uncertainty(*base, "--vote", "borda")
    why = json.loads(r.stdout)["written"][0]["why"]
    assert "settings changed" in why and "borda" in why
    assert json.loads((out / f"{case}.provenance.json").read_text())["mc"]["vote"] == "borda"


def test_vote_options_are_checked_as_predict_checks_them(ct_dataset, model_path, tmp_path):
    r = uncertainty(scan(ct_dataset, "synthct_000"), "--model", model_path, "--vote", "weighted", "-o", tmp_path / "u")
    assert r.exit_code == 2 and "--vote-weights" in r.output, r.output
    r = uncertainty(scan(ct_dataset, "synthct_000"), "--model", model_path, "--vote", "union", "--union-class", "lesion", "-o", tmp_path / "u")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "u" / "synthct_000.provenance.json").read_text())["vote"]["union_classes"] == [2]


# --- 4. the help says what the defaults are ------------------------------------------------------------------------


def test_help_states_the_default_target_and_why_sample_counts_differ():
    r = runner.invoke(app, ["uncertainty", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    text = flat(r.output)
    assert "all foreground classes summed" in text
    assert "at least 2" in text and "default 100" in text and "ssl3d predict" in text and "one deterministic pass" in text


# --- 5. the figure: the scan under the heat map, a colour bar that says what it means ------------------------------


def test_figure_shows_the_scan_slice_and_a_meaningful_colour_bar():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from ssl3d_cli.inference.figures import choose_slice, uncertainty_plot

    rng = np.random.default_rng(0)
    body = rng.normal(100.0, 20.0, (12, 10, 6)).astype(np.float32)
    p = np.zeros((12, 10, 6), np.float32)
    p[3:8, 2:6, 2:4] = 0.9
    fig = uncertainty_plot({"5th percentile": p * 0.5, "95th percentile": p}, p > 0.5, case_id="c0", target="organ",
                           outline_label="true organ", scan=body)
    try:
        z = choose_slice(p > 0.5)
        panels = [ax for ax in fig.axes if ax.get_title().endswith("percentile")]
        assert len(panels) == 2
        for ax in panels:
            under, over = ax.images[0], ax.images[1]
            assert under.get_cmap().name == "gray"
            np.testing.assert_array_equal(np.asarray(under.get_array()), np.rot90(body[:, :, z]))
            assert over.get_clim() == (0.0, 1.0)
        label = fig.axes[-1].get_ylabel()
        assert "probability of organ" in label and "0" in label and "1" in label
        texts = " ".join([t.get_text() for t in fig.texts] + [label]).lower()
        assert "blue: uncertain" not in texts and "red: certain" not in texts
    finally:
        plt.close(fig)


def test_the_command_hands_the_scan_it_read_to_the_figure(ct_dataset, model_path, tmp_path, monkeypatch):
    import importlib

    stage = importlib.import_module("ssl3d_cli.stages.uncertainty")  # ssl3d_cli.stages.uncertainty is also the function's name
    seen = {}
    real = stage.uncertainty_figure

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(stage, "uncertainty_figure", spy)
    path = scan(ct_dataset, "synthct_000")
    r = uncertainty(path, "--model", model_path, "--class", "organ", "-o", tmp_path / "u", figure=True)
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(seen["scan"], np.asarray(nib.load(str(path)).dataobj, dtype=np.float32))
    assert (tmp_path / "u" / "synthct_000_organ_uncertainty.png").read_bytes()[:4] == b"\x89PNG"


def test_read_case_prepares_the_scan_exactly_as_predict_does(ct_dataset, model_path):
    import torch

    from ssl3d_cli.config import RuntimeConfig
    from ssl3d_cli.data.datasets import CaseSpec
    from ssl3d_cli.inference.pipeline import open_segmenter, prepare_case
    from ssl3d_cli.stages.uncertainty import read_case

    seg = open_segmenter(model_path, RuntimeConfig(device="cpu"))
    case = CaseSpec("synthct_000", [scan(ct_dataset, "synthct_000")])
    raw, image, geometry = read_case(seg, case)
    ref_image, ref_geometry = prepare_case(seg, case)
    assert torch.equal(image, ref_image) and geometry.to_dict() == ref_geometry.to_dict()
    assert raw.data.shape[1:] == nib.load(str(case.image_paths[0])).shape


def test_boolean_options_come_in_on_off_pairs(monkeypatch, tmp_path):
    import importlib

    stage = importlib.import_module("ssl3d_cli.stages.uncertainty")
    calls = []
    monkeypatch.setattr(stage, "uncertainty", lambda *a, **kw: calls.append(kw) or {"failed": []})
    for flags in (["--no-figure", "--overwrite"], ["--figure", "--no-overwrite"]):
        r = runner.invoke(app, ["uncertainty", str(tmp_path), *flags, "--json"])
        assert r.exit_code == 0, r.output
    assert [(c["figure"], c["overwrite"]) for c in calls] == [(False, True), (True, False)]
