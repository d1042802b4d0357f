"""The code sandbox contains what model-written programs do by accident or by reward hacking.

Every test runs a real subprocess; nothing is mocked. A containment test asserts the effect did
not happen (no file, no connection, no process output), not just that the program failed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from g2rpo.rewards import sandbox_child
from g2rpo.rewards.sandbox import run_python

LIMITS = {"timeout_s": 10.0, "memory_mb": 512}


def run(code: str, **limits):
    return run_python(textwrap.dedent(code), **{**LIMITS, **limits})


def assert_blocked(result) -> None:
    assert not result.ok
    assert not result.timed_out
    assert "sandbox:" in result.stderr and "is not allowed" in result.stderr, result.stderr


def test_normal_program_writes_in_its_folder_and_prints():
    result = run(
        """
        import os
        with open("notes.txt", "w") as notes:
            notes.write("kept")
        os.makedirs("sub/dir")
        with open("sub/dir/more.txt", "w") as more:
            more.write("also")
        print(open("notes.txt").read(), os.getcwd())
        """
    )
    assert result.ok, result.stderr
    assert result.returncode == 0 and result.reason == "ok"
    text, folder = result.stdout.split()
    assert text == "kept"
    assert not Path(folder).exists(), "the sandbox folder must be removed afterwards"


def test_folder_is_home_and_tmpdir_and_environment_is_minimal(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    monkeypatch.setenv("G2RPO_TEST_SECRET", "hunter2")
    result = run(
        """
        import os, tempfile
        print(os.getcwd() == os.environ["HOME"] == os.environ["TMPDIR"] == tempfile.gettempdir())
        print(sorted(os.environ))
        """
    )
    assert result.ok, result.stderr
    same_folder, names = result.stdout.splitlines()
    assert same_folder == "True"
    for leaked in ("HTTPS_PROXY", "PYTHONPATH", "G2RPO_TEST_SECRET"):
        assert leaked not in names


def test_infinite_loop_times_out_and_is_killed():
    started = time.monotonic()
    result = run("while True:\n    pass\n", timeout_s=1.0)
    elapsed = time.monotonic() - started
    assert result.timed_out and not result.ok
    assert elapsed < 1.0 + 2.0
    assert "timed out" in result.reason


def test_loop_that_closed_its_output_still_times_out():
    started = time.monotonic()
    result = run("import os\nos.close(1)\nos.close(2)\nwhile True:\n    pass\n", timeout_s=1.0)
    assert result.timed_out
    assert time.monotonic() - started < 3.0


def test_unbounded_allocation_fails_inside_the_sandbox():
    result = run(
        """
        blocks = []
        while True:
            blocks.append(bytearray(50 * 1024 * 1024))
        """,
        memory_mb=256,
    )
    assert not result.ok and not result.timed_out
    assert "MemoryError" in result.stderr


def test_endless_output_is_truncated():
    result = run(
        "import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 10000)\nprint('END')", max_output_bytes=4096
    )
    assert result.ok
    assert len(result.stdout) < 4096 + 100
    assert "bytes omitted" in result.stdout
    assert result.stdout.endswith("END\n")


def test_traceback_names_the_program_and_shows_its_line():
    result = run("x = 1\nraise ValueError('model bug')\n")
    assert not result.ok and result.returncode == 1
    assert 'File "<program>", line 2' in result.stderr
    assert "raise ValueError('model bug')" in result.stderr


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    yield server
    server.close()


@pytest.mark.parametrize(
    "attempt",
    [
        "socket.create_connection(('127.0.0.1', PORT), timeout=2)",
        "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', PORT))",
        "socket.getaddrinfo('localhost', PORT)",
        "urllib.request.urlopen(f'http://127.0.0.1:{PORT}/', timeout=2)",
    ],
)
def test_network_is_blocked(listener, attempt):
    port = listener.getsockname()[1]
    result = run(f"import socket, urllib.request\nPORT = {port}\n{attempt}\n")
    assert_blocked(result)
    with pytest.raises(BlockingIOError):
        listener.accept()  # nobody connected


@pytest.mark.parametrize(
    "attempt",
    [
        "open(TARGET, 'w').write('escaped')",
        "open(TARGET, 'a').write('escaped')",
        "import pathlib; pathlib.Path(TARGET).write_text('escaped')",
        "import os; os.close(os.open(TARGET, os.O_WRONLY | os.O_CREAT))",
        "import shutil; open('inside.txt', 'w').write('escaped'); shutil.copy('inside.txt', TARGET)",
        "import os; open('inside.txt', 'w').write('escaped'); os.rename('inside.txt', TARGET)",
        "import os; os.symlink(TARGET, 'link'); open('link', 'w').write('escaped')",
        "import os; open('inside.txt', 'w').write('escaped'); os.link('inside.txt', TARGET)",
        "import os; os.mkdir(TARGET)",
    ],
)
def test_writes_outside_the_folder_are_blocked(tmp_path, attempt):
    target = tmp_path / "escape.txt"
    result = run(f"TARGET = {str(target)!r}\n{attempt}\n")
    assert_blocked(result)
    assert not target.exists()


@pytest.mark.parametrize(
    "attempt",
    [
        "import os; os.remove(KEEP)",
        "import os; os.chmod(KEEP, 0o777)",
        "import os; os.truncate(KEEP, 0)",
        "import os; fd = os.open(os.path.dirname(KEEP), os.O_RDONLY); os.unlink('keep.txt', dir_fd=fd)",
        "import os; os.chdir(os.path.dirname(KEEP)); os.remove('keep.txt')",
    ],
)
def test_changes_to_files_outside_the_folder_are_blocked(tmp_path, attempt):
    keep = tmp_path / "keep.txt"
    keep.write_text("original")
    keep.chmod(0o644)
    result = run(f"KEEP = {str(keep)!r}\n{attempt}\n")
    assert_blocked(result)
    assert keep.read_text() == "original"
    assert keep.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    "attempt",
    [
        "import subprocess; subprocess.run(['touch', MARKER])",
        "import os; os.system('touch ' + MARKER)",
        "import os; os.execv('/usr/bin/touch', ['touch', MARKER])",
        "import os; os.posix_spawn('/usr/bin/touch', ['touch', MARKER], {})",
        "import os; pid = os.fork()\nif pid == 0: os.execv('/usr/bin/touch', ['touch', MARKER])",
        "import multiprocessing, pathlib\n"
        "if __name__ == '__main__':\n"
        "    p = multiprocessing.get_context('spawn').Process(target=print)\n    p.start(); p.join()\n"
        "    pathlib.Path(MARKER).touch()",
    ],
)
def test_starting_processes_is_blocked(tmp_path, attempt):
    marker = tmp_path / "spawned"
    result = run(f"MARKER = {str(marker)!r}\n{attempt}\n")
    assert not result.ok
    assert "sandbox:" in result.stderr, result.stderr
    assert not marker.exists()


def test_ctypes_is_blocked(tmp_path):
    marker = tmp_path / "via-libc"
    result = run(f"import ctypes\nctypes.CDLL(None).system(b'touch {marker}')\n")
    assert not result.ok
    assert "sandbox: import _ctypes is not allowed" in result.stderr
    assert not marker.exists()


def test_signals_to_other_processes_are_blocked():
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        result = run(f"import os, signal\nos.kill({bystander.pid}, signal.SIGKILL)\n")
        assert_blocked(result)
        assert bystander.poll() is None, "the bystander process was killed"
    finally:
        bystander.kill()
        bystander.wait()


def test_libraries_that_import_subprocess_and_use_local_sockets_still_work():
    result = run(
        """
        import asyncio, subprocess
        async def answer():
            await asyncio.sleep(0)
            return 42
        print(asyncio.run(answer()))
        """
    )
    assert result.ok, result.stderr
    assert result.stdout.strip() == "42"


def test_unittest_main_runs_the_programs_tests():
    """unittest.main() collects from sys.modules["__main__"]: it must be the program, not the child."""
    template = "import unittest\nclass T(unittest.TestCase):\n    def test_it(self):\n        self.assertEqual(1, {})\nunittest.main()\n"
    passing, failing = run(template.format(1)), run(template.format(2))
    assert passing.ok and "Ran 1 test" in passing.stderr, passing.stderr
    assert not failing.ok and "FAILED (failures=1)" in failing.stderr, failing.stderr


def test_programs_with_threads_and_common_modules_still_work():
    result = run(
        """
        import concurrent.futures, datetime, decimal, shutil, tempfile, threading
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            print(sum(pool.map(lambda x: x * x, range(100))))
        worker = threading.Thread(target=print, args=("thread",))
        worker.start(); worker.join()
        with tempfile.NamedTemporaryFile("w", delete=False) as scratch:
            scratch.write("copied")
        shutil.copyfile(scratch.name, "copy.txt")
        print(open("copy.txt").read(), datetime.datetime.now().year > 2000, decimal.Decimal(1) / 4)
        """
    )
    assert result.ok, result.stderr
    assert result.stdout.split() == ["328350", "thread", "copied", "True", "0.25"]


def test_a_failure_to_start_is_a_result_not_an_exception():
    result = run("print('never')", memory_mb=1)
    assert not result.ok
    assert "never" not in result.stdout
    assert "sandbox: the memory limit of 1 MiB is below" in result.stderr, result.stderr


def test_the_child_is_started_without_preexec_fn(monkeypatch):
    """preexec_fn is unsafe with threads and rules out vfork; the limits are set by the bootstrap."""
    calls = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        calls.append(kwargs)
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    result = run("print('started')")
    assert result.ok, result.stderr
    assert calls, "the sandbox did not start its process through subprocess.Popen"
    assert all(kwargs.get("preexec_fn") is None for kwargs in calls)
    assert all(kwargs.get("start_new_session") for kwargs in calls if "cwd" in kwargs)


def test_limits_are_in_force_when_the_program_runs():
    result = run(
        """
        import resource
        for name in ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE"):
            print(name, *resource.getrlimit(getattr(resource, name)))
        """,
        memory_mb=300,
        timeout_s=4.0,
    )
    assert result.ok, result.stderr
    limits = {name: (int(soft), int(hard)) for name, soft, hard in map(str.split, result.stdout.splitlines())}
    assert limits == {
        "RLIMIT_AS": (300 * 1024 * 1024, 300 * 1024 * 1024),
        "RLIMIT_CPU": (5, 6),
        "RLIMIT_FSIZE": (16 * 1024 * 1024, 16 * 1024 * 1024),
        "RLIMIT_NOFILE": (64, 64),
        "RLIMIT_CORE": (0, 0),
    }


def test_writing_past_the_file_size_limit_fails():
    result = run("open('big.bin', 'wb').write(b'x' * (17 * 1024 * 1024))\n")
    assert not result.ok and not result.timed_out
    assert "File too large" in result.stderr, result.stderr  # Python ignores SIGXFSZ: EFBIG


def _host_can_unshare_network() -> bool:
    if hasattr(os, "unshare"):
        probe = [sys.executable, "-c", "import os; os.unshare(os.CLONE_NEWNET)"]
    elif shutil.which("unshare"):
        probe = [shutil.which("unshare"), "--net", "true"]
    else:
        return False
    return subprocess.run(probe, capture_output=True).returncode == 0


def test_program_runs_in_an_empty_network_namespace_where_allowed():
    if not _host_can_unshare_network():
        pytest.skip("this process may not create a network namespace (needs CAP_SYS_ADMIN)")
    result = run(
        """
        import os
        with open("/proc/self/net/dev") as devices:  # seccomp refuses the netlink socket if_nameindex opens
            interfaces = [line.split(":")[0].strip() for line in devices.readlines()[2:]]
        print(os.readlink("/proc/self/ns/net"), *interfaces)
        """
    )
    assert result.ok, result.stderr
    namespace, *interfaces = result.stdout.split()
    assert namespace != os.readlink("/proc/self/ns/net")
    assert interfaces == ["lo"]


def test_concurrent_sandboxes_in_a_process_with_busy_threads():
    """The code reward runs sandboxes from a thread pool inside a trainer full of PyTorch threads."""
    torch = pytest.importorskip("torch")
    timeout_s = 30.0
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    stop = threading.Event()
    matmuls = []

    def keep_torch_busy():
        matrix = torch.randn(256, 256)
        deadline = time.monotonic() + 2 * timeout_s  # bounded even if the test hangs
        while not stop.is_set() and time.monotonic() < deadline:
            matrix = torch.tanh(matrix @ matrix)
            matmuls.append(1)

    def sandboxed_sum(n):
        started = time.monotonic()
        result = run(f"print(sum(i * i for i in range({n})))", timeout_s=timeout_s)
        return n, result, time.monotonic() - started

    busy = threading.Thread(target=keep_torch_busy, daemon=True)
    busy.start()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            outcomes = list(pool.map(sandboxed_sum, range(10_000, 170_000, 10_000)))
    finally:
        stop.set()
        busy.join(timeout=10)
        torch.set_num_threads(previous_threads)
    assert matmuls, "the background torch thread never ran"
    assert len(outcomes) == 16
    for n, result, elapsed in outcomes:
        assert result.ok and not result.timed_out, (n, result.reason, result.stderr)
        assert result.stdout.strip() == str(sum(i * i for i in range(n)))
        assert elapsed < timeout_s / 3, f"a sandbox took {elapsed:.1f} s"


# --- Attacks on the sandbox itself ------------------------------------------------------------
# Each program first switches the audit hook off (or fools it), then tries to write, spawn,
# connect, signal or trace outside its folder. They run through tests/sandbox_attack_runner.py,
# as root and as an unprivileged user, which records every effect; the tests assert none happened.

HELPERS = '''
import gc, os, sys


def escaped(what):
    print("ESCAPED:", what, flush=True)


def disarm():
    """Held-out attack (a): find the audit hook through gc and empty its closure cells."""
    for obj in gc.get_objects():
        if getattr(obj, "__name__", None) == "hook" and getattr(obj, "__closure__", None):
            for cell in obj.__closure__:
                value = cell.cell_contents
                if getattr(value, "__name__", None) == "deny":
                    cell.cell_contents = lambda *args, **kwargs: None
                elif isinstance(value, (frozenset, dict)):
                    cell.cell_contents = type(value)()
    sys.modules.pop("_posixsubprocess", None)  # the real fork_exec, not the disarmed stand-in
    import _posixsubprocess, subprocess
    subprocess._posixsubprocess = _posixsubprocess


def libc():
    disarm()
    import ctypes
    library = ctypes.CDLL(None, use_errno=True)
    return ctypes, library
'''
DISARM_FIRST = "disarm()\nprint('DISARMED', flush=True)\n"
FOOL_THE_HOOK = ("realpath_patch_then_open", "code_swap_then_write")  # they tamper in their own way

ATTACKS = {
    # the two held-out attacks
    "gc_closure_then_os_system": "os.system(f'touch {OUT}/by-system; setsid sh -c \"sleep 30\" {TOKEN} &')",
    "realpath_patch_then_open": (
        "import posixpath\nROOT = os.getcwd()\n"
        "posixpath._joinrealpath = lambda path, rest, strict, seen: (ROOT + '/x', True)\n"
        "os.path.realpath = posixpath.realpath = lambda *args, **kwargs: ROOT + '/x'\n"
        "open(OUT + '/by-realpath', 'w').write('escaped'); escaped('open')"
    ),
    # other ways to defeat the in-process guard
    "code_swap_then_write": (
        "for obj in gc.get_objects():\n"
        "    if getattr(obj, '__name__', None) == 'deny': obj.__code__ = (lambda event, detail='': None).__code__\n"
        "open(OUT + '/by-code-swap', 'w').write('escaped'); escaped('open')"
    ),
    # writes and changes outside the folder
    "write": "open(OUT + '/written', 'w').write('escaped'); escaped('open')",
    "rename_out": "open('inside', 'w').write('x'); os.rename('inside', OUT + '/renamed'); escaped('rename')",
    "symlink_out": "os.symlink(OUT + '/via-link', 'link'); open('link', 'w').write('x'); escaped('symlink')",
    "hardlink_out": "open('inside', 'w').write('x'); os.link('inside', OUT + '/hardlink'); escaped('link')",
    "hardlink_in_then_write": "os.link(KEEP, 'in'); open('in', 'w').write('changed'); escaped('link in')",
    "proc_self_root": "open(f'/proc/self/root{OUT}/via-root', 'w').write('x'); escaped('open')",
    "proc_parent_cwd": "open(f'/proc/{os.getppid()}/cwd/via-parent-cwd', 'w').write('x'); escaped('open')",
    "dir_fd_create": "fd = os.open(OUT, os.O_RDONLY)\nos.close(os.open('via-dirfd', os.O_CREAT | os.O_WRONLY, dir_fd=fd))",
    "chmod": "os.chmod(KEEP, 0o777); escaped('chmod')",
    "truncate": "os.truncate(KEEP, 0); escaped('truncate')",
    "unlink": "os.remove(KEEP); escaped('unlink')",
    "read_secret": "escaped(open(SECRET).read())",
    # processes
    "fork": "pid = os.fork()\nif pid == 0:\n    open(OUT + '/forked', 'w').write('x'); os._exit(0)\nescaped('fork')",
    "posix_spawn": "os.posix_spawn('/bin/sh', ['sh', '-c', f'touch {OUT}/spawned', TOKEN], {}); escaped('spawn')",
    "subprocess": "import subprocess\nsubprocess.run(['/bin/sh', '-c', f'touch {OUT}/popen', TOKEN]); escaped('popen')",
    "exec": "os.execv('/bin/sh', ['sh', '-c', f'touch {OUT}/exec', TOKEN])",
    "ctypes_system": (
        "ctypes, c = libc()\nif c.system(f'touch {OUT}/libc-system; sleep 30 # {TOKEN}'.encode()) == 0: escaped('system')"
    ),
    "ctypes_fork": "ctypes, c = libc()\npid = c.fork()\nif pid == 0:\n    open(OUT + '/libc-fork', 'w'); os._exit(0)\n"
    "if pid > 0: escaped('fork')",
    "raw_clone_syscall": (
        "import platform\nctypes, c = libc()\nnumber = {'x86_64': 56, 'aarch64': 220}[platform.machine()]\n"
        "pid = c.syscall(number, 17, 0, 0, 0, 0)  # SIGCHLD, no CLONE_THREAD: a fork\n"
        "if pid == 0:\n    open(OUT + '/clone', 'w'); os._exit(0)\nif pid > 0: escaped('clone')"
    ),
    # network
    "tcp_connect": "import socket\nsocket.create_connection(('127.0.0.1', PORT), timeout=2); escaped('connect')",
    "udp_send": "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', PORT))",
    "unix_connect": "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect(UNIX_SOCKET); escaped('connect')",
    "ctypes_socket": (
        "import struct\nctypes, c = libc()\nfd = c.socket(2, 1, 0)\nif fd >= 0:\n    escaped('socket')\n"
        "    address = struct.pack('=H', 2) + struct.pack('!H', PORT) + bytes([127, 0, 0, 1]) + bytes(8)\n"
        "    if c.connect(fd, address, len(address)) == 0: escaped('connect')"
    ),
    "io_uring": "ctypes, c = libc()\nif c.syscall(425, 8, ctypes.create_string_buffer(120)) >= 0: escaped('io_uring')",
    # the trainer's process
    "signal_parent": "import signal\nos.kill(os.getppid(), signal.SIGUSR2); escaped('kill')",
    "signal_parent_group": "import signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGUSR2); escaped('killpg')",
    "ctypes_kill_parent": "ctypes, c = libc()\nif c.kill(os.getppid(), 12) == 0: escaped('kill')",
    "ptrace_parent": "ctypes, c = libc()\nif c.ptrace(16, os.getppid(), 0, 0) == 0: escaped('ptrace')",
    "process_vm_readv_parent": (
        "ctypes, c = libc()\nbuffer = ctypes.create_string_buffer(8)\n"
        "iov = (ctypes.c_void_p * 2)(ctypes.addressof(buffer), 8)\n"
        "if c.process_vm_readv(os.getppid(), iov, 1, iov, 1, 0) >= 0 or ctypes.get_errno() != 1: escaped('read')"
    ),
    "proc_parent_mem": "open(f'/proc/{os.getppid()}/mem', 'rb'); escaped('open')",
}
IDENTITY = (
    "import json, os\nstatus = dict(line.split(':', 1) for line in open('/proc/self/status').read().splitlines())\n"
    "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'groups': os.getgroups(),\n"
    "                  **{key: status[key].strip() for key in ('CapEff', 'CapPrm', 'NoNewPrivs', 'Seccomp')}}))"
)
RUNNER = Path(__file__).with_name("sandbox_attack_runner.py")
SANDBOX_SOURCES = [
    Path(__file__).parents[1] / "trainer" / "g2rpo" / "rewards" / name for name in ("sandbox.py", "sandbox_child.py")
]
UNPRIVILEGED = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def attack_program(name: str) -> str:
    return HELPERS + ("" if name in FOOL_THE_HOOK else DISARM_FIRST) + ATTACKS[name]


def _python_runs_as(prefix: list[str], python: str) -> bool:
    probe = subprocess.run(
        [*prefix, python, "-I", "-c", "import sys; assert sys.version_info >= (3, 11)"], capture_output=True, timeout=60
    )
    return probe.returncode == 0


def _suite_command(suite: str) -> list[str]:
    """The runner's command line for a suite; pytest.skip with the reason where it cannot run here."""
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if suite == "unprivileged":
        if os.geteuid() != 0:
            return [sys.executable]  # this user already is unprivileged
        if shutil.which("setpriv") is None:
            pytest.skip("util-linux setpriv is not installed: cannot run as an unprivileged user")
        for python in (system_python, sys.executable):
            if python and _python_runs_as(UNPRIVILEGED, python):
                return [*UNPRIVILEGED, python]
        pytest.skip("no Python on this machine runs as uid 65534 (all installs unreadable to it)")
    if os.geteuid() != 0:
        pytest.skip("not running as root")
    if suite == "root":
        return [sys.executable]
    if system_python is None:
        pytest.skip("no /usr/bin/python3 (a world-readable Python, with which the uid drop works)")
    return [system_python]


