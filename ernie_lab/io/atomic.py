"""Publishing a folder written elsewhere: checkpoints, reports and the toy model are written into a
temporary folder next to their destination and swapped in with renames, so a reader never sees a
half-written one, and nothing that ernie_lab did not write is ever deleted.

The rules, shared by ``save_model``, ``run_report`` and ``build_toy``:

- Every published folder holds a marker, :data:`MARKER`, naming its ``kind`` (``"checkpoint"``,
  ``"report"``, ``"toy"``) and every file that run wrote. An existing destination is replaced only
  when it is absent, empty, or a marked folder of the same kind; ``overwrite=True`` relaxes that
  explicitly (the caller says which files a foreign folder gives up, see ``replaceable``).
- Replacing removes only the files the old marker lists. Any other file in the old folder (an
  adapter, notes, a file that appeared during a long run) is carried into the new one, and if that
  is impossible (the new output has a file of that name) the old folder is kept aside, with a warning.
- The check runs before the expensive work (:func:`check_destination`) and again at the swap.
- A symlinked destination is followed: the output goes into the link's target.
- While a temporary folder exists, SIGTERM (timeouts, ``docker stop``, Slurm) raises
  :class:`Terminated` in the main thread, so the temporary folder is removed and the previous output
  stays intact; the swap itself runs with SIGTERM and SIGINT blocked. Leftovers of a killed run
  (SIGKILL) carry the host and process id in their names and are cleaned, with a message, by the
  next run that writes the same destination.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

MARKER = ".ernie_lab.json"  # {"written_by": "ernie_lab", "kind": ..., "files": [relative paths]}
_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class Terminated(SystemExit):
    """SIGTERM arrived while a temporary folder existed; raised so it is cleaned up (exit 143)."""


def destination(path: str | os.PathLike) -> Path:
    """The absolute destination folder, symlinks followed (a link to a folder writes into it)."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"the output folder must be a str or a path, got {type(path).__name__}")
    return Path(path).expanduser().resolve()


