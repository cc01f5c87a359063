"""Command-line options are checked before any work: one line, exit 2, for a bad value, an option given
without the option it modifies (it would be dropped) and options that clash (one would be ignored)."""

from __future__ import annotations

import pytest

from ernie_lab import cli
from ernie_lab.bench import bench, real_shape, tp_bench


@pytest.fixture(autouse=True)
def no_work(monkeypatch, tmp_path):
    """Any timing, model load or report run fails the test: the errors must come first."""
    monkeypatch.chdir(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("expensive work started before the options were checked")

    for module, name in ((bench, "run_bench"), (real_shape, "run_real_shape"), (tp_bench, "run_tp_bench")):
        monkeypatch.setattr(module, name, refuse)
    import ernie_lab.io.weights as weights
    import ernie_lab.report.runner as runner

    monkeypatch.setattr(weights, "load_model", refuse)
    monkeypatch.setattr(runner, "run_report", refuse)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--expert-slots", "0"], "--expert-slots needs --offload"),
        (["bench", "--expert-slots", "8"], "--expert-slots needs --offload"),
        (["bench", "--offload", "experts", "--expert-slots", "0"], "--expert-slots must be >= 1"),
        (["bench", "--tp", "3"], "cannot split this model over 3 processes"),
        (["bench", "--tp", "0"], "--tp must be >= 1"),
        (["bench", "--tp", "2", "--quantization", "nf4"], "--tp does not combine with --quantization"),
        (["bench", "--threads", "0"], "--threads must be >= 1"),
        (["bench", "--quantization", "nf4", "--compile"], "--compile applies to"),
        (["generate", "toy", "--prompt", "hi", "--threads", "0"], "--threads must be >= 1"),
        (["generate", "toy", "--prompt", "hi", "--system", "Be brief."], "--system needs --chat"),
        (["generate", "toy", "--prompt", "hi", "--top-p", "0.9"], "--top-p need --temperature > 0"),
        (["generate", "toy", "--prompt", "hi", "--seed", "1", "--top-k", "5"], "--top-k, --seed need --temperature"),
        (["report", "--out", "r", "--threads", "0"], "--threads must be >= 1"),
        (["bench", "--csv", "no/such/folder/out.csv"], "no/such/folder does not exist"),
        (["selftest", "--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_option_errors_are_one_line_exit_2_before_any_work(capsys, argv, message):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"ernie-lab {argv[0]}: error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["bench", "--device", "cuda"], ["bench", "--real-shape"]])
def test_a_device_this_machine_lacks(capsys, monkeypatch, argv):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only machine
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "device 'cuda' is not available here" in err and err.count("\n") == 1
