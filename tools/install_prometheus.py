"""Put Debian's prometheus and promtool into .tools/bin, without root and without touching the system.

`apt-get install prometheus` needs root, and Debian's package does more than copy two programs: its
postinst (dh_installsystemd, dh_installinit) adds a `prometheus` system user, enables
prometheus.service and starts it, on a systemd host a server on :9090 for every boot. The tests
start their own server on 127.0.0.1. So this only downloads the package (`apt-get download`, no
root: it reads the package lists already on the machine) and unpacks its two binaries (`dpkg-deb
-x`, no maintainer scripts run); they link only against libc. `make tools` runs this when no
prometheus/promtool is on PATH; tests find them in .tools/bin (tests/test_alert_rules.py,
tests/test_prometheus_e2e.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE = "prometheus"
BINARIES = ("prometheus", "promtool")
TARGET = Path(__file__).resolve().parents[1] / ".tools" / "bin"


def main() -> None:
    if all((TARGET / name).is_file() for name in BINARIES):
        return
    with tempfile.TemporaryDirectory() as scratch:
        download = subprocess.run(["apt-get", "download", PACKAGE], cwd=scratch, capture_output=True, text=True)
        if download.returncode != 0:
            sys.exit(
                f"could not download the Debian package {PACKAGE} ({download.stderr.strip()}); on a machine whose "
                "package lists are empty, run `sudo apt-get update` once, or put prometheus and promtool on PATH"
            )
        unpacked = Path(scratch) / "root"
        subprocess.run(["dpkg-deb", "-x", str(next(Path(scratch).glob("*.deb"))), str(unpacked)], check=True)
        TARGET.mkdir(parents=True, exist_ok=True)
        for name in BINARIES:
            shutil.copy2(unpacked / "usr" / "bin" / name, TARGET / name)
    version = subprocess.run([TARGET / "promtool", "--version"], capture_output=True, text=True, check=True)
    print(f"installed {version.stdout.splitlines()[0]} and prometheus into {TARGET}")


if __name__ == "__main__":
    main()
