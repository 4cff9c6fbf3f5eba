"""The preprocess/synth CLI, bad inputs (exit code, message names the file, no traceback, no partial output)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from ssl3d_cli.cli.app import app
from tests.conftest import save_nifti

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_every_subcommand_without_torch():
    code = "import sys; from ssl3d_cli.cli.app import app; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    result = invoke("--help")
    for name in ("preprocess", "pretrain", "finetune", "predict", "uncertainty", "evaluate", "synth", "demo", "experiment"):
        assert name in result.output


def test_synth_then_preprocess_json_and_rerun(tmp_path):
    out = tmp_path / "ds"
    r = invoke("synth", out, "--kind", "ct", "--cases", "3", "--unlabelled", "1", "--shape", "20", "20", "12", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"dataset": str(out), "labelled": 3, "unlabelled": 1}
    r = invoke("preprocess", out, "--size", "16", "-o", tmp_path / "cache", "--json", "--no-progress")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["processed"] == 4
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["format"] == "ssl3d-cache" and manifest["label_values"] == [0, 1, 2]
    assert [c["labelled"] for c in manifest["cases"]] == [True, True, True, False]
    img = np.load(tmp_path / "cache" / "cases" / "synthct_000.npy", mmap_mode="r")
    assert img.shape == (1, 16, 16, 16) and img.dtype == np.float16
    r = invoke("preprocess", out, "--size", "16", "-o", tmp_path / "cache", "--json")
    assert json.loads(r.stdout)["up_to_date"] == 4


def test_default_cache_is_keyed_by_settings(ct_dataset, tmp_path):
    r1 = invoke("preprocess", ct_dataset, "--size", "16", "--json", "--cache-dir", tmp_path)
    r2 = invoke("preprocess", ct_dataset, "--size", "12,16,16", "--json", "--cache-dir", tmp_path)
    d1, d2 = json.loads(r1.stdout)["cache_dir"], json.loads(r2.stdout)["cache_dir"]
    assert d1 != d2 and d1.startswith(str(tmp_path)) and "Task99_SynthCT" in d1


def _assert_clean_failure(result, needle):
    assert result.exit_code != 0
    assert needle in result.output, result.output
    assert "Traceback" not in result.output
    assert len([ln for ln in result.output.splitlines() if ln.startswith("error:")]) == 1


@pytest.mark.parametrize("problem", ["truncated", "undeclared-label", "nan", "shape-mismatch", "4d-label-image"])
def test_bad_case_fails_cleanly_and_skip_bad_continues(ct_dataset, tmp_path, problem):
    root = tmp_path / "ds"
    shutil.copytree(ct_dataset, root)
    image = root / "imagesTr" / "synthct_003.nii.gz"
    label = root / "labelsTr" / "synthct_003.nii.gz"
    if problem == "truncated":
        data = image.read_bytes()
        image.write_bytes(data[: len(data) // 2])
        target = image
    elif problem == "undeclared-label":
        save_nifti(label, np.full((4, 4, 4), 7, np.uint8))
        save_nifti(image, np.zeros((4, 4, 4), np.int16))
        target = label
    elif problem == "nan":
        arr = np.zeros((8, 8, 8), np.float32)
        arr[0, 0, 0] = np.inf
        save_nifti(image, arr)
        save_nifti(label, np.zeros((8, 8, 8), np.uint8))
        target = image
    elif problem == "shape-mismatch":
        save_nifti(label, np.zeros((5, 5, 5), np.uint8))
        target = label
    else:
        save_nifti(image, np.zeros((8, 8, 8, 2), np.float32))
        target = image
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    cache = tmp_path / "cache"
    r = invoke("preprocess", root, "--size", "16", "-o", cache, "--no-progress")
    _assert_clean_failure(r, target.name)
    assert not (cache / "cases" / "synthct_003.json").exists()
    assert not (cache / "cases" / "synthct_003.npy").exists()
    assert not [p for p in (cache / "cases").iterdir() if p.name.startswith(".tmp")]
    r = invoke("preprocess", root, "--size", "16", "-o", cache, "--skip-bad", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert [b["case"] for b in res["bad"]] == ["synthct_003"]
    manifest = json.loads((cache / "manifest.json").read_text())
    assert "synthct_003" not in [c["case_id"] for c in manifest["cases"]]
    after = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert before == after  # inputs never modified


def test_verify_lists_every_problem(ct_dataset, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(ct_dataset, root)
    save_nifti(root / "labelsTr" / "synthct_001.nii.gz", np.zeros((5, 5, 5), np.uint8))
    save_nifti(root / "labelsTr" / "synthct_002.nii.gz", np.zeros((5, 5, 5), np.uint8))
    r = invoke("preprocess", root, "--size", "16", "-o", tmp_path / "c", "--verify")
    assert r.exit_code != 0
    assert "2 problem(s)" in r.output and "synthct_001" in r.output and "synthct_002" in r.output
    assert not (tmp_path / "c").exists()


def test_missing_empty_and_unwritable(tmp_path, ct_dataset):
    _assert_clean_failure(invoke("preprocess", tmp_path / "nope"), "nope")
    (tmp_path / "empty").mkdir()
    _assert_clean_failure(invoke("preprocess", tmp_path / "empty"), "empty")
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        _assert_clean_failure(invoke("preprocess", ct_dataset, "-o", ro / "c", "--size", "16"), "not writable")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _assert_clean_failure(invoke("preprocess", ct_dataset, "-o", blocker / "c", "--size", "16"), "not writable")


def test_shard_and_bad_shard(ct_dataset, tmp_path):
    r = invoke("preprocess", ct_dataset, "--size", "16", "-o", tmp_path / "c", "--shard", "1/3", "--json")
    assert json.loads(r.stdout)["processed"] == 3  # cases 1, 4, 7 of 10
    _assert_clean_failure(invoke("preprocess", ct_dataset, "--shard", "3/3"), "--shard")


def test_real_subprocess_and_module_entry(tmp_path):
    env = {**os.environ, "SSL3D_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "ssl3d_cli", "synth", str(tmp_path / "d"), "--cases", "2", "--shape", "16", "16", "12", "--json"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["labelled"] == 2
    r = subprocess.run([sys.executable, "-m", "ssl3d_cli", "preprocess", str(tmp_path / "d"), "--size", "16"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "Cache:" in r.stdout and "Preprocessing" in r.stderr  # results on stdout, progress on stderr
    r = subprocess.run([sys.executable, "-m", "ssl3d_cli", "preprocess", str(tmp_path / "zzz")], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "zzz" in r.stderr and "Traceback" not in r.stderr and r.stdout == ""
