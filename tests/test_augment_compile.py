"""SimCLR augmentation through torch.compile (``pretrain --compile``): the same draws as eager, views within float
rounding, one compile per patch shape, and a compiler failure that falls back (auto) or stops (on)."""

from __future__ import annotations

import importlib
import json
import logging
import shutil

import pytest
import torch

from ssl3d_cli.augment import simclr
from ssl3d_cli.augment.simclr import ViewAugmenter, augment_view, blend_view, draw_view
from ssl3d_cli.config import ModelConfig, PretrainConfig, RuntimeConfig
from ssl3d_cli.errors import ConfigError

ALL = ("rotate", "colour", "identity", "noise", "blur", "sobel", "cutout")
TINY = ModelConfig(widths=(4, 8), projection_hidden=16, projection_dim=8)
RUNTIME = RuntimeConfig(device="cpu", seed=3, threads=1, deterministic=True)
NEEDS_CC = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                              reason="inductor's CPU backend needs a C compiler")
SHAPE = (16, 1, 8, 8, 8)  # the patches of one step of the stage test below (2 scans of 16^3, 2^3 patches each)


def _x(shape=SHAPE, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _broken(fn, **kwargs):  # noqa: ANN001, ANN003, ANN202 - stands in for torch.compile
    def fail(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("backend exploded\nsecond line")
    return fail


@NEEDS_CC
def test_compiled_views_are_eager_views_within_rounding():
    x = _x()
    augment = ViewAugmenter(ALL, compile=True, strict=True)
    g_compiled, g_eager = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for _ in range(2):  # the second call reuses the compiled code
        got = augment(x, g_compiled)
        want = augment_view(x, augmentations=ALL, gen=g_eager, blend=True)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert not torch.equal(got, x)
    assert torch.equal(g_compiled.get_state(), g_eager.get_state())  # the draws are eager's: the stream is unchanged
    assert augment.compiled and augment._shapes == {SHAPE} and augment.compile_seconds > 0
    seconds = augment.compile_seconds
    augment(x, torch.Generator().manual_seed(5))
    assert augment.compile_seconds == seconds  # no second compile for the same shape


def test_compile_failure_falls_back_to_the_same_draws_under_auto(monkeypatch, caplog):
    monkeypatch.setattr(simclr.torch, "compile", _broken)
    x = _x()
    augment = ViewAugmenter(ALL, compile=True)
    with caplog.at_level(logging.WARNING, logger="ssl3d"):
        got = augment(x, torch.Generator().manual_seed(6))
    drawn, params = draw_view(x, augmentations=ALL, gen=torch.Generator().manual_seed(6))
    assert torch.equal(got, blend_view(x, drawn, params))
    assert not augment.compiled
    assert [r.getMessage() for r in caplog.records if "backend exploded" in r.getMessage()] != []
    assert "second line" not in caplog.text  # one line
    caplog.clear()
    augment(x, torch.Generator().manual_seed(7))  # eager from now on, without a second warning
    assert "backend exploded" not in caplog.text


def test_compile_failure_stops_under_on(monkeypatch):
    monkeypatch.setattr(simclr.torch, "compile", _broken)
    with pytest.raises(ConfigError, match=r"--compile on: torch.compile of the SimCLR augmentation failed .*backend exploded\); use --compile off"):
        ViewAugmenter(ALL, compile=True, strict=True)(_x(), torch.Generator().manual_seed(0))


def test_out_of_memory_while_compiling_is_not_hidden(monkeypatch):
    def oom(fn, **kwargs):  # noqa: ANN001, ANN003, ANN202
        def fail(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return fail
    monkeypatch.setattr(simclr.torch, "compile", oom)
    with pytest.raises(torch.OutOfMemoryError):
        ViewAugmenter(ALL, compile=True)(_x(), torch.Generator().manual_seed(0))


def test_compile_setting_is_checked_and_may_change_on_resume(ct_cache, tmp_path):
    with pytest.raises(ConfigError, match="--compile 'fast'"):
        PretrainConfig(compile="fast", model=TINY).validate((16, 16, 16))
    stage = importlib.import_module("ssl3d_cli.stages.pretrain")
    config = PretrainConfig(epochs=1, batch_size=2, patches_per_side=2, warmup_epochs=1, checkpoint_every=1, workers=0,
                            compile="off", model=TINY)
    first = stage.pretrain(ct_cache, config=config, runtime=RUNTIME, output=tmp_path / "run")
    assert first["augmentation_compiled"] is False
    longer = PretrainConfig(**{**config.__dict__, "epochs": 2, "compile": "auto"})  # auto: eager on a CPU
    second = stage.pretrain(ct_cache, config=longer, runtime=RUNTIME, output=tmp_path / "run", resume=True)
    assert second["augmentation_compiled"] is False
    assert json.loads((tmp_path / "run" / "config.json").read_text())["pretrain"]["compile"] == "auto"


@NEEDS_CC
def test_pretraining_with_compiled_augmentation_follows_the_eager_run(ct_cache, tmp_path):
    """--compile on through the stage: the same draws, so the losses follow the eager run's (the CPU's eager path
    computes the chosen samples only, the compiled one blends: float rounding apart, the same views)."""
    stage = importlib.import_module("ssl3d_cli.stages.pretrain")
    losses = {}
    for mode in ("off", "on"):
        config = PretrainConfig(epochs=2, batch_size=2, patches_per_side=2, warmup_epochs=1, checkpoint_every=2, workers=0,
                                compile=mode, augmentations=ALL, model=TINY)
        result = stage.pretrain(ct_cache, config=config, runtime=RUNTIME, output=tmp_path / mode)
        assert result["augmentation_compiled"] is (mode == "on")
        losses[mode] = [json.loads(ln)["loss"] for ln in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_views_match_eager_and_need_no_host_sync():
    x = _x((16, 1, 16, 16, 16)).cuda()
    drawn, params = draw_view(x, augmentations=ALL, gen=torch.Generator(device="cuda").manual_seed(0))
    try:  # the compiler's whole message on failure (ViewAugmenter keeps its first line)
        torch.compile(blend_view, dynamic=False, fullgraph=True)(x, drawn, params)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"torch.compile of the blend pass failed: {exc}")
    augment = ViewAugmenter(ALL, compile=True, strict=True)
    augment(x, torch.Generator(device="cuda").manual_seed(0))  # compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any operation that makes the host wait for the GPU raises
    try:
        for seed in range(3):
            augment(x, torch.Generator(device="cuda").manual_seed(seed))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # blur's convolutions in full float32 for both
    try:
        got = augment(x, torch.Generator(device="cuda").manual_seed(2))
        want = augment_view(x, augmentations=ALL, gen=torch.Generator(device="cuda").manual_seed(2))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_blend_pass_is_one_graph_also_under_deterministic_algorithms(device):
    """No graph break in the blend pass (ViewAugmenter compiles it with fullgraph=True). Under deterministic algorithms
    on CUDA, F.pad(mode="replicate") takes a Python path dynamo 2.11 skips: the Sobel pads by concatenation instead."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        x = _x().to(device)
        drawn, params = draw_view(x, augmentations=ALL, gen=torch.Generator(device=device).manual_seed(8))
        explained = torch._dynamo.explain(blend_view)(x, drawn, params)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
