"""The split file (``split.json``): which labelled case trains, validates, tests or is unused.

Written by ``finetune`` into its run folder and read by ``finetune --split``, ``predict --split test``,
the demo and the experiments, always through this module. Format::

    {"format": "ssl3d-split", "dataset": NAME, "seed": S, "test_fraction": .., "val_fraction": ..,
     "label_fraction": .., "counts": {role: n}, "cases": {case_id: role}}

with roles ``train``, ``val`` (the scans that select the best epoch; both come from the label
budget, see :func:`make_split`), ``test``, ``unused`` (labelled scans outside the budget) and
``unlabelled``; ``labelled_used`` counts the budget's scans for training and for selection.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ssl3d_cli.errors import ConfigError, InputDataError
from ssl3d_cli.files import atomic_write_json

SPLIT_FORMAT = "ssl3d-split"
SPLIT_FILE = "split.json"
ROLES = ("train", "val", "test", "unused")


def selection_stride(val_fraction: float) -> int:
    """Every k-th scan of a label budget is held back for model selection: k = round(1 / val_fraction) (0: none)."""
    return max(2, math.floor(1.0 / val_fraction + 0.5)) if val_fraction > 0 else 0  # halves up; at most every 2nd scan selects


def make_split(labelled: list[str], *, seed: int, test_fraction: float, val_fraction: float, label_fraction: float) -> dict[str, list[str]]:
    """Seeded, nested splits of the labelled cases, where a label fraction is a budget of labelled scans.

    The test cases depend only on (seed, test_fraction, case list). The rest (the pool) is ordered once
    by the seed; label fraction f gives a budget of the first round(f * pool) scans (halves up), and
    every labelled scan the run touches comes from that budget: within it every k-th scan
    (k = round(1 / val_fraction), see :func:`selection_stride`) is held back to select the best
    epoch, the others train. A budget smaller than k has no selection scans (the run keeps its last
    epoch). Budgets, training sets and selection sets are each nested across fractions, and
    fraction 1 uses the whole pool (e.g. 197 of the paper's 281 pancreas scans with 84 in test).

    Returns:
        ``{role: [case_id, ...]}`` for the roles in :data:`ROLES` (``val``: the selection scans).
    """
    ids = sorted(labelled)
    rng = np.random.default_rng(seed)
    order = [ids[i] for i in rng.permutation(len(ids))]
    n_test = int(round(test_fraction * len(ids)))
    test, pool = order[:n_test], order[n_test:]
    n_budget = math.floor(label_fraction * len(pool) + 0.5)
    k = selection_stride(val_fraction)
    budget = pool[:n_budget]
    val = [c for i, c in enumerate(budget) if k and i % k == k - 1]
    train = [c for i, c in enumerate(budget) if not (k and i % k == k - 1)]
    if not train:
        raise ConfigError(f"--label-fraction {label_fraction}: leaves no training case ({len(pool)} case(s) in the labelled pool "
                          f"would give a budget of {label_fraction * len(pool):.2f} case(s); use a fraction of at least "
                          f"{0.5 / max(len(pool), 1):.3f})")
    return {"train": train, "val": val, "test": test, "unused": pool[n_budget:]}


def write_split(path: Path, split: dict[str, list[str]], *, dataset_name: str, case_ids: Iterable[str], seed: int,
                test_fraction: float, val_fraction: float, label_fraction: float) -> Path:
    """Write ``split.json``; every case of the dataset gets a role (``unlabelled`` if the split omits it)."""
    roles = {c: "unlabelled" for c in case_ids}
    for role, ids in split.items():
        for c in ids:
            roles[c] = role
    record: dict[str, Any] = {"format": SPLIT_FORMAT, "dataset": dataset_name, "seed": seed, "test_fraction": test_fraction,
                              "val_fraction": val_fraction, "label_fraction": label_fraction,
                              "counts": {r: len(v) for r, v in split.items()}, "labelled_used": labelled_used(split), "cases": roles}
    atomic_write_json(path, record)
    return path


def labelled_used(split: dict[str, list[str]]) -> dict[str, int]:
    """How many labelled scans a run touches: for training, for model selection, and together (the label budget)."""
    n_train, n_selection = len(split["train"]), len(split["val"])
    return {"training": n_train, "selection": n_selection, "total": n_train + n_selection}


def _read_record(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputDataError(f"{path}: split file not found; it is written into each fine-tuning run folder") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise InputDataError(f"{path}: cannot read split file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != SPLIT_FORMAT or not isinstance(data.get("cases"), dict):
        raise InputDataError(f"{path}: not an ssl3d split.json")
    return data


def read_split(path: Path, *, dataset_name: str | None = None, case_ids: Iterable[str] | None = None) -> dict[str, list[str]]:
    """``{role: sorted case ids}`` for the roles in :data:`ROLES`.

    Args:
        dataset_name, case_ids: when given, refuse a split made for another dataset or naming cases
            the dataset does not have.
    """
    data = _read_record(path)
    roles: dict[str, str] = data["cases"]
    if dataset_name is not None or case_ids is not None:
        unknown = sorted(set(roles) - set(case_ids)) if case_ids is not None else []
        if unknown or (dataset_name is not None and data.get("dataset") != dataset_name):
            raise InputDataError(f"{path}: split of dataset {data.get('dataset')!r} names case(s) not in {dataset_name!r} "
                                 f"(e.g. {unknown[:3]}); use a split made for this dataset")
    return {role: sorted(c for c, r in roles.items() if r == role) for role in ROLES}


def split_cases(path: Path, role: str) -> list[str]:
    """The sorted case ids that ``split.json`` gives ``role`` (e.g. the held-out ``test`` cases)."""
    if role not in ROLES:
        raise ConfigError(f"split role {role!r}: choose one of {', '.join(ROLES)}")
    return read_split(path)[role]
