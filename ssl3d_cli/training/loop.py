"""Pieces of a resumable, signal-safe training run shared by ``pretrain`` and ``finetune``.

Determinism: the batch order of epoch e is a function of (seed, e), the augmentation generator of
step s of epoch e is seeded from (seed, e, s, rank), and the global RNG state (dropout) is saved in
``last.pt``; so a run resumed from any saved step ends with the same weights as an uninterrupted one
(on CPU, or on GPU with ``--deterministic``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ssl3d_cli.errors import CheckpointError, ConfigError, Ssl3dError

log = logging.getLogger("ssl3d")


class StopRequested(Ssl3dError):
    """SIGTERM/SIGUSR1 arrived (SLURM's warning before the time limit); state was saved. Exit 75 (EX_TEMPFAIL)."""

    exit_code = 75


class SignalGuard:
    """Turns SIGTERM/SIGUSR1 into a flag checked after every step (main thread only)."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = signum

    def __enter__(self) -> SignalGuard:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def default_runs_root() -> Path:
    env = os.environ.get("SSL3D_RUNS_DIR")
    return Path(env).expanduser() if env else Path.cwd() / "runs"


def latest_run(stage: str, dataset_name: str | None = None, root: Path | None = None, marker: str = "last.pt") -> Path | None:
    """Newest ``<root>/<stage>-<dataset>-*`` folder holding ``marker``."""
    root = root or default_runs_root()
    if not root.is_dir():
        return None
    pattern = f"{stage}-{dataset_name}-*" if dataset_name else f"{stage}-*"
    runs = [p for p in root.glob(pattern) if (p / marker).exists()]
    return max(runs, key=lambda p: (p / marker).stat().st_mtime) if runs else None


def choose_run_dir(stage: str, dataset_name: str, *, output: Path | None, resume: bool) -> Path:
    """``-o`` if given; with --resume the newest matching run; else a new time-stamped folder.

    Under torch.distributed rank 0 decides and broadcasts, so every rank uses the same folder.
    """
    import torch.distributed as dist

    chosen: list[str | None] = [None]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        if output is not None:
            chosen[0] = str(Path(output).expanduser())
        elif resume:
            found = latest_run(stage, dataset_name)
            if found is None:
                raise CheckpointError(f"--resume: no earlier {stage} run of {dataset_name} with last.pt under {default_runs_root()}; give its folder with -o")
            chosen[0] = str(found)
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            chosen[0] = str(default_runs_root() / f"{stage}-{dataset_name}-{stamp}")
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(chosen, src=0)
    return Path(chosen[0])  # type: ignore[arg-type]


def attach_log_file(run_dir: Path, name: str) -> logging.Handler | None:
    """Mirror the ``ssl3d`` logger into ``run_dir/<name>.log`` (rank 0)."""
    if os.environ.get("RANK", "0") != "0":
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / f"{name}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("ssl3d")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        handler.setLevel(logging.INFO)
    return handler


def detach_log_file(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger("ssl3d").removeHandler(handler)
        handler.close()


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR multiplier: linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine decay to 0."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


class EpochBatches:
    """Batch sampler: a seeded permutation per epoch, global batches split by rank, optional skip.

    Each step takes ``per_rank * world`` items (wrapping around so every batch is full); rank r gets
    its contiguous slice. ``set_epoch`` and ``skip`` make the order a pure function of (seed, epoch).
    """

    def __init__(self, n_items: int, per_rank: int, *, seed: int, world: int = 1, rank: int = 0, steps: int = 0) -> None:
        self.n_items, self.per_rank, self.seed, self.world, self.rank = n_items, per_rank, seed, world, rank
        self.steps = steps or max(1, math.ceil(n_items / (per_rank * world)))
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start = epoch, start_step

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        need = self.steps * self.per_rank * self.world
        reps = math.ceil(need / self.n_items)
        order = torch.cat([torch.randperm(self.n_items, generator=g) for _ in range(reps)])[:need]
        order = order.view(self.steps, self.world, self.per_rank)
        for s in range(self.start, self.steps):
            yield order[s, self.rank].tolist()


def step_generator(device: torch.device, seed: int, epoch: int, step: int, rank: int) -> torch.Generator:
    """A generator for one step's augmentations, seeded from (seed, epoch, step, rank)."""
    g = torch.Generator(device=device)
    g.manual_seed(((seed * 1_000_003 + epoch) * 100_003 + step) * 131 + rank)
    return g


def config_differences(saved: dict[str, Any], current: dict[str, Any], *, ignore: tuple[str, ...] = ()) -> list[str]:
    """Human-readable list of settings that differ (nested keys joined by dots)."""
    out: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                name = f"{prefix}.{key}" if prefix else key
                if name in ignore or key in ignore:
                    continue
                walk(a.get(key), b.get(key), name)
        elif a != b:
            out.append(f"{prefix}: checkpoint {a!r} vs now {b!r}")

    walk(saved, current, "")
    return out


def check_resume_compatible(saved_config: dict[str, Any], current_config: dict[str, Any], path: Path, *, ignore: tuple[str, ...]) -> None:
    diffs = config_differences(saved_config, current_config, ignore=ignore)
    if diffs:
        raise ConfigError(f"{path}: --resume with different settings ({'; '.join(diffs)}); use the original settings or a new -o")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def save_train_state(path: Path, *, stage: str, full_config: dict[str, Any], epoch: int, step: int, extra: dict[str, Any],
                     model: torch.nn.Module, optimizer: Any, scheduler: Any, scaler: Any) -> None:
    """Write ``last.pt`` (rank 0) with every rank's RNG state; call on all ranks (it gathers)."""
    import torch.distributed as tdist

    from ssl3d_cli import checkpoints
    from ssl3d_cli.runtime.device import rng_state

    rng: Any = rng_state()
    if tdist.is_available() and tdist.is_initialized():
        gathered: list[Any] = [None] * tdist.get_world_size()
        tdist.all_gather_object(gathered, rng)
        rng = gathered
        if tdist.get_rank() != 0:
            return
    checkpoints.save_checkpoint({
        "stage": stage, "config": full_config, "epoch": epoch, "step": step, "extra": extra,
        "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "rng": rng,
    }, path, fmt=checkpoints.TRAIN_STATE)


def restore_train_state(path: Path, *, stage: str, full_config: dict[str, Any], mutable: tuple[str, ...], model: torch.nn.Module,
                        optimizer: Any, scheduler: Any, scaler: Any, rank: int = 0) -> dict[str, Any]:
    """Load ``last.pt`` after checking it is this stage with compatible settings; restores RNG states."""
    from ssl3d_cli import checkpoints
    from ssl3d_cli.runtime.device import set_rng_state

    state = checkpoints.load_checkpoint(path, fmt=checkpoints.TRAIN_STATE)
    if state.get("stage") != stage:
        raise ConfigError(f"{path}: holds a {state.get('stage')} run, not {stage}")
    check_resume_compatible(state["config"], full_config, path, ignore=mutable)
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
    return state


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """On resume, drop metric lines of epochs after the checkpoint (they are about to be redone)."""
    if not path.exists():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("epoch", 0) <= last_epoch]
    from ssl3d_cli.data.cache import atomic_write_bytes

    atomic_write_bytes(path, "".join(f"{ln}\n" for ln in kept).encode())