@pytest.fixture(scope="module", params=["root", "root_system_python", "unprivileged"])
def suite(request):
    """Runs every attack (and IDENTITY) through the runner as the suite's user; returns its report.

    The runner has a session of its own: an escaped killpg would hit it (it counts SIGUSR2), not pytest.

    root: the trainer's Python as root. root_system_python: /usr/bin/python3 as root, which the
    dropped uid can read, so the uid drop holds. unprivileged: uid/gid 65534, as a pod runs it.
    The files travel in a world-readable copy: the unprivileged user cannot read the repository.
    """
    command = _suite_command(request.param)
    with tempfile.TemporaryDirectory(prefix="g2rpo-attacks-") as workspace:
        workspace = Path(workspace)
        workspace.chmod(0o755)
        code = workspace / "code"
        code.mkdir(mode=0o755)
        for source in [*SANDBOX_SOURCES, RUNNER]:
            shutil.copy(source, code / source.name)
            (code / source.name).chmod(0o644)
        base = workspace / "base"
        base.mkdir()
        base.chmod(0o777)
        config = workspace / "config.json"
        attacks = {name: attack_program(name) for name in ATTACKS} | {"identity": IDENTITY}
        config.write_text(json.dumps({"sandbox_dir": str(code), "base": str(base), "attacks": attacks}))
        config.chmod(0o644)
        completed = subprocess.run(
            [*command, "-I", str(code / RUNNER.name), str(config)],
            capture_output=True,
            text=True,
            timeout=600,
            start_new_session=True,
        )
        assert completed.returncode == 0, completed.stderr[-5000:]
        report = json.loads(completed.stdout)
        report["suite"] = request.param
        report["files_left_in_base"] = sorted(
            str(path.relative_to(base))
            for path in base.rglob("*")
            if path.name not in ("keep.txt", "secret.txt", "listener.sock")
        )
        yield report


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_contained(suite, name):
    outcome = suite["outcomes"][name]
    context = json.dumps(outcome, indent=1)
    if name not in FOOL_THE_HOOK:
        assert "DISARMED" in outcome["stdout"], "the attack never switched the audit hook off: " + context
    assert "ESCAPED" not in outcome["stdout"], context
    assert "sandbox:" not in outcome["stderr"], "the audit hook stopped it, not the kernel: " + context
    assert outcome["new_files"] == [] and outcome["new_in_base"] == [], context
    assert outcome["keep"] == ["original", "0o666"], context
    assert outcome["tcp_connections"] == outcome["udp_datagrams"] == outcome["unix_connections"] == 0, context
    assert outcome["signals"] == 0, context
    assert outcome["processes"] == [], context
    assert not any(path.startswith(name + "/") for path in suite["files_left_in_base"]), suite["files_left_in_base"]


