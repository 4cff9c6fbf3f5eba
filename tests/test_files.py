"""Atomic output files: final mode follows the umask, failures leave the old file and no temporary behind."""

import json
import os
import stat
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from ssl3d_cli import checkpoints, files
from ssl3d_cli.data import nifti
from ssl3d_cli.errors import InputDataError
from tests.conftest import save_nifti

# umask -> the mode a newly created regular file must get (what open(path, "w") would give it)
EXPECTED_MODES = {0o022: 0o644, 0o002: 0o664}


@pytest.fixture(params=sorted(EXPECTED_MODES), ids=lambda m: f"umask{m:03o}")
def umask(request):
    """Run the test under the given umask; the previous umask is always restored."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


def test_current_umask_reads_the_value_just_set(umask):
    assert files.current_umask() == umask
    assert files.current_umask() == umask  # reading it did not change it


def test_current_umask_fallback_restores_the_umask(umask, monkeypatch):
    monkeypatch.setattr(files.sys, "platform", "elsewhere")  # skip /proc: the set-and-restore fallback
    assert files.current_umask() == umask
    assert files.current_umask() == umask


def test_atomic_write_bytes_mode(tmp_path, umask):
    path = tmp_path / "sub" / "data.bin"
    files.atomic_write_bytes(path, b"\x00\x01abc")
    assert path.read_bytes() == b"\x00\x01abc"
    assert mode(path) == EXPECTED_MODES[umask]
    assert leftovers(path.parent) == []


def test_atomic_write_text_keeps_newlines_and_mode(tmp_path, umask):
    path = tmp_path / "table.csv"
    files.atomic_write_text(path, "a,b\r\n1,\u00e9\r\n")
    assert path.read_bytes() == "a,b\r\n1,\u00e9\r\n".encode()
    assert mode(path) == EXPECTED_MODES[umask]


def test_atomic_write_json_format_and_mode(tmp_path, umask):
    path = tmp_path / "record.json"
    obj = {"b": [1, 2], "a": {"x": None}}
    files.atomic_write_json(path, obj)
    assert path.read_text() == json.dumps(obj, indent=2) + "\n"
    assert mode(path) == EXPECTED_MODES[umask]


def test_atomic_save_npy_mode(tmp_path, umask):
    path = tmp_path / "case.npy"
    array = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    files.atomic_save_npy(path, array)
    np.testing.assert_array_equal(np.load(path, mmap_mode="r"), array)
    assert mode(path) == EXPECTED_MODES[umask]
    assert leftovers(tmp_path) == []


def test_save_checkpoint_mode(tmp_path, umask):
    path = tmp_path / "run" / "model.pt"
    checkpoints.save_checkpoint({"weights": torch.arange(3.0)}, path, fmt=checkpoints.SEGMENTER)
    assert mode(path) == EXPECTED_MODES[umask]
    loaded = checkpoints.load_checkpoint(path, fmt=checkpoints.SEGMENTER)
    assert torch.equal(loaded["weights"], torch.arange(3.0))
    assert leftovers(path.parent) == []


@pytest.mark.parametrize("name", ["pred.nii.gz", "pred.nii"])
def test_write_like_mode(tmp_path, umask, name):
    ref = save_nifti(tmp_path / "ref.nii.gz", np.random.default_rng(0).random((4, 5, 6), dtype=np.float32))
    out = nifti.write_like(np.ones((4, 5, 6), np.uint8), ref, tmp_path / "out" / name, dtype=np.uint8)
    assert mode(out) == EXPECTED_MODES[umask]
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), np.ones((4, 5, 6), np.uint8))
    assert leftovers(out.parent) == []


def test_uncertainty_figure_mode(tmp_path, umask):
    pytest.importorskip("matplotlib")
    from ssl3d_cli.inference.figures import uncertainty_figure

    volume = np.zeros((6, 6, 4), np.float32)
    volume[2:4, 2:4, 1:3] = 1.0
    out = uncertainty_figure({"mean": volume}, volume > 0.5, case_id="c0", target="tumour", outline_label="truth",
                             out_path=tmp_path / "fig" / "c0.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert mode(out) == EXPECTED_MODES[umask]
    assert leftovers(out.parent) == []


def test_atomic_output_yields_a_hidden_sibling_with_the_suffix(tmp_path):
    path = tmp_path / "new" / "scan.nii.gz"
    with files.atomic_output(path, suffix=".nii.gz") as tmp:
        assert tmp.parent == path.parent  # same folder: the rename stays on one file system
        assert tmp.name.startswith(".tmp-") and tmp.name.endswith(".nii.gz")
        assert tmp.exists() and not path.exists()
        tmp.write_bytes(b"done")
    assert path.read_bytes() == b"done"
    assert leftovers(path.parent) == []


def test_failure_keeps_the_previous_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with files.atomic_output(path, suffix=".pt") as tmp:
            tmp.write_bytes(b"half writ")
            raise RuntimeError("disk on fire")
    assert path.read_bytes() == b"previous"
    assert leftovers(tmp_path) == []


def test_failure_of_a_new_file_leaves_nothing(tmp_path):
    path = tmp_path / "out.json"
    with pytest.raises(TypeError):
        files.atomic_write_json(path, {"not json": object()})
    assert not path.exists()
    assert leftovers(tmp_path) == []


def test_caller_removing_the_temporary_is_reported(tmp_path):
    path = tmp_path / "x.bin"
    with pytest.raises(FileNotFoundError):
        with files.atomic_output(path) as tmp:
            tmp.unlink()
    assert not path.exists()


def test_check_writable(tmp_path):
    files.check_writable(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputDataError, match=r"file[/\\]c: output folder is not writable .*-o/--cache-dir"):
        files.check_writable(blocker / "c")


def test_import_is_cheap():
    code = "import sys, ssl3d_cli.files; bad = {'torch', 'numpy'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)
