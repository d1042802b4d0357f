"""The image locks are consistent, and the CPU install runs the images' versions.

Offline: the lock's resolution is replayed from constraints/locked-metadata.json, the Requires-Dist
and Requires-Python that scripts/lock_images.py read from the exact files the images install (a
real resolver's inputs, recorded; nothing is downloaded here).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints"


def _load_lock_script():
    spec = importlib.util.spec_from_file_location("lock_images", ROOT / "scripts" / "lock_images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock_images = _load_lock_script()
METADATA = json.loads(lock_images.METADATA.read_text())
LOCK_EXTRAS = {lock.name: extras for lock, extras in lock_images.LOCKS.items()}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# DeepSpeed publishes only an sdist, built as pure Python (DS_BUILD_OPS=0) in the Dockerfile's
# builder stage, which has no compiler. Another sdist-only package needs a look at that stage.
SDIST_ONLY = {"deepspeed"}


def marker_environment(python_full_version: str) -> dict[str, str]:
    """The image's marker values: CPython on linux x86_64."""
    return {
        "implementation_name": "cpython",
        "implementation_version": python_full_version,
        "os_name": "posix",
        "platform_machine": "x86_64",
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "python_full_version": python_full_version,
        "python_version": ".".join(python_full_version.split(".")[:2]),
        "sys_platform": "linux",
    }


