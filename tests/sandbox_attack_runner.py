"""Runs the sandbox attack suite in this process's shoes (root, or an unprivileged user) and reports.

Usage: python -I sandbox_attack_runner.py CONFIG.json, where CONFIG holds "sandbox_dir" (a folder
with copies of sandbox.py and sandbox_child.py: this script may run as a user who cannot read the
repository), "base" (a world-writable folder outside any sandbox) and "attacks" ({name: code}).
Standard library only. For each attack it prepares a fresh folder `base/name` holding a file to
keep (KEEP), a secret (SECRET) and a listening unix socket, and runs the program with these
names defined, plus PORT (a TCP listener and a UDP socket on 127.0.0.1) and TOKEN (in the command line of any
process the program might start). It then records every effect the test asserts did not happen:
new files in `base/name` or `base`, KEEP changed, connections or datagrams on any listener, SIGUSR2 sent to
this process, processes alive with TOKEN in their command line, and "ESCAPED" in the output.
Prints one JSON object: {"layers", "gaps", "uid", "outcomes": {name: {...}}}.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import sys
import time


def _processes_with(token: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                text = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if token in text and int(pid) != os.getpid():
            found.append(f"{pid}: {text}")
    return found


def _accepted(listener: socket.socket) -> int:
    count = 0
    while True:
        try:
            connection, _ = listener.accept()
        except (BlockingIOError, OSError):
            return count
        connection.close()
        count += 1


def _received(udp: socket.socket) -> int:
    count = 0
    while True:
        try:
            udp.recv(65536)
        except (BlockingIOError, OSError):
            return count
        count += 1


def _run_attack(sandbox, base: str, name: str, code: str, listeners: dict, signals: list) -> dict:
    folder = os.path.join(base, name)
    os.mkdir(folder)
    os.chmod(folder, 0o777)  # the program's uid (maybe 65534) could write here if only DAC stood guard
    keep, secret, unix_path = (os.path.join(folder, leaf) for leaf in ("keep.txt", "secret.txt", "listener.sock"))
    for path, text in ((keep, "original"), (secret, "top secret")):
        with open(path, "w") as handle:
            handle.write(text)
        os.chmod(path, 0o666)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(unix_path)
    os.chmod(unix_path, 0o777)
    unix.listen(4)
    unix.setblocking(False)
    prepared = set(os.listdir(folder))
    base_before = set(os.listdir(base))
    token = f"g2rpo-attack-{name}-{secrets.token_hex(4)}"
    prelude = (
        f"OUT = {folder!r}\nKEEP = {keep!r}\nSECRET = {secret!r}\nUNIX_SOCKET = {unix_path!r}\n"
        f"PORT = {listeners['tcp'].getsockname()[1]}\nTOKEN = {token!r}\n"
    )
    signals.clear()
    result = sandbox.run_python(prelude + code, timeout_s=10.0, memory_mb=512)
    time.sleep(0.05)  # a process that escaped would have had time to act
    keep_text = open(keep).read() if os.path.exists(keep) else None
    outcome = {
        "ok": result.ok,
        "reason": result.reason,
        "stdout": result.stdout[-3000:],
        "stderr": result.stderr[-3000:],
        "new_files": sorted(set(os.listdir(folder)) - prepared),
        "new_in_base": sorted(set(os.listdir(base)) - base_before - {name}),
        "keep": [keep_text, oct(os.stat(keep).st_mode & 0o7777) if keep_text is not None else None],
        "tcp_connections": _accepted(listeners["tcp"]),
        "udp_datagrams": _received(listeners["udp"]),
        "unix_connections": _accepted(unix),
        "signals": len(signals),
        "processes": _processes_with(token),
    }
    unix.close()
    return outcome


def main() -> None:
    with open(sys.argv[1]) as config_file:
        config = json.load(config_file)
    sys.path.insert(0, config["sandbox_dir"])
    import sandbox  # the copy: this user may not read the repository

    os.chdir(config["base"])  # /proc/<this pid>/cwd is one of the escape routes tried
    signals: list = []
    signal.signal(signal.SIGUSR2, lambda number, frame: signals.append(number))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(4)
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", tcp.getsockname()[1]))  # PORT reaches both
    udp.setblocking(False)
    listeners = {"tcp": tcp, "udp": udp}
    outcomes = {
        name: _run_attack(sandbox, config["base"], name, code, listeners, signals)
        for name, code in config["attacks"].items()
    }
    print(
        json.dumps(
            {
                "layers": sandbox.sandbox_layers(),
                "gaps": sandbox.sandbox_layer_gaps(),
                "uid": os.getuid(),
                "outcomes": outcomes,
            }
        )
    )


if __name__ == "__main__":
    main()
