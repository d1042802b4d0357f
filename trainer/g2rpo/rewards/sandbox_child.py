"""The sandbox's child process: walls itself in with the kernel, then runs the model's program.

`sandbox.py` starts it as `python -I -B sandbox_child.py CONFIG` in the sandbox folder, where it
finds the program in `program.py`. It imports only the standard library. Before any of the
program's code runs, and in this order, it:

1. sets the resource limits from CONFIG on itself (address space, CPU, file size, open files, core);
2. enters a new, empty network namespace: directly as root, else inside a new user namespace
   (mapping only its own uid and gid, then dropping the capabilities that namespace gave it);
3. reads the program and deletes its file;
4. as root, drops to the unprivileged uid/gid from CONFIG (setgroups([]), then setresgid/setresuid);
5. sets no_new_privs, which Landlock and seccomp need without CAP_SYS_ADMIN;
6. Landlock: writes only beneath the sandbox folder (and /dev/null), reads only the Python
   install, its libraries, a few system files and /proc/<its own pid>, executes nothing, no TCP
   bind/connect (ABI 4+), no signals or abstract unix sockets out of its domain (ABI 6+);
7. seccomp-bpf: no fork, vfork, clone other than a thread, execve, socket (socketpair only for
   AF_UNIX, which asyncio's self-pipe needs), connect, ptrace, process_vm_*, namespaces, mounts,
   io_uring (its operations bypass seccomp), signals to any process but itself;
8. forgets ctypes and installs the audit hook (the pre-kernel-layer guard, now the second layer);
9. runs the program as `__main__` with the filename "<program>".

Landlock domains and seccomp filters cannot be removed or widened by the process they confine,
and both survive exec, so defeating the audit hook (it is in-process Python: `gc` reaches its
closure, monkeypatched `posixpath` fools its path checks, and ctypes' static types stay
reachable through `object.__subclasses__()` once step 6 loaded them) gains the program nothing
the kernel layers forbid.

A layer the kernel or the container's policy does not allow is skipped, and the child says so:
with `"probe": true` in CONFIG it prints {"layers": {name: reason or null}, "setup_ms": {step:
milliseconds}} as JSON after the setup and exits (the trainer probes once per process); with `"expect": [names]` a run whose
expected layer fails exits 1 instead of running the program with a weaker wall.
"""

from __future__ import annotations

import _posixsubprocess  # imported while the Python install is surely readable (before the uid drop)
import ctypes
import json
import linecache
import os
import platform
import resource
import stat
import struct
import sys
import time
import traceback
import types

PROGRAM_FILE = "program.py"
LAYERS = ("rlimits", "netns", "uid_drop", "landlock", "seccomp", "audit_hook")

# --- Landlock (include/uapi/linux/landlock.h) --------------------------------------------------
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446  # all arches
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_ALL_V1 = (1 << 13) - 1  # execute ... make_sym
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # ABI 2, 3, 5
FS_MAKE_CHAR, FS_MAKE_BLOCK = 1 << 6, 1 << 11
FS_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV  # all a file rule may hold
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

READ = FS_READ_FILE | FS_READ_DIR
SYSTEM_READ_ROOTS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sys/devices/system/cpu")
SYSTEM_READ_FILES = (
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/passwd",
    "/etc/group",
    "/dev/urandom",
    "/dev/random",
    "/dev/zero",
)

# --- seccomp (include/uapi/linux/seccomp.h, filter.h, audit.h) ---------------------------------
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
RET_KILL_PROCESS, RET_ERRNO, RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
EPERM, ENOSYS = 1, 38
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_JSET_K, BPF_RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
DATA_NR, DATA_ARCH, DATA_ARG0_LOW = 0, 4, 16  # offsets in struct seccomp_data (little-endian)
X32_SYSCALL_BIT = 0x40000000
CLONE_THREAD, CLONE_NEWUSER, CLONE_NEWNET = 0x00010000, 0x10000000, 0x40000000
AF_UNIX = 1

