"""--resume compares the cache by content, not by folder: a moved, copied or re-made cache of the same scans resumes."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from ssl3d_cli.config import ModelConfig, PreprocessConfig, PretrainConfig, RuntimeConfig
from ssl3d_cli.data.cache import Cache, content_differences
from ssl3d_cli.errors import ConfigError
from ssl3d_cli.stages.preprocess import preprocess

TINY = ModelConfig(widths=(4, 8), projection_hidden=16, projection_dim=8)
RUNTIME = RuntimeConfig(device="cpu", seed=3, threads=1)
SIZE16 = PreprocessConfig(size=(16, 16, 16))


def _config(epochs):
    return PretrainConfig(epochs=epochs, batch_size=2, patches_per_side=1, warmup_epochs=0, checkpoint_every=1, workers=0, model=TINY)


def _epochs(run):
    return [json.loads(ln)["epoch"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_from_a_moved_or_remade_cache_and_refusal_of_other_content(ct_dataset, tmp_path):
    from ssl3d_cli.stages.pretrain import pretrain

    run = tmp_path / "run"
    # job 1: the cache on one node's scratch ($SSL3D_CACHE_DIR / --cache-dir)
    pretrain(ct_dataset, config=_config(1), runtime=RUNTIME, preprocess_config=SIZE16, cache_root=tmp_path / "node1", output=run)
    first_cache = json.loads((run / "config.json").read_text())["cache"]
    # job 2 on another node: the same dataset re-made into another scratch folder
    pretrain(ct_dataset, config=_config(2), runtime=RUNTIME, preprocess_config=SIZE16, cache_root=tmp_path / "node2", output=run,
             resume=True)
    assert _epochs(run) == [1, 2]
    # job 3: the cache folder copied elsewhere, the original gone
    moved = tmp_path / "moved" / "cache"
    shutil.copytree(first_cache, moved)
    shutil.rmtree(first_cache)
    pretrain(moved, config=_config(3), runtime=RUNTIME, output=run, resume=True)
    assert _epochs(run) == [1, 2, 3]
    saved = json.loads((run / "config.json").read_text())
    assert saved["cache"] == str(moved)  # the folder stays in config.json, for provenance
    assert list(saved["cache_content"]["cases"]) == Cache(moved).case_ids

    # one scan changed, the dataset re-made: refused, naming the case
    changed = tmp_path / "changed" / ct_dataset.name
    shutil.copytree(ct_dataset, changed)
    scan = changed / "imagesTr" / "synthct_003.nii.gz"
    img = nib.load(str(scan))
    data = np.asarray(img.dataobj).astype(np.float32)
    data[data > -500] += 40.0  # brighter tissue
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(scan))
    with pytest.raises(ConfigError, match=r"1 case\(s\) with other content.*synthct_003") as info:
        pretrain(changed, config=_config(4), runtime=RUNTIME, preprocess_config=SIZE16, cache_root=tmp_path / "node3", output=run,
                 resume=True)
    message = str(info.value)
    assert "\n" not in message and str(moved) in message and "new -o" in message

    # one case dropped from the cache: refused, naming it
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["cases"] = [c for c in manifest["cases"] if c["case_id"] != "synthct_005"]
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"1 case\(s\) no longer in the cache \(synthct_005\)"):
        pretrain(moved, config=_config(4), runtime=RUNTIME, output=run, resume=True)
    assert _epochs(run) == [1, 2, 3]


def test_content_fingerprint_ignores_folders_and_times_but_not_settings(ct_dataset, ct_cache, tmp_path):
    same = preprocess(ct_dataset, config=SIZE16, cache_dir=tmp_path / "again").cache_dir
    a, b = Cache(ct_cache).content_fingerprint(), Cache(same).content_fingerprint()
    assert a == b and content_differences(a, b) == []
    other = preprocess(ct_dataset, config=PreprocessConfig(size=(16, 16, 8)), cache_dir=tmp_path / "other").cache_dir
    diffs = content_differences(a, Cache(other).content_fingerprint())
    assert diffs[0].startswith("cache settings hash") and any("10 case(s) with other content" in d for d in diffs)
    reordered = {**a, "cases": dict(reversed(list(a["cases"].items())))}
    assert content_differences(a, reordered) == ["the cases are listed in another order"]


def test_slurm_signal_reaching_the_dataloader_workers_still_saves_the_state(ct_cache, tmp_path, monkeypatch):
    """SLURM signals every process of the step: a DataLoader worker must not die of it and crash the rank mid-step."""
    import os
    import signal
    from dataclasses import replace

    import torch.utils.data

    from ssl3d_cli.errors import StopRequested
    from ssl3d_cli.stages.pretrain import pretrain
    from ssl3d_cli.training import data as training_data

    original = training_data.CacheCases.__getitem__
    marker = tmp_path / "signalled"

    def getitem(self, i):
        if torch.utils.data.get_worker_info() is not None and not marker.exists():
            marker.touch()
            os.kill(os.getppid(), signal.SIGTERM)  # the rank
            os.kill(os.getpid(), signal.SIGTERM)  # and this worker, as SLURM's --signal does
        return original(self, i)

    monkeypatch.setattr(training_data.CacheCases, "__getitem__", getitem)
    run = tmp_path / "run"
    with pytest.raises(StopRequested):
        pretrain(ct_cache, config=replace(_config(2), workers=1), runtime=RUNTIME, output=run)
    assert (run / "last.pt").exists()
    pretrain(ct_cache, config=replace(_config(2), workers=1), runtime=RUNTIME, output=run, resume=True)
    assert _epochs(run) == [1, 2]


def test_finetune_resume_compares_the_encoder_by_content(tmp_path):
    """An encoder copied elsewhere (node-local scratch) resumes; other encoder bytes are refused; a run saved before the
    hash was recorded still resumes by its path."""
    from ssl3d_cli.training.run import resume_differences

    base = {"finetune": {"epochs": 4}, "encoder": "/a/encoder.pt", "encoder_sha256": "aa"}
    moved = {**base, "encoder": "/scratch/encoder.pt"}
    assert resume_differences(base, moved) == ([], [])
    diffs, _ = resume_differences(base, {**moved, "encoder_sha256": "bb"})
    assert diffs and "encoder_sha256" in diffs[0]
    old = {"finetune": {"epochs": 4}, "encoder": "/a/encoder.pt"}  # saved before encoder_sha256 existed
    assert resume_differences(old, base) == ([], [])
    diffs, _ = resume_differences(old, moved)
    assert diffs and "encoder" in diffs[0]
    scratch = {"finetune": {"epochs": 4}, "encoder": None, "encoder_sha256": None}  # from scratch, both ways
    assert resume_differences(scratch, dict(scratch)) == ([], [])
