"""Start-up checks of a cluster trainer that another attempt cannot fix, run before torch is imported.

The NVIDIA driver. The trainer image's CUDA user space comes from the locked nvidia-* wheels
(torch 2.13 cu130: nvidia-cuda-runtime 13.0.x), the driver from the node. NVIDIA's minor version
compatibility table (docs.nvidia.com/deploy/cuda-compatibility, "CUDA Toolkit Driver Version
Ranges") gives CUDA 13.x a minimum driver of 580 and CUDA 12.x one of 525: any R580 or newer
driver runs every CUDA 13 minor release. On an older driver torch does not fail: it warns that
"the NVIDIA driver on your system is too old" and `torch.cuda.is_available()` answers False, so a
trainer would go on without its GPUs. Running CUDA 13 on an R535-R570 driver needs NVIDIA's
forward compatibility package (cuda-compat, data center GPUs only), which this image does not
ship. So the check reads the driver version without CUDA: from the kernel module's
/proc/driver/nvidia/version (present in every container of a node whose driver is loaded, GPU
allocated or not, so the `check-spec` init container can read it) and compares it with the
minimum of the installed CUDA runtime's major version. No driver (a CPU machine) and no CUDA
runtime wheel (the CPU install) are not problems: there is nothing to check.

Every problem here (and in g2rpo.train.storage) is a `FatalProblem`: one line naming what was
found and what is needed, an exit code from g2rpo.api.spec.FAILURE_REASONS, and the same line
in the container's termination message, where the operator reads it (`report`).
"""

from __future__ import annotations

import contextlib
import re
from importlib import metadata
from pathlib import Path

from g2rpo.api.spec import EXIT_DRIVER_TOO_OLD, FAILURE_REASONS

DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")
TERMINATION_LOG = Path("/dev/termination-log")
"""Kubernetes' default terminationMessagePath: the kubelet creates it mode 0666 for every container
(pkg/kubelet/kuberuntime/kuberuntime_container.go, makeMounts), so uid 1000 can write it."""
CUDA_RUNTIME_DISTRIBUTION = "nvidia-cuda-runtime"
MINIMUM_DRIVER_BRANCH = {13: 580, 12: 525, 11: 450}
"""CUDA major version -> the oldest driver branch that runs all of its minor releases (NVIDIA's table)."""
_NVRM_VERSION = re.compile(r"\b(\d{3,}\.\d+(?:\.\d+)?)\b")


class FatalProblem(Exception):
    """A problem another attempt cannot fix: str() is the one line to show, `exit_code` the process's code.
    `secondhand`: this rank stops because another rank found the problem (that rank reports it)."""

    exit_code: int

    def __init__(self, line: str, secondhand: bool = False):
        super().__init__(line)
        self.secondhand = secondhand

    @property
    def reason(self) -> str:
        return FAILURE_REASONS[self.exit_code]


class DriverTooOld(FatalProblem):
    exit_code = EXIT_DRIVER_TOO_OLD


def driver_version(version_file: Path = DRIVER_VERSION_FILE) -> str | None:
    """The loaded NVIDIA kernel module's version ("580.65.06"), or None without one.

    The file's first line reads `NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  <date>`
    (or `... Open Kernel Module for x86_64  580.65.06  Release Build ...`)."""
    try:
        first = version_file.read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    match = _NVRM_VERSION.search(first.partition(":")[2])
    return match.group(1) if match else None


def image_cuda_major() -> int | None:
    """The CUDA major version of the installed CUDA runtime wheel (None: no CUDA runtime installed)."""
    try:
        return int(metadata.version(CUDA_RUNTIME_DISTRIBUTION).split(".")[0])
    except metadata.PackageNotFoundError:
        return None


def check_driver(found: str | None, cuda_major: int | None) -> None:
    """Raise DriverTooOld when driver `found` is older than CUDA `cuda_major` needs."""
    if found is None or cuda_major is None or cuda_major not in MINIMUM_DRIVER_BRANCH:
        return
    needed = MINIMUM_DRIVER_BRANCH[cuda_major]
    if int(found.split(".")[0]) < needed:
        raise DriverTooOld(
            f"NVIDIA driver {found} on this node is too old for this image's CUDA {cuda_major}: it needs driver "
            f"R{needed} or newer; run the GPU pods on nodes with a newer driver (node pool version, GPU operator "
            "driver.version, or the spec's nodeSelector) or build the image for an older CUDA"
        )


def check_node_driver() -> None:
    check_driver(driver_version(DRIVER_VERSION_FILE), image_cuda_major())


def report(problem: FatalProblem, termination_log: Path | None = None) -> str:
    """The problem's line; written as `<reason>: <line>` to the termination message when the container has one
    (not for a secondhand problem: the ranks of a pod share the file, and the rank that found it has the details)."""
    line = str(problem)
    log = termination_log or TERMINATION_LOG
    if log.exists() and not problem.secondhand:
        # Unwritable: the line still reaches stderr, and the exit code (where it survives) names the reason.
        with contextlib.suppress(OSError):
            log.write_text(f"{problem.reason}: {line}")
    return line


def main() -> int:
    """`python -m g2rpo.train.preflight`: the driver check alone (the rollout pod's init container)."""
    import sys

    try:
        check_node_driver()
    except FatalProblem as problem:
        print(report(problem), file=sys.stderr)
        return problem.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