_COMMON_NUMBERS = {  # syscalls numbered alike on every architecture (424 and later)
    "pidfd_send_signal": 424,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "pidfd_open": 434,
    "clone3": 435,
    "pidfd_getfd": 438,
    "process_madvise": 440,
    "fchmodat2": 452,
    "setxattrat": 463,
    "removexattrat": 466,
}
SECCOMP_ARCHES = {  # platform.machine() -> (AUDIT_ARCH_*, syscall numbers)
    "x86_64": (
        0xC000003E,
        {
            "socket": 41,
            "connect": 42,
            "socketpair": 53,
            "clone": 56,
            "fork": 57,
            "vfork": 58,
            "execve": 59,
            "kill": 62,
            "ptrace": 101,
            "rt_sigqueueinfo": 129,
            "pivot_root": 155,
            "chroot": 161,
            "acct": 163,
            "mount": 165,
            "umount2": 166,
            "swapon": 167,
            "swapoff": 168,
            "reboot": 169,
            "init_module": 175,
            "delete_module": 176,
            "tkill": 200,
            "tgkill": 234,
            "kexec_load": 246,
            "add_key": 248,
            "request_key": 249,
            "keyctl": 250,
            "unshare": 272,
            "rt_tgsigqueueinfo": 297,
            "perf_event_open": 298,
            "setns": 308,
            "process_vm_readv": 310,
            "process_vm_writev": 311,
            "kcmp": 312,
            "finit_module": 313,
            "kexec_file_load": 320,
            "bpf": 321,
            "execveat": 322,
            "userfaultfd": 323,
            "chmod": 90,
            "fchmod": 91,
            "chown": 92,
            "fchown": 93,
            "lchown": 94,
            "utime": 132,
            "mknod": 133,
            "setxattr": 188,
            "lsetxattr": 189,
            "fsetxattr": 190,
            "removexattr": 197,
            "lremovexattr": 198,
            "fremovexattr": 199,
            "utimes": 235,
            "mknodat": 259,
            "fchownat": 260,
            "futimesat": 261,
            "fchmodat": 268,
            "utimensat": 280,
            **_COMMON_NUMBERS,
        },
    ),
    "aarch64": (
        0xC00000B7,
        {  # asm-generic numbering: no fork or vfork (glibc uses clone)
            "socket": 198,
            "connect": 203,
            "socketpair": 199,
            "clone": 220,
            "execve": 221,
            "kill": 129,
            "ptrace": 117,
            "rt_sigqueueinfo": 138,
            "pivot_root": 41,
            "chroot": 51,
            "acct": 89,
            "mount": 40,
            "umount2": 39,
            "swapon": 224,
            "swapoff": 225,
            "reboot": 142,
            "init_module": 105,
            "delete_module": 106,
            "tkill": 130,
            "tgkill": 131,
            "kexec_load": 104,
            "add_key": 217,
            "request_key": 218,
            "keyctl": 219,
            "unshare": 97,
            "rt_tgsigqueueinfo": 240,
            "perf_event_open": 241,
            "setns": 268,
            "process_vm_readv": 270,
            "process_vm_writev": 271,
            "kcmp": 272,
            "finit_module": 273,
            "kexec_file_load": 294,
            "bpf": 280,
            "execveat": 281,
            "userfaultfd": 282,
            "fchmod": 52,
            "fchmodat": 53,
            "fchownat": 54,
            "fchown": 55,
            "mknodat": 33,
            "utimensat": 88,
            "setxattr": 5,
            "lsetxattr": 6,
            "fsetxattr": 7,
            "removexattr": 14,
            "lremovexattr": 15,
            "fremovexattr": 16,
            **_COMMON_NUMBERS,
        },
    ),
}
DENIED_SYSCALLS = (  # EPERM whatever the arguments
    "fork",
    "vfork",
    "execve",
    "execveat",
    "socket",
    "connect",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_open",
    "pidfd_send_signal",
    "pidfd_getfd",
    "process_madvise",
    "tkill",
    "unshare",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    # Landlock does not govern metadata: without these the program could chmod, chown, stamp or
    # tag any file its uid owns (the trainer's checkpoints when both run as the pod's user).
    "chmod",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "chown",
    "fchown",
    "lchown",
    "fchownat",
    "utime",
    "utimes",
    "futimesat",
    "utimensat",
    "setxattr",
    "lsetxattr",
    "fsetxattr",
    "setxattrat",
    "removexattr",
    "lremovexattr",
    "fremovexattr",
    "removexattrat",
    "mknod",
    "mknodat",
)


