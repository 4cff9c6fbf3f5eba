"""Device choice, precision, seeds and CPU threads."""

from __future__ import annotations

import logging
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ssl3d_cli.errors import ConfigError, DeviceError

log = logging.getLogger("ssl3d")


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU. ``cuda``/``cuda:N``/``mps``/``cpu`` are checked.

    Under torchrun the local rank picks the CUDA device.
    """
    spec = spec.strip().lower()
    # torchrun sets LOCAL_RANK; a plain srun step only SLURM_LOCALID (init_distributed maps it later, after the device is chosen)
    local_rank = int(os.environ.get("LOCAL_RANK") or (os.environ.get("SLURM_LOCALID", "0") if int(os.environ.get("SLURM_NTASKS", "1")) > 1 else "0"))
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {spec}: no CUDA GPU is visible (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu or install the CUDA build of torch"
            )
        if spec == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        try:
            index = int(spec.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"--device {spec!r}: expected auto, cpu, cuda, cuda:N or mps") from None
        if index >= torch.cuda.device_count():
            raise DeviceError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise DeviceError("--device mps: Apple MPS is not available here; use --device cpu")
        return torch.device("mps")
    raise ConfigError(f"--device {spec!r}: expected auto, cpu, cuda, cuda:N or mps")


def describe_device(device: torch.device) -> str:
    """Human description, with the GPU name on CUDA."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


@dataclass(frozen=True)
class Precision:
    """Autocast settings for one device."""

    name: str  # fp32 | bf16 | fp16
    device_type: str

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def autocast(self) -> Any:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    @property
    def needs_scaler(self) -> bool:
        return self.name == "fp16"


def resolve_precision(spec: str, device: torch.device) -> Precision:
    """``auto``: bf16 on CUDA where supported, else fp16 (with a scaler); fp32 on CPU and MPS."""
    if spec == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "fp32"
    else:
        name = spec
    if name == "fp16" and device.type == "cpu":
        raise ConfigError("--precision fp16 is not supported on CPU; use fp32 or bf16")
    return Precision(name=name, device_type=device.type)


def set_threads(threads: int) -> int:
    """Set torch's intra-op threads: the given number, or the cores this process may use."""
    if threads <= 0:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - macOS
            threads = os.cpu_count() or 1
        world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, threads // world)
    torch.set_num_threads(threads)
    return threads


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally ask for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def rng_state() -> dict[str, Any]:
    """All RNG states, as plain types and tensors (for checkpoints)."""
    state: dict[str, Any] = {
        "python": list(_py_state_to_plain(random.getstate())),
        "numpy": _np_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_py_state_from_plain(state["python"]))
    np.random.set_state(_np_state_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_plain(s: tuple) -> tuple:
    return (s[0], list(s[1]), s[2])


def _py_state_from_plain(s: list) -> tuple:
    return (s[0], tuple(s[1]), s[2])


def _np_state_to_plain(s: tuple) -> dict[str, Any]:
    return {"name": s[0], "keys": torch.from_numpy(s[1].astype(np.int64)), "pos": int(s[2]),
            "has_gauss": int(s[3]), "cached": float(s[4])}


def _np_state_from_plain(d: dict[str, Any]) -> tuple:
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
