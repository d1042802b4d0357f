"""Every pod the operator creates meets the Pod Security Standards' `restricted` level, the level the
README's requirements table states for job namespaces.

The checks are those of Kubernetes' Pod Security admission, ported from
kubernetes/kubernetes staging/src/k8s.io/pod-security-admission/policy/check_*.go (baseline and
restricted, latest versions): no host namespaces, ports or paths, no privileged containers, no
capability beyond the default set (baseline) and none but NET_BIND_SERVICE after dropping ALL
(restricted), no unconfined seccomp/AppArmor, no custom SELinux user/role, default procMount, only safe
sysctls, the restricted volume types, no privilege escalation, non-root, and a RuntimeDefault or
Localhost seccomp profile. The pods come from the builders for the specs of tests/test_rbac.py.
"""

from __future__ import annotations

import pytest
from test_rbac import SPECS, Manifest, created

BASELINE_CAPABILITIES = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def restricted_violations(pod: Manifest) -> list[str]:
    """Why `pod` (a pod spec) is not `restricted`: one line per failed check; empty when it is."""
    found: list[str] = []
    pod_context = pod.get("securityContext") or {}
    containers = [*(pod.get("initContainers") or []), *pod["containers"], *(pod.get("ephemeralContainers") or [])]
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            found.append(f"hostNamespaces: {field}")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"restrictedVolumes: {volume['name']} is {sorted(kinds)}")
    for sysctl in pod_context.get("sysctls") or []:
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"sysctls: {sysctl['name']}")
    pod_seccomp = (pod_context.get("seccompProfile") or {}).get("type")
    for context in (pod_context, *(c.get("securityContext") or {} for c in containers)):
        if (context.get("appArmorProfile") or {}).get("type") == "Unconfined":
            found.append("appArmorProfile: Unconfined")
        selinux = context.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            found.append(f"seLinuxOptions: {selinux}")
        if context.get("runAsUser") == 0:
            found.append("runAsUser: 0")
    for container in containers:
        name, context = container["name"], container.get("securityContext") or {}
        added = set((context.get("capabilities") or {}).get("add") or [])
        dropped = set((context.get("capabilities") or {}).get("drop") or [])
        checks = {
            "privileged": not context.get("privileged"),
            "hostPorts": all(not port.get("hostPort") for port in container.get("ports") or []),
            "procMount": context.get("procMount", "Default") == "Default",
            "capabilities_baseline": added <= BASELINE_CAPABILITIES,
            "capabilities_restricted": "ALL" in dropped and added <= {"NET_BIND_SERVICE"},
            "allowPrivilegeEscalation": context.get("allowPrivilegeEscalation") is False,
            "runAsNonRoot": context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True,
            "seccompProfile": (context.get("seccompProfile") or {}).get("type", pod_seccomp)
            in ("RuntimeDefault", "Localhost"),
        }
        found += [f"{check}: container {name}" for check, ok in checks.items() if not ok]
    return found


def pod_templates(objects: list[Manifest]) -> list[tuple[str, Manifest]]:
    return [
        (f"{o['kind']} {o['metadata']['name']}", o["spec"]["template"]["spec"])
        for o in objects
        if o["kind"] in ("Deployment", "Job")
    ]


@pytest.mark.parametrize("case", SPECS)
def test_every_pod_the_operator_creates_is_restricted(case):
    pods = pod_templates(created("ml", SPECS[case], kueue=True))
    assert pods
    violations = [f"{where}: {why}" for where, pod in pods for why in restricted_violations(pod)]
    assert not violations, "\n".join(violations)


def test_the_check_refuses_what_pod_security_refuses():
    """The check can fail: each change below is one the restricted level refuses."""
    (_, pod) = next(iter(pod_templates(created("ml", {}, kueue=False))))
    assert restricted_violations(pod) == []
    broken = [
        lambda p: p.update(hostNetwork=True),
        lambda p: p["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
        lambda p: p["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
        lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["IPC_LOCK"]),
        lambda p: p["securityContext"].update(runAsNonRoot=False),
        lambda p: p["securityContext"].update(seccompProfile={"type": "Unconfined"}),
    ]
    for change in broken:
        copy = {**pod, "securityContext": dict(pod["securityContext"]), "volumes": list(pod["volumes"])}
        copy["containers"] = [
            {
                **c,
                "securityContext": {**c["securityContext"], "capabilities": dict(c["securityContext"]["capabilities"])},
            }
            for c in pod["containers"]
        ]
        change(copy)
        assert restricted_violations(copy), change
