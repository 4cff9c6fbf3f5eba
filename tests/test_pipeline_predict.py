"""Pipelined predict / uncertainty (``--prefetch``): the same outputs, failures, records and stops as one case after the other."""

import importlib
import json
import shutil
import threading

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from ssl3d_cli.cli.app import app
from ssl3d_cli.config import MCConfig, RuntimeConfig
from ssl3d_cli.errors import ConfigError, InputDataError, StopRequested
from ssl3d_cli.stages.predict import predict
from ssl3d_cli.stages.uncertainty import uncertainty

runner = CliRunner()
predict_stage = importlib.import_module("ssl3d_cli.stages.predict")  # the module: the package binds the stage function to the name
CPU = RuntimeConfig(device="cpu")


@pytest.fixture
def scans(ct_dataset, tmp_path):
    """Four good scans."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("synthct_000", "synthct_001", "synthct_002", "synthct_003"):
        shutil.copy2(ct_dataset / "imagesTr" / f"{name}.nii.gz", folder / f"{name}.nii.gz")
    return folder


@pytest.fixture
def scans_bad_middle(scans):
    """Four scans, the third (synthct_002) unreadable."""
    (scans / "synthct_002.nii.gz").write_bytes(b"not a scan")
    return scans


def volume(path):
    return np.asarray(nib.load(str(path)).dataobj)


def args_record(folder, stem="predict_args"):
    record = json.loads((folder / f"{stem}.json").read_text())
    record.pop("prefetch")
    return record


def without_seconds(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "segmentation", "probabilities", "provenance", "target_provenance", "files",
                                                     "figure")} for r in records]


def test_pipelined_predict_equals_sequential(scans, model_path, tmp_path):
    mc = MCConfig(mc_samples=3, vote="borda")
    runs = {n: predict([scans], output=tmp_path / f"p{n}", model=model_path, mc=mc, runtime=CPU, save_probabilities=True, prefetch=n)
            for n in (0, 1, 2)}
    order = [c["case"] for c in runs[0]["cases"]]
    assert order == ["synthct_000", "synthct_001", "synthct_002", "synthct_003"]
    for n in (1, 2):
        assert [c["case"] for c in runs[n]["cases"]] == order and runs[n]["written"] == runs[0]["written"]
        assert without_seconds(runs[n]["cases"]) == without_seconds(runs[0]["cases"])
        for case in order:
            a, b = tmp_path / "p0" / f"{case}.nii.gz", tmp_path / f"p{n}" / f"{case}.nii.gz"
            assert volume(a).tobytes() == volume(b).tobytes() and volume(a).dtype == volume(b).dtype
            pa, pb = (volume(f / f"{case}_probabilities.nii.gz") for f in (tmp_path / "p0", tmp_path / f"p{n}"))
            assert np.abs(pa - pb).max() <= 1e-6
        rec = json.loads((tmp_path / f"p{n}" / "predict_args.json").read_text())
        assert rec["prefetch"] == n and rec["status"] == "finished"
        assert args_record(tmp_path / f"p{n}")["written"] == args_record(tmp_path / "p0")["written"]
    # --prefetch does not change outputs, so it does not make cases stale
    again = predict([scans], output=tmp_path / "p0", model=model_path, mc=mc, runtime=CPU, save_probabilities=True, prefetch=1)
    assert again["predicted"] == 0 and again["skipped_existing"] == 4


def test_pipelined_uncertainty_equals_sequential(scans, model_path, tmp_path, ct_dataset):
    runs = {n: uncertainty([scans], output=tmp_path / f"u{n}", model=model_path, mc=MCConfig(mc_samples=3), runtime=CPU, figure=n != 2,
                           label=ct_dataset / "labelsTr", prefetch=n) for n in (0, 1)}
    assert [c["case"] for c in runs[1]["cases"]] == [c["case"] for c in runs[0]["cases"]]
    assert without_seconds(runs[1]["cases"]) == without_seconds(runs[0]["cases"])
    for case in [c["case"] for c in runs[0]["cases"]]:
        assert volume(tmp_path / "u0" / f"{case}.nii.gz").tobytes() == volume(tmp_path / "u1" / f"{case}.nii.gz").tobytes()
        for kind in ("entropy", "mutual_information", "foreground_p05", "foreground_p50", "foreground_p95", "foreground_std"):
            a, b = (volume(f / f"{case}_{kind}.nii.gz") for f in (tmp_path / "u0", tmp_path / "u1"))
            assert np.abs(a - b).max() <= 1e-6, kind
        assert (tmp_path / "u1" / f"{case}_foreground_uncertainty.png").exists()
    assert args_record(tmp_path / "u1", "uncertainty_args")["written"] == args_record(tmp_path / "u0", "uncertainty_args")["written"]


@pytest.mark.parametrize("skip_bad", [True, False])
def test_bad_scan_in_the_middle_as_sequential(scans_bad_middle, model_path, tmp_path, skip_bad):
    outcomes = {}
    for n in (0, 1, 2):  # 2: the bad scan is read in one thread while the next is read in another
        out = tmp_path / f"o{n}"
        try:
            res = predict([scans_bad_middle], output=out, model=model_path, mc=MCConfig(mc_samples=2), runtime=CPU, skip_bad=skip_bad,
                          prefetch=n)
            outcomes[n] = ([c["case"] for c in res["cases"]], res["failed"], res["written"])
        except InputDataError as exc:
            outcomes[n] = str(exc)
        record = args_record(out)
        assert record["status"] == ("finished" if skip_bad else "stopped")
        outcomes[n] = (outcomes[n], record["written"], record["failed"], record["not_processed"])
        assert not list(out.glob("synthct_002*")) and not list(out.glob(".tmp-*"))
    assert outcomes[1] == outcomes[0] == outcomes[2]
    if skip_bad:
        assert outcomes[0][0][0] == ["synthct_000", "synthct_001", "synthct_003"]
    else:
        assert "2 of 4 case(s) not processed" in outcomes[0][0] and "--skip-bad" in outcomes[0][0]
        assert [w["case"] for w in outcomes[0][1]] == ["synthct_000", "synthct_001"] and outcomes[0][3] == ["synthct_003"]


def test_bad_scan_in_the_middle_uncertainty_cli(scans_bad_middle, model_path, tmp_path):
    outs = []
    for n in ("0", "1"):
        r = runner.invoke(app, ["uncertainty", str(scans_bad_middle), "--model", str(model_path), "-o", str(tmp_path / n), "--mc-samples", "2",
                                "--no-figure", "--device", "cpu", "--prefetch", n, "--json"])
        assert r.exit_code == 2, r.output
        error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        outs.append((error, args_record(tmp_path / n, "uncertainty_args")["written"]))
    assert outs[0] == outs[1] and len(outs[0][0]) == 1 and "2 of 4 case(s) not processed" in outs[0][0][0]


def test_writer_exception_propagates(scans, model_path, tmp_path, monkeypatch):
    real, real_read, threads = predict_stage.write_like, predict_stage.read_case_scan, set()

    def reading(*args, **kw):
        threads.add(("read", threading.current_thread().name.split("_")[0]))
        return real_read(*args, **kw)

    def failing(array, reference, out_path, **kw):
        threads.add(("write", threading.current_thread().name.split("_")[0]))
        if out_path.name.startswith("synthct_001"):
            raise OSError("disk full")
        return real(array, reference, out_path, **kw)

    monkeypatch.setattr(predict_stage, "write_like", failing)
    monkeypatch.setattr(predict_stage, "read_case_scan", reading)
    out = tmp_path / "o"
    with pytest.raises(OSError, match="disk full"):
        predict([scans], output=out, model=model_path, mc=MCConfig(mc_samples=2), runtime=CPU, prefetch=1)
    record = json.loads((out / "predict_args.json").read_text())
    assert record["status"] == "stopped" and [w["case"] for w in record["written"]] == ["synthct_000"]
    assert record["not_processed"] == ["synthct_001", "synthct_002", "synthct_003"]
    assert not list(out.glob(".tmp-*")) and not (out / "synthct_002.nii.gz").exists()
    assert threads == {("read", "ssl3d-prefetch"), ("write", "ssl3d-write")}  # the stages did run in the background


@pytest.mark.parametrize("stop", [StopRequested("signal SIGTERM"), KeyboardInterrupt()])
def test_stop_mid_batch_leaves_whole_files_and_a_stopped_record(scans, model_path, tmp_path, monkeypatch, stop):
    real, calls = predict_stage.vote_case, []

    def stopping(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise stop
        return real(*args, **kw)

    monkeypatch.setattr(predict_stage, "vote_case", stopping)
    out = tmp_path / "o"
    with pytest.raises(type(stop)):
        predict([scans], output=out, model=model_path, mc=MCConfig(mc_samples=2), runtime=CPU, prefetch=1)
    record = json.loads((out / "predict_args.json").read_text())
    written = [w["case"] for w in record["written"]]
    assert record["status"] == "stopped" and written == ["synthct_000", "synthct_001"]
    assert record["not_processed"] == ["synthct_002", "synthct_003"]
    assert not list(out.glob(".tmp-*"))
    assert sorted(p.name for p in out.glob("synthct_*")) == sorted(f"{c}{s}" for c in written for s in (".nii.gz", ".provenance.json"))


def test_prefetch_must_not_be_negative(scans, model_path, tmp_path):
    with pytest.raises(ConfigError, match="--prefetch -1"):
        predict([scans], output=tmp_path / "o", model=model_path, runtime=CPU, prefetch=-1)
