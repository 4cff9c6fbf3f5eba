"""The ``ssl3d`` Typer application: one module per subcommand, registered here."""

from __future__ import annotations

import typer

from ssl3d_cli import __version__
from ssl3d_cli.cli import (
    demo,
    evaluate,
    experiment,
    finetune,
    predict,
    preprocess,
    pretrain,
    synth,
    uncertainty,
)
from ssl3d_cli.cli.common import Ssl3dCommand

app = typer.Typer(
    name="ssl3d",
    help="Self-supervised 3D segmentation: 3D SimCLR pretraining, U-Net fine-tuning, Monte-Carlo-dropout inference.\n\n"
    "Pipeline: preprocess -> pretrain -> finetune -> predict / uncertainty -> evaluate. Try `ssl3d demo`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ssl3d {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit.")) -> None:
    """ssl3d command-line tool."""


for module in (synth, preprocess, pretrain, finetune, predict, uncertainty, evaluate, demo, experiment):
    app.command(module.NAME, cls=Ssl3dCommand, help=module.HELP, epilog=module.EPILOG,
                no_args_is_help=getattr(module, "NO_ARGS_HELP", True))(module.command)


def main() -> None:
    app()
