"""Run a model-written Python program in a fresh, limited interpreter: the code reward's sandbox.

Threat model. The programs come from the policy being trained: usually harmless, sometimes broken
(endless loops, runaway memory, huge output), occasionally doing something a test harness must
not allow by accident or by reward hacking (deleting files, calling out to the network, spawning
shells). This module contains *those* programs. It is not a jail for code written by someone who
attacks this sandbox on purpose; for hard isolation, run the trainer pod with a restricted
securityContext (non-root, read-only root filesystem, no service-account token, a NetworkPolicy
that denies egress), or put an OS-level sandbox (gVisor, nsjail, a separate pod) around it.

What is contained, and how:

- Time: a wall-clock deadline, after which the whole process group (the program runs in its own
  session) is killed with SIGKILL; RLIMIT_CPU as a second limit.
- Memory and files: RLIMIT_AS (address space), RLIMIT_FSIZE (largest file written), RLIMIT_NOFILE,
  RLIMIT_CORE 0. Output is drained while the program runs and only the first and last
  `max_output_bytes / 2` bytes of each stream are kept, so a program that prints forever cannot
  exhaust the trainer's memory.
- How the limits are applied: the bootstrap (below) sets them on its own process with
  `resource.setrlimit` as its first step, before it reads the program; the trainer computes them
  and passes them as arguments. RLIMIT_AS and RLIMIT_CPU count the whole process, so they bound the
  same total as limits set before exec would; only the interpreter's own startup (about 15 MiB of
  address space, milliseconds) runs before them, and a memory limit below what the interpreter already uses is
  refused with a message instead of crashing it later. The trainer passes no `preexec_fn`: it is
  not safe in a process with threads (the trainer has PyTorch's threads, and the code reward runs
  sandboxes from a thread pool) and it forces a full fork of a process that may hold a large model.
  Without it, `subprocess` starts the child with vfork + exec (`subprocess._USE_VFORK`; cwd,
  start_new_session and close_fds are applied in the vforked child without running Python code).
- State: a new temporary directory is the working directory, HOME and TMPDIR, and is removed
  afterwards. The environment is minimal (no proxies, tokens, PYTHONPATH) and `python -I -B`
  ignores PYTHON* variables, the user site and the script folder, and writes no bytecode.
- Network, layer (a): where the trainer may (root with CAP_SYS_ADMIN), the child enters a new,
  empty network namespace before it reads the program: the bootstrap calls
  `os.unshare(os.CLONE_NEWNET)` (Python 3.12+) before it installs the hook; on Python 3.11, which
  has no os.unshare, the trainer starts the child through util-linux `unshare --net` once a probe
  has shown that this works. Where it is not allowed (EPERM) this layer is skipped silently.
  ctypes is deliberately not used for it: see `_unshare_command`.
- Layer (b), everywhere: a bootstrap installs a `sys.addaudithook` hook before the program runs.
  It refuses, with PermissionError: sockets other than AF_UNIX (and AF_UNIX addresses outside
  the folder), name resolution; opening files for writing, creating, removing, renaming, linking
  or changing the metadata of paths outside the folder (os.devnull excepted), any `..` path
  component in those, writing to device files, opening directories outside the folder (whose
  file descriptors would let `dir_fd=` escape); subprocess, os.system, os.exec*, os.posix_spawn,
  os.fork/forkpty, and importing `_posixsubprocess` (which forks without an audit event);
  everything in ctypes (a loaded C library would bypass the hook), sub-interpreters (they do not
  inherit the hook), signals to other processes.

What is not contained: reading files the trainer's user can read (there is no exfiltration
channel besides the program's own output, which only reaches logs); CPU cores (the program may
run threads for its whole time budget); disk space inside the temporary folder beyond the
per-file limit; and code that targets the hook itself (an in-process hook can be defeated by
monkeypatching the functions it calls, racing a symlink swap against a check, or finding its
objects through `gc`). Those need the OS-level isolation named above.
"""

from __future__ import annotations

import functools
import math
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_OPEN_FILES = 64
_PROGRAM_FILE = "program.py"  # the name BOOTSTRAP reads the program from
_READ_CHUNK = 65536
_SEARCH_PATH = "/usr/local/bin:/usr/bin:/bin"

