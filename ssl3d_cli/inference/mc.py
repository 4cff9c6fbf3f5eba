"""Monte-Carlo dropout sampling (Gal & Ghahramani): only dropout modules sample.

The model stays in eval mode (normalisation layers in inference mode); exactly the
``LevelDropout`` modules with p > 0 are put in training mode. The part of the network before the
first active dropout is computed once per scan (``deterministic_prefix``) and every sample batch
continues from it, so N samples cost far less than N full passes.

``compile`` (``--compile``): the sampled part of the network and the softmax can run through ``torch.compile``
(``auto``: on CUDA; ``on``: on any device; ``off``: never). Inductor then fuses the normalisation, activation, dropout
and concatenation passes between the convolutions, which at 128^3 are memory-bound. Inductor is told to draw dropout
masks with torch's own random ops (``fallback_random``), so a compiled run draws the same masks as an eager one from
the same seed and batch sizes; what differs is float rounding in fused kernels. Compiling costs time once per process
and compiled variant (batch shape, start of sampling, dropout rates, autocast; see docs/ARCHITECTURE.md's figures); a
failure to compile, or a variant past :data:`MAX_COMPILED_VARIANTS`, falls back to eager sampling with one warning under
``auto`` (from the random state the failed call began with) and is an error under ``on``. ``auto`` compiles only with
torch >= :data:`AUTO_COMPILE_MIN_TORCH` (``runtime.compiling``).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ssl3d_cli.errors import ConfigError
from ssl3d_cli.models.unet import LevelDropout, Prefix, UNet, deterministic_prefix, sample_from_prefix
from ssl3d_cli.runtime.compiling import COMPILE_LOCK, compile_wanted, failure_reason
from ssl3d_cli.runtime.device import is_out_of_memory

log = logging.getLogger("ssl3d")

#: Compiled variants (batch shape x start of sampling x dropout rates x autocast) before compiling is given up: enough
#: for ``experiment mc-dropout``'s rates and sites in one process (torch's own default, 8, is not).
MAX_COMPILED_VARIANTS = 64


def set_mc_mode(model: UNet, *, sampling: bool, encoder: float | None = None, decoder: float | None = None) -> None:
    """Eval mode everywhere; with ``sampling`` the dropout modules (and only they) sample at the given rates."""
    model.eval()
    model.set_dropout(encoder=encoder, decoder=decoder)
    if sampling:
        for m in model.modules():
            if isinstance(m, LevelDropout) and m.p > 0:
                m.train()


def _device_bytes(device: torch.device) -> int:
    """The GPU's total memory: not what is free now, so that the batch, and with it which dropout masks each sample
    draws, is the same on every run on the same kind of GPU whatever else happens to be loaded."""
    return int(torch.cuda.get_device_properties(device).total_memory)


def auto_mc_batch(model: UNet, spatial: tuple[int, int, int], device: torch.device, n_samples: int, bytes_per_value: int = 4) -> int:
    """Samples per batch: on a GPU from its memory (a rough activation estimate per sample, half of the total, at most
    16: on an H100 at 128^3, N = 96, batches of 8/16/32 took 0.74/0.69/0.69 s and 4.6/9.0/17.7 GiB); on a CPU 2, since
    larger batches bring no speed there (64^3, N = 10, batch 1/2/4/10: 8.2/6.8/7.2/7.4 s) but cost memory.

    The batch size decides how the N samples' dropout masks are drawn, so it depends only on the model, the grid, N
    and the kind of device (``--mc-batch`` fixes it; an out-of-memory error names that option).
    """
    if device.type != "cuda":
        return max(1, min(n_samples, 2))
    voxels = spatial[0] * spatial[1] * spatial[2]
    per_sample = 0
    for level, width in enumerate(model.config.widths):
        per_sample += 6 * width * voxels // (8**level)  # encoder + decoder activations and concatenations
    per_sample = per_sample * bytes_per_value + model.num_classes * voxels * 4 * 3
    return int(max(1, min(n_samples, (_device_bytes(device) // 2) // max(per_sample, 1), 16)))


def probabilities_from_prefix(model: UNet, prefix: Prefix, n: int) -> torch.Tensor:
    """Softmax probabilities (n, num_classes, D, H, W) float32 of ``n`` dropout-sampled passes continued from ``prefix``."""
    return torch.softmax(sample_from_prefix(model, prefix, n).float(), dim=1)


class CompiledSampler:
    """:func:`probabilities_from_prefix` through ``torch.compile``, with the eager function as the fallback.

    One per model (:func:`compiled_sampler`): compiled code is kept across scans, so a cohort at a fixed grid (the
    paper's 128^3) compiles once per batch shape. ``strict``: a compile failure raises instead of falling back.
    """

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.failed = False
        self.compile_seconds = 0.0
        self._variants: set[tuple[Any, ...]] = set()
        self._fn = torch.compile(probabilities_from_prefix, dynamic=False)

    def __call__(self, model: UNet, prefix: Prefix, n: int) -> torch.Tensor:
        if self.failed:
            return probabilities_from_prefix(model, prefix, n)
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config

        # what makes torch compile anew: batch shape, where sampling starts, the dropout rates, autocast
        rates = tuple(m.p for m in model.modules() if isinstance(m, LevelDropout))
        variant = ((n, *prefix.pre.shape[1:]), prefix.stage, rates, torch.is_autocast_enabled(prefix.pre.device.type))
        first = variant not in self._variants
        device = prefix.pre.device
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        t0 = time.perf_counter()
        try:
            # one thread at a time: the config patches are process-wide. A variant beyond the recompile limit raises
            # (and falls back below) instead of running eagerly without a word, as torch would by default
            with COMPILE_LOCK, inductor_config.patch(fallback_random=True), dynamo_config.patch(
                    recompile_limit=MAX_COMPILED_VARIANTS, fail_on_recompile_limit_hit=True):
                probs = self._fn(model, prefix, n)  # fallback_random: eager's dropout masks (module docstring)
        except Exception as exc:  # noqa: BLE001 - any compiler failure has the same remedy: run eagerly
            if is_out_of_memory(exc):
                raise
            reason = failure_reason(exc)
            if self.strict:
                raise ConfigError(f"--compile on: torch.compile failed on {device} ({reason}); use --compile off") from None
            log.warning("torch.compile failed (%s); sampling without it (--compile off avoids the attempt)", reason)
            self.failed = True
            torch.set_rng_state(rng[0])  # the eager retry draws the masks --compile off would have drawn
            if rng[1] is not None:
                torch.cuda.set_rng_state(rng[1], device)
            return probabilities_from_prefix(model, prefix, n)
        if first:
            self._variants.add(variant)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.compile_seconds += time.perf_counter() - t0
            log.info("compiled the MC sampler for batch shape %s (dropout %s) in %.1f s", variant[0], rates, time.perf_counter() - t0)
        return probs


_SAMPLERS: weakref.WeakKeyDictionary[UNet, CompiledSampler] = weakref.WeakKeyDictionary()


def compiled_sampler(model: UNet, *, strict: bool = False) -> CompiledSampler:
    """The model's :class:`CompiledSampler` (made on first use, kept as long as the model lives)."""
    sampler = _SAMPLERS.get(model)
    if sampler is None or sampler.strict != strict:
        sampler = _SAMPLERS[model] = CompiledSampler(strict)
    return sampler


@torch.no_grad()
def sample_probabilities(
    model: UNet,
    image: torch.Tensor,
    *,
    mc_samples: int,
    mc_batch: int = 0,
    autocast: Callable[[], object] | None = None,
    seed: int = 0,
    dropout_encoder: float | None = None,
    dropout_decoder: float | None = None,
    compile: str = "off",
    consume: Callable[[torch.Tensor], None],
) -> int:
    """Run the deterministic pass (mc_samples <= 1) or N dropout samples and hand each batch to ``consume``.

    Args:
        image: (1, C, D, H, W) on the model's device.
        compile: ``auto`` | ``on`` | ``off``: whether the sampled passes run through ``torch.compile`` (module docstring).
        consume: called with softmax probabilities (n, num_classes, D, H, W) float32, batch by batch.
    Returns:
        The number of samples produced.
    """
    from contextlib import nullcontext

    ctx = autocast or nullcontext
    device = image.device
    if mc_samples <= 1:
        set_mc_mode(model, sampling=False)
        with ctx():
            logits = model(image)
        consume(torch.softmax(logits.float(), dim=1))
        return 1
    set_mc_mode(model, sampling=True, encoder=dropout_encoder, decoder=dropout_decoder)
    batch = mc_batch or auto_mc_batch(model, tuple(image.shape[2:]), device, mc_samples)
    probabilities = compiled_sampler(model, strict=compile == "on") if compile_wanted(compile, device) else probabilities_from_prefix
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with ctx():
            prefix = deterministic_prefix(model, image)
        done = 0
        while done < mc_samples:
            n = min(batch, mc_samples - done)
            with ctx():
                probs = probabilities(model, prefix, n)
            consume(probs)
            done += n
    set_mc_mode(model, sampling=False)
    return mc_samples
