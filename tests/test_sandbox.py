"""The code sandbox contains what model-written programs do by accident or by reward hacking.

Every test runs a real subprocess; nothing is mocked. A containment test asserts the effect did
not happen (no file, no connection, no process output), not just that the program failed.
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

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
    result = run("import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 10000)\nprint('END')", max_output_bytes=4096)
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
