"""Regenerate the image locks and the metadata that lets tests check them offline.

    make lock                      # or: python scripts/lock_images.py (needs `uv` and `packaging`)

Writes, from pyproject.toml's extras:
  constraints/trainer-cuda.txt   every package of the trainer image (train, objectstore, deepspeed, vllm extras)
  constraints/operator.txt       every package of the operator image (operator, controller extras),
                                 resolved under the trainer lock so the packages both share agree
  constraints/locked-metadata.json
                                 each locked package's Requires-Python and Requires-Dist, read from
                                 the exact file the image installs, so tests/test_lock.py can replay
                                 the resolution without downloading 300 MB wheels.

Both images run CPython 3.12 on linux x86_64 (the Dockerfile's base), and the locks are resolved
for exactly that. The metadata comes from the package index: a wheel's METADATA is read with HTTP
range requests (the wheel's zip directory, then the one member), an sdist's PKG-INFO from the
archive, the same files a resolver reads.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from email.parser import HeaderParser
from pathlib import Path

from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints"
TRAINER_LOCK = CONSTRAINTS / "trainer-cuda.txt"
OPERATOR_LOCK = CONSTRAINTS / "operator.txt"
METADATA = CONSTRAINTS / "locked-metadata.json"

# The images' interpreter and C library: the Dockerfile's python:3.12.12-slim-bookworm base (glibc 2.36).
PYTHON_VERSION = "3.12.12"
UV_PLATFORM = "x86_64-manylinux_2_36"
# The CPU install's interpreter (`make install`; CI's python3).
CPU_PYTHON_VERSION = "3.11"
LOCKS = {
    TRAINER_LOCK: ("train", "tracking", "objectstore", "deepspeed", "vllm"),
    OPERATOR_LOCK: ("operator", "controller"),
}
INDEX = os.environ.get("G2RPO_LOCK_INDEX", "https://pypi.org/simple")
REGENERATE = "make lock"

_PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(36, 4, -1)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
]
# Most preferred first, as pip ranks them for cp312 on the base image (Debian bookworm, glibc 2.36).
_TAG_RANK: dict[Tag, int] = {
    tag: rank
    for rank, tag in enumerate(
        [
            *cpython_tags((3, 12), abis=["cp312"], platforms=_PLATFORMS),
            *compatible_tags((3, 12), interpreter="cp312", platforms=_PLATFORMS),
        ]
    )
}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def read_pins(lock: Path) -> dict[str, str]:
    """`name==version` lines of a lock, names canonicalised."""
    pins: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def _uv_compile(
    uv: str, output: Path, extras: tuple[str, ...], python: str, constraints: list[Path], prefer: Path | None = None
) -> None:
    command = [
        uv, "pip", "compile", "pyproject.toml", "--quiet",
        "--python-platform", UV_PLATFORM, "--python-version", python,
        "--index-url", INDEX, "--custom-compile-command", REGENERATE, "-o", str(output),
    ]  # fmt: skip
    for extra in extras:
        command += ["--extra", extra]
    for constraint in constraints:
        command += ["-c", os.path.relpath(constraint, ROOT)]
    # uv keeps the versions of an existing output file where it can: that is how `prefer` works,
    # and why anything else is removed first.
    output.unlink(missing_ok=True)
    if prefer is not None:
        shutil.copyfile(prefer, output)
    subprocess.run(command, cwd=ROOT, check=True)


def compile_lock(uv: str, lock: Path, extras: tuple[str, ...], constraints: list[Path], scratch: Path) -> None:
    """Resolve for the image's interpreter, move to versions that also install on the CPU's, relock.

    The CPU install (tests, `make run`) takes its versions from these locks, so every version must
    also install on CPython 3.11. Three resolutions: the image's (keeping the committed lock's
    versions wherever the requirements still allow them, so that adding a package moves only what it
    must; newest versions with G2RPO_LOCK_UPGRADE=1); the CPU's, keeping the image's versions
    wherever 3.11 allows them (networkx 3.7 needs 3.12, for example); the image's again under the
    CPU's versions, adding what only 3.12 requires.
    """
    image = scratch / f"{lock.stem}-cpython{PYTHON_VERSION}.txt"
    cpu = scratch / f"{lock.stem}-cpython{CPU_PYTHON_VERSION}.txt"
    committed = lock if lock.is_file() and os.environ.get("G2RPO_LOCK_UPGRADE") != "1" else None
    _uv_compile(uv, image, extras, PYTHON_VERSION, constraints, prefer=committed)
    _uv_compile(uv, cpu, extras, CPU_PYTHON_VERSION, constraints, prefer=image)
    _uv_compile(uv, lock, extras, PYTHON_VERSION, [*constraints, cpu])
    # The scratch file is no source a reader can follow: drop it from the `# via` notes.
    body = "".join(line for line in lock.read_text().splitlines(keepends=True) if cpu.name not in line)
    lock.write_text(
        f"# The {lock.stem} image's complete lock: CPython {PYTHON_VERSION} on {UV_PLATFORM}, extras "
        f"{', '.join(extras)}.\n# Every version also installs on CPython {CPU_PYTHON_VERSION}: the CPU "
        "install uses these pins too (constraints/cpu.txt).\n"
        f"# Regenerate with `{REGENERATE}` (scripts/lock_images.py); never edit by hand: "
        "tests/test_lock.py checks it against constraints/locked-metadata.json.\n" + body
    )


def _get(url: str, headers: dict[str, str] | None = None) -> bytes:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read()


class _RangeFile(io.RawIOBase):
    """A read-only, seekable view of a remote file, fetched in blocks with HTTP Range requests."""

    _BLOCK = 256 * 1024

    def __init__(self, url: str, size: int) -> None:
        self._url, self._size, self._pos = url, size, 0
        self._blocks: dict[int, bytes] = {}

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def _block(self, index: int) -> bytes:
        if index not in self._blocks:
            start = index * self._BLOCK
            end = min(start + self._BLOCK, self._size) - 1
            self._blocks[index] = _get(self._url, {"Range": f"bytes={start}-{end}"})
        return self._blocks[index]

    def readinto(self, buffer) -> int:  # type: ignore[override]
        end = min(self._pos + len(buffer), self._size)
        chunks = []
        position = self._pos
        while position < end:
            index, offset = divmod(position, self._BLOCK)
            piece = self._block(index)[offset : offset + end - position]
            chunks.append(piece)
            position += len(piece)
        data = b"".join(chunks)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _index_files(name: str) -> list[dict]:
    body = _get(f"{INDEX}/{name}/", {"Accept": "application/vnd.pypi.simple.v1+json"})
    return json.loads(body)["files"]


def _valid_filename(filename: str) -> bool:
    """Old uploads with names no installer parses (`x-0.1.0-rc1.tar.gz`) are never candidates."""
    try:
        if filename.endswith(".whl"):
            parse_wheel_filename(filename)
        elif filename.endswith((".tar.gz", ".zip")):
            parse_sdist_filename(filename)
        else:
            return False
    except (InvalidWheelFilename, InvalidSdistFilename):
        return False
    return True


def _pick_file(name: str, version: str, files: list[dict]) -> dict:
    """The file pip would install on the image: the best-ranked compatible wheel, else the sdist."""
    best: tuple[int, dict] | None = None
    sdist = None
    for file in files:
        filename = file["filename"]
        if file.get("yanked") or not _valid_filename(filename):
            continue
        if filename.endswith(".whl"):
            wheel_name, wheel_version, _, tags = parse_wheel_filename(filename)
            if wheel_name != name or str(wheel_version) != version:
                continue
            rank = min((_TAG_RANK[tag] for tag in tags if tag in _TAG_RANK), default=None)
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, file)
        elif filename.endswith((".tar.gz", ".zip")):
            sdist_name, sdist_version = parse_sdist_filename(filename)
            if sdist_name == name and str(sdist_version) == version:
                sdist = file
    if best is not None:
        return best[1]
    if sdist is not None:
        return sdist
    raise SystemExit(f"{name}=={version}: no wheel for cp312 linux x86_64 and no sdist on {INDEX}")


def _core_metadata(file: dict) -> str:
    filename, url = file["filename"], file["url"]
    if filename.endswith(".whl"):
        with zipfile.ZipFile(_RangeFile(url, file["size"])) as wheel:
            member = next(n for n in wheel.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
            return wheel.read(member).decode()
    archive = _get(url)
    if filename.endswith(".zip"):
        with zipfile.ZipFile(io.BytesIO(archive)) as sdist:
            member = next(n for n in sdist.namelist() if re.fullmatch(r"[^/]+/PKG-INFO", n))
            return sdist.read(member).decode()
    with tarfile.open(fileobj=io.BytesIO(archive)) as sdist:
        member = next(m for m in sdist.getmembers() if re.fullmatch(r"[^/]+/PKG-INFO", m.name))
        return sdist.extractfile(member).read().decode()  # type: ignore[union-attr]


def package_metadata(name: str, version: str) -> dict:
    file = _pick_file(name, version, _index_files(name))
    headers = HeaderParser().parsestr(_core_metadata(file))
    if canonicalize_name(headers["Name"]) != name or headers["Version"] != version:
        raise SystemExit(
            f"{file['filename']} declares {headers['Name']} {headers['Version']}, expected {name} {version}"
        )
    return {
        "version": headers["Version"],
        "file": file["filename"],
        "sha256": file["hashes"].get("sha256"),
        "requires_python": headers.get("Requires-Python"),
        "requires_dist": headers.get_all("Requires-Dist") or [],
    }


def main() -> None:
    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    with tempfile.TemporaryDirectory() as scratch:
        compile_lock(uv, TRAINER_LOCK, LOCKS[TRAINER_LOCK], [], Path(scratch))
        # Under the trainer lock, so the packages both images hold have one version.
        compile_lock(uv, OPERATOR_LOCK, LOCKS[OPERATOR_LOCK], [TRAINER_LOCK], Path(scratch))
    pins = read_pins(TRAINER_LOCK) | read_pins(OPERATOR_LOCK)
    with ThreadPoolExecutor(max_workers=16) as pool:
        records = dict(zip(pins, pool.map(package_metadata, pins, pins.values()), strict=False))
    document = {
        "python_version": PYTHON_VERSION,
        "platform": UV_PLATFORM,
        "cpu_python_version": CPU_PYTHON_VERSION,
        "locks": {lock.name: list(extras) for lock, extras in LOCKS.items()},
        "packages": dict(sorted(records.items())),
    }
    METADATA.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")
    print(
        f"{len(read_pins(TRAINER_LOCK))} trainer pins, {len(read_pins(OPERATOR_LOCK))} operator pins, metadata for {len(records)}"
    )


if __name__ == "__main__":
    main()
