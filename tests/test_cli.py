"""The command line as a new user meets it: expected errors are one line naming the argument, exit status 2, the
traceback only with --debug; --help carries no docstring markup; progress bars do not flood a log."""

import re
import time

import pytest
from conftest import TINY

from viq_mllm import cli, console

MISSING = [
    (["tokenize", "--viq", "{tmp}", "--input", "/missing", "--out", "{tmp}/o"], "argument --input: /missing"),
    (["extend-vocab", "--text-tokenizer", "/missing.model", "--viq", "{tmp}", "--out", "{tmp}/v"],
     "argument --text-tokenizer: /missing.model"),
    (["generate", "--checkpoint", "/missing", "--image", "{tmp}"], "argument --checkpoint: /missing"),
]


def run(argv, capsys):
    """(exit status, stderr lines) of ``viq-mllm ARGV`` in this process."""
    try:
        status = cli.main(argv)
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("argv, names", MISSING)
def test_a_missing_path_is_one_line_naming_the_argument(argv, names, tmp_path, capsys):
    status, err = run([a.format(tmp=tmp_path) for a in argv], capsys)
    assert status == 2 and len(err) == 1, err
    assert names in err[0] and "no such file or folder" in err[0] and err[0].startswith(f"viq-mllm {argv[0]}: ")


def test_an_error_found_inside_the_job_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    argv = ["tokenize", "--viq", str(tmp_path), "--input", str(tmp_path), "--out", str(tmp_path / "o")]
    status, err = run(argv, capsys)
    assert status == 2 and len(err) == 1 and "missing config.json" in err[0], err
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        cli.main(["--debug", *argv])
    monkeypatch.setenv(console.DEBUG_ENV, "1")
    with pytest.raises(FileNotFoundError):
        cli.main(argv)


def test_max_restarts_without_processes_to_restart_is_refused_before_anything_runs(capsys):
    status, err = run(["train", TINY, "--max-restarts", "1"], capsys)
    assert status == 2 and len(err) == 1 and "give --nproc N too" in err[0], err


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    def broken(args):
        raise KeyError("a bug, not the user's input")

    monkeypatch.setattr(cli.data, "_extend_vocab", broken)
    with pytest.raises(KeyError):
        cli.main(["extend-vocab", "--text-tokenizer", str(tmp_path), "--viq", str(tmp_path), "--out", str(tmp_path)])


def help_texts(capsys) -> dict[str, str]:
    texts = {}
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    assert {"train", "tokenize", "extend-vocab", "import-viq", "bench"} <= set(commands)
    for argv in [[], *([c] for c in commands), *(["bench", b] for b in cli.BENCHMARKS)]:
        with pytest.raises(SystemExit) as exit_:
            cli.main([*argv, "--help"])
        assert exit_.value.code == 0
        texts[" ".join(argv)] = capsys.readouterr().out
    return texts


def test_help_has_no_docstring_markup(capsys):
    for command, text in help_texts(capsys).items():
        assert text.startswith("usage: "), command
        assert not re.search(r"``|:(func|class|mod|meth):`", text), (command, text)


def test_plain_removes_roles_and_literals_and_keeps_the_first_paragraph():
    doc = "The ``viq-mllm`` command: see :func:`~a.b.load` and :mod:`megatron_ext.patches`.\n\nMore."
    assert console.plain(doc) == "The viq-mllm command: see load and megatron_ext.patches."


def test_a_progress_bar_in_a_log_writes_a_line_every_few_seconds_not_every_update(capsys):
    """Over one second of updates a terminal bar redraws ~10 times; one in a log (capsys: not a terminal) draws
    once at the start and once at the end."""
    bar = console.progress(10**9, desc="steps", unit="step")
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        bar.update(1)
    bar.close()
    redraws = capsys.readouterr().err.count("steps:")
    assert 1 <= redraws <= 2, redraws


def test_the_launcher_runs_a_function_in_a_child_and_brings_back_its_result_or_its_error():
    """One protocol for every child process: the result through JSON, an expected error as ChildError."""
    from viq_mllm import launch

    assert launch.call("statistics:median", [3, 1, 2]) == 2
    with pytest.raises(launch.ChildError, match="statistics:mean failed in its process"):
        launch.call("statistics:mean", [])  # StatisticsError is a ValueError: an expected error in the child
    with pytest.raises(launch.ChildError, match="`viq-mllm train nope.yaml` failed with status 2: .*nope.yaml: no such file"):
        launch.command("train", "nope.yaml", capture=True)
