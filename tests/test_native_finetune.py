"""Native-resolution fine-tuning and prediction (issue 15): patches cut per step, sliding-window validation and
prediction, outputs on each scan's own grid."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ssl3d_cli.cli.app import app
from ssl3d_cli.config import FinetuneConfig, ModelConfig, PreprocessConfig, RuntimeConfig
from ssl3d_cli.stages.finetune import finetune
from ssl3d_cli.stages.preprocess import preprocess
from ssl3d_cli.stages.synth import synth
from ssl3d_cli.training.patches import collate_cases, default_patch_size, sample_patches

runner = CliRunner()
CPU = RuntimeConfig(device="cpu", threads=1)


def test_default_patch_size_keeps_the_median_proportions_within_the_budget():
    assert default_patch_size([(200, 200, 100)] * 3, levels=5) == (160, 160, 80)  # scaled by 0.8: 128^3 voxels at most
    assert default_patch_size([(40, 44, 20), (36, 30, 18), (50, 40, 22)], levels=3) == (40, 40, 20)  # fits: the median itself
    assert default_patch_size([(5, 5, 3)], levels=3) == (8, 4, 4)  # never a single voxel at the bottleneck


def test_sample_patches_are_reproducible_padded_and_centred_on_foreground():
    gen = torch.Generator().manual_seed
    images = [torch.randn(1, 20, 18, 6), torch.randn(1, 12, 30, 10)]
    labels = [torch.zeros(20, 18, 6, dtype=torch.long), torch.zeros(12, 30, 10, dtype=torch.long)]
    labels[0][15:17, 2:4, 1:3] = 2
    labels[1][1, 28, 9] = 1
    a = sample_patches(images, labels, (8, 8, 8), foreground=1.0, gen=gen(3))
    b = sample_patches(images, labels, (8, 8, 8), foreground=1.0, gen=gen(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (2, 1, 8, 8, 8) and a[1].shape == (2, 8, 8, 8)
    assert (a[1][0] == 2).any() and (a[1][1] == 1).any()  # every patch holds the foreground it was centred on
    assert (a[0][0, 0, :, :, 6:] == images[0].min()).all()  # the 6-slice case padded with its minimum at the end
    counts = [int((sample_patches(images[:1], labels[:1], (4, 4, 4), foreground=0.0, gen=gen(s))[1] > 0).any()) for s in range(40)]
    assert sum(counts) < 20  # foreground 0: uniform centres, the 8-voxel lesion is rarely hit
    items = list(zip(images, labels))
    assert [t.shape for t in collate_cases(items)[0]] == [i.shape for i in images]


@pytest.fixture(scope="module")
def native_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("native") / "Task98_NativeCT"
    synth(root, kind="ct", cases=8, unlabelled=0, seed=1, shape=(40, 40, 20))
    result = preprocess(root, config=PreprocessConfig(spacing="auto"), cache_root=tmp_path_factory.mktemp("cache"))
    return result.cache_dir


def test_native_finetune_then_predict_and_uncertainty(native_cache, tmp_path):
    records = [json.loads(p.read_text()) for p in (native_cache / "cases").glob("*.json")]
    assert len({tuple(r["geometry"]["size"]) for r in records}) > 1  # cases keep their own sizes
    config = FinetuneConfig(epochs=2, from_scratch=True, batch_size=2, workers=0, warmup_epochs=0, learning_rate=1e-2, val_fraction=0.3,
                            model=ModelConfig(widths=(4, 8), dropout_encoder=0.3), patch_size=(16, 16, 8))
    result = finetune(native_cache, config=config, runtime=CPU, output=tmp_path / "run")
    model_pt = Path(result["model"])
    payload = torch.load(model_pt, map_location="cpu", weights_only=False)
    assert payload["training"]["patch_size"] == [16, 16, 8] and payload["dataset"]["preprocess"]["spacing"]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["finetune"]
    assert saved["patch_size"] == [16, 16, 8] and saved["foreground_oversampling"] == pytest.approx(1 / 3)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "val_dice" in metrics[-1]  # validated by sliding window on whole native cases
    assert result["test"]["cases"] >= 1

    scan = Path(json.loads((native_cache / "cases" / f"{records[0]['case_id']}.json").read_text())["sources"][0]["path"])
    r = runner.invoke(app, ["predict", str(scan), "--model", str(model_pt), "--mc-samples", "2", "-o", str(tmp_path / "p"),
                            "--device", "cpu", "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    out = nib.load(str(tmp_path / "p" / nib.load(str(scan)).get_filename().split("/")[-1]))
    source = nib.load(str(scan))
    assert out.shape == source.shape and np.allclose(out.affine, source.affine)

    r = runner.invoke(app, ["uncertainty", str(scan), "--model", str(model_pt), "--mc-samples", "2", "-o", str(tmp_path / "u"),
                            "--device", "cpu", "--no-progress"])
    assert r.exit_code == 0, r.output  # maps by sliding window: tests/test_native_uncertainty.py


def test_patch_size_is_refused_on_the_fixed_grid(ct_cache, tmp_path):
    r = runner.invoke(app, ["finetune", str(ct_cache), "--from-scratch", "--epochs", "1", "--patch-size", "16,16,8", "--widths", "4,8",
                            "--device", "cpu", "--no-progress", "-o", str(tmp_path / "r")])
    assert r.exit_code == 2 and "--patch-size 16,16,8: only for a native-resolution cache" in r.output


def test_native_refusals_in_one_line(native_cache, ct_cache, tmp_path):
    def run(*args: str):
        return runner.invoke(app, ["finetune", *args, "--from-scratch", "--epochs", "1", "--device", "cpu", "--no-progress",
                                   "-o", str(tmp_path / "r")])

    r = run(str(native_cache), "--patch-size", "8,8,8", "--widths", "4,8,16,32")
    assert r.exit_code == 2 and "--patch-size 8,8,8: leaves one voxel at the U-Net's bottleneck" in r.output
    r = run(str(ct_cache), "--foreground-oversampling", "0.5", "--widths", "4,8")
    assert r.exit_code == 2 and "--foreground-oversampling 0.5: only for a native-resolution cache" in r.output
    r = run(str(ct_cache), "--resolution", "native", "--widths", "4,8")
    assert r.exit_code == 2 and "a fixed-grid cache" in r.output and "--resolution native was asked" in r.output


def test_pretraining_region_of_mostly_padding_is_refused():
    """Thin scans (22 slices) and K = 2 patches of at least 32 voxels: a 64-slice region would make half the SimCLR
    patches padding only."""
    from ssl3d_cli.config import PretrainConfig
    from ssl3d_cli.errors import ConfigError
    from ssl3d_cli.stages.pretrain import native_region_size

    class Cases:  # what native_region_size reads of a cache
        case_ids = ["a", "b", "c"]

        def record(self, case_id: str) -> dict:
            return {"geometry": {"size": [256, 256, 22]}}

    config = PretrainConfig(patches_per_side=2)  # default widths: 5 levels
    with pytest.raises(ConfigError, match="exceeds the median scan .256x256x22. by a whole patch along S"):
        native_region_size(Cases(), config, None)
    assert native_region_size(Cases(), PretrainConfig(patches_per_side=1), (128, 128, 32)) == (128, 128, 32)