def read_marker(folder: Path) -> dict | None:
    """The marker of ``folder`` when ernie_lab wrote one, else None (unreadable markers count as none)."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(marker, dict) and isinstance(marker.get("files"), list) and isinstance(marker.get("kind"), str)
    return marker if ok else None


def check_destination(out: Path, kind: str, overwrite: bool = False) -> None:
    """Raise FileExistsError unless ``out`` may be replaced by a new ``kind`` output: it does not
    exist, is an empty folder, holds an ernie_lab marker of the same kind, or ``overwrite`` is set.
    Also raises PermissionError when the parent folder cannot be written (before any work)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and not overwrite and any(out.iterdir()):
        marker = read_marker(out)
        if marker is None:
            raise FileExistsError(
                f"{out} is not empty and was not written by ernie_lab (no {MARKER} marker); refusing to "
                "replace it: choose a new or empty folder, or pass overwrite=True (--overwrite)"
            )
        if marker["kind"] != kind:
            raise FileExistsError(
                f"{out} holds an ernie_lab {marker['kind']}, not a {kind}; refusing to replace it: choose "
                "another folder, or pass overwrite=True (--overwrite)"
            )
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot write {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {out}: {parent} is not writable")


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A fresh temporary folder next to ``out`` (same file system, so renames are atomic); removed
    when the block exits, also on errors and on SIGTERM. Cleans leftovers of killed runs first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(out)
    tmp = out.with_name(_temp_name(out, "tmp"))
    with _terminate_raises():
        tmp.mkdir()  # not mkdtemp: its 0700 mode would stick to the published folder
        try:
            yield tmp
        finally:
            with _signals_blocked():
                shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(
    tmp: Path,
    out: Path,
    kind: str,
    *,
    overwrite: bool = False,
    replaceable: Callable[[Path], set[str]] | None = None,
) -> None:
    """Publish ``tmp`` as ``out`` (same parent folder, or inside a :func:`staging` folder there).

    Writes the marker (kind + every file in ``tmp``), re-checks ``out`` (:func:`check_destination`),
    then swaps with renames: an existing ``out`` is renamed aside, restored if the swap fails, and
    removed after it succeeds, except for files it did not list (carried into the new folder).
    ``replaceable(old)``: with ``overwrite`` on a folder without our marker, the relative paths it
    gives up (default: all of them).
    """
    write_marker(tmp, kind)
    check_destination(out, kind, overwrite)
    if not out.exists():
        with _signals_blocked():
            os.replace(tmp, out)
        return
    owned = _owned_files(out, kind, overwrite, replaceable)
    foreign = [p for p in _files(out) if p not in owned]
    for rel in foreign:  # linked (or copied) beforehand, so readers of ``out`` never miss them
        _link(out / rel, tmp / rel)
    backup = out.with_name(_temp_name(out, "old"))
    with _signals_blocked():
        os.replace(out, backup)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(backup, out)
            raise
        kept = _carry_back(backup, out, owned)
        if kept:
            logger.warning(
                "%s: the previous folder held files that the new output also writes (%s); it is kept "
                "as %s: move what you need and delete it",
                out,
                ", ".join(kept[:5]),
                backup,
            )
        else:
            shutil.rmtree(backup, ignore_errors=True)


def write_marker(folder: Path, kind: str) -> None:
    """Write :data:`MARKER` into ``folder``, listing every file under it (relative paths, sorted)."""
    files = sorted(p for p in _files(folder) if p != MARKER)
    marker = {"written_by": "ernie_lab", "kind": kind, "files": files}
    (folder / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------ the swap
def _owned_files(out: Path, kind: str, overwrite: bool, replaceable) -> set[str]:
    """Relative paths in ``out`` the new output may delete: what its marker lists (+ the marker)."""
    marker = read_marker(out)
    if marker is not None and marker["kind"] == kind:
        return {str(f) for f in marker["files"]} | {MARKER}
    if overwrite:
        return (replaceable(out) if replaceable is not None else set(_files(out))) | {MARKER}
    return set()


def _files(folder: Path) -> list[str]:
    """Relative paths of the files and symlinks under ``folder`` (symlinks not followed), and of its
    empty folders."""
    found = []
    for root, dirs, files in os.walk(folder):
        base = Path(root)
        found += [str((base / f).relative_to(folder)) for f in files]
        found += [str((base / d).relative_to(folder)) for d in dirs if (base / d).is_symlink()]
        if not dirs and not files and base != folder:
            found.append(str(base.relative_to(folder)))
    return found


def _link(src: Path, dst: Path) -> None:
    if dst.exists() or dst.is_symlink():
        return  # the new output has its own file of that name: resolved after the swap
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir() and not src.is_symlink():
        dst.mkdir()
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # no hard links on this file system
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_back(backup: Path, out: Path, owned: set[str]) -> list[str]:
    """Move every file of ``backup`` not in ``owned`` and not already carried into ``out``; return
    the ones that could not be (the new output has a different file of that name)."""
    kept = []
    for rel in _files(backup):
        if rel in owned:
            continue
        src, dst = backup / rel, out / rel
        if not (dst.exists() or dst.is_symlink()):
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
            except OSError:  # e.g. the new output has a file where this needs a folder
                kept.append(rel)
        elif not (src.is_dir() and dst.is_dir()) and not _same_file(src, dst):
            kept.append(rel)
    return kept


def _same_file(a: Path, b: Path) -> bool:
    """The same file (a hard link), the same link, or a copy ``copy2`` made (same size and mtime)."""
    try:
        if a.is_symlink():
            return b.is_symlink() and os.readlink(a) == os.readlink(b)
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    return os.path.samestat(sa, sb) or (sa.st_size, sa.st_mtime_ns) == (sb.st_size, sb.st_mtime_ns)


# ------------------------------------------------------------------------------ leftovers, signals
def _temp_name(out: Path, what: str) -> str:
    """``.NAME.tmp-HOST-PID-RANDOM``: hidden, and saying which process on which host owns it."""
    return f".{out.name}.{what}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _clean_leftovers(out: Path) -> None:
    """Remove temporary folders that killed runs on this host left next to ``out``; restore a
    previous output that a kill caught mid-swap; leave (and name) older backups that may hold files."""
    host = socket.gethostname()
    for what in ("tmp", "old"):
        for path in out.parent.glob(f".{glob.escape(out.name)}.{what}-*"):
            owner, _, pid = path.name[len(out.name) + len(what) + 3 :].rpartition("-")[0].rpartition("-")
            if owner != host or not pid.isdigit() or _alive(int(pid)):
                continue
            if what == "tmp":
                logger.warning("removing %s, the temporary folder of an interrupted run (pid %s)", path, pid)
                shutil.rmtree(path, ignore_errors=True)
            elif not out.exists():
                logger.warning("restoring %s from %s, left by a run interrupted mid-swap", out, path)
                os.replace(path, out)
            else:
                logger.warning("%s holds the previous %s from an interrupted run: check it and delete it", path, out)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _terminate_raises() -> Iterator[None]:
    """In the main thread, SIGTERM raises :class:`Terminated` inside the block (restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """SIGTERM and SIGINT held back (delivered on exit) while renames must not be interrupted."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
