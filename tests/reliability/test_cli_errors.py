"""The command line: a user error is one line ``ernie-lab <cmd>: error: ...`` and exit status 2,
a traceback only with ``--debug``; the output folder is checked before a model is loaded."""

from __future__ import annotations

import pytest

from ernie_lab import cli


def run(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main(list(argv))
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "no/such/dir/here"], "ernie-lab info: error: no such model directory"),
        (["generate", "toy", "--prompt", "hi", "--top-p", "2"], "ernie-lab generate: error: --top-p must be"),
        (["generate", "toy", "--prompt", "hi", "--max-new-tokens", "-1"], "--max-new-tokens must be"),
        (["train-toy", "--out", "x", "--steps", "0"], "ernie-lab train-toy: error: --steps must be >= 1"),
        (["train-toy", "--out", "x", "--anneal-steps", "-1"], "--anneal-steps must be >= 0, got -1"),
        (["train-toy", "--out", "x", "--init-from", "toy", "--steps", "9", "--anneal-steps", "5"], "--steps cannot be"),
        (["train-toy", "--out", "x", "--init-from", "toy"], "--init-from needs --anneal-steps >= 1"),
        (["train-toy", "--out", "x", "--init-from", "no/such", "--anneal-steps", "5"], "not a train-toy checkpoint"),
        (["train-toy", "--out", "x", "--anneal-steps", "5", "--anneal-lr", "0"], "--anneal-lr must be > 0, got 0.0"),
        (["train-toy", "--out", "x", "--lr", "nan"], "--lr must be > 0"),
        (["train-toy", "--out", "x", "--shared-dropout", "1"], "--shared-dropout must be in [0, 1), got 1.0"),
        (["train-toy", "--out", "x", "--shared-dropout", "nan"], "--shared-dropout must be in [0, 1)"),
        (["train-toy", "--out", "x", "--freeze-router", "--bias-gamma", "0.01"], "--bias-gamma cannot be combined"),
        (["train-toy", "--out", "x", "--anneal-seq-len", "256"], "--anneal-seq-len shape the cool-down's windows"),
        (["train-toy", "--out", "x", "--anneal-steps", "5", "--anneal-seq-len", "1"], "--anneal-seq-len must be >= 2"),
        (["train-toy", "--out", "x", "--freeze-router", "--aux-loss-coef", "0.1"], "--aux-loss-coef cannot be"),
        (["report", "no_such_spec.yaml", "--out", "r"], "ernie-lab report: error: no report spec at"),
        (["bench", "--repeats", "0"], "ernie-lab bench: error: --repeats must be >= 1"),
        (["bench", "--device", "gpu0"], "ernie-lab bench: error: --device must be a torch device"),
        (["bench", "--config", "huge"], "ernie-lab bench: error: unknown preset 'huge'"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    rc, err = run(capsys, *argv)
    assert rc == 2 and err.startswith("ernie-lab ") and message in err and err.count("\n") == 1


def test_debug_shows_the_traceback(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        cli.main(["--debug", "info", "missing/dir/x"])
    with pytest.raises(FileNotFoundError):
        cli.main(["info", "missing/dir/x", "--debug"])


def test_report_out_is_checked_before_loading_the_model(capsys, tmp_path, monkeypatch):
    from ernie_lab.report import runner

    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("mine")
    rc, err = run(capsys, "report", "--out", str(tmp_path / "taken"), "--quick")
    assert rc == 2 and "not written by ernie_lab" in err and "--overwrite" in err
    (tmp_path / "file").write_text("x")
    rc, err = run(capsys, "report", "--out", str(tmp_path / "file" / "sub"), "--quick")
    assert rc == 2 and err.startswith("ernie-lab report: error: cannot write") and "is a file, not a folder" in err


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("dtype: int8", "dtype: unknown dtype 'int8'"),
        ("hash_checkpoint: 'no'", "hash_checkpoint: must be true or false"),
    ],
)
def test_spec_settings_fail_before_loading(capsys, tmp_path, monkeypatch, line, message):
    from ernie_lab.report import runner

    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"{line}\ndatasets: {{d: {{texts: [a b]}}}}\nanalyses: {{balance: {{dataset: d}}}}\n")
    rc, err = run(capsys, "report", str(spec), "--out", str(tmp_path / "r"))
    assert rc == 2 and err.startswith("ernie-lab report: error: ") and message in err
