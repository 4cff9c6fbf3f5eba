"""The one home for writing output files: atomically, and with the mode the user's umask asks for.

Every file ssl3d writes for later use (checkpoints, cache arrays and records, predictions, tables,
figures) goes through :func:`atomic_output`: the content is written into a temporary sibling and
renamed onto the final name only once complete, so an interrupted run never leaves a truncated file
under a name that a resumed run or a colleague would trust.

``tempfile.mkstemp`` creates its file with mode 0600 (whatever the umask) and a rename keeps the
mode, so without care every output would be unreadable to the rest of a group on shared cluster
storage. :func:`atomic_output` therefore gives the file the mode that a plain ``open(path, "w")``
would have given it, ``0o666 & ~umask``, before renaming it into place.

This module imports neither torch nor (at import time) numpy: the CLI imports it for ``--help``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssl3d_cli.errors import InputDataError

if TYPE_CHECKING:
    import numpy as np

# What open() asks the kernel for when it creates a regular file; the umask then takes bits away.
_DEFAULT_FILE_MODE = 0o666


def current_umask() -> int:
    """The process's file mode creation mask, read without changing it where the platform allows.

    The portable way to read the umask is to set it and set it back (``old = os.umask(0);
    os.umask(old)``). Between those two calls the whole process runs with umask 0, so any file that
    another thread (a data-loader thread, a logging handler) creates in that window comes out
    world-writable. Linux (since 4.7) reports the umask in ``/proc/self/status`` instead, which reads it
    without touching it; the set-and-restore fallback is only used where that line is not available
    (other systems, old kernels, no /proc mounted).

    Returns:
        The umask, e.g. ``0o022``.
    """
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
                for line in fh:
                    if line.startswith("Umask:"):
                        return int(line.split(":", 1)[1].strip(), 8)
        except (OSError, ValueError):
            pass  # no /proc, or an unexpected format: fall back to the portable (racy) way below
    old = os.umask(0o077)  # if another thread creates a file meanwhile, the mask it sees is the strict one, not 0
    os.umask(old)
    return old


@contextlib.contextmanager
def atomic_output(path: Path | str, *, suffix: str = "") -> Iterator[Path]:
    """Write a file atomically: the caller writes into a temporary sibling that replaces ``path`` on success.

    The temporary file is created in the destination folder (a rename is only atomic within one file
    system), hidden (``.tmp-`` prefix) and keeps ``suffix`` so that writers which pick the format from
    the file name (nibabel for ``.nii.gz``, numpy for ``.npy``) still work. Before the rename it is
    given the mode ``0o666 & ~umask``, as if it had been created by ``open(path, "w")``.

    Example::

        with atomic_output(out / "model.pt", suffix=".pt") as tmp:
            torch.save(state, tmp)

    Args:
        path: the final file; its parent folders are created when missing.
        suffix: ending of the temporary file's name, e.g. ``".nii.gz"``.

    Any exception raised inside the ``with`` block is re-raised after the temporary file is removed;
    an existing ``path`` is then left as it was.

    Yields:
        The temporary file's path (an existing, empty file) for the caller to write or overwrite.

    Raises:
        OSError: the folder or the temporary file cannot be created, or the rename fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)  # callers write by path (torch.save, nib.save, savefig open it themselves)
    tmp = Path(name)
    try:
        yield tmp
        # Set the mode on the temporary file, so the final name never exists with mkstemp's 0600.
        os.chmod(tmp, _DEFAULT_FILE_MODE & ~current_umask())
        os.replace(tmp, path)
    except BaseException:  # also on Ctrl-C: never leave a half-written temporary file behind
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_output`).

    Args:
        path: the final file; parent folders are created when missing.
        data: the whole content.
    """
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically, without newline translation (CSV keeps its ``\\r\\n``).

    Args:
        path: the final file; parent folders are created when missing.
        text: the whole content.
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> None:
    """Write ``obj`` as indented JSON with a final newline to ``path`` atomically.

    Args:
        path: the final file; parent folders are created when missing.
        obj: anything :func:`json.dumps` accepts.
    """
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_save_npy(path: Path | str, array: np.ndarray) -> None:
    """Save ``array`` in ``.npy`` format to ``path`` atomically (memory-mappable later with ``np.load``).

    Args:
        path: the final file; parent folders are created when missing.
        array: the array to save.
    """
    import numpy as np  # lazily: keeps ``import ssl3d_cli.files`` (and so ``ssl3d --help``) cheap

    # Through a file handle: np.save would append ".npy" to a path that lacks it.
    with atomic_output(path, suffix=".npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def check_writable(folder: Path) -> None:
    """Fail early, with the folder named, when outputs cannot be written there.

    Args:
        folder: the output folder; created when missing.

    Raises:
        InputDataError: the folder cannot be created or a file cannot be created in it.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise InputDataError(f"{folder}: output folder is not writable ({exc.strerror}); choose another with -o/--cache-dir") from None


def source_stat(path: Path, *, series_uid: str | None = None) -> dict[str, Any]:
    """Size and mtime of an input, the things that make its cached case or prediction stale when they change.

    A file: ``{"size", "mtime_ns"}``. A folder (a DICOM series): the total size and newest mtime of the regular
    files directly inside it (hidden ones aside; any of them may belong to the series), their count as ``files``, and
    ``series_uid`` (the series read from it), so a changed, added or removed slice, or another series, counts.
    The caller adds ``path``.
    """
    if not path.is_dir():
        st = path.stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    stats = [p.stat() for p in sorted(path.iterdir()) if not p.name.startswith(".") and p.is_file()]
    return {"size": sum(s.st_size for s in stats), "mtime_ns": max((s.st_mtime_ns for s in stats), default=0),
            "files": len(stats), "series_uid": series_uid}
