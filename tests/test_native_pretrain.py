"""Native-resolution SimCLR pretraining (issue 15): one random region per case and step, drawn from the step's generator,
split into the K^3 patches; resume exactness, the encoder it writes, fine-tuning from it, the fixed grid unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ssl3d_cli.cli.app import app
from ssl3d_cli.config import FinetuneConfig, ModelConfig, PreprocessConfig, PretrainConfig, RuntimeConfig
from ssl3d_cli.errors import ConfigError, StopRequested
from ssl3d_cli.stages.finetune import finetune
from ssl3d_cli.stages.preprocess import preprocess
from ssl3d_cli.stages.pretrain import pretrain, pretrain_settings
from ssl3d_cli.stages.synth import synth
from ssl3d_cli.training.patches import collate_images, default_region_size, sample_regions
from ssl3d_cli.training.sampling import step_generator

runner = CliRunner()
TINY = ModelConfig(widths=(4, 8), projection_hidden=16, projection_dim=8)
RUNTIME = RuntimeConfig(device="cpu", seed=3, threads=1, deterministic=True)


def _config(epochs: int = 2, **kw) -> PretrainConfig:
    return PretrainConfig(epochs=epochs, batch_size=2, patches_per_side=2, warmup_epochs=1, checkpoint_every=1, workers=0, model=TINY, **kw)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / "last.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def native_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("native-pre") / "Task97_NativePretrain"
    synth(root, kind="ct", cases=6, unlabelled=2, seed=1, shape=(40, 40, 20))
    return preprocess(root, config=PreprocessConfig(spacing="auto"), cache_root=tmp_path_factory.mktemp("cache")).cache_dir


def _case_shapes(cache: Path) -> list[list[int]]:
    return [json.loads(p.read_text())["geometry"]["size"] for p in sorted((cache / "cases").glob("*.json"))]


@pytest.fixture(scope="module")
def native_encoder(native_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("native-enc") / "run"
    pretrain(native_cache, config=_config(epochs=1), runtime=RUNTIME, output=run)
    return run


def test_default_region_size_splits_into_patches_the_unet_takes():
    assert default_region_size([(300, 250, 90)] * 3, levels=5, patches_per_side=2) == (192, 160, 64)  # 128^3 voxels, x32, >= 64
    assert default_region_size([(28, 22, 24), (20, 30, 26)], levels=2, patches_per_side=2) == (20, 20, 24)  # fits: the (lower) median
    assert default_region_size([(5, 5, 3)], levels=3, patches_per_side=3) == (24, 24, 24)  # never below K * 2^levels


def test_sample_regions_are_a_function_of_the_step_generator_and_padded():
    d, h, w = 20, 18, 6
    images = [torch.arange(d * h * w, dtype=torch.float32).view(1, d, h, w), torch.randn(1, 12, 30, 10)]
    region = (8, 8, 8)
    a = sample_regions(images, region, gen=step_generator(torch.device("cpu"), 3, 1, 2, 0))
    b = sample_regions(images, region, gen=step_generator(torch.device("cpu"), 3, 1, 2, 0))
    c = sample_regions(images, region, gen=step_generator(torch.device("cpu"), 3, 1, 3, 0))
    assert a.shape == (2, 1, 8, 8, 8) and a.dtype == images[0].dtype
    assert torch.equal(a, b) and not torch.equal(a, c)  # same (seed, epoch, step, rank) -> same regions; another step -> others
    # the region is a window of the case: its first voxel names its start (the case's values are their flat indices)
    first = int(a[0, 0, 0, 0, 0])
    z, y = first // (h * w), first // w % h
    assert first % w == 0  # the 6-slice case is padded to 8, so its only window along W starts at 0
    assert torch.equal(a[0, 0, :, :, :w], images[0][0, z:z + 8, y:y + 8, :])
    assert (a[0, 0, :, :, w:] == images[0].min()).all()  # padded at its end with the case's minimum
    case = torch.arange(12 * 30 * 10, dtype=torch.float32).view(1, 12, 30, 10)
    firsts = [int(sample_regions([case], region, gen=torch.Generator().manual_seed(s))[0, 0, 0, 0, 0]) for s in range(60)]
    assert {f // 300 for f in firsts} == set(range(5)) and {f % 10 for f in firsts} == set(range(3))  # every window inside
    assert [t.shape for t in collate_images(images)] == [i.shape for i in images]


def test_native_pretraining_writes_the_region_into_encoder_and_config(native_cache, native_encoder):
    region = default_region_size(_case_shapes(native_cache), levels=2, patches_per_side=2)
    enc = torch.load(native_encoder / "encoder.pt", weights_only=True)
    assert enc["training"]["region_size"] == list(region) and enc["dataset"]["preprocess"]["spacing"]
    assert enc["architecture"] == {"in_channels": 1, "widths": [4, 8]}
    saved = json.loads((native_encoder / "config.json").read_text())
    assert saved["pretrain"]["region_size"] == list(region)


def test_native_resume_after_kill_and_after_sigterm_equals_uninterrupted(native_cache, tmp_path, interrupts):
    pretrain(native_cache, config=_config(), runtime=RUNTIME, output=tmp_path / "full")
    reference = _weights(tmp_path / "full")

    # killed while logging epoch 2: last.pt holds epoch 1, and the resumed run redoes epoch 2's regions
    with interrupts.crash_after_logging_epoch(2), pytest.raises(KeyboardInterrupt):
        pretrain(native_cache, config=_config(), runtime=RUNTIME, output=tmp_path / "killed")
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["epoch"] == 1
    pretrain(native_cache, config=_config(), runtime=RUNTIME, output=tmp_path / "killed", resume=True)
    for k, v in _weights(tmp_path / "killed").items():
        assert torch.equal(v, reference[k]), k

    # SIGTERM at the third step of epoch 1: resumed mid-epoch, the remaining steps cut the same regions
    with interrupts.sigterm_at_step(3), pytest.raises(StopRequested):
        pretrain(native_cache, config=_config(), runtime=RUNTIME, output=tmp_path / "term")
    saved = torch.load(tmp_path / "term" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (0, 3)
    pretrain(native_cache, config=_config(), runtime=RUNTIME, output=tmp_path / "term", resume=True)
    for k, v in _weights(tmp_path / "term").items():
        assert torch.equal(v, reference[k]), k

    with pytest.raises(ConfigError, match=r"pretrain.region_size: checkpoint \[.*\] vs now \[16, 16, 8\]"):
        pretrain(native_cache, config=_config(epochs=3), runtime=RUNTIME, output=tmp_path / "full", resume=True, region_size=(16, 16, 8))


def test_native_encoder_initialises_native_finetuning(native_cache, native_encoder, tmp_path):
    encoder_pt = native_encoder / "encoder.pt"
    config = FinetuneConfig(epochs=2, freeze_epochs=2, batch_size=2, workers=0, warmup_epochs=0, val_fraction=0.3,
                            model=ModelConfig(widths=(4, 8), dropout_encoder=0.3), patch_size=(16, 16, 8))
    result = finetune(native_cache, encoder=encoder_pt, config=config, runtime=RuntimeConfig(device="cpu", threads=1),
                      output=tmp_path / "ft", evaluate_test=False)
    assert result["encoder"] == str(encoder_pt)
    enc = torch.load(encoder_pt, weights_only=True)["state_dict"]
    model = torch.load(result["model"], weights_only=True)["state_dict"]
    for k, v in enc.items():  # frozen throughout: the U-Net's encoder is exactly the pretrained one
        assert torch.equal(model[f"encoder.{k}"], v), k


def test_region_size_refusals_and_cli(native_cache, native_encoder, ct_cache, tmp_path):
    with pytest.raises(ConfigError, match="--region-size 18,16,8: three sides, each a multiple of 4"):
        pretrain(native_cache, config=_config(epochs=1), runtime=RUNTIME, output=tmp_path / "a", region_size=(18, 16, 8))
    with pytest.raises(ConfigError, match="--region-size 16,16,4: patches of \\[8, 8, 2\\] are too small for 2 U-Net levels"):
        pretrain(native_cache, config=_config(epochs=1), runtime=RUNTIME, output=tmp_path / "b", region_size=(16, 16, 4))
    with pytest.raises(ConfigError, match="--region-size 16,16,16: only for a native-resolution cache"):
        pretrain(ct_cache, config=_config(epochs=1), runtime=RUNTIME, output=tmp_path / "c", region_size=(16, 16, 16))
    r = runner.invoke(app, ["pretrain", str(native_cache), "--resolution", "native", "--region-size", "16,16,8", "--widths", "4,8",
                            "--patches-per-side", "2", "--batch-size", "4", "--epochs", "1", "--workers", "0", "--device", "cpu",
                            "--threads", "1", "--no-progress", "--json", "-o", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["region_size"] == [16, 16, 8] and out["patches_per_step"] == 32
    assert "Native resolution: a random 16x16x8 region per scan and step" in (tmp_path / "cli" / "pretrain.log").read_text()
    r = runner.invoke(app, ["pretrain", str(native_cache), "--spacing", "1,1,1", "--no-progress"])
    assert r.exit_code == 2 and "--spacing 1,1,1: only with --resolution native" in r.output


def test_fixed_grid_pretraining_settings_are_unchanged(ct_cache, tmp_path):
    """No new keys on the fixed grid: its config.json (compared on --resume) and encoder.pt stay what they were."""
    config = PretrainConfig(epochs=1, batch_size=2, patches_per_side=1, workers=0, model=TINY)
    assert pretrain_settings(config, None) == config.to_dict()
    pretrain(ct_cache, config=config, runtime=RUNTIME, output=tmp_path / "r")
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    expected = json.loads(json.dumps(config.to_dict()))
    expected["model"]["in_channels"] = 1
    assert saved["pretrain"] == expected and "region_size" not in torch.load(tmp_path / "r" / "encoder.pt", weights_only=True)["training"]
    assert set(saved) == {"pretrain", "runtime", "preprocess", "cache", "cache_content", "world_size", "simclr_view_policy"}
