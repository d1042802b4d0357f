"""The `g2rpo` command itself: what a new user sees without arguments, in --help, and in a pipe."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from g2rpo.cli import EXIT_BROKEN_PIPE, build_parser
from g2rpo.controller.__main__ import parser as controller_parser

VERBS = ("validate", "run", "render", "eval", "submit", "status", "logs", "list", "delete", "crd", "controller")


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "g2rpo.cli", *args], timeout=60, **kwargs)


def test_no_arguments_prints_the_help_with_every_verb():
    result = _cli(capture_output=True, text=True)
    assert result.returncode == 2
    assert "required: verb" not in result.stderr
    assert result.stderr.startswith("usage: g2rpo")
    for verb in VERBS:
        assert f"\n    {verb}" in result.stderr, verb


def _verb_parsers() -> dict[str, argparse.ArgumentParser]:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {**subparsers.choices, "controller": controller_parser()}


@pytest.mark.parametrize("verb", VERBS)
def test_every_positional_argument_has_a_help_text(verb):
    positionals = [a for a in _verb_parsers()[verb]._actions if not a.option_strings]
    assert all(a.help for a in positionals), [a.dest for a in positionals if not a.help]


@pytest.mark.parametrize(
    "args", [("crd",), ("render", "manifests/examples/g2rpojob.yaml"), ("validate", "examples/smollm2-arithmetic.yaml")]
)
def test_a_closed_pipe_ends_the_output_quietly(args):
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head` after its lines
    try:
        result = _cli(*args, stdout=write_end, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == EXIT_BROKEN_PIPE


def test_the_readmes_command_table_lists_every_verb():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    listed = {line.split("`g2rpo ", 1)[1].split()[0].rstrip("`") for line in table.splitlines() if "| `g2rpo " in line}
    assert listed == set(_verb_parsers()), set(_verb_parsers()) ^ listed
