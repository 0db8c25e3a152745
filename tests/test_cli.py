"""The `gpt2-accel` dispatcher: commands, help, unknown commands, and both option spellings."""

from __future__ import annotations

import argparse

import pytest

from gpt2_accel.cli import COMMANDS, accept_both_spellings, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command_suggests(capsys):
    assert main(["sampel"]) == 2
    assert "did you mean 'sample'" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    try:
        code = main([command, "--help"])
    except SystemExit as e:  # argparse exits after printing help
        code = e.code
    assert code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "gpt2-accel" in out


def test_options_accept_dashes_and_underscores():
    p = argparse.ArgumentParser()
    p.add_argument("--max_new_tokens", type=int)
    p.add_argument("--repo-id")
    accept_both_spellings(p)
    a = p.parse_args(["--max-new-tokens", "5", "--repo_id", "u/x"])
    assert (a.max_new_tokens, a.repo_id) == (5, "u/x")


OLD_HOMES = {  # where each command's main() lived before gpt2_accel/cli/ (scripts may still import it)
    "gpt2_accel.sample": "sample",
    "gpt2_accel.evaluation": "eval",
    "gpt2_accel.data": "prepare",
    "gpt2_accel.hub": "push",
    "gpt2_accel.convert": "convert",
    "gpt2_accel.export": "export",
    "gpt2_accel.merge": "merge",
    "gpt2_accel.bench": "bench",
    "gpt2_accel.checkpoints_cli": "checkpoints",
    "gpt2_accel.ema": "ema",
    "gpt2_accel.train": "train",
}


@pytest.mark.parametrize("module", sorted(OLD_HOMES))
def test_old_module_main_runs_the_same_command(module):
    import importlib

    old = importlib.import_module(module).main
    assert old is importlib.import_module(COMMANDS[OLD_HOMES[module]][0]).main
    with pytest.raises(AttributeError, match="no attribute 'mian'"):
        importlib.import_module(module).mian  # noqa: B018  (a typo is still an error)
