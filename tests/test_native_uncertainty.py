"""``ssl3d uncertainty`` with a native-resolution model (issue 15): maps by sliding window on the native cache grid,
restored onto each scan's grid as on the fixed grid, labels equal to ``ssl3d predict``'s, percentiles fused by a
named rule."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ssl3d_cli.cli.app import app
from ssl3d_cli.config import FinetuneConfig, MCConfig, ModelConfig, PreprocessConfig, RuntimeConfig
from ssl3d_cli.data.datasets import CaseSpec
from ssl3d_cli.data.preprocessing import restore_scores
from ssl3d_cli.errors import ConfigError
from ssl3d_cli.inference.mc import sample_probabilities
from ssl3d_cli.inference.pipeline import native_patch, open_segmenter, sampling_rates
from ssl3d_cli.inference.sliding_window import pad_to_patch, window_grid
from ssl3d_cli.inference.uncertainty import TargetStore, entropy
from ssl3d_cli.inference.votes import VoteAccumulator
from ssl3d_cli.stages.finetune import finetune
from ssl3d_cli.stages.preprocess import preprocess
from ssl3d_cli.stages.synth import synth
from ssl3d_cli.stages.uncertainty import compute_maps, prepare_uncertainty_input, resolve_target, sliding_window_maps, uncertainty

runner = CliRunner()
CPU = RuntimeConfig(device="cpu", threads=1)
MC = ["--mc-samples", "3", "--seed", "5", "--device", "cpu", "--no-progress", "--json"]
MAPS = ("p05", "p50", "p95", "std")
TOL = 1e-6  # float32 maps read back from NIfTI


@pytest.fixture(scope="module")
def native_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A native-resolution model (patch 16 x 16 x 8, encoder dropout 0.3) and one of its scans (several windows)."""
    root = tmp_path_factory.mktemp("native") / "Task97_NativeUnc"
    synth(root, kind="ct", cases=8, unlabelled=0, seed=1, shape=(40, 40, 20))
    cache = preprocess(root, config=PreprocessConfig(spacing="auto"), cache_root=tmp_path_factory.mktemp("cache")).cache_dir
    config = FinetuneConfig(epochs=1, from_scratch=True, batch_size=2, workers=0, val_fraction=0.3,
                            model=ModelConfig(widths=(4, 8), dropout_encoder=0.3), patch_size=(16, 16, 8))
    result = finetune(cache, config=config, runtime=CPU, output=tmp_path_factory.mktemp("run") / "run")
    record = json.loads(next(iter(sorted((cache / "cases").glob("*.json")))).read_text())
    return Path(result["model"]), Path(record["sources"][0]["path"])


def case_of(scan: Path) -> str:
    return scan.name.removesuffix(".nii.gz")


def run(*args: str | Path) -> dict:
    r = runner.invoke(app, [*map(str, args), *MC])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_uncertainty_of_a_native_model_writes_ordered_maps_on_the_scan_grid(native_model, tmp_path):
    model, scan = native_model
    out, case = tmp_path / "u", case_of(scan)
    result = run("uncertainty", scan, "--model", model, "--class", "organ", "-o", out)
    assert result["sliding_window"] == {"patch": [16, 16, 8], "overlap": 0.5, "sigma_scale": 0.125, "percentile_fusion": "nearest"}
    record = result["cases"][0]
    assert record["percentile_fusion"] == "nearest" and record["windows"] > 1  # the scan needs several windows
    source = nib.load(str(scan))
    maps = {}
    for kind in (*MAPS, "entropy", "mutual_information"):
        name = f"{case}_{kind}.nii.gz" if kind in ("entropy", "mutual_information") else f"{case}_organ_{kind}.nii.gz"
        img = nib.load(str(out / name))
        assert img.shape == source.shape and np.allclose(img.affine, source.affine), kind
        maps[kind] = np.asarray(img.dataobj, dtype=np.float64)
    seg = nib.load(str(out / f"{case}.nii.gz"))
    assert seg.shape == source.shape and np.allclose(seg.affine, source.affine)
    assert (out / f"{case}_organ_uncertainty.png").exists()
    assert (maps["p05"] <= maps["p50"] + TOL).all() and (maps["p50"] <= maps["p95"] + TOL).all()
    for kind in MAPS:
        assert maps[kind].min() >= -TOL and maps[kind].max() <= 1 + TOL, kind
    assert maps["entropy"].min() >= -TOL and maps["mutual_information"].min() >= -TOL
    assert maps["p95"].max() > maps["p05"].min()  # not a blank map
    # the records say how percentiles were fused; the maps' headers say it too
    target_record = json.loads((out / f"{case}_organ.provenance.json").read_text())
    assert target_record["target"]["sliding_window"]["percentile_fusion"] == "nearest"
    assert json.loads((out / "uncertainty_args.json").read_text())["sliding_window"]["percentile_fusion"] == "nearest"
    descrip = nib.load(str(out / f"{case}_organ_p05.nii.gz")).header["descrip"].tobytes().decode()
    assert "p05 of p(organ), nearest window" in descrip
    # same run again: kept (its records match)
    again = run("uncertainty", scan, "--model", model, "--class", "organ", "-o", out)
    assert again["kept"] == [case] and not again["cases"]


