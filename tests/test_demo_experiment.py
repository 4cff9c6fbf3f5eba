"""The demo end to end with its smallest settings, and the experiment runner (resume, shards, collect)."""

import csv
import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from ssl3d_cli.cli.app import app
from ssl3d_cli.config import RuntimeConfig
from ssl3d_cli.errors import ConfigError
from ssl3d_cli.stages.experiment import Settings, experiment

runner = CliRunner()
TINY = Settings(size=16, widths=(4, 8), patches_per_side=1, pretrain_epochs=1, finetune_epochs=2, freeze_epochs=1, mc_samples=2, batch_size=2)


def test_demo_tiny_end_to_end(tmp_path):
    r = runner.invoke(app, ["demo", "--tiny", "-o", str(tmp_path / "demo"), "--device", "cpu", "--json", "--no-progress"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert [(row["init"], row["inference"]) for row in res["table"]] == [
        ("SimCLR", "deterministic"), ("SimCLR", "MC x3"), ("scratch", "deterministic"), ("scratch", "MC x3")]
    assert all(0.0 <= row["dice_mean_fg"] <= 1.0 for row in res["table"])
    assert (tmp_path / "demo" / "runs" / "pretrain" / "encoder.pt").exists()
    assert res["figure"].endswith("_uncertainty.png")
    r = runner.invoke(app, ["demo", "--tiny", "-o", str(tmp_path / "demo")])
    assert r.exit_code != 0 and "not empty" in r.output


def test_experiment_label_fractions_resume_shards_collect(ct_dataset, tmp_path):
    kw = dict(output=tmp_path / "exp", fractions=(0.5, 1.0), runtime=RuntimeConfig(device="cpu"), settings=TINY)
    with pytest.raises(ConfigError, match="--shard needs the encoder first"):
        experiment("label-fractions", ct_dataset, shard="0/2", **kw)
    experiment("label-fractions", ct_dataset, fractions=(1.0,), output=tmp_path / "exp", runtime=RuntimeConfig(device="cpu"), settings=TINY)
    first = experiment("label-fractions", ct_dataset, shard="0/2", **kw)
    assert "shard" in first
    second = experiment("label-fractions", ct_dataset, shard="1/2", **kw)
    assert second["runs"] == 2
    merged = experiment("label-fractions", ct_dataset, **kw)
    rows = list(csv.DictReader((tmp_path / "exp" / "label-fractions" / "results.csv").open()))
    assert sorted((r["method"], r["fraction"]) for r in rows) == [("scratch", "0.5"), ("scratch", "1.0"), ("simclr", "0.5"), ("simclr", "1.0")]
    assert (tmp_path / "exp" / "label-fractions" / "label_fractions.png").exists()
    assert merged["rows"] == 4
    # finished runs are skipped: the rows are not rewritten
    stamp = (tmp_path / "exp" / "label-fractions" / "rows" / "simclr-f0.5-s0.json").stat().st_mtime_ns
    experiment("label-fractions", ct_dataset, **kw)
    assert (tmp_path / "exp" / "label-fractions" / "rows" / "simclr-f0.5-s0.json").stat().st_mtime_ns == stamp
    record = json.loads((tmp_path / "exp" / "experiment.json").read_text())
    assert record["settings"]["finetune_epochs"] == TINY.finetune_epochs and record["fractions"] == [0.5, 1.0]
    # the runs and the encoder are shared by both experiments: other sizes into the same folder are refused before any training
    with pytest.raises(ConfigError, match="finetune_epochs"):
        experiment("mc-dropout", ct_dataset, **{**kw, "settings": replace(TINY, finetune_epochs=3)})
    with pytest.raises(ConfigError, match="--size 20"):
        Settings.make(True, size=20)


def test_experiment_mc_dropout_reuses_models_and_covers_every_vote_rule(ct_dataset, tmp_path):
    kw = dict(output=tmp_path / "exp", fractions=(1.0,), runtime=RuntimeConfig(device="cpu"), settings=TINY)
    res = experiment("mc-dropout", ct_dataset, **kw)
    votes = {s["vote"] for s in res["summary"] if s["setting"] == "site" and s["dropout_encoder"] == 0.3 and s["dropout_decoder"] == 0.0}
    assert votes == {"majority", "weighted", "weighted-probs", "borda", "union", "mean"}
    settings = {(s["setting"], s["dropout_encoder"], s["dropout_decoder"]) for s in res["summary"]}
    assert {("deterministic", 0.0, 0.0), ("site", 0.0, 0.3), ("site", 0.3, 0.3), ("rate", 0.5, 0.0)} <= settings
    assert (tmp_path / "exp" / "mc-dropout" / "mc_dropout.png").exists()
    r = runner.invoke(app, ["experiment", "mc-dropout", str(ct_dataset), "-o", str(tmp_path / "exp"), "--collect", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rows"] == res["rows"]


def test_experiment_at_native_resolution(ct_dataset, tmp_path):
    """``--resolution native`` passes through: native cache, patch pretraining and fine-tuning, sliding-window test
    predictions; the record says so, and a fixed-grid rerun into the folder is refused."""
    native = replace(TINY, native=True)
    result = experiment("label-fractions", ct_dataset, output=tmp_path / "exp", fractions=(1.0,), runtime=RuntimeConfig(device="cpu"),
                        settings=native)
    assert result["rows"] == 2
    record = json.loads((tmp_path / "exp" / "experiment.json").read_text())
    assert record["settings"]["native"] is True
    model = next((tmp_path / "exp").rglob("model.pt"))
    import torch

    assert torch.load(model, map_location="cpu", weights_only=False)["training"]["patch_size"]
    with pytest.raises(ConfigError, match="native"):
        experiment("label-fractions", ct_dataset, output=tmp_path / "exp", fractions=(1.0,), runtime=RuntimeConfig(device="cpu"), settings=TINY)
    assert "native" not in Settings.make(True).record()  # fixed-grid folders keep the record they had