# Runs in the child as `python -I -B -c BOOTSTRAP LIMIT...`, in the sandbox folder, before any user
# code. It sets the resource limits given as arguments ("RESOURCE,SOFT,HARD") on itself, enters a
# new network namespace where it may (Python 3.12+), reads the program (then deletes its file),
# installs the audit hook, and execs the program as `__main__` with the filename "<program>",
# registered in linecache so tracebacks show its lines. The hook binds everything it uses as
# default arguments and keeps ctypes unimported: with ctypes loaded before the hook,
# `ctypes.pythonapi` would reach libc without a further audit event.
BOOTSTRAP = r'''
import os, resource, sys


def _limit_self(limits):
    for limit in limits:
        which, soft, hard = (int(part) for part in limit.split(","))
        if which == resource.RLIMIT_AS:
            with open("/proc/self/statm") as statm:
                in_use = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            if in_use >= soft:
                sys.exit(f"sandbox: the memory limit of {soft >> 20} MiB is below the "
                         f"{in_use >> 20} MiB the interpreter itself uses")
        resource.setrlimit(which, (soft, hard))
    if hasattr(os, "unshare"):  # Python 3.12+; on 3.11 the trainer starts this process in one
        try:
            os.unshare(os.CLONE_NEWNET)
        except OSError:  # EPERM without CAP_SYS_ADMIN: the audit hook still holds
            pass


_limit_self(sys.argv[1:])
del _limit_self

import linecache, stat, traceback

ROOT = os.path.realpath(os.getcwd())
with open("program.py", encoding="utf-8") as program_file:
    SOURCE = program_file.read()
os.remove("program.py")

# _posixsubprocess.fork_exec starts processes without an audit event (multiprocessing calls it
# directly). Disarmed here, `import subprocess` (and asyncio) still work; the hook below refuses
# a fresh import of the module, which would bring the original back.
import _posixsubprocess


def _refuse_fork_exec(*args, **kwargs):
    raise PermissionError("sandbox: starting a process is not allowed")


_posixsubprocess.fork_exec = _refuse_fork_exec

FORBIDDEN_EVENTS = frozenset({
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.fork", "os.forkpty",
    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
    "socket.gethostbyaddr", "socket.getnameinfo", "cpython.PyInterpreterState_New",
})
FORBIDDEN_MODULES = frozenset({
    "_posixsubprocess", "_ctypes", "_xxsubinterpreters", "_testcapi", "_testinternalcapi",
})
MODIFY_ONE_PATH = {  # event -> (index of the path argument, index of its dir_fd argument or None)
    "os.remove": (0, 1), "os.rmdir": (0, 1), "os.mkdir": (0, 2), "os.chmod": (0, 2),
    "os.chown": (0, 3), "os.utime": (0, 3), "os.truncate": (0, None),
    "os.setxattr": (0, None), "os.removexattr": (0, None),
}
MODIFY_TWO_PATHS = {"os.rename": (2, 3), "os.link": (2, 3)}  # event -> dir_fd indexes of src, dst
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
SOCKET_ADDRESS_EVENTS = frozenset({"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"})


def _install_guard(root=ROOT, sep=os.sep, devnull=os.devnull, pid=os.getpid(), getpgrp=os.getpgrp(),
                   realpath=os.path.realpath, join=os.path.join, isabs=os.path.isabs, fspath=os.fspath,
                   fsdecode=os.fsdecode, readlink=os.readlink, stat_path=os.stat, isdir=os.path.isdir,
                   is_device=lambda mode: stat.S_ISBLK(mode) or stat.S_ISCHR(mode), af_unix=1,  # Linux
                   forbidden_events=FORBIDDEN_EVENTS, forbidden_modules=FORBIDDEN_MODULES,
                   modify_one=MODIFY_ONE_PATH, modify_two=MODIFY_TWO_PATHS, write_flags=WRITE_FLAGS,
                   socket_address_events=SOCKET_ADDRESS_EVENTS, addaudithook=sys.addaudithook):

    def deny(event, detail=""):
        raise PermissionError(f"sandbox: {event}{' ' + detail if detail else ''} is not allowed")

    def resolve(path, dir_fd=None):
        """The absolute, symlink-free path; None for a file descriptor; "" for a path with `..`.

        A `..` component is refused in paths that modify: from a directory file descriptor (the
        "open" event does not report dir_fd) it could climb out of the folder unseen.
        """
        if isinstance(path, int):
            return None
        path = fsdecode(fspath(path))
        if ".." in path.replace("\\", "/").split("/"):
            return ""
        if dir_fd not in (None, -1) and not isabs(path):
            path = join(readlink(f"/proc/self/fd/{dir_fd}"), path)
        return realpath(path)

    def inside(path, dir_fd=None):
        resolved = resolve(path, dir_fd)
        return resolved is None or resolved == root or resolved.startswith(root + sep)

    def check_open(path, mode, flags):
        writes = bool(flags & write_flags) or (isinstance(mode, str) and any(c in mode for c in "wax+"))
        resolved = resolve(path)
        if resolved is None or (resolved == "" and not writes):
            return
        if not (resolved == root or resolved.startswith(root + sep)):
            if writes and resolved != devnull:
                deny("writing", repr(path))
            if isdir(resolved):
                deny("opening the directory", repr(path))
            return
        if writes:
            try:
                if is_device(stat_path(resolved).st_mode):
                    deny("writing the device", repr(path))
            except FileNotFoundError:
                pass

    def check_socket_address(event, args):
        sock, address = args[0], args[1]
        if getattr(sock, "family", None) != af_unix:
            deny(event)
        if address is None:  # sendmsg on a connected socket: its connect was checked
            return
        if not isinstance(address, (str, bytes)) or address[:1] in ("\0", b"\0") or not inside(address):
            deny(event, repr(address))

    def hook(event, args):
        if event in forbidden_events or event.startswith("ctypes."):
            deny(event)
        elif event == "open":
            check_open(*args)
        elif event == "import":
            if args[0] in forbidden_modules:  # ImportError: libraries treat ctypes as optional
                raise ImportError(f"sandbox: import {args[0]} is not allowed")
        elif event in modify_one:
            path_index, dir_fd_index = modify_one[event]
            dir_fd = args[dir_fd_index] if dir_fd_index is not None else None
            if not inside(args[path_index], dir_fd):
                deny(event, repr(args[path_index]))
        elif event in modify_two:
            for path, dir_fd in zip(args[:2], (args[i] for i in modify_two[event])):
                if not inside(path, dir_fd):
                    deny(event, repr(path))
        elif event == "os.symlink":
            target, link, dir_fd = args
            if not inside(link, dir_fd) or not inside(join(root, fsdecode(fspath(target)))):
                deny(event, repr(target))
        elif event == "socket.__new__":
            if args[1] != af_unix:
                deny("creating a network socket")
        elif event in socket_address_events:
            check_socket_address(event, args)
        elif event == "os.kill":
            if args[0] not in (0, pid):
                deny(event, str(args[0]))
        elif event == "os.killpg":
            if args[0] not in (0, getpgrp):
                deny(event, str(args[0]))

    addaudithook(hook)


_install_guard()
del _install_guard
linecache.cache["<program>"] = (len(SOURCE), None, SOURCE.splitlines(True), "<program>")


def _print_program_traceback(kind, error, trace):
    """Tracebacks through linecache (the built-in printer reads files), without this bootstrap's frame."""
    traceback.print_exception(kind, error, trace.tb_next if trace is not None else None)


sys.excepthook = _print_program_traceback
CODE = compile(SOURCE, "<program>", "exec")
sys.argv = ["<program>"]
del SOURCE, program_file
exec(CODE, {"__name__": "__main__", "__builtins__": __builtins__})
'''


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
        folder = tempfile.mkdtemp(prefix="g2rpo-sandbox-")
    except OSError as error:
        return _sandbox_error(error)
    try:
        with open(os.path.join(folder, _PROGRAM_FILE), "w", encoding="utf-8") as program_file:
            program_file.write(code)
        return _run_in(folder, timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes)
    except (OSError, UnicodeError, subprocess.SubprocessError) as error:
        return _sandbox_error(error)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_in(folder: str, *, timeout_s: float, memory_mb: int, max_output_bytes: int) -> SandboxResult:
    # No preexec_fn (see the module docstring): the limits travel as arguments to the bootstrap.
    command = [*_unshare_command(), sys.executable, "-I", "-B", "-c", BOOTSTRAP]
    process = subprocess.Popen(
        [*command, *_limit_arguments(timeout_s, memory_mb)],
        cwd=folder,
        env=_minimal_environment(folder),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
    )
    deadline = time.monotonic() + timeout_s
    stdout, stderr = _BoundedBuffer(max_output_bytes), _BoundedBuffer(max_output_bytes)
    try:
        _drain_until(deadline, {process.stdout: stdout, process.stderr: stderr})
        timed_out = not _exited_by(process.pid, deadline)
    finally:
        # The leader is not reaped yet, so its process group id cannot have been reused.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
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