def test_labels_equal_those_of_predict(native_model, tmp_path):
    """Both commands decide labels from the same fused sliding-window sums (same model, samples, seed, vote rule)."""
    model, scan = native_model
    case = case_of(scan)
    for vote in ("majority", "borda"):
        run("predict", scan, "--model", model, "--vote", vote, "-o", tmp_path / f"p-{vote}")
        run("uncertainty", scan, "--model", model, "--vote", vote, "--no-figure", "-o", tmp_path / f"u-{vote}")
        predicted = np.asarray(nib.load(str(tmp_path / f"p-{vote}" / f"{case}.nii.gz")).dataobj)
        from_uncertainty = np.asarray(nib.load(str(tmp_path / f"u-{vote}" / f"{case}.nii.gz")).dataobj)
        assert np.array_equal(predicted, from_uncertainty), vote
        assert (predicted > 0).any()  # not a trivially empty map on both sides


def one_window_reference(seg, image: torch.Tensor, mc: MCConfig, patch: tuple[int, int, int], indices: list[int],
                         qs: list[float]) -> torch.Tensor:
    """By hand, as the fixed grid computes them: one MC pass over the whole padded image, a TargetStore of every
    sample, percentiles / std, entropy and mutual information, cropped back to the image. (Q + 3, D, H, W)."""
    padded, crop = pad_to_patch(image, patch)
    store = TargetStore(indices, mc.mc_samples)
    acc = VoteAccumulator(seg.num_classes, track_entropy=True)

    def consume(probs: torch.Tensor) -> None:
        acc.update(probs)
        store(probs)

    sample_probabilities(seg.model, padded, mc_samples=mc.mc_samples, mc_batch=mc.mc_batch, autocast=seg.precision.autocast,
                         seed=mc.seed, dropout_encoder=mc.dropout_encoder, dropout_decoder=mc.dropout_decoder, compile=mc.compile,
                         consume=consume)
    h = entropy(acc.mean_prob())
    mi = (h - acc.entropy_sum / acc.n).clamp_min(0)
    maps = torch.cat([store.percentiles(qs), store.std()[None], h[None], mi[None]])
    return maps[(slice(None), *crop)]


@pytest.mark.parametrize("fusion", ["nearest", "gaussian"])
def test_a_scan_in_one_window_has_the_maps_of_one_whole_volume_pass(native_model, fusion):
    """With a patch that holds the whole (padded) native grid, the sliding-window maps are those of one MC pass over
    the padded image computed by hand (window 0 samples with the seed itself; its share is 1), bit for bit, and
    compute_maps restores them onto the scan with the fixed grid's function."""
    model, scan = native_model
    seg = open_segmenter(model, CPU)
    case = CaseSpec(case_of(scan), [scan])
    prepared = prepare_uncertainty_input(seg, case, label=None, figure=False)
    shape = tuple(prepared.image.shape[2:])
    patch = tuple(-(-s // 2) * 2 for s in shape)  # the grid rounded up to the U-Net's factor (2 for two levels)
    one = replace(seg, payload={**seg.payload, "training": {**seg.payload["training"], "patch_size": list(patch)}})
    assert native_patch(one) == patch and len(window_grid(shape, patch)) == 1
    mc = sampling_rates(one, MCConfig(mc_samples=3, seed=11))
    target = resolve_target(one, ["organ"])
    qs = [5.0, 50.0, 95.0]
    want = one_window_reference(one, prepared.image, mc, patch, list(target.indices), qs)
    _, got, windows = sliding_window_maps(one, prepared.image, mc=mc, percentiles=qs, target=target, percentile_fusion=fusion)
    assert windows == 1 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    computed = compute_maps(one, prepared, mc=mc, union_classes=[], percentiles=qs, target=target, percentile_fusion=fusion)
    np.testing.assert_array_equal(computed.restored, restore_scores(want, prepared.geometry, background=0.0))
    assert computed.windows == 1


def test_percentile_fusion_is_recorded_and_refused_on_the_fixed_grid(native_model, model_path, tmp_path):
    model, scan = native_model
    case = case_of(scan)
    out = tmp_path / "u"
    mc = MCConfig(mc_samples=3, seed=5)
    first = uncertainty([scan], output=out, model=model, mc=mc, runtime=CPU, classes=["organ"], percentile_fusion="gaussian")
    assert first["sliding_window"]["percentile_fusion"] == "gaussian" and first["cases"][0]["percentile_fusion"] == "gaussian"
    descrip = nib.load(str(out / f"{case}_organ_std.nii.gz")).header["descrip"].tobytes().decode()
    assert "std of p(organ), window-weighted mean" in descrip
    # maps fused by another rule are not kept as these: the default (nearest) computes the case again
    assert (out / f"{case}_organ_uncertainty.png").exists()
    second = uncertainty([scan], output=out, model=model, mc=mc, runtime=CPU, classes=["organ"])
    assert [w["case"] for w in second["written"]] == [case] and "sliding_window changed" in second["written"][0]["why"]
    with pytest.raises(ConfigError, match="choose one of nearest, gaussian"):
        uncertainty([scan], output=tmp_path / "x", model=model, mc=mc, runtime=CPU, percentile_fusion="median")
    with pytest.raises(ConfigError, match="only for a native-resolution model"):
        uncertainty([scan], output=tmp_path / "y", model=model_path, mc=mc, runtime=CPU, percentile_fusion="nearest")
