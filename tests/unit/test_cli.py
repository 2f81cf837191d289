"""The `jamba-server` command line: `run-batch` is a subcommand beside the server's own flags."""

from __future__ import annotations

import pytest

from jamba_server import cli
from tests.support import DEV_CONFIG


def test_run_batch_help_lists_its_flags_and_the_engine_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run-batch", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--input", "--output", "--resume", "--config", "--max-num-seqs", "--max-concurrent-requests"):
        assert flag in text
    assert text.startswith("usage: jamba-server run-batch")


def test_the_server_help_names_the_subcommand(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("run- batch", "run-batch")  # wrapped at the hyphen
    assert "jamba-server run-batch --help" in text and "--input" not in text


def test_run_batch_needs_input_and_output(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run-batch", "--config", str(DEV_CONFIG)])
    assert exit_info.value.code == 2
    assert "--input" in capsys.readouterr().err


def test_an_unreadable_input_is_exit_2_before_any_engine(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("jamba_server.runtime.vllm_engine.EngineAdapter.start", lambda self: pytest.fail("engine started"))
    monkeypatch.setattr(cli, "prepare_process", lambda settings: None)  # leaves this process's logging and environment
    code = cli.main(["run-batch", "--config", str(DEV_CONFIG), "-i", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "out")])
    assert code == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_resume_to_stdout_is_refused(tmp_path, capsys):
    code = cli.main(["run-batch", "--config", str(DEV_CONFIG), "-i", str(tmp_path / "in"), "-o", "-", "--resume"])
    assert code == 2
    assert "--resume" in capsys.readouterr().err


def test_more_than_one_api_server_runs_the_supervisor_and_one_runs_the_server(monkeypatch):
    import sys
    import types

    ran: list[tuple[str, int]] = []
    supervisor = types.ModuleType("jamba_server.runtime.vllm_api_servers")
    supervisor.supervise = lambda settings: ran.append(("supervise", settings.api_server_count)) or 0
    monkeypatch.setitem(sys.modules, supervisor.__name__, supervisor)
    monkeypatch.setattr(cli, "serve", lambda settings: ran.append(("serve", settings.api_server_count)) or 0)
    monkeypatch.setattr(cli, "prepare_process", lambda settings: None)
    assert cli.main(["--config", str(DEV_CONFIG), "--api-server-count", "2"]) == 0
    assert cli.main(["--config", str(DEV_CONFIG)]) == 0
    assert ran == [("supervise", 2), ("serve", 1)]
