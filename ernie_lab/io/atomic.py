"""Publishing a folder written elsewhere: checkpoints, reports and the toy model are written into a
temporary folder next to their destination and swapped in with renames, so a reader never sees a
half-written one."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def replace_dir(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out`` (same parent folder, so each rename is atomic). An existing ``out``
    is renamed aside first, restored if the swap fails, and removed after it succeeds."""
    if not out.exists():
        os.replace(tmp, out)
        return
    backup = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(out, backup)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(backup, out)
        raise
    shutil.rmtree(backup, ignore_errors=True)
