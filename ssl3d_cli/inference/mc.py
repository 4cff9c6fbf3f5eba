"""Monte-Carlo dropout sampling (Gal & Ghahramani): only dropout modules sample.

The model stays in eval mode (normalisation layers in inference mode); exactly the
``LevelDropout`` modules with p > 0 are put in training mode. The part of the network before the
first active dropout is computed once per scan (``deterministic_prefix``) and every sample batch
continues from it, so N samples cost far less than N full passes.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from ssl3d_cli.models.unet import LevelDropout, UNet, deterministic_prefix, sample_from_prefix


def set_mc_mode(model: UNet, *, sampling: bool, encoder: float | None = None, decoder: float | None = None) -> None:
    """Eval mode everywhere; with ``sampling`` the dropout modules (and only they) sample at the given rates."""
    model.eval()
    model.set_dropout(encoder=encoder, decoder=decoder)
    if sampling:
        for m in model.modules():
            if isinstance(m, LevelDropout) and m.p > 0:
                m.train()


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 4 * 2**30


def auto_mc_batch(model: UNet, spatial: tuple[int, int, int], device: torch.device, n_samples: int, bytes_per_value: int = 4) -> int:
    """Samples per batch: on a GPU from free memory (a rough activation estimate per sample, half of what is
    free, at most 16: on an H100 at 128^3, N = 96, batches of 8/16/32 took 0.74/0.69/0.69 s and 4.6/9.0/17.7
    GiB); on a CPU 2, since larger batches bring no speed there (64^3, N = 10, batch 1/2/4/10:
    8.2/6.8/7.2/7.4 s) but cost memory.
    """
    if device.type != "cuda":
        return max(1, min(n_samples, 2))
    voxels = spatial[0] * spatial[1] * spatial[2]
    per_sample = 0
    for level, width in enumerate(model.config.widths):
        per_sample += 6 * width * voxels // (8**level)  # encoder + decoder activations and concatenations
    per_sample = per_sample * bytes_per_value + model.num_classes * voxels * 4 * 3
    return int(max(1, min(n_samples, (_available_bytes(device) // 2) // max(per_sample, 1), 16)))


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
    consume: Callable[[torch.Tensor], None],
) -> int:
    """Run the deterministic pass (mc_samples <= 1) or N dropout samples and hand each batch to ``consume``.

    Args:
        image: (1, C, D, H, W) on the model's device.
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
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with ctx():
            prefix = deterministic_prefix(model, image)
        done = 0
        while done < mc_samples:
            n = min(batch, mc_samples - done)
            with ctx():
                logits = sample_from_prefix(model, prefix, n)
            consume(torch.softmax(logits.float(), dim=1))
            done += n
    set_mc_mode(model, sampling=False)
    return mc_samples
