"""Run a model-written Python program in a fresh, walled-in interpreter: the code reward's sandbox.

Threat model. The programs come from the policy being trained: usually harmless, sometimes broken
(endless loops, runaway memory, huge output), sometimes reward hacking, and they must be assumed
hostile: on a cluster they run inside the trainer pod, next to the checkpoints and the controller
token. Each runs in a child process (`sandbox_child.py`) that walls itself in *before* it reads
the program, with mechanisms the program cannot undo from inside:

- Kernel: Landlock (writes only beneath its temporary folder; reads only the Python install, its
  libraries and a few system files; no exec; no TCP; no signals out of its domain), seccomp-bpf
  (no fork/exec, no sockets, no ptrace, no namespaces, signals only to itself), a new empty
  network namespace, and, when the trainer runs as root, uid/gid 65534 with no groups.
  `sandbox_child.py` lists each step.
- Resource limits: address space, CPU time, file size, open files, no core dumps; plus a
  wall-clock deadline after which the child's process group is killed with SIGKILL.
- An audit hook in the child (`sys.addaudithook`) as a second layer: it gives clear
  "sandbox: ... is not allowed" errors for what the kernel also refuses, but it is in-process
  Python and can be defeated by the program; the kernel layers hold regardless.
- State: a new temporary directory is the working directory, HOME and TMPDIR, and is removed
  afterwards. The environment is minimal (no proxies, tokens, PYTHONPATH) and `python -I -B`
  ignores PYTHON* variables, the user site and the script folder, and writes no bytecode. Output
  is drained while the program runs and only the first and last `max_output_bytes / 2` bytes of
  each stream are kept.

Which layers hold depends on the kernel and the pod's security policy (docs/sandbox.md).
`sandbox_layers()` probes them once per process in a throwaway child and logs each missing one
once; every later run then insists on the layers the probe found (a run whose layer fails is a
sandbox error, not a weaker run).

The trainer passes no `preexec_fn`: it is not safe in a process with threads (the trainer has
PyTorch's threads, and the code reward runs sandboxes from a thread pool) and it forces a full
fork of a process that may hold a large model. Without it, `subprocess` starts the child with
vfork + exec; everything else happens in the child, in Python.

Not contained: CPU cores (the program may run threads for its whole time budget), disk space
inside the temporary folder beyond the per-file limit, reading world-readable files under the
allowed system paths (/usr, the Python install).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_OPEN_FILES = 64
UNPRIVILEGED_ID = 65534  # nobody / nogroup: who the program runs as when the trainer is root
CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
KERNEL_LAYERS = ("landlock", "seccomp", "uid_drop", "netns")
_PROGRAM_FILE = "program.py"  # the name sandbox_child.py reads the program from
_READ_CHUNK = 65536
_SEARCH_PATH = "/usr/local/bin:/usr/bin:/bin"
_PROBE_TIMEOUT_S = 30.0
_PROBE_MEMORY_MB = 512

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SandboxResult:
    ok: bool
    returncode: int | None
    timed_out: bool
    reason: str
    stdout: str
    stderr: str


def run_python(code: str, *, timeout_s: float, memory_mb: int, max_output_bytes: int = 65536) -> SandboxResult:
    """Run `code` as `__main__` in a fresh sandboxed interpreter; ok when it exits 0 within the limits.

    Never raises for what the program does; a failure to start the sandbox is a result too
    (ok=False, returncode None, reason "sandbox error: ...").
    """
    if timeout_s <= 0 or memory_mb <= 0 or max_output_bytes <= 0:
        raise ValueError("timeout_s, memory_mb and max_output_bytes must be positive")
    try:
        layers = _layer_report()
    except _ProbeFailed as error:
        return _sandbox_error(error)
    config = {
        "drop_to": [UNPRIVILEGED_ID, UNPRIVILEGED_ID] if layers["uid_drop"] is None else None,
        "expect": [name for name in KERNEL_LAYERS if layers[name] is None],
    }
    return _run_child(code, config, timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes)


def sandbox_layers() -> dict[str, bool]:
    """Which layers wall the program in here: landlock, seccomp, uid_drop, netns, rlimits, audit_hook.

    Probed once per process in a throwaway child (which logs each missing layer once); every run
    then insists on the layers found. Raises RuntimeError when the probe itself fails.
    """
    try:
        return {name: reason is None for name, reason in _layer_report().items()}
    except _ProbeFailed as error:
        raise RuntimeError(str(error)) from None


def sandbox_layer_gaps() -> dict[str, str]:
    """Each missing layer with why it is missing (empty when every layer holds); see sandbox_layers."""
    try:
        return {name: reason for name, reason in _layer_report().items() if reason is not None}
    except _ProbeFailed as error:
        raise RuntimeError(str(error)) from None


class _ProbeFailed(Exception):
    pass


_probe_lock = threading.Lock()
_probed_layers: dict[str, str | None] = {}


def _layer_report() -> dict[str, str | None]:
    """{layer: None when active, else why not}; probed once (a failed probe is retried next time)."""
    with _probe_lock:
        if not _probed_layers:
            _probed_layers.update(_probe_layers())
            for name, reason in _probed_layers.items():
                if reason is not None:
                    logger.warning("code sandbox: the %s layer is off: %s", name, reason)
            active = [name for name, reason in _probed_layers.items() if reason is None]
            logger.info("code sandbox layers active: %s", ", ".join(active))
        return dict(_probed_layers)


def _probe_layers() -> dict[str, str | None]:
    config = {"drop_to": [UNPRIVILEGED_ID, UNPRIVILEGED_ID] if os.geteuid() == 0 else None, "probe": True}
    result = _run_child("", config, timeout_s=_PROBE_TIMEOUT_S, memory_mb=_PROBE_MEMORY_MB, max_output_bytes=65536)
    try:
        layers = json.loads(result.stdout)["layers"] if result.ok else None
    except (ValueError, KeyError, TypeError):
        layers = None
    if not isinstance(layers, dict) or not all(isinstance(reason, (str, type(None))) for reason in layers.values()):
        raise _ProbeFailed(f"the sandbox layer probe failed ({result.reason}): {result.stderr.strip()[-2000:]}")
    return layers


def _run_child(code: str, config: dict, *, timeout_s: float, memory_mb: int, max_output_bytes: int) -> SandboxResult:
    config = {**config, "limits": _limits(timeout_s, memory_mb)}
    try:
        folder = tempfile.mkdtemp(prefix="g2rpo-sandbox-")
    except OSError as error:
        return _sandbox_error(error)
    try:
        if config.get("drop_to"):
            os.chown(folder, *config["drop_to"])  # the dropped user writes here
        with open(os.path.join(folder, _PROGRAM_FILE), "w", encoding="utf-8") as program_file:
            program_file.write(code)
        return _run_in(folder, config, timeout_s=timeout_s, max_output_bytes=max_output_bytes)
    except (OSError, UnicodeError, subprocess.SubprocessError) as error:
        return _sandbox_error(error)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_in(folder: str, config: dict, *, timeout_s: float, max_output_bytes: int) -> SandboxResult:
    # No preexec_fn (see the module docstring): the child sets up everything itself from `config`.
    process = subprocess.Popen(
        [sys.executable, "-I", "-B", CHILD_SCRIPT, json.dumps(config)],
        cwd=folder,
        env=_minimal_environment(folder),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
    )
    assert process.stdout is not None and process.stderr is not None  # both are PIPEs
    deadline = time.monotonic() + timeout_s
    stdout, stderr = _BoundedBuffer(max_output_bytes), _BoundedBuffer(max_output_bytes)
    try:
        _drain_until(deadline, {process.stdout: stdout, process.stderr: stderr})
        timed_out = not _exited_by(process.pid, deadline)
    finally:
        # The leader is not reaped yet, so its process group id cannot have been reused.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        returncode = process.wait()
        process.stdout.close()
        process.stderr.close()
    ok = returncode == 0 and not timed_out
    return SandboxResult(
        ok=ok,
        returncode=returncode,
        timed_out=timed_out,
        reason=_describe(returncode, timed_out, timeout_s),
        stdout=stdout.text(),
        stderr=stderr.text(),
    )


def _minimal_environment(folder: str) -> dict[str, str]:
    return {
        "PATH": _SEARCH_PATH,
        "HOME": folder,
        "TMPDIR": folder,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        # Numeric libraries size thread pools (and their memory) by the machine's cores, which
        # breaks imports under RLIMIT_AS on large nodes.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _limits(timeout_s: float, memory_mb: int) -> list[list[int]]:
    """[RESOURCE, SOFT, HARD] for each limit the child sets on itself."""
    cpu_seconds = math.ceil(timeout_s) + 1
    memory_bytes = memory_mb * 1024 * 1024
    return [
        [which, *_within_hard_limit(which, soft, hard)]
        for which, soft, hard in (
            (resource.RLIMIT_AS, memory_bytes, memory_bytes),
            (resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1),
            (resource.RLIMIT_FSIZE, MAX_FILE_BYTES, MAX_FILE_BYTES),
            (resource.RLIMIT_NOFILE, MAX_OPEN_FILES, MAX_OPEN_FILES),
            (resource.RLIMIT_CORE, 0, 0),
        )
    ]


def _within_hard_limit(which: int, soft: int, hard: int) -> tuple[int, int]:
    """Lower a wanted limit to the trainer's own hard limit: only root may raise a hard limit."""
    current_hard = resource.getrlimit(which)[1]
    if current_hard == resource.RLIM_INFINITY:
        return soft, hard
    return min(soft, current_hard), min(hard, current_hard)