def _ld(offset):
    return BPF_LD_W_ABS, 0, 0, offset


def _jeq(value, jump_true, jump_false):
    return BPF_JEQ_K, jump_true, jump_false, value


def _ret(value):
    return BPF_RET_K, 0, 0, value


def seccomp_program(machine: str, pid: int) -> list[tuple[int, int, int, int]]:
    """The classic BPF filter (code, jt, jf, k) for `machine`, with `pid` as the only signal target.

    Pure, so tests can run it through a BPF interpreter for an architecture this host is not.
    """
    audit_arch, numbers = SECCOMP_ARCHES[machine]
    deny = _ret(RET_ERRNO | EPERM)
    program = [_ld(DATA_ARCH), _jeq(audit_arch, 1, 0), _ret(RET_KILL_PROCESS), _ld(DATA_NR)]
    if machine == "x86_64":  # x32 syscalls are numbered from this bit up and would dodge the table
        program += [(BPF_JGE_K, 0, 1, X32_SYSCALL_BIT), deny]
    for name in DENIED_SYSCALLS:
        if name in numbers:
            program += [_jeq(numbers[name], 0, 1), deny]
    # glibc's pthread_create and posix_spawn try clone3 first and fall back to clone on ENOSYS,
    # whose flags (in a register, unlike clone3's struct) the filter can read.
    program += [_jeq(numbers["clone3"], 0, 1), _ret(RET_ERRNO | ENOSYS)]
    program += [
        _jeq(numbers["clone"], 0, 4),
        _ld(DATA_ARG0_LOW),
        (BPF_JSET_K, 0, 1, CLONE_THREAD),
        _ret(RET_ALLOW),
        deny,
    ]
    program += [_jeq(numbers["socketpair"], 0, 4), _ld(DATA_ARG0_LOW), _jeq(AF_UNIX, 0, 1), _ret(RET_ALLOW), deny]
    own_group = (-pid) & 0xFFFFFFFF
    for name, allowed in (
        ("kill", (0, pid, own_group)),
        ("tgkill", (pid,)),
        ("rt_sigqueueinfo", (pid,)),
        ("rt_tgsigqueueinfo", (pid,)),
    ):
        checks = [_jeq(value, len(allowed) - index, 0) for index, value in enumerate(allowed)]
        block = [_ld(DATA_ARG0_LOW), *checks, deny, _ret(RET_ALLOW)]
        program += [_jeq(numbers[name], 0, len(block)), *block]
    return [*program, _ret(RET_ALLOW)]


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class _Libc:
    """The few libc calls the standard library lacks on Python 3.11, raising OSError on failure."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long

    def _check(self, result: int, what: str) -> int:
        if result < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")
        return result

    def syscall(self, number: int, *args, what: str) -> int:
        return self._check(self.libc.syscall(ctypes.c_long(number), *args), what)

    def prctl(self, option: int, *args, what: str) -> None:
        self._check(self.libc.prctl(ctypes.c_int(option), *args), what)

    def unshare(self, flags: int) -> None:
        self._check(self.libc.unshare(ctypes.c_int(flags)), "unshare")

    def drop_capabilities(self) -> None:
        """Empties this process's effective, permitted and inheritable capability sets."""
        header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3: two data structs
        self._check(self.libc.capset(ctypes.byref(header), (_CapData * 2)()), "capset")