@pytest.mark.parametrize("layer", ["landlock", "seccomp", "netns", "uid_drop"])
def test_kernel_layer_is_active(suite, layer):
    """Each layer this machine allows is on; a missing one skips with the reason the sandbox logs."""
    if not suite["layers"][layer]:
        pytest.skip(f"{suite['suite']}: {suite['gaps'][layer]}")
    identity = json.loads(suite["outcomes"]["identity"]["stdout"])
    if layer == "seccomp":
        assert identity["Seccomp"] == "2" and identity["NoNewPrivs"] == "1"
    if layer == "uid_drop":
        assert (identity["uid"], identity["gid"], identity["groups"]) == (65534, 65534, [])
        assert identity["CapEff"] == identity["CapPrm"] == "0000000000000000"


def test_root_keeps_no_capabilities_without_the_uid_drop(suite):
    if suite["suite"] != "root" or suite["layers"]["uid_drop"]:
        pytest.skip("only for root where the uid drop is off")
    identity = json.loads(suite["outcomes"]["identity"]["stdout"])
    assert identity["uid"] == 0
    assert identity["CapEff"] == identity["CapPrm"] == "0000000000000000"


def test_the_disarm_really_switches_the_audit_hook_off():
    """Control: after disarm(), what only the hook refuses (importing ctypes) works, so the
    attacks above meet the kernel layers, not the hook."""
    result = run(HELPERS + DISARM_FIRST + "import ctypes\nprint('ctypes', ctypes.sizeof(ctypes.c_int))")
    assert result.ok, result.stderr
    assert "ctypes 4" in result.stdout
    undisarmed = run(HELPERS + "import ctypes")
    assert "sandbox: import _ctypes is not allowed" in undisarmed.stderr


