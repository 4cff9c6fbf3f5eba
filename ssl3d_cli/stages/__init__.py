"""The Python API: one function per subcommand.

    from ssl3d_cli.stages import synth, preprocess, pretrain, finetune, predict, uncertainty, evaluate, demo, experiment

Each name is the stage *function*, whatever was imported before: the stage modules are imported here
and the functions bound after them (a lazy ``__getattr__`` cannot do that, since importing a
submodule ``ssl3d_cli.stages.pretrain`` rebinds the package attribute ``pretrain`` to the module).
To reach a stage *module* (e.g. to patch it in a test), use
``importlib.import_module("ssl3d_cli.stages.pretrain")``. ``ssl3d --help`` stays cheap because the
CLI imports this package only when a command runs.
"""

from __future__ import annotations

from ssl3d_cli.stages.demo import demo
from ssl3d_cli.stages.evaluate import evaluate
from ssl3d_cli.stages.experiment import experiment
from ssl3d_cli.stages.finetune import finetune
from ssl3d_cli.stages.predict import predict
from ssl3d_cli.stages.preprocess import ensure_cache, preprocess
from ssl3d_cli.stages.pretrain import pretrain
from ssl3d_cli.stages.synth import synth
from ssl3d_cli.stages.uncertainty import uncertainty

__all__ = ["synth", "preprocess", "ensure_cache", "pretrain", "finetune", "predict", "uncertainty", "evaluate", "demo", "experiment"]