@functools.cache
def _unshare_command() -> tuple[str, ...]:
    """The `unshare --net --` prefix that starts the child in a new network namespace, or ().

    Only for Python < 3.12: from 3.12 the bootstrap calls os.unshare itself. The prefix is used
    where a probe shows that it works here (it needs CAP_SYS_ADMIN); the probe runs once.

    Why not ctypes in the bootstrap (unshare through libc, then dropping ctypes and _ctypes from
    sys.modules before the hook is installed): on 3.11 importing _ctypes readies its static types,
    and they stay reachable from the program through `object.__subclasses__()` whatever the
    bootstrap deletes. With them `c_char_p(address).value` reads, and a Union of an integer and a
    pointer writes, any memory without raising a single audit event, enough to switch the hook
    off. Before, the child never loaded ctypes; util-linux `unshare` keeps it that way.
    """
    if hasattr(os, "unshare"):
        return ()
    unshare = shutil.which("unshare", path=_SEARCH_PATH)
    if unshare is None:
        return ()
    command = (unshare, "--net", "--")
    try:
        probe = subprocess.run(
            [*command, sys.executable, "-I", "-S", "-c", ""],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={"PATH": _SEARCH_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
            close_fds=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return ()
    return command if probe.returncode == 0 else ()


def _limit_arguments(timeout_s: float, memory_mb: int) -> list[str]:
    """The bootstrap's arguments: one "RESOURCE,SOFT,HARD" per limit it sets on itself."""
    cpu_seconds = math.ceil(timeout_s) + 1
    memory_bytes = memory_mb * 1024 * 1024
    return [
        "{},{},{}".format(which, *_within_hard_limit(which, soft, hard))
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