# --- The seccomp filter, decision by decision, for each architecture ---------------------------
# A classic-BPF interpreter (the five opcodes the filter uses) runs the filter the child would
# load, so the aarch64 table is checked on an x86_64 machine too; the attacks above check the
# kernel's own verdicts on this machine's architecture.

SECCOMP_ALLOW, SECCOMP_EPERM, SECCOMP_ENOSYS, SECCOMP_KILL = 0x7FFF0000, 0x00050001, 0x00050026, 0x80000000
READ_SYSCALL = {"x86_64": 0, "aarch64": 63}
GLIBC_THREAD_FLAGS = 0x3D0F00  # CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|PARENT_SETTID|CHILD_CLEARTID


def run_bpf(program, number: int, arch: int, *args: int) -> int:
    """The filter's verdict; also asserts that a verdict on an argument comes within a few steps of
    loading it (a jump that overshoots its block would go on comparing the argument as if it
    were the syscall number)."""
    data = struct.pack("<iIQ6Q", number, arch, 0, *(list(args) + [0] * (6 - len(args))))
    accumulator, counter, steps_since_argument = 0, 0, None
    while True:
        code, jump_true, jump_false, k = program[counter]
        if steps_since_argument is not None:
            steps_since_argument += 1
            assert steps_since_argument <= 6, "the filter compared an argument beyond its own block"
        if code == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            assert steps_since_argument is None, "a second argument load"
            steps_since_argument = 0 if k >= 16 else None
            accumulator, counter = struct.unpack_from("<I", data, k)[0], counter + 1
        elif code in (0x15, 0x35, 0x45):  # JEQ, JGE, JSET with a constant
            taken = {0x15: accumulator == k, 0x35: accumulator >= k, 0x45: bool(accumulator & k)}[code]
            counter += 1 + (jump_true if taken else jump_false)
        elif code == 0x06:  # BPF_RET | BPF_K
            return k
        else:
            raise AssertionError(f"opcode {code:#x} is not one the filter should use")


