"""Predictions a pipeline can trust: provenance-checked outputs, the right model, batches that do not stop at a bad scan."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ssl3d_cli import __version__, checkpoints
from ssl3d_cli.cli.app import app

runner = CliRunner()
OTHER_DATASET = "Task98_Other"


def variant(model: Path, dest: Path, *, dataset: str | None = None, nudge: float = 0.0) -> Path:
    """A copy of ``model`` with its weights nudged (another model file) or its dataset renamed (a model of another dataset)."""
    payload = checkpoints.load_checkpoint(model, fmt=checkpoints.SEGMENTER)
    if nudge:
        payload["state_dict"] = {k: v + nudge if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    if dataset:
        payload["dataset"] = {**payload["dataset"], "name": dataset}
    dest.mkdir(parents=True, exist_ok=True)
    torch.save(payload, dest / "model.pt")
    return dest / "model.pt"


@pytest.fixture(scope="module")
def model_b(model_path, tmp_path_factory):
    """Another model file of the same dataset (model A's weights, nudged)."""
    return variant(model_path, tmp_path_factory.mktemp("seg_b") / "finetune-b", nudge=1e-3)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def predict(*args: str | Path):
    return runner.invoke(app, ["predict", *map(str, args), "--device", "cpu", "--json", "--no-progress"])


def one_scan(ct_dataset: Path, folder: Path, name: str = "synthct_008") -> Path:
    """A scan copied out of the dataset (outside any dataset folder, free to touch)."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(ct_dataset / "imagesTs" / f"{name}.nii.gz", folder / f"{name}.nii.gz"))


# --- outputs that never lie about where they came from -------------------------------------------------------------


def test_another_model_recomputes_and_every_record_names_it(ct_dataset, model_path, model_b, tmp_path):
    out = tmp_path / "preds"
    r = predict(ct_dataset / "imagesTs", "--model", model_path, "-o", out)
    assert r.exit_code == 0, r.output
    record = json.loads((out / "synthct_008.provenance.json").read_text())
    assert record["model"]["sha256"] == sha256(model_path) and record["tool_version"] == __version__
    assert record["mc"]["dropout_encoder"] == 0.3 and record["seed"] == 0 and record["vote"]["rule"] == "majority"
    assert record["inputs"][0]["path"] == str((ct_dataset / "imagesTs" / "synthct_008.nii.gz").resolve())
    assert {"size", "mtime_ns"} <= set(record["inputs"][0]) and record["outputs"] == {"segmentation": "synthct_008.nii.gz"}

    r = predict(ct_dataset / "imagesTs", "--model", model_b, "-o", out)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["predicted"] == 2 and res["skipped_existing"] == 0
    assert "case synthct_008: recomputed (model changed)" in r.stderr
    for case in ("synthct_008", "synthct_009"):
        assert json.loads((out / f"{case}.provenance.json").read_text())["model"]["sha256"] == sha256(model_b)
    args = json.loads((out / "predict_args.json").read_text())
    assert args["model"]["sha256"] == sha256(model_b) and args["status"] == "finished"
    assert [w["why"] for w in args["written"]] == ["model changed", "model changed"] and args["kept"] == []

    r = predict(ct_dataset / "imagesTs", "--model", model_b, "-o", out)
    assert json.loads(r.stdout)["predicted"] == 0
    args = json.loads((out / "predict_args.json").read_text())
    assert args["written"] == [] and [k["provenance"] for k in args["kept"]] == ["synthct_008.provenance.json", "synthct_009.provenance.json"]


@pytest.mark.parametrize("change", [
    ["--mc-samples", "3"],
    ["--vote", "borda"],
    ["--seed", "1"],
    ["--dropout-encoder", "0.2"],
    ["--vote", "weighted", "--vote-weights", "1,2,2"],
    ["--vote", "union", "--union-class", "lesion"],
])
def test_changed_settings_recompute_same_settings_keep(change, ct_dataset, model_path, tmp_path):
    scan = ct_dataset / "imagesTs" / "synthct_008.nii.gz"
    base = [scan, "--model", model_path, "-o", tmp_path / "o", "--mc-samples", "2"]
    assert predict(*base).exit_code == 0
    r = predict(*base, *change)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["predicted"] == 1, r.output
    assert "case synthct_008: recomputed (settings changed: " in r.stderr
    r = predict(*base, *change)
    assert json.loads(r.stdout)["kept"] == ["synthct_008"]


def test_missing_or_unrecorded_files_recompute(ct_dataset, model_path, tmp_path):
    out = tmp_path / "o"
    base = [ct_dataset / "imagesTs", "--model", model_path, "-o", out]
    assert json.loads(predict(*base).stdout)["predicted"] == 2
    r = predict(*base, "--save-probabilities")  # asked for now, never written before
    assert json.loads(r.stdout)["predicted"] == 2, r.output
    assert [w["why"] for w in json.loads(r.stdout)["written"]] == ["no recorded probabilities file"] * 2
    (out / "synthct_009_probabilities.nii.gz").unlink()
    r = predict(*base, "--save-probabilities")
    assert json.loads(r.stdout)["predicted"] == 1, r.output
    assert json.loads(r.stdout)["written"] == [{"case": "synthct_009", "why": "probabilities file missing"}]
    assert (out / "synthct_009_probabilities.nii.gz").exists()
    (out / "synthct_008.provenance.json").unlink()  # e.g. a run killed between the NIfTI files and the record
    r = predict(*base)
    assert json.loads(r.stdout)["predicted"] == 1, r.output
    assert json.loads(r.stdout)["written"] == [{"case": "synthct_008", "why": "no provenance record"}]
    assert not (out / "synthct_008_probabilities.nii.gz").exists()  # the old run's file does not outlive the labels it went with


def test_changed_input_recomputes(ct_dataset, model_path, tmp_path):
    scan = one_scan(ct_dataset, tmp_path / "scans")
    base = [scan, "--model", model_path, "-o", tmp_path / "o"]
    assert json.loads(predict(*base).stdout)["predicted"] == 1
    os.utime(scan, ns=(scan.stat().st_atime_ns, scan.stat().st_mtime_ns + 10**9))
    r = predict(*base)
    assert json.loads(r.stdout)["predicted"] == 1, r.output
    assert json.loads(r.stdout)["written"] == [{"case": "synthct_008", "why": "input file changed"}]


# --- the right model --------------------------------------------------------------------------------------------------


@pytest.fixture
def runs_root(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("SSL3D_RUNS_DIR", str(root))
    return root


def add_run(root: Path, name: str, model: Path, *, dataset: str | None = None, age_s: int = 0) -> Path:
    """A fine-tuned run folder under ``root`` whose model.pt is ``age_s`` seconds old."""
    if dataset:
        path = variant(model, root / name, dataset=dataset)
    else:
        shutil.copytree(model.parent, root / name)
        path = root / name / "model.pt"
    stamp = path.stat().st_mtime - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_without_model_the_newest_run_of_the_same_dataset_is_named_under_quiet(ct_dataset, model_path, runs_root, tmp_path):
    same = add_run(runs_root, "finetune-Task99_SynthCT-20240101-000000", model_path, age_s=3600)
    add_run(runs_root, f"finetune-{OTHER_DATASET}-20240202-000000", model_path, dataset=OTHER_DATASET)  # newer, another dataset
    r = predict(ct_dataset / "imagesTs", "-o", tmp_path / "o", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"] == str(same)
    assert str(same) in r.stderr and "newest fine-tuned run of Task99_SynthCT" in r.stderr


def test_the_dataset_an_input_belongs_to(ct_dataset, mr_brats_dataset, tmp_path):
    from ssl3d_cli.stages.predict import input_dataset

    assert input_dataset(ct_dataset) == input_dataset(ct_dataset / "imagesTs") == "Task99_SynthCT"
    assert input_dataset(ct_dataset / "imagesTs" / "synthct_008.nii.gz") == "Task99_SynthCT"
    brats_case = sorted(p for p in mr_brats_dataset.iterdir() if p.is_dir())[0]
    assert input_dataset(brats_case) == input_dataset(mr_brats_dataset) == mr_brats_dataset.name
    assert input_dataset(one_scan(ct_dataset, tmp_path / "loose")) is None


@pytest.mark.parametrize("command", ["predict", "uncertainty"])
def test_without_model_a_run_of_another_dataset_is_refused(command, ct_dataset, model_path, runs_root, tmp_path):
    add_run(runs_root, f"finetune-{OTHER_DATASET}-20240202-000000", model_path, dataset=OTHER_DATASET)
    r = runner.invoke(app, [command, str(ct_dataset / "imagesTs" / "synthct_008.nii.gz"), "-o", str(tmp_path / "o"), "--device", "cpu",
                            "--mc-samples", "2"])
    assert r.exit_code == 2, r.output
    assert "no run fine-tuned on Task99_SynthCT" in r.output and "--model" in r.output
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.nii.gz"))


def test_loose_scans_need_model_unless_exactly_one_run(ct_dataset, model_path, runs_root, tmp_path):
    scan = one_scan(ct_dataset, tmp_path / "loose")
    first = add_run(runs_root, "finetune-Task99_SynthCT-20240101-000000", model_path)
    r = predict(scan, "-o", tmp_path / "o1", "-q")
    assert r.exit_code == 0, r.output
    assert str(first) in r.stderr and "the only fine-tuned run" in r.stderr
    add_run(runs_root, f"scratch-{OTHER_DATASET}-20240202-000000", model_path, dataset=OTHER_DATASET)
    r = predict(scan, "-o", tmp_path / "o2")
    assert r.exit_code == 2 and "2 fine-tuned runs" in r.output and "--model" in r.output, r.output


@pytest.mark.parametrize("command", ["predict", "uncertainty"])
def test_model_may_be_a_run_folder(command, ct_dataset, model_path, tmp_path):
    r = runner.invoke(app, [command, str(ct_dataset / "imagesTs" / "synthct_008.nii.gz"), "--model", str(model_path.parent),
                            "-o", str(tmp_path / "o"), "--device", "cpu", "--mc-samples", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"] == str(model_path)
    r = runner.invoke(app, [command, str(ct_dataset / "imagesTs" / "synthct_008.nii.gz"), "--model", str(tmp_path), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "holds no model.pt" in r.output, r.output


# --- batches that do not stop at the first bad scan -------------------------------------------------------------------


@pytest.fixture
def scans_with_a_bad_one(ct_dataset, tmp_path):
    """Four scans, the second (synthct_001) unreadable."""
    folder = tmp_path / "scans"
    for name in ("synthct_008", "synthct_009"):
        one_scan(ct_dataset, folder, name)
    shutil.copy2(ct_dataset / "imagesTr" / "synthct_000.nii.gz", folder / "synthct_000.nii.gz")
    (folder / "synthct_001.nii.gz").write_bytes(b"not a scan")
    return folder


def test_predict_skip_bad_goes_on_lists_and_exits_4(scans_with_a_bad_one, model_path, tmp_path):
    out = tmp_path / "o"
    r = predict(scans_with_a_bad_one, "--model", model_path, "-o", out, "--skip-bad")
    assert r.exit_code == 4, r.output
    res = json.loads(r.stdout)
    assert res["predicted"] == 3 and [f["case"] for f in res["failed"]] == ["synthct_001"]
    assert "synthct_001.nii.gz" in res["failed"][0]["error"]
    assert "1 case(s) failed (synthct_001" in r.stderr
    assert not list(out.glob("synthct_001*"))
    assert json.loads((out / "predict_args.json").read_text())["failed"] == res["failed"]
    r = runner.invoke(app, ["predict", str(scans_with_a_bad_one), "--model", str(model_path), "-o", str(out), "--skip-bad"])
    assert r.exit_code == 4 and "failed synthct_001: " in r.stdout, r.output


def test_predict_stops_at_a_bad_scan_counting_the_cases_left(scans_with_a_bad_one, model_path, tmp_path):
    out = tmp_path / "o"
    r = predict(scans_with_a_bad_one, "--model", model_path, "-o", out)
    assert r.exit_code == 2, r.output
    assert "synthct_001.nii.gz" in r.stderr and "3 of 4 case(s) not processed" in r.stderr and "--skip-bad" in r.stderr
    args = json.loads((out / "predict_args.json").read_text())
    assert args["status"] == "stopped" and [w["case"] for w in args["written"]] == ["synthct_000"]
    assert args["not_processed"] == ["synthct_008", "synthct_009"]


def test_uncertainty_skip_bad(scans_with_a_bad_one, model_path, tmp_path):
    out = tmp_path / "u"
    r = runner.invoke(app, ["uncertainty", str(scans_with_a_bad_one), "--model", str(model_path), "-o", str(out), "--mc-samples", "2",
                            "--no-figure", "--device", "cpu", "--skip-bad", "--json"])
    assert r.exit_code == 4, r.output
    res = json.loads(r.stdout)
    assert len(res["cases"]) == 3 and [f["case"] for f in res["failed"]] == ["synthct_001"]
    assert not list(out.glob("synthct_001*"))


# --- one command-line language ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["weighted", "weighted-probs"])
def test_weighted_votes_need_weights(rule, ct_dataset, model_path, tmp_path):
    r = predict(ct_dataset / "imagesTs" / "synthct_008.nii.gz", "--model", model_path, "--vote", rule, "--mc-samples", "2", "-o", tmp_path / "o")
    assert r.exit_code == 2 and f"--vote {rule} needs --vote-weights" in r.output, r.output