class _BoundedBuffer:
    """Keeps the first and the last `limit / 2` bytes of a stream and counts what it dropped."""

    def __init__(self, limit: int) -> None:
        self.head_limit = limit - limit // 2
        self.tail_limit = limit // 2
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    def append(self, chunk: bytes) -> None:
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        self.tail += chunk
        excess = len(self.tail) - self.tail_limit
        if excess > 0:
            del self.tail[:excess]
            self.dropped += excess

    def text(self) -> str:
        middle = f"\n[... {self.dropped} bytes omitted ...]\n".encode() if self.dropped else b""
        return bytes(self.head + middle + self.tail).decode("utf-8", errors="replace")


def _drain_until(deadline: float, buffers: dict) -> None:
    """Read the child's pipes into their buffers until both close or the deadline passes."""
    with selectors.DefaultSelector() as selector:
        for pipe, buffer in buffers.items():
            selector.register(pipe, selectors.EVENT_READ, buffer)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, _READ_CHUNK)
                if chunk:
                    key.data.append(chunk)
                else:
                    selector.unregister(key.fileobj)


def _exited_by(pid: int, deadline: float) -> bool:
    """Whether the child exits before the deadline; leaves it unreaped (a zombie) either way."""
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def _describe(returncode: int, timed_out: bool, timeout_s: float) -> str:
    if timed_out:
        return f"timed out after {timeout_s:g} s"
    if returncode == 0:
        return "ok"
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        hint = " (CPU time limit)" if -returncode == signal.SIGXCPU else ""
        hint = " (file size limit)" if -returncode == signal.SIGXFSZ else hint
        return f"killed by {name}{hint}"
    return f"exited with code {returncode}"


def _sandbox_error(error: Exception) -> SandboxResult:
    return SandboxResult(
        ok=False, returncode=None, timed_out=False, reason=f"sandbox error: {error}", stdout="", stderr=""
    )
