"""One resumable, signal-safe training run: the shape both ``pretrain`` and ``finetune`` take.

A :class:`TrainingRun` owns the run folder and its ``config.json``, ``--resume`` and its
compatibility checks, the signal guard, DDP wrapping, the epoch/step iteration in seeded order,
``metrics.jsonl``, the checkpoint cadence (``last.pt``) and the stop-on-signal exit. A stage supplies
only its :class:`Recipe`: the model, the loss of one step, what happens when an epoch starts and
ends (unfreezing, validation, best model) and the artefact it writes at each checkpoint.

Data path: DataLoader workers read and pin the batches in one pass over the whole run (:class:`RunBatches`),
:class:`DevicePrefetcher` copies batch i+1 to the device and runs the recipe's ``prepare`` on it (SimCLR: the random
views) while step i runs, across epoch ends too, and the step
figures stay on the device until the epoch ends (:class:`StepMetrics`): inside an epoch a single-process bf16/fp32
loop never waits for the GPU, except where a recipe's step does. Under torch.distributed a stop signal is agreed on
one step late (``StopVote``), so the vote does not drain the GPU's queue either; with fp16 the gradient scaler still
waits once per step.

Determinism: the batch order of epoch e is a function of (seed, e), the augmentation generator of
step s of epoch e is seeded from (seed, e, s, rank), and every rank's global RNG state (dropout) is
saved in ``last.pt``; so a run resumed from any saved step ends with the same weights as an
uninterrupted one (on CPU, or on GPU with ``--deterministic``).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ssl3d_cli import checkpoints
from ssl3d_cli.data.cache import content_differences
from ssl3d_cli.errors import CheckpointError, ConfigError, DeviceError, StopRequested
from ssl3d_cli.files import atomic_write_bytes, atomic_write_json
from ssl3d_cli.runs import default_runs_root, latest_run
from ssl3d_cli.runtime import progress
from ssl3d_cli.runtime.device import (
    describe_device,
    is_out_of_memory,
    resolve_device,
    resolve_precision,
    rng_state,
    set_rng_state,
    set_threads,
)
from ssl3d_cli.runtime.distributed import (
    DistInfo,
    StopVote,
    all_reduce_mean,
    barrier,
    broadcast_object,
    gather_objects,
    init_distributed,
    is_main_process,
    world_size,
)
from ssl3d_cli.training.data import DevicePrefetcher
from ssl3d_cli.training.sampling import EpochBatches, RunBatches, step_generator, warmup_cosine

log = logging.getLogger("ssl3d")

#: Settings that may change between a run and its ``--resume`` (anywhere in the nested config).
RESUME_MUTABLE = ("epochs", "checkpoint_every", "workers", "device", "threads", "compile")
#: Top-level config key of the training cache's content fingerprint (``Cache.content_fingerprint()``): compared by
#: content on ``--resume``, with :func:`ssl3d_cli.data.cache.content_differences`.
CACHE_CONTENT = "cache_content"
#: Top-level config key of the cache folder: kept in config.json for provenance; compared only for a run saved without
#: a content fingerprint (before it existed), since a cache may move (node-local scratch) or be re-made between jobs.
CACHE_PATH = "cache"
#: Top-level config keys of a fine-tuning run's encoder: its file's SHA-256 is compared on ``--resume`` when both configs
#: have it, its path only otherwise (an encoder copied to node-local scratch is the same encoder).
ENCODER_CONTENT = "encoder_sha256"
ENCODER_PATH = "encoder"


class SignalGuard:
    """Turns SIGTERM/SIGUSR1 into a flag checked after every step (main thread only)."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = signum

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker start-up: leave SIGTERM/SIGUSR1 to the main process.

    SLURM signals every process of a job step, DataLoader workers included; a worker killed by it would crash its rank
    in the middle of a step instead of letting the rank save its state. The workers end with the loader as usual.
    """
    for s in SignalGuard.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


@dataclass(frozen=True)
class TrainingContext:
    """Where and how a training stage runs: device, process group and precision."""

    device: torch.device
    dist: DistInfo
    precision: Any  # runtime.device.Precision


def start_training(runtime: Any) -> TrainingContext:
    """Resolve the device, join the process group (under torchrun/srun), set threads and precision."""
    device = resolve_device(runtime.device)
    dist = init_distributed(device)
    set_threads(runtime.threads)
    return TrainingContext(device, dist, resolve_precision(runtime.precision, device))


def optimisation_step(compute: Callable[[], Any], *, optimizer: Any, scheduler: Any, scaler: Any, oom_hint: str) -> Any:
    """One update: ``compute()`` returns (loss, ...); backward through the scaler, step, schedule.

    An out-of-memory error becomes a DeviceError carrying ``oom_hint`` (which option to lower).
    Returns what ``compute`` returned.
    """
    with out_of_memory_hint(oom_hint):
        out = compute()
        loss = out[0] if isinstance(out, tuple) else out
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    scheduler.step()
    return out


@contextmanager
def out_of_memory_hint(hint: str) -> Iterator[None]:
    """Turn an out-of-memory error inside the block into a DeviceError carrying ``hint`` (which option to lower)."""
    try:
        yield
    except RuntimeError as exc:
        if is_out_of_memory(exc):
            raise DeviceError(f"out of memory; {hint}") from None
        raise


@dataclass(frozen=True)
class Schedule:
    """How long and how fast a run trains (the parts of a stage's config the run itself needs)."""

    epochs: int
    batch_size: int  # scans per step on each rank
    learning_rate: float
    weight_decay: float
    warmup_epochs: int
    checkpoint_every: int
    workers: int
    steps_per_epoch: int = 0  # 0: one pass over the items per epoch


class Recipe:
    """What a stage brings to a :class:`TrainingRun`; override the hooks it needs.

    Attributes:
        model: the bare network (not DDP-wrapped), on the device.
        dataset: one training item per index (the run batches and orders them).
        state: plain values saved in ``last.pt`` and restored on resume (e.g. the best score so far).
        description: what the progress bar says.
        oom_hint: which option to lower when a step runs out of memory.
        shown: metric names shown next to the progress bar.
        collate: how the loader batches items (None: torch's default, which stacks equal shapes).
    """

    model: torch.nn.Module
    dataset: Dataset
    state: dict[str, Any]
    description: str = "Training"
    oom_hint: str = "lower --batch-size"
    shown: tuple[str, ...] = ("loss", "lr")
    collate: Callable[[list[Any]], Any] | None = None

    def prepare(self, batch: Any, gen: torch.Generator) -> Any:
        """Work on a step's batch (on the device) that needs no model: e.g. random augmentation from ``gen``, the step's
        generator. Runs one step ahead, on the copy stream on CUDA (:class:`DevicePrefetcher`), so its kernels overlap the
        previous step's; also across an epoch end, before the next epoch's ``epoch_start``, so it must not depend on
        what that changes (e.g. which parameters train). What it returns is what ``step`` gets. Default: the batch."""
        return batch

    def step(self, model: torch.nn.Module, batch: Any, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one step (to minimise) and other per-step figures to average over the epoch.

        ``batch``: what ``prepare`` returned; ``gen``: the step's generator, after ``prepare``'s draws.
        """
        raise NotImplementedError

    def epoch_start(self, epoch: int) -> bool:
        """Called before each epoch (and once at start-up); True when the set of trainable parameters changed."""
        return False

    def epoch_end(self, model: torch.nn.Module, epoch: int, metrics: dict[str, Any], *, steps: int) -> dict[str, Any]:
        """Called on every rank after epoch ``epoch`` (0-based) with its metrics line so far.

        ``metrics`` holds ``epoch`` (1-based), the epoch means of the step loss and figures, ``lr`` and
        ``seconds``; ``steps`` is how many steps this process ran in it. Returns the line to log.
        """
        return metrics

    def checkpoint(self, model: torch.nn.Module, epoch: int, metrics: dict[str, Any]) -> None:
        """Called on rank 0 at the checkpoint cadence (epochs done: ``epoch``), just before ``last.pt`` is saved."""


def choose_run_dir(stage: str, dataset_name: str, *, output: Path | None, resume: bool) -> Path:
    """``-o`` if given; with --resume the newest matching run; else a new time-stamped folder.

    Under torch.distributed rank 0 decides and broadcasts, so every rank uses the same folder.
    """
    chosen: str | None = None
    if is_main_process():
        if output is not None:
            chosen = str(Path(output).expanduser())
        elif resume:
            found = latest_run(stage, dataset_name)
            if found is None:
                raise CheckpointError(f"--resume: no earlier {stage} run of {dataset_name} with last.pt under {default_runs_root()}; give its folder with -o")
            chosen = str(found)
        else:
            chosen = str(default_runs_root() / f"{stage}-{dataset_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return Path(broadcast_object(chosen))


def checked_last_path(run_dir: Path, *, resume: bool) -> Path:
    """``run_dir/last.pt``, refusing --resume without it and a fresh start over it."""
    last_path = run_dir / "last.pt"
    if resume and not last_path.exists():
        raise ConfigError(f"--resume: {last_path} not found; start without --resume or give the run folder with -o")
    if not resume and last_path.exists():
        raise ConfigError(f"{run_dir}: already holds a run (last.pt); add --resume to continue it or choose another -o")
    return last_path


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


def resume_differences(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(settings that differ, cache content that differs) between a saved run config and the current one.

    The cache is compared by its content fingerprint (``CACHE_CONTENT``), not by its folder (``CACHE_PATH``), when both
    configs have one; a config saved without it falls back to the folder. Likewise a fine-tuning run's encoder: by its
    SHA-256 (``ENCODER_CONTENT``) when both have it, else by its path.
    """
    saved, current = dict(saved), dict(current)
    saved_content, current_content = saved.pop(CACHE_CONTENT, None), current.pop(CACHE_CONTENT, None)
    cache_diffs: list[str] = []
    if saved_content is not None and current_content is not None:
        cache_diffs = content_differences(saved_content, current_content)
        saved.pop(CACHE_PATH, None)
        current.pop(CACHE_PATH, None)
    if saved.get(ENCODER_CONTENT) is not None and current.get(ENCODER_CONTENT) is not None:
        saved.pop(ENCODER_PATH, None)  # the same bytes elsewhere are the same encoder; the hashes are compared below
        current.pop(ENCODER_PATH, None)
    elif ENCODER_CONTENT not in saved:  # a run saved before the hash was recorded: its path decides, as it did then
        current.pop(ENCODER_CONTENT, None)
    return config_differences(saved, current, ignore=RESUME_MUTABLE), cache_diffs


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare network inside a DDP wrapper (or the network itself)."""
    return model.module if hasattr(model, "module") else model


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel under torch.distributed, the bare model otherwise."""
    if world_size() == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def attach_log_file(run_dir: Path, name: str) -> logging.Handler:
    """Mirror the ``ssl3d`` logger into ``run_dir/<name>.log`` (call on rank 0 only)."""
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
    """One JSON line per epoch."""
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def _epoch_of(line: str) -> int | None:
    """The epoch of a metrics line; None for a blank or half-written one (a kill in the middle of an append)."""
    try:
        return int(json.loads(line).get("epoch", 0))
    except (ValueError, AttributeError):
        return None


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """On resume, drop metric lines of epochs after the checkpoint (they are about to be redone)."""
    if not path.exists():
        return
    kept = [ln for ln in path.read_text().splitlines() if _epoch_of(ln) is not None and _epoch_of(ln) <= last_epoch]
    atomic_write_bytes(path, "".join(f"{ln}\n" for ln in kept).encode())


class StepMetrics:
    """The epoch's running sums of the step figures (loss and the recipe's), kept on the device.

    ``add`` only queues additions: converting each step's figures to Python floats would make the host wait for the
    GPU at every step. ``floats`` converts once (mean over ranks, then to the host); call it on every rank together.
    Sums are float64 (float32 on MPS, which has no float64): a Python float accumulation of float32 figures, as the
    loop kept before, gives the same values, so a run resumed mid-epoch logs what an uninterrupted one does.
    ``base`` holds plain floats carried over from ``last.pt`` (``{"loss": sum, ..., "n": steps}``).
    """

    def __init__(self, device: torch.device, base: dict[str, float] | None = None) -> None:
        self.device = device
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.base: dict[str, float] = dict(base or {"loss": 0.0, "n": 0})
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        """Add one step's figures (scalar tensors on the device); no host synchronisation."""
        for name, value in values.items():
            value = value.detach().to(self.dtype)
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.steps += 1

    def floats(self) -> dict[str, float]:
        """Sums so far as plain floats (``base`` included) and ``n`` the step count: what ``last.pt`` stores.

        Synchronises with the device, and under torch.distributed all-reduces (the same names, in the same order, on
        every rank: all ranks run the same steps). The mean over ranks of the sums is the sum of the per-step means.
        """
        out = dict(self.base)
        for name, total in self.sums.items():
            out[name] = out.get(name, 0.0) + float(all_reduce_mean(total))
        out["n"] = self.base.get("n", 0) + self.steps
        return out

    def means(self) -> dict[str, float]:
        """Epoch means of every figure (sums / steps)."""
        totals = self.floats()
        return {k: v / max(totals["n"], 1) for k, v in totals.items() if k != "n"}


class TrainingRun:
    """One run folder: ``config.json``, ``metrics.jsonl``, ``last.pt``, ``<stage>.log`` and the stage's artefacts.

    Use as a context manager (it mirrors the log into the run folder while open)::

        with TrainingRun("pretrain", name, config=full_config, output=o, resume=r, device=d, dist=di, seed=s) as run:
            run.fit(recipe, schedule)
    """

    def __init__(self, stage: str, dataset_name: str, *, config: dict[str, Any], output: Path | None, resume: bool,
                 device: torch.device, dist: DistInfo, precision: Any, seed: int) -> None:
        """
        Args:
            stage: ``pretrain``, ``finetune`` or ``scratch``: names the run folder and tags ``last.pt``.
            config: every setting of the run (saved as ``config.json``; compared on ``--resume``).
        """
        self.stage, self.config, self.resume = stage, config, resume
        self.device, self.dist, self.precision, self.seed = device, dist, precision, seed
        self.dir = choose_run_dir(stage, dataset_name, output=output, resume=resume)
        self.last_path = checked_last_path(self.dir, resume=resume)
        self.metrics_path = self.dir / "metrics.jsonl"
        self._log_handler: logging.Handler | None = None

    def __enter__(self) -> TrainingRun:
        if self.dist.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._log_handler = attach_log_file(self.dir, "finetune" if self.stage == "scratch" else self.stage)
        return self

    def __exit__(self, *exc: Any) -> None:
        detach_log_file(self._log_handler)
        self._log_handler = None

    # --- last.pt ---------------------------------------------------------------------------------

    def _save_state(self, model: torch.nn.Module, opt: Any, *, epoch: int, step: int, extra: dict[str, Any]) -> None:
        """Write ``last.pt`` (rank 0) with every rank's RNG state; call on all ranks (it gathers)."""
        rngs = gather_objects(rng_state())
        if not self.dist.is_main:
            return
        optimizer, scheduler, scaler = opt
        checkpoints.save_checkpoint({
            "stage": self.stage, "config": self.config, "epoch": epoch, "step": step, "extra": extra,
            "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": rngs if len(rngs) > 1 else rngs[0],
        }, self.last_path, fmt=checkpoints.TRAIN_STATE)

    def _restore_state(self, model: torch.nn.Module, opt: Any) -> dict[str, Any]:
        """Load ``last.pt`` after checking it is this stage with compatible settings; restores RNG states."""
        state = checkpoints.load_checkpoint(self.last_path, fmt=checkpoints.TRAIN_STATE)
        if state.get("stage") != self.stage:
            raise ConfigError(f"{self.last_path}: holds a {state.get('stage')} run, not {self.stage}")
        diffs, cache_diffs = resume_differences(state["config"], self.config)
        if diffs:
            raise ConfigError(f"{self.last_path}: --resume with different settings ({'; '.join(diffs)}); use the original settings or a new -o")
        if cache_diffs:
            raise ConfigError(f"{self.last_path}: --resume with a cache whose content differs from the run's ({'; '.join(cache_diffs)}; "
                              f"the run was trained from {state['config'].get(CACHE_PATH)}, now {self.config.get(CACHE_PATH)}); resume from "
                              "that cache or one re-made from the same scans and settings, or start a new -o")
        optimizer, scheduler, scaler = opt
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][self.dist.rank] if isinstance(state["rng"], list) else state["rng"])
        return state

    # --- the loop --------------------------------------------------------------------------------

    def _stop(self, model: torch.nn.Module, opt: Any, recipe: Recipe, *, epoch: int, step: int, sums: StepMetrics,
              signum: int | None) -> None:
        """Save ``last.pt`` at (epoch, step: the steps done) on every rank together, then raise StopRequested (exit 75)."""
        self._save_state(model, opt, epoch=epoch, step=step, extra={"accum": sums.floats(), **recipe.state})
        barrier()  # no rank exits 75 before rank 0 has written last.pt: exit 75 always means "state saved"
        raise StopRequested(f"signal {signum or 'on another rank'}: state saved in {self.last_path}; rerun with --resume to continue")

    def _prepare(self, recipe: Recipe, batches: RunBatches, index: int, batch: Any) -> tuple[Any, torch.Generator]:
        """``recipe.prepare`` of the ``index``-th batch of the run's loader pass, with its step's generator (which the
        step then continues): the draws depend only on (seed, epoch, step, rank), not on when they are made."""
        epoch, step = batches.position(index)
        gen = step_generator(self.device, self.seed, epoch, step, self.dist.rank)
        with out_of_memory_hint(recipe.oom_hint):
            return recipe.prepare(batch, gen), gen

    def fit(self, recipe: Recipe, schedule: Schedule) -> dict[str, Any]:
        """Train ``recipe.model`` for ``schedule.epochs`` (continuing ``last.pt`` when resuming).

        Returns:
            the last epoch's metrics line (empty if no epoch was left to run).
        Raises:
            StopRequested: SIGTERM/SIGUSR1 arrived; the state was saved mid-epoch and ``--resume`` continues.
        """
        device, dist = self.device, self.dist
        model = recipe.model
        optimizer = torch.optim.AdamW(model.parameters(), lr=schedule.learning_rate, weight_decay=schedule.weight_decay)
        batches = EpochBatches(len(recipe.dataset), schedule.batch_size, seed=self.seed, world=dist.world_size, rank=dist.rank,
                               steps=schedule.steps_per_epoch)
        total_steps = schedule.epochs * batches.steps
        # the schedule always follows the current --epochs: a resumed, longer run keeps the warm-up + cosine shape
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, schedule.warmup_epochs * batches.steps))
        scaler = torch.amp.GradScaler(device.type, enabled=self.precision.needs_scaler)
        opt = (optimizer, scheduler, scaler)
        start_epoch, start_step, carried = 0, 0, None
        if self.resume:
            state = self._restore_state(model, opt)
            start_epoch, start_step = state["epoch"], state["step"]
            carried = state["extra"]["accum"]  # plain floats: the sums of the epoch's steps done before the stop
            recipe.state.update({k: v for k, v in state["extra"].items() if k != "accum"})
            log.info("Resuming %s at epoch %d step %d", self.dir, start_epoch + 1, start_step)
            if dist.is_main:
                truncate_metrics(self.metrics_path, start_epoch)
        if dist.is_main:
            atomic_write_json(self.dir / "config.json", self.config)
        log.info("Device: %s, precision %s", describe_device(device), self.precision.name)
        recipe.epoch_start(start_epoch)
        wrapped = wrap_ddp(model, device)
        # the loader draws its workers' base seed from its own generator, not the global RNG: a draw from the global
        # state at an iterator's start would shift every later dropout mask after a mid-epoch resume
        # one loader pass for the whole run (RunBatches): the workers start once, and the next epoch's first batch is
        # read and prepared while this epoch's last step runs (the batch sampler runs in this process)
        run_batches = RunBatches(batches, start_epoch=start_epoch, start_step=start_step, end_epoch=schedule.epochs)
        loader = DataLoader(recipe.dataset, batch_sampler=run_batches, num_workers=schedule.workers, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(self.seed), worker_init_fn=ignore_stop_signals,
                            collate_fn=recipe.collate)
        # batch i+1 is copied to the device and prepared while step i runs, across epoch ends too
        incoming = iter(DevicePrefetcher(loader, device, prepare=partial(self._prepare, recipe, run_batches)))
        votes = StopVote(device)  # under torchrun: a stop signal on any rank stops all ranks at the same step
        metrics: dict[str, Any] = {}
        wrapped.train()
        with SignalGuard() as guard, progress.task(recipe.description, total=schedule.epochs) as bar:
            bar.advance(start_epoch)
            for epoch in range(start_epoch, schedule.epochs):
                if recipe.epoch_start(epoch):
                    wrapped = wrap_ddp(model, device)  # DDP must see the newly trainable parameters
                t_epoch, sums = time.perf_counter(), StepMetrics(device, carried)
                carried = None
                for step in range(start_step, batches.steps):
                    batch, gen = next(incoming)
                    compute = partial(recipe.step, wrapped, batch, gen)
                    loss, stats = optimisation_step(compute, optimizer=optimizer, scheduler=scheduler, scaler=scaler, oom_hint=recipe.oom_hint)
                    sums.add({"loss": loss, **stats})
                    if votes(guard.requested is not None):
                        votes.close()
                        self._stop(wrapped, opt, recipe, epoch=epoch, step=step + 1, sums=sums, signum=guard.requested)
                if votes.close():  # asked during the epoch's last step (torchrun): stop before the epoch's bookkeeping
                    self._stop(wrapped, opt, recipe, epoch=epoch, step=batches.steps, sums=sums, signum=guard.requested)
                start_step, steps = 0, sums.steps
                means = sums.means()  # waits for the epoch's queued device work, so the time below includes it
                seconds = time.perf_counter() - t_epoch
                metrics = recipe.epoch_end(wrapped, epoch, {"epoch": epoch + 1, **means, "lr": scheduler.get_last_lr()[0], "seconds": seconds},
                                           steps=steps)
                if dist.is_main:
                    append_metrics(self.metrics_path, metrics)
                barrier()
                bar.advance(1, **{k: metrics[k] for k in recipe.shown if k in metrics})
                if epoch + 1 == schedule.epochs or (epoch + 1) % schedule.checkpoint_every == 0:
                    if dist.is_main:  # the artefact first: a kill between the two leaves last.pt behind, which redoes the epoch
                        recipe.checkpoint(wrapped, epoch + 1, metrics)
                    self._save_state(wrapped, opt, epoch=epoch + 1, step=0, extra={"accum": {"loss": 0.0, "n": 0}, **recipe.state})
        return metrics
