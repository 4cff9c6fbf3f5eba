"""One command-line language: boolean on/off pairs, help texts that say what an option does here, evaluate's class names and -o."""

import importlib
import json
import shutil

import pytest
import typer
from typer.testing import CliRunner

from ssl3d_cli.cli.app import app
from ssl3d_cli.cli.common import spelled_out_booleans

runner = CliRunner()


def _capture(monkeypatch, module, name, result=None):
    """Replace a stage function by one that records its call and returns ``result``."""
    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return result if result is not None else {"ok": True}

    monkeypatch.setattr(importlib.import_module(module), name, fake)
    return calls


def _run(args):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return r


@pytest.mark.parametrize("flags, verify, skip_bad", [
    ([], False, False),
    (["--verify", "--skip-bad"], True, True),
    (["--no-verify", "--no-skip-bad"], False, False),
    (["--verify", "true", "--skip-bad", "FALSE"], True, False),
    (["--verify=false", "--skip-bad=yes"], False, True),
    (["--verify", "--no-verify"], False, False),  # the last one wins
])
def test_preprocess_boolean_forms(flags, verify, skip_bad, monkeypatch, tmp_path):
    class Result:
        def to_dict(self):
            return {"cache_dir": "c", "processed": 0, "up_to_date": 0, "cases": 0, "bad": []}

    calls = _capture(monkeypatch, "ssl3d_cli.stages.preprocess", "preprocess", Result())
    _run(["preprocess", *flags, str(tmp_path), "--no-progress", "--no-json", "--no-quiet", "--no-debug"])
    assert calls[0][1]["verify"] is verify and calls[0][1]["skip_bad"] is skip_bad


def test_training_prediction_and_evaluation_booleans(monkeypatch, tmp_path):
    calls = _capture(monkeypatch, "ssl3d_cli.stages.pretrain", "pretrain")
    _run(["pretrain", str(tmp_path), "--no-resume", "--deterministic=true", "--json"])
    _run(["pretrain", str(tmp_path), "--resume", "true", "--no-deterministic", "--json"])
    assert [(c[1]["resume"], c[1]["runtime"].deterministic) for c in calls] == [(False, True), (True, False)]

    calls = _capture(monkeypatch, "ssl3d_cli.stages.finetune", "finetune")
    _run(["finetune", str(tmp_path), "--no-augment", "--no-test", "--from-scratch", "--no-resume", "--json"])  # the old spellings
    _run(["finetune", str(tmp_path), "--augment", "--test", "--no-from-scratch", "--exclude-background=on", "--json"])
    (_, first), (_, second) = calls
    assert (first["config"].augment, first["evaluate_test"], first["config"].from_scratch, first["resume"]) == (False, False, True, False)
    assert (second["config"].augment, second["evaluate_test"], second["config"].from_scratch) == (True, True, False)
    assert second["config"].include_background is False

    calls = _capture(monkeypatch, "ssl3d_cli.stages.predict", "predict", {"failed": []})
    _run(["predict", str(tmp_path), "--no-save-probabilities", "--overwrite=true", "--no-skip-bad", "--json"])
    _run(["predict", str(tmp_path), "--save-probabilities", "--no-overwrite", "--skip-bad", "--json"])
    assert [(c[1]["save_probabilities"], c[1]["overwrite"], c[1]["skip_bad"]) for c in calls] == [(False, True, False), (True, False, True)]

    calls = _capture(monkeypatch, "ssl3d_cli.stages.evaluate", "evaluate")
    _run(["evaluate", str(tmp_path), str(tmp_path), "--no-hd95", "--json"])
    _run(["evaluate", str(tmp_path), str(tmp_path), "--hd95", "--json"])
    assert [c[1]["with_hd95"] for c in calls] == [False, True]

    calls = _capture(monkeypatch, "ssl3d_cli.stages.experiment", "experiment")
    _run(["experiment", "label-fractions", str(tmp_path), "--quick", "--no-collect", "--json"])
    assert (calls[0][1]["quick"], calls[0][1]["collect_only"]) == (True, False)


def test_boolean_values_are_still_checked(tmp_path):
    r = runner.invoke(app, ["preprocess", str(tmp_path), "--verify=maybe"])
    assert r.exit_code == 2 and "--verify" in r.output
    r = runner.invoke(app, ["preprocess", str(tmp_path), "--verify", "maybe"])  # a second positional argument
    assert r.exit_code == 2


def test_spelled_out_booleans_touches_only_boolean_options():
    params = typer.main.get_command(app).commands["preprocess"].params
    assert spelled_out_booleans(params, ["--verify", "true", "x"]) == ["--verify", "x"]
    assert spelled_out_booleans(params, ["--no-verify=false", "--no-progress=false", "--progress=no"]) == ["--verify", "--progress", "--no-progress"]
    assert spelled_out_booleans(params, ["--workers", "true", "--", "--verify", "true"]) == ["--workers", "true", "--", "--verify", "true"]
    assert spelled_out_booleans(params, ["-q", "true"]) == ["-q", "true"]  # short names take no spelled-out value


def _help(command, option):
    params = typer.main.get_command(app).commands[command].params
    return next(p for p in params if option in p.opts).help


def test_help_texts_say_what_the_option_does_in_this_command():
    seed = _help("synth", "--seed")
    assert "synthetic" in seed and "MC dropout" not in seed and "split" not in seed
    mc = _help("predict", "--mc-samples")
    assert "Default 0" in mc and "uncertainty" in mc and "100" in mc


def test_evaluate_names_classes_from_the_predictions_and_writes_json(ct_dataset, model_path, tmp_path):
    scans = sorted((ct_dataset / "imagesTr").glob("*.nii.gz"))[:2]
    preds = tmp_path / "preds"
    _run(["predict", *map(str, scans), "--model", str(model_path), "-o", str(preds), "--json"])
    labels = tmp_path / "labels"  # a plain folder of label files: no names of its own
    labels.mkdir()
    for scan in scans:
        shutil.copy(ct_dataset / "labelsTr" / scan.name, labels / scan.name)

    r = _run(["evaluate", str(preds), str(labels), "--no-hd95", "--json"])
    printed = json.loads(r.stdout.strip().splitlines()[-1])
    assert printed["class_names"] == ["background", "organ", "lesion"] and printed["label_values"] == [0, 1, 2]
    assert "dice_organ" in printed["cases"][0] and not any(k.startswith("dice_label") for k in printed["cases"][0])

    out = tmp_path / "reports" / "evaluation.json"
    r = _run(["evaluate", str(preds), str(labels), "--no-hd95", "--json", "-o", str(out)])
    printed = json.loads(r.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == printed and printed["json"] == str(out) and printed["class_names"][1] == "organ"
    assert not list(out.parent.glob(".tmp-*"))

    r = _run(["evaluate", str(preds), str(labels), "--no-hd95", "-o", str(out)])  # the table, and the file again
    assert "Dice organ" in r.stdout and f"Summary written to {out}" in r.stdout
    r = runner.invoke(app, ["evaluate", str(preds), str(labels), "-o", str(tmp_path)])
    assert r.exit_code == 2 and "is a folder" in r.output and "Traceback" not in r.output

    # labels that name their classes (the dataset) keep their own names; without any names: label<value>
    assert _run(["evaluate", str(preds), str(ct_dataset), "--no-hd95", "--json"]).stdout.count('"organ"') == 1
    (preds / "predict_args.json").unlink()
    printed = json.loads(_run(["evaluate", str(preds), str(labels), "--no-hd95", "--json"]).stdout.strip().splitlines()[-1])
    assert printed["class_names"] == ["background", "label1", "label2"]