@pytest.fixture(params=sorted(sandbox_child.SECCOMP_ARCHES))
def arch(request):
    audit_arch, numbers = sandbox_child.SECCOMP_ARCHES[request.param]
    pid = 4242
    program = sandbox_child.seccomp_program(request.param, pid)
    return request.param, audit_arch, numbers, pid, program


def test_seccomp_program_is_well_formed(arch):
    _, _, _, _, program = arch
    assert len(program) < 4096  # BPF_MAXINSNS
    for index, (code, jump_true, jump_false, _) in enumerate(program):
        assert 0 <= jump_true < 256 and 0 <= jump_false < 256
        assert index + 1 + max(jump_true, jump_false) < len(program) or code == 0x06


def test_seccomp_kills_a_foreign_architecture_and_x32(arch):
    machine, audit_arch, _numbers, _, program = arch
    assert run_bpf(program, READ_SYSCALL[machine], audit_arch ^ 0x1) == SECCOMP_KILL
    if machine == "x86_64":
        assert run_bpf(program, 0x40000000 | 59, audit_arch) == SECCOMP_EPERM  # x32 execve


def test_seccomp_denies_the_listed_syscalls_and_allows_the_rest(arch):
    machine, audit_arch, numbers, _, program = arch
    for name in sandbox_child.DENIED_SYSCALLS:
        if name in numbers:
            assert run_bpf(program, numbers[name], audit_arch) == SECCOMP_EPERM, name
    assert {"fork", "vfork"} <= set(numbers) or machine == "aarch64"
    assert run_bpf(program, READ_SYSCALL[machine], audit_arch) == SECCOMP_ALLOW
    assert run_bpf(program, numbers["clone3"], audit_arch) == SECCOMP_ENOSYS  # glibc falls back to clone


