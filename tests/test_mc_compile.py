"""``--compile``: the MC sampler through torch.compile draws eager's dropout masks; a compiler failure falls back or stops."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from ssl3d_cli.config import MCConfig, ModelConfig
from ssl3d_cli.errors import ConfigError
from ssl3d_cli.inference import mc as mc_module
from ssl3d_cli.inference.mc import compile_wanted, compiled_sampler, sample_probabilities
from ssl3d_cli.models.unet import UNet
from ssl3d_cli.provenance import EXECUTION_ONLY


def _model() -> UNet:
    torch.manual_seed(0)
    return UNet(ModelConfig(widths=(4, 8), dropout_encoder=0.3, dropout_decoder=0.2), 3)


def _samples(model: UNet, image: torch.Tensor, compile: str, seed: int = 7) -> torch.Tensor:
    got: list[torch.Tensor] = []
    sample_probabilities(model, image, mc_samples=5, mc_batch=2, seed=seed, compile=compile, consume=got.append)
    return torch.cat(got)


def test_compile_wanted_by_mode_and_device() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not compile_wanted("auto", cpu) and compile_wanted("auto", cuda)
    assert compile_wanted("on", cpu) and not compile_wanted("off", cuda)
    with pytest.raises(ConfigError, match="--compile 'fast'"):
        compile_wanted("fast", cpu)
    with pytest.raises(ConfigError, match="--compile"):
        MCConfig(compile="yes").validate()
    assert "compile" in EXECUTION_ONLY  # recorded in provenance, not compared: the same masks either way


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor's CPU backend needs a C compiler")
def test_compiled_sampler_draws_eager_masks() -> None:
    """Same seed and batches: the compiled sampler's probabilities equal eager's up to float rounding (fused kernels),
    which they would not if inductor drew its own dropout masks (they differ by O(1) where a mask differs)."""
    model = _model()
    image = torch.randn(1, 1, 16, 16, 16)
    eager = _samples(model, image, "off")
    compiled = _samples(model, image, "on")
    assert compiled.shape == eager.shape == (5, 3, 16, 16, 16)
    assert torch.allclose(compiled, eager, atol=1e-5), (compiled - eager).abs().max()
    sampler = compiled_sampler(model, strict=True)
    assert {v[0] for v in sampler._variants} == {(2, 4, 16, 16, 16), (1, 4, 16, 16, 16)}  # batches of 2, 2, 1: once per shape
    seconds = sampler.compile_seconds
    assert torch.equal(_samples(model, image, "on"), compiled)  # reused, no new compilation
    assert sampler.compile_seconds == seconds
    assert (_samples(model, image, "off", seed=8) - eager).abs().max() > 1e-2  # other masks move probabilities far beyond 1e-5


def _broken_compile(fn, **kwargs):  # noqa: ANN001, ANN003, ANN202 - stands in for torch.compile
    def fail(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("backend exploded\nsecond line")
    return fail


def test_compile_failure_falls_back_under_auto(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    model = _model()
    image = torch.randn(1, 1, 16, 16, 16)
    eager = _samples(model, image, "off")
    monkeypatch.setattr(mc_module.torch, "compile", _broken_compile)
    monkeypatch.setattr(mc_module, "compile_wanted", lambda mode, device: mode != "off")  # as on CUDA
    with caplog.at_level(logging.WARNING, logger="ssl3d"):
        fallback = _samples(model, image, "auto")
    assert torch.equal(fallback, eager)
    assert [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()] == [
        "torch.compile failed (backend exploded); sampling without it (--compile off avoids the attempt)"]  # once, not per batch
    with pytest.raises(ConfigError, match=r"--compile on: torch.compile failed on cpu \(backend exploded\); use --compile off"):
        _samples(_model(), image, "on")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_sampler_draws_eager_masks() -> None:
    """On CUDA (auto compiles there), in bf16 as predict runs: the compiled samples are eager's within bf16 rounding."""
    from ssl3d_cli.runtime.device import resolve_precision

    device = torch.device("cuda")
    model = _model().to(device)
    image = torch.randn(1, 1, 32, 32, 32, device=device)
    precision = resolve_precision("auto", device)

    def samples(compile: str, seed: int = 7) -> torch.Tensor:
        got: list[torch.Tensor] = []
        sample_probabilities(model, image, mc_samples=5, mc_batch=2, seed=seed, compile=compile, autocast=precision.autocast,
                             consume=got.append)
        return torch.cat(got)

    eager, compiled = samples("off"), samples("auto")
    assert compiled_sampler(model)._variants and not compiled_sampler(model).failed
    rounding = (compiled - eager).abs().mean()  # bf16 activations, fused in another order
    other_masks = (samples("off", seed=8) - eager).abs().mean()  # what drawing other dropout masks moves
    assert rounding < 0.1 * other_masks, (rounding, other_masks)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor's CPU backend needs a C compiler")
def test_past_the_variant_limit_auto_falls_back_with_a_warning_and_eager_masks(monkeypatch, caplog):
    """Each dropout rate is a new compiled variant; past the limit torch would run eagerly without a word: the sampler
    warns once and samples eagerly from the random state the failed call started with (the masks of --compile off)."""
    model = _model()
    image = torch.randn(1, 1, 16, 16, 16)
    monkeypatch.setattr(mc_module, "compile_wanted", lambda mode, device: mode != "off")  # auto compiles, as on CUDA
    monkeypatch.setattr(mc_module, "MAX_COMPILED_VARIANTS", 1)
    torch._dynamo.reset()  # variants compiled by earlier tests count towards the limit

    def run(compile: str, rate: float) -> torch.Tensor:
        got: list[torch.Tensor] = []
        sample_probabilities(model, image, mc_samples=2, mc_batch=2, seed=5, compile=compile, dropout_encoder=rate, consume=got.append)
        return torch.cat(got)

    with caplog.at_level(logging.WARNING, logger="ssl3d"):
        assert torch.allclose(run("auto", 0.3), run("off", 0.3), atol=1e-5)  # the one allowed variant
        assert torch.equal(run("auto", 0.4), run("off", 0.4))  # a second rate: over the limit, eager
    warnings = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1
    assert compiled_sampler(model).failed
