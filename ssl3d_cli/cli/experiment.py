"""``ssl3d experiment``: built by a later issue."""

from __future__ import annotations

from ssl3d_cli.cli.common import fail

NAME = "experiment"
HELP = "(not built yet) see the issue tracker."
EPILOG = ""
NO_ARGS_HELP = False


def command() -> None:
    fail("ssl3d experiment is not built yet in this version", 3)