def test_seccomp_allows_threads_but_no_other_clone(arch):
    _, audit_arch, numbers, _, program = arch
    assert run_bpf(program, numbers["clone"], audit_arch, GLIBC_THREAD_FLAGS) == SECCOMP_ALLOW
    assert run_bpf(program, numbers["clone"], audit_arch, 17) == SECCOMP_EPERM  # SIGCHLD: fork
    assert run_bpf(program, numbers["clone"], audit_arch, 0x4111) == SECCOMP_EPERM  # CLONE_VM|CLONE_VFORK|SIGCHLD


def test_seccomp_allows_socketpair_only_for_unix(arch):
    _, audit_arch, numbers, _, program = arch
    assert run_bpf(program, numbers["socketpair"], audit_arch, 1, 1) == SECCOMP_ALLOW
    assert run_bpf(program, numbers["socketpair"], audit_arch, 2, 1) == SECCOMP_EPERM


def test_seccomp_allows_signals_only_to_the_program_itself(arch):
    _, audit_arch, numbers, pid, program = arch
    own_group = (-pid) & 0xFFFFFFFF
    for target in (0, pid, own_group, pid | (0xFFFFFFFF << 32)):  # the upper half of an int argument is noise
        assert run_bpf(program, numbers["kill"], audit_arch, target, 9) == SECCOMP_ALLOW, target
    for target in (1, pid + 1, 0xFFFFFFFF, (-(pid + 1)) & 0xFFFFFFFF):  # init, a neighbour, -1, another group
        assert run_bpf(program, numbers["kill"], audit_arch, target, 9) == SECCOMP_EPERM, target
    for name in ("tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        assert run_bpf(program, numbers[name], audit_arch, pid, pid, 9) == SECCOMP_ALLOW, name
        assert run_bpf(program, numbers[name], audit_arch, pid + 1, pid + 1, 9) == SECCOMP_EPERM, name
    assert run_bpf(program, numbers["tkill"], audit_arch, pid, 9) == SECCOMP_EPERM


# --- Reporting the layers ---------------------------------------------------------------------


def test_each_missing_layer_is_logged_once_per_process(monkeypatch, caplog):
    from g2rpo.rewards import sandbox

    monkeypatch.setattr(sandbox, "_probed_layers", {})  # a fresh process, as far as the probe knows
    with caplog.at_level("INFO", logger="g2rpo.rewards.sandbox"):
        layers = sandbox.sandbox_layers()
        gaps = sandbox.sandbox_layer_gaps()
        run("print('again')")
        assert sandbox.sandbox_layers() == layers
    assert set(layers) == {"rlimits", "netns", "uid_drop", "landlock", "seccomp", "audit_hook"}
    assert set(gaps) == {name for name, active in layers.items() if not active}
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert warnings == [f"code sandbox: the {name} layer is off: {reason}" for name, reason in gaps.items()]
    assert sum("code sandbox layers active" in record.getMessage() for record in caplog.records) == 1


def test_a_run_whose_expected_layer_fails_is_a_sandbox_error_not_a_weaker_run(tmp_path):
    """The trainer expects every layer its probe found; here uid_drop is expected but not asked for."""
    from g2rpo.rewards import sandbox

    marker = tmp_path / "ran"
    result = sandbox._run_child(
        f"open({str(marker)!r}, 'w')", {"expect": ["uid_drop"]}, timeout_s=10.0, memory_mb=512, max_output_bytes=4096
    )
    assert not result.ok
    assert "sandbox: a layer that the probe found working failed here: uid_drop" in result.stderr, result.stderr
    assert not marker.exists()
