"""torch.distributed set-up under torchrun / srun, and a gather that keeps gradients.

The tool never spawns workers itself: it detects the launcher's environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized()


def process_rank() -> int:
    """This process's global rank: the process group's once joined, else the launcher's environment.

    Before ``init_distributed`` runs (logging set-up, progress) torchrun has set ``RANK``; a plain
    ``srun`` step has only ``SLURM_PROCID``. A lone process is rank 0.
    """
    if _joined():
        return dist.get_rank()
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if launched_distributed():
        return int(os.environ.get("SLURM_PROCID", "0"))
    return 0


def is_main_process() -> bool:
    """True on rank 0 (or alone): the process that logs, shows progress, prints results and writes run files."""
    return process_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if _joined() else 1


def launched_distributed() -> bool:
    """True under torchrun (WORLD_SIZE > 1) or a multi-task srun step."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ


def init_distributed(device: torch.device) -> DistInfo:
    """Initialise the process group from the environment; a no-op for a single process."""
    if _joined():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if not launched_distributed():
        return DistInfo()
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:  # srun without torchrun
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown_distributed() -> None:
    if _joined():
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns each rank its slice of the summed gradient.

    With DDP averaging parameter gradients over ranks, the summed-then-sliced gradient makes the
    result equal to a single process computing the mean loss over the global batch.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rank = dist.get_rank()
        ctx.n = tensor.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (N, ...) from every rank in rank order -> (world*N, ...), with gradients."""
    if world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (for logging)."""
    if world_size() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def barrier() -> None:
    if _joined():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable value); ``obj`` itself alone."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order, on every rank (``[obj]`` alone)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


class StopVote:
    """Whether any rank asked to stop, agreed on by every rank one step late, without making the host wait for the
    step just queued.

    Each call posts this step's flag (an asynchronous all-reduce, MAX) and answers with the previous call's result: a
    flag raised at step i stops every rank after step i + 1, together. On CUDA the result is copied to pinned memory
    behind the reduction and read after an event, so the host waits for the previous step only while the GPU still
    has the current one queued (a plain ``.item()`` would drain the queue at every step). A lone process answers with
    its own flag at once. Every rank must call it the same number of times, and :meth:`close` at the same points
    (a training run closes it at every epoch end, so a stop never crosses one). With ``TORCH_NCCL_BLOCKING_WAIT=1``
    NCCL's ``wait`` blocks the host, and each vote waits for its step again.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pending: tuple[torch.Tensor, Any, Any] | None = None  # (value, ready event, work) of the last posted vote

    def __call__(self, flag: bool) -> bool:
        if world_size() == 1:
            return flag
        value = torch.full((1,), 1.0 if flag else 0.0, device=self.device)  # a fill kernel, not a host-to-device copy
        work = dist.all_reduce(value, op=dist.ReduceOp.MAX, async_op=True)
        if self.device.type == "cuda":
            work.wait()  # NCCL: the current stream waits for the reduction; the host does not
            host = torch.empty(1, pin_memory=True)
            host.copy_(value, non_blocking=True)
            ready = torch.cuda.Event(blocking=True)  # the host sleeps while it waits, leaving the core to the loader
            ready.record()
            posted: tuple[torch.Tensor, Any, Any] = (host, ready, None)
        else:
            posted = (value, None, work)
        previous, self._pending = self._pending, posted
        return previous is not None and self._read(previous)

    @staticmethod
    def _read(vote: tuple[torch.Tensor, Any, Any]) -> bool:
        value, ready, work = vote
        if work is not None:
            work.wait()
        if ready is not None:
            ready.synchronize()
        return bool(value.item() > 0)

    def close(self) -> bool:
        """Wait for the last posted vote (no reduction is left in flight) and return it."""
        pending, self._pending = self._pending, None
        return pending is not None and self._read(pending)
