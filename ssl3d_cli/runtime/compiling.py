"""When ``torch.compile`` is used (``--compile auto|on|off``), shared by MC sampling and SimCLR augmentation.

``auto`` compiles on CUDA only: there the fused kernels pay for the one-off compile within a run, while on a CPU the
compile takes longer than it saves (inductor's C++ build) and a missing compiler would only cost a warning.
"""

from __future__ import annotations

import threading

import torch

from ssl3d_cli.errors import ConfigError

#: ``--compile`` choices.
COMPILE_MODES = ("auto", "on", "off")
#: ``auto`` compiles from this torch version on: older inductor could lay out the dropout input differently under
#: ``fallback_random`` and so draw other masks than eager (pytorch#174078); 2.11 (CUDA) and 2.13 (CPU) were checked here.
AUTO_COMPILE_MIN_TORCH = (2, 11)
#: Held while compiled code runs under patched dynamo/inductor settings: those patches are process-wide.
COMPILE_LOCK = threading.Lock()


def torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def compile_wanted(mode: str, device: torch.device) -> bool:
    """Whether ``--compile MODE`` compiles on ``device`` (``auto``: on CUDA only, with torch >= :data:`AUTO_COMPILE_MIN_TORCH`).

    Raises:
        ConfigError: an unknown mode.
    """
    if mode not in COMPILE_MODES:
        raise ConfigError(f"--compile {mode!r}: choose auto, on or off")
    return mode == "on" or (mode == "auto" and device.type == "cuda" and torch_version() >= AUTO_COMPILE_MIN_TORCH)


def failure_reason(exc: BaseException) -> str:
    """The first line of a compiler error (at most 200 characters), for a one-line warning or refusal."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
