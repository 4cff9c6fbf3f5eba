"""Sharding a case list across cluster array jobs (``--shard I/N``, I = ``$SLURM_ARRAY_TASK_ID``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from ssl3d_cli.errors import InputDataError

T = TypeVar("T")


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"I/N"`` (I from 0 to N-1, as SLURM_ARRAY_TASK_ID) -> (I, N); None -> (0, 1)."""
    if shard is None:
        return (0, 1)
    if isinstance(shard, tuple):
        index, count = shard
    else:
        try:
            a, b = shard.split("/")
            index, count = int(a), int(b)
        except ValueError:
            raise InputDataError(f"--shard {shard!r}: expected I/N, e.g. 0/4 (I from 0 to N-1)") from None
    if count < 1 or not 0 <= index < count:
        raise InputDataError(f"--shard {index}/{count}: need 0 <= I < N")
    return index, count


def take_shard(items: Sequence[T], shard: str | tuple[int, int] | None) -> list[T]:
    """Every N-th item starting at I: shards are disjoint, cover all items and differ in size by at most one."""
    index, count = parse_shard(shard)
    return list(items[index::count])