def _limit_self(limits) -> None:
    for which, soft, hard in limits:
        if which == resource.RLIMIT_AS:
            with open("/proc/self/statm") as statm:
                in_use = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            if in_use >= soft:
                sys.exit(
                    f"sandbox: the memory limit of {soft >> 20} MiB is below the "
                    f"{in_use >> 20} MiB the interpreter itself uses"
                )
        resource.setrlimit(which, (soft, hard))


def _enter_network_namespace(libc: _Libc) -> None:
    if os.geteuid() == 0:
        libc.unshare(CLONE_NEWNET)
        return
    uid, gid = os.geteuid(), os.getegid()
    libc.unshare(CLONE_NEWUSER | CLONE_NEWNET)
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as map_file:
            map_file.write(text)
    libc.drop_capabilities()  # the new user namespace's full set, which this process needs no more


def _drop_user(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise OSError(EPERM, "the uid/gid did not change")


def _python_paths() -> list[str]:
    """The directories the program imports from (checked before a uid drop, readable or not after)."""
    return [path for path in (os.path.dirname(os.__file__), *sys.path) if os.path.isdir(path)]


def landlock_read_paths() -> list[str]:
    """What the program may read: the Python install, the libraries it mapped, a few system files."""
    paths = [
        *SYSTEM_READ_ROOTS,
        *SYSTEM_READ_FILES,
        f"/proc/{os.getpid()}",
        sys.prefix,
        sys.exec_prefix,
        sys.base_prefix,
        sys.base_exec_prefix,
        os.path.dirname(os.path.realpath(sys.executable)),
        *sys.path,
    ]
    with open("/proc/self/maps") as maps:  # ld.so, libc, libpython, extension modules loaded so far
        paths += {
            os.path.dirname(line.split(None, 5)[5].strip())
            for line in maps
            if len(line.split(None, 5)) == 6 and line.split(None, 5)[5].startswith("/")
        }
    return [path for path in dict.fromkeys(paths) if path and os.path.exists(path)]


def _landlock(libc: _Libc, folder: str) -> int:
    """Restricts this process (and all it could start) with Landlock; returns the ABI version used."""
    abi = libc.syscall(
        SYS_LANDLOCK_CREATE_RULESET,
        None,
        ctypes.c_size_t(0),
        ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION),
        what="Landlock ABI",
    )
    handled_fs = FS_ALL_V1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0)
    handled_fs |= FS_IOCTL_DEV if abi >= 5 else 0
    handled_net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    attr_size = 8 if abi < 4 else 16 if abi < 6 else 24
    attr = ctypes.create_string_buffer(struct.pack("=QQQ", handled_fs, handled_net, scoped)[:attr_size], attr_size)
    ruleset = libc.syscall(
        SYS_LANDLOCK_CREATE_RULESET,
        attr,
        ctypes.c_size_t(attr_size),
        ctypes.c_uint32(0),
        what="landlock_create_ruleset",
    )
    try:
        rules = [(path, READ) for path in landlock_read_paths()]
        rules += [
            ("/dev/null", FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE | FS_IOCTL_DEV),
            (folder, handled_fs & ~(FS_EXECUTE | FS_MAKE_CHAR | FS_MAKE_BLOCK)),
        ]
        for path, access in rules:
            _landlock_allow(libc, ruleset, path, access & handled_fs)
        libc.syscall(
            SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0), what="landlock_restrict_self"
        )
    finally:
        os.close(ruleset)
    return abi


def _landlock_allow(libc: _Libc, ruleset: int, path: str, access: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= FS_FILE_RIGHTS
        rule = ctypes.create_string_buffer(struct.pack("=Qi", access, fd), 12)  # packed path_beneath_attr
        libc.syscall(
            SYS_LANDLOCK_ADD_RULE,
            ctypes.c_int(ruleset),
            ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
            rule,
            ctypes.c_uint32(0),
            what=f"landlock_add_rule {path}",
        )
    finally:
        os.close(fd)


def _seccomp(libc: _Libc) -> None:
    machine = platform.machine()
    if machine not in SECCOMP_ARCHES or sys.byteorder != "little":
        raise OSError(ENOSYS, f"no syscall table for {machine} ({sys.byteorder}-endian) in this sandbox")
    program = seccomp_program(machine, os.getpid())
    filters = (_SockFilter * len(program))(*(_SockFilter(*insn) for insn in program))
    fprog = _SockFprog(len(program), filters)
    libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog), what="seccomp")


