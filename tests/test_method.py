"""The method as the paper means it: train as you sample, label budgets that count every labelled scan, and
calibration in `ssl3d evaluate` checked against hand-computed values."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ssl3d_cli.cli.app import app
from ssl3d_cli.config import FinetuneConfig, MCConfig, ModelConfig, PreprocessConfig, RuntimeConfig
from ssl3d_cli.data.splits import make_split
from ssl3d_cli.data.summary import DatasetSummary
from ssl3d_cli.errors import ConfigError
from ssl3d_cli.inference.pipeline import Segmenter, sampling_rates
from ssl3d_cli.models.unet import UNet
from ssl3d_cli.runtime.device import resolve_precision
from tests.conftest import save_nifti

runner = CliRunner()
CPU = torch.device("cpu")


# --- 1. dropout in training at the rates it is sampled with ---------------------------------------------------------

def _segmenter(enc: float, dec: float) -> Segmenter:
    data = DatasetSummary(name="D", modality="ct", channel_names=("CT",), class_names=("background", "organ", "lesion"),
                          label_values=(0, 1, 2), preprocess=PreprocessConfig(size=(16, 16, 16)).to_dict(), settings_hash="x")
    net = UNet(ModelConfig(widths=(4, 8), dropout_encoder=enc, dropout_decoder=dec), 3)
    return Segmenter(net, data, {}, CPU, resolve_precision("fp32", CPU), path=Path("m/model.pt"))


def test_finetune_trains_with_the_papers_dropout_by_default():
    assert (FinetuneConfig().model.dropout_encoder, FinetuneConfig().model.dropout_decoder) == (0.3, 0.0)
    assert MCConfig().dropout_encoder is None and MCConfig().dropout_decoder is None  # sampled at the training rates


def test_sampling_defaults_to_training_rates_and_warns_on_others(caplog):
    seg = _segmenter(0.3, 0.0)
    assert sampling_rates(seg, MCConfig(mc_samples=10)).dropout_encoder == 0.3
    with caplog.at_level(logging.WARNING, logger="ssl3d"):
        assert sampling_rates(seg, MCConfig(mc_samples=10)).dropout_decoder == 0.0
    assert not caplog.records  # the training rates: nothing to warn about
    with caplog.at_level(logging.WARNING, logger="ssl3d"):
        mc = sampling_rates(seg, MCConfig(mc_samples=10, dropout_encoder=0.5, dropout_decoder=0.2))
    assert (mc.dropout_encoder, mc.dropout_decoder) == (0.5, 0.2)
    assert len(caplog.records) == 1  # one line, naming both
    line = caplog.records[0].getMessage()
    assert "encoder 0.5 / decoder 0.2" in line and "trained with encoder 0.3 / decoder 0" in line and "decoder never saw dropout" in line
    with pytest.raises(ConfigError, match="trained without dropout.*--dropout-encoder"):
        sampling_rates(_segmenter(0.0, 0.0), MCConfig(mc_samples=10))
    assert sampling_rates(_segmenter(0.0, 0.0), MCConfig(mc_samples=0)).dropout_encoder == 0.0  # one deterministic pass is fine


# --- 2. a label fraction is a budget of labelled scans, selection included ------------------------------------------

def test_label_budget_counts_every_labelled_scan_the_run_touches():
    ids = [f"case{i:03d}" for i in range(281)]  # the paper's pancreas: 281 labelled, 84 test, 197 for training
    for fraction in (0.05, 0.1, 0.25, 0.5, 1.0):
        s = make_split(ids, seed=0, test_fraction=0.3, val_fraction=0.1, label_fraction=fraction)
        assert len(s["test"]) == 84
        assert len(s["train"]) + len(s["val"]) == math.floor(fraction * 197 + 0.5)  # training + selection = the budget
    full = make_split(ids, seed=0, test_fraction=0.3, val_fraction=0.1, label_fraction=1.0)
    assert len(full["train"]) + len(full["val"]) == 197 and not full["unused"]
    small = make_split(ids[:20], seed=0, test_fraction=0.3, val_fraction=0.1, label_fraction=0.5)  # budget 7 < 10: no selection
    assert len(small["train"]) == 7 and small["val"] == []
    budgets = [make_split(ids, seed=0, test_fraction=0.3, val_fraction=0.1, label_fraction=f) for f in (0.25, 0.5)]
    assert set(budgets[0]["val"]) <= set(budgets[1]["val"]) and set(budgets[0]["train"]) <= set(budgets[1]["train"])


def test_small_budget_keeps_the_last_epoch_and_records_the_counts(ct_cache, tmp_path):
    from ssl3d_cli.stages.finetune import finetune

    config = FinetuneConfig(epochs=2, freeze_epochs=0, batch_size=2, workers=0, warmup_epochs=0, from_scratch=True, val_fraction=0.2,
                            label_fraction=0.5, model=ModelConfig(widths=(4, 8), dropout_encoder=0.3))
    res = finetune(ct_cache, config=config, runtime=RuntimeConfig(device="cpu", threads=1), output=tmp_path / "run")
    # 8 labelled: 2 test, pool 6, budget 3 < 5 (every 5th scan selects): all 3 train, none select
    assert res["labelled_used"] == {"training": 3, "selection": 0, "total": 3}
    assert res["best_val_dice"] is None and res["best_epoch"] == 2
    model = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert model["epoch"] == 2 and model["val_dice"] is None
    assert (model["model"]["dropout_encoder"], model["model"]["dropout_decoder"]) == (0.3, 0.0)  # the rates travel with the model
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["labelled_used"] == {"training": 3, "selection": 0, "total": 3}
    assert json.loads((tmp_path / "run" / "test_metrics.json").read_text())["labelled_used"]["total"] == 3
    assert all("val_dice" not in json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())


# --- 5. calibration and uncertainty quality in `ssl3d evaluate` --------------------------------------------------------

def test_evaluate_calibration_matches_hand_computed_values(tmp_path):
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1], dtype=np.uint8).reshape(2, 2, 2)
    p1 = np.array([0.1, 0.1, 0.3, 0.7, 0.9, 0.9, 0.6, 0.4], dtype=np.float32).reshape(2, 2, 2)  # p(class 1)
    pred = (p1 > 0.5).astype(np.uint8)  # 0 0 0 1 | 1 1 1 0: two errors
    save_nifti(tmp_path / "labels" / "c1.nii.gz", truth, affine)
    save_nifti(tmp_path / "preds" / "c1.nii.gz", pred, affine)
    save_nifti(tmp_path / "probs" / "c1_probabilities.nii.gz", np.stack([1 - p1, p1], axis=-1), affine)
    entropy = -(p1 * np.log(p1) + (1 - p1) * np.log(1 - p1))
    save_nifti(tmp_path / "unc" / "c1_entropy.nii.gz", entropy.astype(np.float32), affine)
    r = runner.invoke(app, ["evaluate", str(tmp_path / "preds"), str(tmp_path / "labels"), "--probabilities", str(tmp_path / "probs"),
                            "--uncertainty", str(tmp_path / "unc"), "--no-hd95", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    row = res["cases"][0]
    # confidences 0.9 0.9 0.7 0.7 | 0.9 0.9 0.6 0.6 ; correct 1 1 1 0 | 1 1 1 0
    # bins (15 of 1/15): 0.9 -> bin 13 (4 voxels, all right), 0.7 -> bin 10 (1 right, 1 wrong), 0.6 -> bin 8 (1 right, 1 wrong)
    # ECE = 4/8*|1-0.9| + 2/8*|0.5-0.7| + 2/8*|0.5-0.6| = 0.05 + 0.05 + 0.025 = 0.125
    assert row["ece"] == pytest.approx(0.125, abs=1e-6)
    # Brier per voxel: 2*(1-p_true)^2: p_true = .9 .9 .7 .3 .9 .9 .6 .4 -> 2*(.01+.01+.09+.49+.01+.01+.16+.36) = 2.28; /8
    assert row["brier"] == pytest.approx(2.28 / 8, abs=1e-6)
    assert row["nll"] == pytest.approx(-np.log([.9, .9, .7, .3, .9, .9, .6, .4]).mean(), abs=1e-5)
    assert row["roi_ece"] == pytest.approx(0.125, abs=1e-6)  # the 10 mm region covers this 2x2x2 volume
    assert res["calibration"]["scan"]["ece_pooled"] == pytest.approx(0.125, abs=1e-6)
    # errors at p1 = 0.7 (truth 0) and 0.4 (truth 1); entropies: H(.1) = .325, H(.3) = H(.7) = .611, H(.4) = H(.6) = .673 nats.
    # t in (.325, .611) flags {.3, .7, .6, .4}: 2 of the 2 errors -> Dice 2*2/(4+2) = 2/3 (the best); t in (.611, .673) flags
    # {.6, .4}: Dice 2*1/(2+2) = 0.5; t < .325 flags all 8: 2*2/(8+2) = 0.4
    assert row["uncertainty_error_dice"] == pytest.approx(2 / 3)
    assert 0.325 < row["uncertainty_threshold"] < 0.611
    assert (tmp_path / "preds" / "reliability.png").exists() and res["reliability_figure"] == str(tmp_path / "preds" / "reliability.png")


def test_finetune_resume_with_dropout_equals_uninterrupted(ct_cache, tmp_path, monkeypatch):
    """Mid-epoch stop + --resume of a dropout-trained U-Net ends with the uninterrupted run's weights (dropout masks
    come from the restored RNG state, so nothing else may draw from it: the data loader has its own generator)."""
    import importlib
    import os
    import signal

    from ssl3d_cli.errors import StopRequested
    from ssl3d_cli.stages.finetune import finetune

    run_module = importlib.import_module("ssl3d_cli.training.run")
    config = FinetuneConfig(epochs=3, batch_size=2, workers=0, warmup_epochs=0, val_fraction=0.2, checkpoint_every=1, from_scratch=True,
                            augment=False, model=ModelConfig(widths=(4, 8), dropout_encoder=0.3, dropout_decoder=0.2))
    runtime = RuntimeConfig(device="cpu", seed=3, threads=1, deterministic=True)
    finetune(ct_cache, config=config, runtime=runtime, output=tmp_path / "full", evaluate_test=False)
    reference = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]

    real_step, calls = run_module.optimisation_step, {"n": 0}

    def stop_on_fourth_step(*a, **kw):  # 3 steps per epoch: the 4th is the middle of epoch 2
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*a, **kw)

    monkeypatch.setattr(run_module, "optimisation_step", stop_on_fourth_step)
    with pytest.raises(StopRequested):
        finetune(ct_cache, config=config, runtime=runtime, output=tmp_path / "cut", evaluate_test=False)
    monkeypatch.setattr(run_module, "optimisation_step", real_step)
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["step"] == 1  # stopped after step 1 of epoch 2
    finetune(ct_cache, config=config, runtime=runtime, output=tmp_path / "cut", evaluate_test=False, resume=True)
    for k, v in torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model"].items():
        assert torch.equal(v, reference[k]), k
