"""Options and error handling shared by every subcommand."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

# Every boolean option is an on/off pair (--verify / --no-verify, the typer convention); Ssl3dCommand also reads
# --verify=true / --verify false. NoProgressOpt keeps its negative meaning (True: no bars) with --progress as its "off".
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps (auto: CUDA, then MPS, then CPU).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (splits, augmentations, MC dropout).")]
JsonOpt = Annotated[bool, typer.Option("--json/--no-json", help="Print one JSON object on stdout: what was written, key figures.")]
QuietOpt = Annotated[bool, typer.Option("--quiet/--no-quiet", "-q", help="Only warnings and errors on stderr.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose/--no-verbose", "-v", help="Debug messages on stderr.")]
NoProgressOpt = Annotated[bool, typer.Option("--no-progress/--progress", help="No progress bars or periodic progress lines.")]
DebugOpt = Annotated[bool, typer.Option("--debug/--no-debug", help="Show the Python traceback on errors.")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="auto (bf16/fp16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16.")]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="CPU threads for torch (0: the cores available).")]
CacheDirOpt = Annotated[Path | None, typer.Option("--cache-dir", help="Root of preprocessed caches (default: $SSL3D_CACHE_DIR or the user cache dir).")]


#: Spelled-out values a boolean option accepts as ``--flag=VALUE``; ``--flag VALUE`` takes only true/false (a positional
#: argument could be any other word).
_TRUE_WORDS, _FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def spelled_out_booleans(params: list[Any], args: list[str]) -> list[str]:
    """``args`` with ``--flag=true`` / ``--flag false`` (any case) turned into ``--flag`` / ``--no-flag``.

    Only boolean on/off options among ``params`` (click parameters) are touched, and only their long names; anything
    else, and everything after ``--``, is left for the parser (an unknown value after ``=`` is still its error).
    """
    spellings: dict[str, tuple[str, str]] = {}  # option name -> (its spelling for true, for false)
    for p in params:
        if getattr(p, "is_bool_flag", False) and getattr(p, "secondary_opts", None):
            on, off = next(o for o in p.opts if o.startswith("--")), p.secondary_opts[0]
            spellings.update({o: (on, off) for o in p.opts if o.startswith("--")})
            spellings.update({o: (off, on) for o in p.secondary_opts})
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return out + args[i:]
        name, eq, value = arg.partition("=")
        if eq and name in spellings and value.lower() in _TRUE_WORDS + _FALSE_WORDS:
            out.append(spellings[name][value.lower() in _FALSE_WORDS])
        elif arg in spellings and i + 1 < len(args) and args[i + 1].lower() in ("true", "false"):
            out.append(spellings[arg][args[i + 1].lower() == "false"])
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


class Ssl3dCommand(TyperCommand):
    """A subcommand whose boolean options also take a spelled-out value (:func:`spelled_out_booleans`)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, spelled_out_booleans(self.params, args))


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (test runners swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _is_main_process() -> bool:
    from ssl3d_cli.runtime.distributed import is_main_process  # imports torch: only once a command runs, never for --help

    return is_main_process()


def setup_logging(*, quiet: bool, verbose: bool) -> None:
    """Log lines to stderr: rich on a terminal, plain time-stamped lines in cluster logs."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logger = logging.getLogger("ssl3d")
    logger.handlers.clear()
    logger.setLevel(level)
    logger.propagate = False
    if not _is_main_process():
        logger.setLevel(logging.WARNING)
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=False)
    else:
        handler = _CurrentStderrHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)


def emit(result: dict[str, Any], *, as_json: bool, human: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Results to stdout: one JSON object with --json, else the human summary."""
    if not _is_main_process():
        return
    if as_json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    elif human is not None:
        human(result)
    else:
        for key, value in result.items():
            sys.stdout.write(f"{key}: {value}\n")
    sys.stdout.flush()


def stdout_console():  # -> rich.console.Console
    """A console for result tables: the terminal's width, or 200 columns in files and pipes (rich would use 80)."""
    from rich.console import Console

    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)


def fail(message: str, code: int = 2) -> None:
    """One red line on stderr and a non-zero exit."""
    if sys.stderr.isatty():
        typer.secho(f"error: {message}", fg="red", err=True)
    else:
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


#: The exit statuses of a batch command (``predict``, ``uncertainty``), for their ``--help`` epilogs.
BATCH_EXIT_CODES = ("Exit status: 0 every case done (or kept); 2 a bad option, model or scan, named in one line (without --skip-bad "
                    "the batch stops there and the line counts the cases left); 3 out of memory; 4 with --skip-bad some cases failed "
                    "(each listed with its reason, the others done).")
SkipBadOpt = Annotated[bool, typer.Option("--skip-bad/--no-skip-bad", help="Continue past cases that cannot be read or preprocessed; list each "
                                          "with its reason at the end and exit 4 if any failed.")]


def raise_if_cases_failed(result: dict[str, Any]) -> None:
    """After a batch's result was printed: exit 4 (``CasesFailed``) when ``--skip-bad`` passed over failed cases.

    Raises:
        CasesFailed: ``result["failed"]`` is not empty.
    """
    from ssl3d_cli.errors import CasesFailed

    failed = result.get("failed") or []
    if failed:
        names = ", ".join(f["case"] for f in failed[:5]) + (", ..." if len(failed) > 5 else "")
        raise CasesFailed(f"{len(failed)} case(s) failed ({names}; each listed with its reason); the other cases were done: "
                          "fix or remove those scans and rerun the same command")


def run_stage(body: Callable[[], dict[str, Any]], *, as_json: bool, quiet: bool = False, verbose: bool = False,
              no_progress: bool = False, debug: bool = False,
              human: Callable[[dict[str, Any]], None] | None = None,
              check: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Run a stage: set up logging and progress, turn domain errors into one line and an exit code.

    Args:
        check: called with the result once it was printed; an ``Ssl3dError`` it raises becomes one line and its exit
            code (:func:`raise_if_cases_failed`: exit 4 after a ``--skip-bad`` batch with failed cases).
    """
    from ssl3d_cli.errors import Ssl3dError
    from ssl3d_cli.runtime import progress

    setup_logging(quiet=quiet, verbose=verbose)
    progress.configure(enabled=not (no_progress or quiet))
    try:
        result = body()
    except Ssl3dError as exc:
        if debug:
            traceback.print_exc()
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted; rerun the same command (with --resume for training) to continue", 130)
    except typer.Exit:
        raise
    except Exception as exc:  # unexpected: still no traceback unless --debug
        from ssl3d_cli.runtime.device import is_out_of_memory

        if debug:
            traceback.print_exc()
        if is_out_of_memory(exc):
            fail("out of memory; lower --batch-size (or --mc-batch / --size) and try again", 3)
        fail(f"unexpected {exc.__class__.__name__}: {exc} (rerun with --debug for the traceback and report it)", 1)
    else:
        emit(result, as_json=as_json, human=human)
        if check is not None:
            try:
                check(result)
            except Ssl3dError as exc:
                fail(str(exc), exc.exit_code)
    finally:
        if "torch.distributed" in sys.modules:  # only when a stage imported it (never for --help)
            from ssl3d_cli.runtime.distributed import shutdown_distributed

            shutdown_distributed()