class _Laps:
    """Milliseconds each setup step took (reported by the probe, read by bench/sandbox_overhead.py)."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        self.ms[step] = round((now - self._last) * 1000, 3)
        self._last = now


def wall_in(config: dict, folder: str, lap=lambda step: None) -> tuple[dict, str]:
    """Steps 1-7 of the module docstring; returns ({layer: None or why it is off}, the program)."""
    layers = dict.fromkeys(LAYERS)
    _limit_self(config.get("limits", ()))
    libc = _Libc()
    lap("rlimits")
    try:
        _enter_network_namespace(libc)
    except OSError as error:
        layers["netns"] = f"no new network namespace ({error}): needs root or unprivileged user namespaces"
    lap("netns")
    with open(PROGRAM_FILE, encoding="utf-8") as program_file:
        source = program_file.read()
    os.remove(PROGRAM_FILE)
    drop_to = config.get("drop_to")
    if drop_to is None:
        layers["uid_drop"] = f"not asked to drop: the program runs as the trainer's uid {os.geteuid()}"
    else:
        python_paths = _python_paths()
        try:
            _drop_user(*drop_to)
            unreadable = [path for path in python_paths if not os.access(path, os.R_OK | os.X_OK)]
            if unreadable:
                layers["uid_drop"] = (
                    f"uid {drop_to[0]} cannot read the Python install ({unreadable[0]}); "
                    "install Python world-readable (not under /root) to enable the drop"
                )
        except OSError as error:
            layers["uid_drop"] = f"could not drop to uid/gid {drop_to}: {error}"
    if os.geteuid() == 0:  # still root: at least without capabilities (raw I/O, mknod, clock, chown...)
        try:
            libc.drop_capabilities()
        except OSError as error:
            layers["uid_drop"] = f"{layers['uid_drop']}; dropping root's capabilities failed: {error}"
    lap("uid_drop")
    try:
        libc.prctl(
            PR_SET_NO_NEW_PRIVS,
            ctypes.c_ulong(1),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
            what="no_new_privs",
        )
    except OSError as error:
        layers["landlock"] = layers["seccomp"] = f"no_new_privs refused: {error}"
        return layers, source
    try:
        _landlock(libc, folder)
    except OSError as error:
        layers["landlock"] = _why_no_landlock(error)
    lap("landlock")
    try:
        _seccomp(libc)
    except OSError as error:
        layers["seccomp"] = f"seccomp filter refused: {error}"
    lap("seccomp")
    return layers, source


def _why_no_landlock(error: OSError) -> str:
    hints: dict[int | None, str] = {
        38: "the kernel has no Landlock (needs Linux 5.13+ built with CONFIG_SECURITY_LANDLOCK)",
        95: "Landlock is built but not enabled: add landlock to the lsm= boot parameter",
        1: "the container's seccomp profile refuses the landlock syscalls",
    }
    hint = hints.get(error.errno, "")
    return f"{error}{': ' + hint if hint else ''}"


def _forget_ctypes() -> None:
    """Unimport ctypes: a fresh `import ctypes` then meets the audit hook's refusal of _ctypes."""
    for name in [name for name in sys.modules if name == "ctypes" or name.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]


