"""Training items read from the preprocessed cache (memory-mapped, copied out per item), and their way to the device."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ssl3d_cli.data.cache import Cache


class CacheCases(Dataset):
    """Cases of a cache as training items.

    Item: the image (C, D, H, W) in the cache dtype (float16/float32), or with ``labels`` the pair
    (image, label (D, H, W) uint8 class indices).
    """

    def __init__(self, cache: Cache, case_ids: list[str], *, labels: bool = False) -> None:
        self.cache, self.case_ids, self.labels = cache, case_ids, labels

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, i: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        case_id = self.case_ids[i]
        image = torch.from_numpy(np.array(self.cache.image(case_id)))  # copy out of the memory map
        if not self.labels:
            return image
        return image, torch.from_numpy(self.cache.label(case_id))


Batch = Any  # a tensor, or a tuple/list of tensors (what the DataLoader collates)


def batch_to_device(batch: Batch, device: torch.device) -> Batch:
    """Every tensor of ``batch`` (nested tuples/lists too: cases of different sizes) on ``device``, copied
    asynchronously (the loader pins memory for CUDA)."""
    if isinstance(batch, (tuple, list)):
        return type(batch)(batch_to_device(b, device) for b in batch)
    return batch.to(device, non_blocking=True)


def _tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, (tuple, list)):
        return [t for b in batch for t in _tensors(b)]
    return [batch] if isinstance(batch, torch.Tensor) else []


Prepare = Callable[[int, Batch], Any]  # (index of the batch in this pass, the batch on the device) -> what the step gets


class DevicePrefetcher:
    """Batches of an iterable on ``device``, the next one copied (and prepared) while the current step runs.

    On CUDA the copy of batch i+1 is queued on a side stream as soon as batch i is handed out, so the host-to-device
    transfer (from pinned memory) overlaps step i instead of opening step i+1. ``prepare`` (e.g. SimCLR's random views)
    is queued on the same side stream right after the copy, so its kernels run beside step i's forward and backward
    passes instead of before step i+1's. The compute stream waits for that stream before it uses what is handed out,
    and ``record_stream`` tells the caching allocator those tensors are used there (their memory is not handed out
    again while step i+1 may still read them). Elsewhere batches go through ``.to(device)`` and ``prepare`` in turn.
    Order and content are those of the iterable; one batch is read (and prepared) ahead.
    """

    def __init__(self, batches: Iterable[Batch], device: torch.device, prepare: Prepare | None = None) -> None:
        """The copy stream is made once, not per pass: the caching allocator reuses a freed block only on the stream
        that allocated it, so a new stream per pass would strand the previous passes' cached memory."""
        self.batches, self.device, self.prepare = batches, device, prepare
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _ready(self, index: int, batch: Batch) -> Any:
        batch = batch_to_device(batch, self.device)
        return batch if self.prepare is None else self.prepare(index, batch)

    def __iter__(self) -> Iterator[Any]:
        if self.device.type != "cuda":
            for index, batch in enumerate(self.batches):
                yield self._ready(index, batch)
            return
        stream = self.stream
        compute = torch.cuda.current_stream(self.device)
        source = enumerate(self.batches)

        def copy_next() -> Any:
            item = next(source, None)
            if item is None:
                return None
            with torch.cuda.stream(stream):
                return self._ready(*item)

        upcoming = copy_next()
        while upcoming is not None:
            compute.wait_stream(stream)  # queued on the GPU: the host does not wait
            for t in _tensors(upcoming):
                t.record_stream(compute)
            current, upcoming = upcoming, copy_next()
            yield current
