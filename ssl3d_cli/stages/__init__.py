"""The Python API: one function per subcommand.

    from ssl3d_cli.stages import preprocess, pretrain, finetune, predict, uncertainty, evaluate, synth

Imports are lazy so that importing this package stays cheap.
"""

from __future__ import annotations

from typing import Any

_STAGES = {
    "preprocess": "ssl3d_cli.stages.preprocess",
    "ensure_cache": "ssl3d_cli.stages.preprocess",
    "pretrain": "ssl3d_cli.stages.pretrain",
    "finetune": "ssl3d_cli.stages.finetune",
    "predict": "ssl3d_cli.stages.predict",
    "uncertainty": "ssl3d_cli.stages.uncertainty",
    "evaluate": "ssl3d_cli.stages.evaluate",
    "synth": "ssl3d_cli.stages.synth",
    "demo": "ssl3d_cli.stages.demo",
    "experiment": "ssl3d_cli.stages.experiment",
}

__all__ = list(_STAGES)


def __getattr__(name: str) -> Any:
    if name in _STAGES:
        import importlib

        return getattr(importlib.import_module(_STAGES[name]), name)
    raise AttributeError(name)
