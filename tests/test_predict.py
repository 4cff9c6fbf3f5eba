"""MC dropout, predict and uncertainty: modes, equivalences, geometry on real scans, outputs, bad input."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ssl3d_cli.cli.app import app
from ssl3d_cli.config import ModelConfig
from ssl3d_cli.inference.mc import sample_probabilities, set_mc_mode
from ssl3d_cli.inference.uncertainty import TargetStore, percentile_name
from ssl3d_cli.inference.votes import VoteAccumulator
from ssl3d_cli.models.unet import LevelDropout, UNet, deterministic_prefix, sample_from_prefix

runner = CliRunner()


def tiny_unet(dropout_encoder=0.3, dropout_decoder=0.2):
    torch.manual_seed(0)
    net = UNet(ModelConfig(in_channels=1, widths=(4, 8, 16), dropout_encoder=dropout_encoder, dropout_decoder=dropout_decoder), 3)
    net.add_module("bn_probe", torch.nn.BatchNorm3d(1))  # a norm layer that would change behaviour in training mode
    return net


def test_only_dropout_modules_sample():
    net = tiny_unet()
    set_mc_mode(net, sampling=True, encoder=0.3, decoder=0.0)
    for m in net.modules():
        if isinstance(m, LevelDropout):
            assert m.training == (m.p > 0)
            assert m.p == (0.3 if m.part == "encoder" else 0.0)
        elif not list(m.children()):
            assert not m.training, m
    set_mc_mode(net, sampling=False)
    assert not any(m.training for m in net.modules())


@pytest.mark.parametrize("enc,dec", [(0.3, 0.0), (0.0, 0.2), (0.0, 0.0), (0.2, 0.2)])
def test_prefix_then_samples_equals_full_forward_without_dropout(enc, dec):
    """With dropout modules in eval mode, prefix + continuation is exactly the plain forward pass."""
    net = tiny_unet(enc, dec)
    net.eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        full = net(x)
        out = sample_from_prefix(net, deterministic_prefix(net, x), 3)
    assert out.shape == (3, 3, 16, 16, 16)
    torch.testing.assert_close(out, full.expand(3, -1, -1, -1, -1))


def test_one_sample_equals_deterministic_model_and_seed_reproducible():
    net = tiny_unet()
    x = torch.randn(1, 1, 16, 16, 16)
    got = []
    sample_probabilities(net, x, mc_samples=1, consume=got.append)
    net.eval()
    with torch.no_grad():
        ref = torch.softmax(net(x), 1)
    torch.testing.assert_close(got[0], ref)
    runs = []
    for _ in range(2):
        acc = VoteAccumulator(3)
        sample_probabilities(net, x, mc_samples=6, mc_batch=4, seed=7, consume=acc.update)
        runs.append(acc.prob_sum)
    torch.testing.assert_close(runs[0], runs[1])
    acc = VoteAccumulator(3)
    sample_probabilities(net, x, mc_samples=6, mc_batch=4, seed=8, consume=acc.update)
    assert not torch.allclose(acc.prob_sum, runs[0])


def test_accumulator_memory_does_not_grow_with_samples():
    net = tiny_unet()
    x = torch.randn(1, 1, 16, 16, 16)
    sizes, batch_sizes = [], []
    for n in (2, 20):
        acc = VoteAccumulator(3, track_entropy=True)

        def consume(p, acc=acc):
            batch_sizes.append(p.shape[0])
            acc.update(p)

        sample_probabilities(net, x, mc_samples=n, mc_batch=4, consume=consume)
        assert acc.n == n
        sizes.append(sum(t.numel() * t.element_size() for t in (acc.votes, acc.wp_votes, acc.borda, acc.prob_sum, acc.entropy_sum)))
    assert sizes[0] == sizes[1] and max(batch_sizes) == 4


def test_percentiles_of_a_constructed_stack():
    probs = torch.zeros(11, 2, 2, 1, 1)
    values = torch.linspace(0, 1, 11)
    probs[:, 1, 0, 0, 0] = values  # voxel 0: 0, 0.1, ..., 1.0
    probs[:, 1, 1, 0, 0] = 0.5  # voxel 1: constant
    probs[:, 0] = 1 - probs[:, 1]
    store = TargetStore([1], 11)
    store(probs[:6])
    store(probs[6:])
    pct = store.percentiles([5, 50, 95])
    expected = np.percentile(values.numpy(), [5, 50, 95])
    np.testing.assert_allclose(pct[:, 0, 0, 0].numpy(), expected, atol=1 / 255)
    np.testing.assert_allclose(pct[:, 1, 0, 0].numpy(), [0.5] * 3, atol=1 / 255)
    assert float(store.std()[1, 0, 0]) == pytest.approx(0.0, abs=1e-6)
    assert [percentile_name(q) for q in (5, 50, 95, 2.5)] == ["p05", "p50", "p95", "p02_5"]


@pytest.mark.parametrize("scan", ["example_ct_sm.nii.gz", "example_mr_sm.nii.gz"])
def test_predict_output_lies_on_real_scans(real_dir, model_path, tmp_path, scan):
    r = runner.invoke(app, ["predict", str(real_dir / scan), "--model", str(model_path), "--mc-samples", "3", "--vote", "borda",
                            "-o", str(tmp_path / "out"), "--device", "cpu", "--save-probabilities", "--json"])
    assert r.exit_code == 0, r.output
    case = scan.replace(".nii.gz", "")
    src, out = nib.load(str(real_dir / scan)), nib.load(str(tmp_path / "out" / f"{case}.nii.gz"))
    assert out.shape == src.shape
    np.testing.assert_array_equal(out.affine, src.affine)
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(src.affine)
    np.testing.assert_allclose(out.header.get_zooms(), src.header.get_zooms())
    assert set(np.unique(np.asarray(out.dataobj)).tolist()) <= {0, 1, 2}
    probs = nib.load(str(tmp_path / "out" / f"{case}_probabilities.nii.gz"))
    assert probs.shape == (*src.shape, 3)
    np.testing.assert_allclose(np.asarray(probs.dataobj).sum(-1), 1.0, atol=1e-4)
    args = json.loads((tmp_path / "out" / "predict_args.json").read_text())
    assert args["mc"]["vote"] == "borda" and args["tool_version"]


def test_predict_skip_overwrite_shard_and_split(ct_dataset, model_path, tmp_path):
    base = ["predict", str(ct_dataset / "imagesTs"), "--model", str(model_path), "-o", str(tmp_path / "o"), "--json"]
    r = runner.invoke(app, base)
    assert json.loads(r.stdout)["predicted"] == 2
    r = runner.invoke(app, base)
    assert json.loads(r.stdout)["skipped_existing"] == 2
    r = runner.invoke(app, base + ["--overwrite", "--shard", "1/2"])
    assert json.loads(r.stdout)["predicted"] == 1
    r = runner.invoke(app, ["predict", str(ct_dataset), "--split", "test", "--model", str(model_path), "-o", str(tmp_path / "t"), "--json"])
    assert r.exit_code == 0, r.output
    split = json.loads((model_path.parent / "split.json").read_text())["cases"]
    assert sorted(c["case"] for c in json.loads(r.stdout)["cases"]) == sorted(c for c, role in split.items() if role == "test")
    from ssl3d_cli.stages.evaluate import evaluate

    assert evaluate(tmp_path / "t", ct_dataset, with_hd95=False)["evaluated"] == len(json.loads(r.stdout)["cases"])


def test_uncertainty_outputs_and_figure(ct_dataset, model_path, tmp_path):
    scan = ct_dataset / "imagesTr" / "synthct_000.nii.gz"
    r = runner.invoke(app, ["uncertainty", str(scan), "--model", str(model_path), "--mc-samples", "4", "--class", "organ",
                            "--label", str(ct_dataset / "labelsTr" / "synthct_000.nii.gz"), "-o", str(tmp_path / "u"), "--json"])
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in (tmp_path / "u").iterdir())
    expected = ([f"synthct_000_{n}.nii.gz" for n in ("entropy", "mutual_information", "organ_p05", "organ_p50", "organ_p95", "organ_std")]
                + ["synthct_000.nii.gz", "synthct_000_organ_uncertainty.png", "synthct_000.provenance.json", "synthct_000_organ.provenance.json",
                   "uncertainty_args.json", "labels.ctbl", "labels_itksnap.txt"])
    assert names == sorted(expected)
    src = nib.load(str(scan))
    p05, p95 = (np.asarray(nib.load(str(tmp_path / "u" / f"synthct_000_organ_{n}.nii.gz")).dataobj) for n in ("p05", "p95"))
    assert p05.shape == src.shape and (p05 <= p95 + 1e-6).all() and p95.max() <= 1.0 + 1e-6
    assert (tmp_path / "u" / "synthct_000_organ_uncertainty.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,needle", [
    (["predict", "{missing}"], "missing.nii.gz"),
    (["predict", "{txt}"], "not a NIfTI"),
    (["predict", "{scan}", "--model", "{encoder}"], "expected a fine-tuned segmenter"),
    (["predict", "{scan}", "--vote", "union", "--union-class", "spleen", "--mc-samples", "2"], "'spleen' is not one of"),
    (["predict", "{scan}", "--vote", "union", "--mc-samples", "2"], "--union-class"),
    (["predict", "{scan}", "--vote-weights", "1,2", "--vote", "weighted", "--mc-samples", "2"], "--vote-weights has 2"),
    (["predict", "{scan}", "--mc-samples", "-1"], "--mc-samples -1"),
    (["predict", "{scan}", "--dropout-encoder", "1.0", "--mc-samples", "2"], "--dropout-encoder 1.0"),
    (["predict", "{brats}"], "the model expects 1"),
    (["uncertainty", "{scan}", "--mc-samples", "1"], "at least 2 MC samples"),
    (["uncertainty", "{scan}", "--percentiles", "5,150", "--mc-samples", "2"], "0..100"),
])
def test_bad_input_one_line_no_output(args, needle, ct_dataset, mr_brats_dataset, model_path, tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("x")
    enc = tmp_path / "enc.pt"
    from ssl3d_cli import checkpoints

    checkpoints.save_checkpoint({"architecture": {}}, enc, fmt=checkpoints.ENCODER)
    subs = {"{missing}": str(tmp_path / "missing.nii.gz"), "{txt}": str(txt), "{scan}": str(ct_dataset / "imagesTs" / "synthct_008.nii.gz"),
            "{encoder}": str(enc), "{brats}": str(sorted(mr_brats_dataset.iterdir())[0])}
    argv = [subs.get(a, a) for a in args]
    if "--model" not in argv:
        argv += ["--model", str(model_path)]
    out = tmp_path / "out"
    r = runner.invoke(app, argv + ["-o", str(out)])
    assert r.exit_code != 0
    assert needle in r.output, r.output
    assert "Traceback" not in r.output
    assert not out.exists() or not [p for p in out.iterdir() if p.name.endswith(".nii.gz")]


def test_latest_model_is_found(model_path, tmp_path, monkeypatch, ct_dataset):
    runs = tmp_path / "runs"
    shutil.copytree(model_path.parent, runs / model_path.parent.name)
    monkeypatch.setenv("SSL3D_RUNS_DIR", str(runs))
    r = runner.invoke(app, ["predict", str(ct_dataset / "imagesTs" / "synthct_008.nii.gz"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "newest fine-tuned run" in r.output