def project_requirements(extras: tuple[str, ...]) -> list[Requirement]:
    project = PYPROJECT["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def lock_problems(pins: dict[str, str], metadata: dict, extras: tuple[str, ...]) -> list[str]:
    """Everything a resolver would object to in `pins`, as sentences; [] for a consistent lock.

    Walks the requirements from the project's extras through each reached package's recorded
    Requires-Dist (and the extras asked of it), under the image's markers: every requirement must
    name a pinned package whose pin satisfies it, every pin must be reached, and the metadata must
    be recorded for exactly the pinned version.
    """
    packages = metadata["packages"]
    python = metadata["python_version"]
    environment = marker_environment(python)
    problems = []
    for name, version in sorted(pins.items()):
        record = packages.get(name)
        if record is None:
            problems.append(f"{name}=={version} is pinned but has no recorded metadata (run `make lock`)")
        elif record["version"] != version:
            problems.append(
                f"{name}=={version} is pinned but the metadata is for {record['version']} (run `make lock`)"
            )
        elif record["requires_python"] and not SpecifierSet(record["requires_python"]).contains(
            python, prereleases=True
        ):
            problems.append(f"{name}=={version} requires Python {record['requires_python']}, the image runs {python}")

    expanded: set[tuple[str, str]] = set()
    pending = [("g2rpo", requirement) for requirement in project_requirements(extras)]
    while pending:
        parent, requirement = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate(environment | {"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name not in pins:
            problems.append(f"{parent} requires {requirement}, which the lock does not pin")
            continue
        if not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{parent} requires {requirement}, the lock pins {name}=={pins[name]}")
        record = packages.get(name)
        if record is None:
            continue
        for extra in ("", *sorted(canonicalize_name(e) for e in requirement.extras)):
            if (name, extra) in expanded:
                continue
            expanded.add((name, extra))
            for line in record["requires_dist"]:
                dependency = Requirement(line)
                if dependency.marker is None or dependency.marker.evaluate(environment | {"extra": extra}):
                    dependency.marker = None
                    pending.append((f"{name}=={pins[name]}", dependency))
    reached = {name for name, _ in expanded}
    problems += [f"{name}=={pins[name]} is pinned but nothing requires it" for name in sorted(set(pins) - reached)]
    return problems


@pytest.mark.parametrize("lock", sorted(LOCK_EXTRAS))
def test_the_lock_resolves_from_its_recorded_metadata(lock):
    pins = lock_images.read_pins(CONSTRAINTS / lock)
    assert pins, f"{lock} pins nothing"
    assert lock_problems(pins, METADATA, LOCK_EXTRAS[lock]) == []


def test_the_recorded_metadata_is_for_exactly_the_locked_packages():
    pins = {}
    for lock in LOCK_EXTRAS:
        pins |= lock_images.read_pins(CONSTRAINTS / lock)
    recorded = {name: record["version"] for name, record in METADATA["packages"].items()}
    assert recorded == pins


def test_the_locks_are_for_the_image_interpreter():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"python:{METADATA['python_version']}-slim-bookworm@sha256:" in dockerfile
    assert METADATA["cpu_python_version"] == lock_images.CPU_PYTHON_VERSION


def test_only_known_packages_are_built_from_source():
    sdists = {name for name, record in METADATA["packages"].items() if not record["file"].endswith(".whl")}
    assert sdists == SDIST_ONLY, "a package without a cp312 linux x86_64 wheel is built in the image's builder stage"


def _write_lock_variant(tmp_path: Path, name: str, version: str) -> dict[str, str]:
    """A copy of the trainer lock with one pin changed, read back the way the real one is."""
    text = (CONSTRAINTS / "trainer-cuda.txt").read_text()
    pins = lock_images.read_pins(CONSTRAINTS / "trainer-cuda.txt")
    old = f"\n{name}=={pins[name]}\n"
    assert old in text
    variant = tmp_path / "trainer-cuda.txt"
    variant.write_text(text.replace(old, f"\n{name}=={version}\n"))
    return lock_images.read_pins(variant)


def test_a_lock_with_transformers_bumped_past_what_vllm_accepts_fails(tmp_path):
    """The metadata is relabelled as if `make lock` had recorded 5.24.0 too: vLLM's bound must fail."""
    pins = _write_lock_variant(tmp_path, "transformers", "5.24.0")
    metadata = json.loads(json.dumps(METADATA))
    metadata["packages"]["transformers"]["version"] = "5.24.0"
    problems = lock_problems(pins, metadata, LOCK_EXTRAS["trainer-cuda.txt"])
    assert any(
        p.startswith("vllm==0.31.0 requires transformers") and p.endswith("transformers==5.24.0") for p in problems
    ), problems
    assert "g2rpo requires transformers==5.17.0, the lock pins transformers==5.24.0" in problems


def test_a_hand_edited_pin_without_fresh_metadata_fails(tmp_path):
    pins = _write_lock_variant(tmp_path, "trl", "1.15.0")
    problems = lock_problems(pins, METADATA, LOCK_EXTRAS["trainer-cuda.txt"])
    assert "trl==1.15.0 is pinned but the metadata is for 1.16.0 (run `make lock`)" in problems


def test_a_lock_missing_a_dependency_fails(tmp_path):
    pins = lock_images.read_pins(CONSTRAINTS / "trainer-cuda.txt")
    del pins["tokenizers"]
    problems = lock_problems(pins, METADATA, LOCK_EXTRAS["trainer-cuda.txt"])
    assert any(
        p.startswith("transformers==") and "requires tokenizers" in p and p.endswith("which the lock does not pin")
        for p in problems
    )


def test_both_images_share_one_version_per_package():
    trainer = lock_images.read_pins(CONSTRAINTS / "trainer-cuda.txt")
    operator = lock_images.read_pins(CONSTRAINTS / "operator.txt")
    assert {n: operator[n] for n in operator.keys() & trainer.keys()} == {
        n: trainer[n] for n in operator.keys() & trainer.keys()
    }


def test_pyproject_exact_pins_equal_the_locks():
    pins = lock_images.read_pins(CONSTRAINTS / "trainer-cuda.txt") | lock_images.read_pins(CONSTRAINTS / "operator.txt")
    exact = {}
    for requirement in project_requirements(tuple(PYPROJECT["project"]["optional-dependencies"])):
        specifiers = list(requirement.specifier)
        if len(specifiers) == 1 and specifiers[0].operator == "==":
            exact[canonicalize_name(requirement.name)] = specifiers[0].version
    # The stack the images run is pinned exactly, so a change is deliberate and relocked.
    for name in ("torch", "transformers", "trl", "accelerate", "deepspeed", "vllm", "kopf"):
        assert name in exact, f"pyproject.toml should pin {name} exactly"
    assert {n: v for n, v in exact.items() if n in pins} == {n: pins[n] for n in exact if n in pins}


def test_the_cpu_install_is_constrained_by_the_image_locks():
    lines = [line.strip() for line in (CONSTRAINTS / "cpu.txt").read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    torch = lock_images.read_pins(CONSTRAINTS / "trainer-cuda.txt")["torch"]
    assert lines == [f"torch=={torch}", "-c trainer-cuda.txt", "-c operator.txt"]


def test_this_environment_runs_the_locked_versions():
    """The installed transformers, TRL, accelerate, datasets... are the images' versions.

    Fails in a virtualenv installed before the locks changed: reinstall it (`make install`).
    """
    pins = lock_images.read_pins(CONSTRAINTS / "trainer-cuda.txt") | lock_images.read_pins(CONSTRAINTS / "operator.txt")
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    shared = sorted(installed.keys() & pins.keys())
    for required in ("torch", "transformers", "trl", "accelerate", "datasets", "tokenizers", "kopf"):
        assert required in shared
    # torch's CPU build carries a local label (2.13.0+cpu): the release is what the lock pins.
    different = {n: installed[n] for n in shared if Version(installed[n]).public != Version(pins[n]).public}
    assert different == {}, f"installed versions differ from the locks {[f'{n}=={pins[n]}' for n in different]}"


def test_the_project_metadata_builds_without_a_deprecation_warning(tmp_path):
    """project.license is an SPDX string (PEP 639): setuptools >= 77 deprecates the TOML table form (issue 19)."""
    import subprocess
    import sys

    script = (
        "import sys, warnings\n"
        "from setuptools import build_meta\n"
        "warnings.simplefilter('error')\n"
        "build_meta.prepare_metadata_for_build_wheel(sys.argv[1])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metadata = next(tmp_path.glob("*.dist-info/METADATA")).read_text()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