@dataclass
class TrainingContext:
    """Where and how a training stage runs: device, process group, precision and the dataset's cache."""

    device: torch.device
    dist: Any  # runtime.distributed.DistInfo
    precision: Any  # runtime.device.Precision
    cache: Any  # data.cache.Cache


def start_training(dataset: Path | str, *, runtime: Any, preprocess_config: Any, cache_root: Path | None) -> TrainingContext:
    """Resolve the device, join the process group, set threads and precision, and get the cache.

    Rank 0 preprocesses on demand while the other ranks wait, then every rank opens the cache.
    """
    from ssl3d_cli.runtime.device import resolve_device, resolve_precision, set_threads
    from ssl3d_cli.runtime.distributed import barrier, init_distributed
    from ssl3d_cli.stages.preprocess import ensure_cache

    device = resolve_device(runtime.device)
    dist = init_distributed(device)
    set_threads(runtime.threads)
    precision = resolve_precision(runtime.precision, device)
    if dist.is_main:
        cache = ensure_cache(dataset, config=preprocess_config, cache_root=cache_root)
    barrier()
    if not dist.is_main:
        cache = ensure_cache(dataset, config=preprocess_config, cache_root=cache_root)
    return TrainingContext(device, dist, precision, cache)


def checked_last_path(run_dir: Path, *, resume: bool) -> Path:
    """``run_dir/last.pt``, refusing --resume without it and a fresh start over it."""
    last_path = run_dir / "last.pt"
    if resume and not last_path.exists():
        raise ConfigError(f"--resume: {last_path} not found; start without --resume or give the run folder with -o")
    if not resume and last_path.exists():
        raise ConfigError(f"{run_dir}: already holds a run (last.pt); add --resume to continue it or choose another -o")
    return last_path


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel under torch.distributed, the bare model otherwise."""
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def optimisation_step(compute: Any, *, optimizer: Any, scheduler: Any, scaler: Any, oom_hint: str) -> Any:
    """One update: ``compute()`` returns (loss, ...); backward through the scaler, step, schedule.

    An out-of-memory error becomes a DeviceError carrying ``oom_hint`` (which option to lower).
    Returns what ``compute`` returned.
    """
    from ssl3d_cli.errors import DeviceError
    from ssl3d_cli.runtime.device import is_out_of_memory

    try:
        out = compute()
        loss = out[0] if isinstance(out, tuple) else out
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    except RuntimeError as exc:
        if is_out_of_memory(exc):
            raise DeviceError(f"out of memory; {oom_hint}") from None
        raise
    scheduler.step()
    return out
