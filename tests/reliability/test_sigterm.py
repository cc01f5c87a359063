"""SIGTERM (timeouts, ``docker stop``, Slurm) mid-write: no hidden temporary folder is left behind
and the previous output is intact. Each case runs the real entry point in a subprocess, paused inside
its temporary folder, and sends it a real SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ernie_lab.io.atomic import write_marker

ROOT = Path(__file__).resolve().parents[2]
# the subprocess: patch one step inside the temporary folder to signal "ready" and wait, then run
SCRIPT = """
import pathlib, sys, time
what, out, ready = sys.argv[1:]

def pause(*args, **kwargs):
    pathlib.Path(ready).write_text("paused")
    time.sleep(120)

if what == "save":
    import ernie_lab as el
    from ernie_lab.io import weights
    model = el.load_model("toy")
    weights.write_checkpoint = pause
    el.save_model(model, out)
elif what == "report":
    from ernie_lab import cli
    from ernie_lab.report import runner
    runner._write_section = pause
    sys.exit(cli.main(["report", "--out", out, "--quick", "--no-progress"]))
else:
    from ernie_lab import cli
    from ernie_lab.toy import build
    build.training_corpus = pause
    sys.exit(cli.main(["train-toy", "--out", out, "--no-progress"]))
"""
KINDS = {"save": "checkpoint", "report": "report", "train-toy": "toy"}


def test_sigterm_leaves_no_temporary_folder_and_the_previous_output(tmp_path):
    """save_model, ``ernie-lab report`` and ``ernie-lab train-toy``, run side by side (one start-up)."""
    runs = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for what, kind in KINDS.items():
        parent = tmp_path / what
        out = parent / "out"
        out.mkdir(parents=True)
        (out / "previous.txt").write_text("the previous output")
        write_marker(out, kind)  # an earlier output of the same kind: the run may replace it
        ready = tmp_path / f"{what}.ready"
        argv = [sys.executable, "-c", SCRIPT, what, str(out), str(ready)]
        runs[what] = (parent, ready, sorted(os.listdir(parent)), subprocess.Popen(argv, env=env, cwd=parent))
    try:
        deadline = time.monotonic() + 180
        for what, (parent, ready, _, proc) in runs.items():
            while not ready.exists():
                assert proc.poll() is None, f"{what} exited early ({proc.returncode})"
                assert time.monotonic() < deadline, f"{what} never reached its pause"
                time.sleep(0.05)
            assert any(".tmp-" in name for name in os.listdir(parent)), f"{what} is not mid-way"
            proc.send_signal(signal.SIGTERM)
        for what, (parent, _, before, proc) in runs.items():
            assert proc.wait(timeout=60) == 128 + signal.SIGTERM, what
            assert sorted(os.listdir(parent)) == before, f"{what} left a temporary folder"
            assert (parent / "out" / "previous.txt").read_text() == "the previous output", what
    finally:
        for _, _, _, proc in runs.values():
            proc.kill()