# The audit hook. It binds everything it uses as default arguments, so rebinding module globals
# does not change it; that is no defence against gc (see the module docstring) and is not meant
# as one any more: the kernel layers above are the wall.
FORBIDDEN_EVENTS = frozenset(
    {
        "subprocess.Popen",
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.fork",
        "os.forkpty",
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "socket.gethostbyname_ex",
        "socket.gethostbyaddr",
        "socket.getnameinfo",
        "cpython.PyInterpreterState_New",
    }
)
FORBIDDEN_MODULES = frozenset(
    {
        "_posixsubprocess",
        "_ctypes",
        "_xxsubinterpreters",
        "_testcapi",
        "_testinternalcapi",
    }
)
MODIFY_ONE_PATH = {  # event -> (index of the path argument, index of its dir_fd argument or None)
    "os.remove": (0, 1),
    "os.rmdir": (0, 1),
    "os.mkdir": (0, 2),
    "os.chmod": (0, 2),
    "os.chown": (0, 3),
    "os.utime": (0, 3),
    "os.truncate": (0, None),
    "os.setxattr": (0, None),
    "os.removexattr": (0, None),
}
MODIFY_TWO_PATHS = {"os.rename": (2, 3), "os.link": (2, 3)}  # event -> dir_fd indexes of src, dst
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
SOCKET_ADDRESS_EVENTS = frozenset({"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"})


def _disarm_fork_exec() -> None:
    """_posixsubprocess.fork_exec starts processes without an audit event (multiprocessing calls it).

    Disarmed, `import subprocess` (and asyncio) still work; the hook refuses a fresh import of
    the module, which would bring the original back.
    """

    def refuse_fork_exec(*args, **kwargs):
        raise PermissionError("sandbox: starting a process is not allowed")

    _posixsubprocess.fork_exec = refuse_fork_exec


def install_audit_hook(
    root,
    sep=os.sep,
    devnull=os.devnull,
    pid=os.getpid(),  # noqa: B008 (bound once, before the untrusted program runs)
    getpgrp=os.getpgrp(),  # noqa: B008
    realpath=os.path.realpath,
    join=os.path.join,
    isabs=os.path.isabs,
    fspath=os.fspath,
    fsdecode=os.fsdecode,
    readlink=os.readlink,
    stat_path=os.stat,
    isdir=os.path.isdir,
    is_device=lambda mode: stat.S_ISBLK(mode) or stat.S_ISCHR(mode),
    af_unix=AF_UNIX,
    forbidden_events=FORBIDDEN_EVENTS,
    forbidden_modules=FORBIDDEN_MODULES,
    modify_one=MODIFY_ONE_PATH,
    modify_two=MODIFY_TWO_PATHS,
    write_flags=WRITE_FLAGS,
    socket_address_events=SOCKET_ADDRESS_EVENTS,
    addaudithook=sys.addaudithook,
):
    """Refuses, with PermissionError, what the program must not do, as far as Python can see it."""

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
            for path, dir_fd in zip(args[:2], (args[i] for i in modify_two[event]), strict=False):
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
        elif event == "os.killpg" and args[0] not in (0, getpgrp):
            deny(event, str(args[0]))

    addaudithook(hook)


def _print_program_traceback(kind, error, trace):
    """Tracebacks through linecache (the built-in printer reads files), from the program's first frame."""
    while trace is not None and trace.tb_frame.f_code.co_filename != "<program>":
        trace = trace.tb_next
    traceback.print_exception(kind, error, trace)


def main() -> None:
    config = json.loads(sys.argv[1])
    folder = os.path.realpath(os.getcwd())
    lap = _Laps()
    layers, source = wall_in(config, folder, lap)
    _forget_ctypes()
    _disarm_fork_exec()
    install_audit_hook(folder)
    lap("audit_hook")
    if config.get("probe"):
        print(json.dumps({"layers": layers, "setup_ms": lap.ms}), flush=True)
        return
    failed = [f"{name} ({layers[name]})" for name in config.get("expect", ()) if layers.get(name)]
    if failed:
        sys.exit(f"sandbox: a layer that the probe found working failed here: {', '.join(failed)}")
    linecache.cache["<program>"] = (len(source), None, source.splitlines(True), "<program>")
    sys.excepthook = _print_program_traceback
    code = compile(source, "<program>", "exec")
    sys.argv = ["<program>"]
    del source, layers, config
    # The program's own module is `__main__`, so unittest.main() and pickle find what it defines.
    program = types.ModuleType("__main__")
    program.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = program
    exec(code, program.__dict__)


if __name__ == "__main__":
    main()
