"""Install, in the current process, the seccomp filters the daemon unit's settings make systemd add.

Used by tests/daemon/systemd/test_hardening.py to run PyTorch under the same system-call rules as the
service without a running systemd:

- `SystemCallFilter=~@clock @cpu-emulation @module @mount @obsolete @raw-io @reboot @swap` with
  `SystemCallErrorNumber=EPERM` (`deny_groups`),
- `MemoryDenyWriteExecute=yes` (`deny_write_execute`): no mmap both writable and executable, no
  mprotect/pkey_mprotect adding execute permission; the unit leaves it off, the test shows why.

x86-64 only (classic BPF over `struct seccomp_data`); stdlib only, so it also runs on the GPU
machine. Filters are inherited by child processes, so spawned workers run under them too.
"""

from __future__ import annotations

import ctypes
import errno
import platform

#: the daemon unit's SystemCallFilter= deny list, as systemd 252 expands it (`systemd-analyze
#: syscall-filter @group`), restricted to names that exist on x86-64, with their numbers
DENIED_GROUPS: dict[str, dict[str, int]] = {
    "@clock": {"adjtimex": 159, "clock_adjtime": 305, "clock_settime": 227, "settimeofday": 164},
    "@cpu-emulation": {"modify_ldt": 154},
    "@module": {"delete_module": 176, "finit_module": 313, "init_module": 175},
    "@mount": {
        "chroot": 161,
        "fsconfig": 431,
        "fsmount": 432,
        "fsopen": 430,
        "fspick": 433,
        "mount": 165,
        "mount_setattr": 442,
        "move_mount": 429,
        "open_tree": 428,
        "pivot_root": 155,
        "umount2": 166,
    },
    "@obsolete": {
        "_sysctl": 156,
        "afs_syscall": 183,
        "create_module": 174,
        "get_kernel_syms": 177,
        "getpmsg": 181,
        "putpmsg": 182,
        "query_module": 178,
        "security": 185,
        "sysfs": 139,
        "tuxcall": 184,
        "uselib": 134,
        "ustat": 136,
        "vserver": 236,
    },
    "@raw-io": {"ioperm": 173, "iopl": 172},
    "@reboot": {"kexec_file_load": 320, "kexec_load": 246, "reboot": 169},
    "@swap": {"swapoff": 168, "swapon": 167},
}
NR_MMAP, NR_MPROTECT, NR_PKEY_MPROTECT = 9, 10, 329
PROT_WRITE, PROT_EXEC = 0x2, 0x4

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
# classic BPF opcodes
LD_W_ABS, JEQ_K, JGE_K, JSET_K, AND_K, RET_K = 0x20, 0x15, 0x35, 0x45, 0x54, 0x06
RET_ALLOW = 0x7FFF0000
RET_EPERM = 0x00050000 | errno.EPERM
# offsets in struct seccomp_data: nr, arch, args[i] (low 32 bits, little endian)
OFF_NR, OFF_ARCH = 0, 4


def _arg(i: int) -> int:
    return 16 + 8 * i


class _Program:
    """Instructions with symbolic jump targets ("allow", "deny", or a label)."""

    def __init__(self) -> None:
        self.code: list[tuple[int, object, object, int]] = []
        self.labels: dict[str, int] = {}

    def op(self, code: int, k: int = 0, jt: object = 0, jf: object = 0) -> None:
        self.code.append((code, jt, jf, k))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def assemble(self) -> bytes:
        self.label("allow")
        self.op(RET_K, RET_ALLOW)
        self.label("deny")
        self.op(RET_K, RET_EPERM)
        out = bytearray()
        for i, (code, jt, jf, k) in enumerate(self.code):
            offsets = []
            for target in (jt, jf):
                offset = target if isinstance(target, int) else self.labels[str(target)] - i - 1
                if not 0 <= offset <= 255:
                    raise ValueError(f"BPF jump out of range at {i}: {offset}")
                offsets.append(offset)
            out += code.to_bytes(2, "little") + bytes(offsets) + k.to_bytes(4, "little")
        return bytes(out)


def build(*, deny_groups: bool, deny_write_execute: bool) -> bytes:
    """The filter program as raw `struct sock_filter` bytes."""
    p = _Program()
    p.op(LD_W_ABS, OFF_ARCH)
    p.op(JEQ_K, AUDIT_ARCH_X86_64, 0, "deny")  # SystemCallArchitectures=native
    p.op(LD_W_ABS, OFF_NR)
    p.op(JGE_K, X32_SYSCALL_BIT, "deny", 0)
    if deny_groups:
        for numbers in DENIED_GROUPS.values():
            for nr in numbers.values():
                p.op(JEQ_K, nr, "deny", 0)
    if deny_write_execute:
        p.op(JEQ_K, NR_MMAP, 0, "not_mmap")
        p.op(LD_W_ABS, _arg(2))
        p.op(AND_K, PROT_WRITE | PROT_EXEC)
        p.op(JEQ_K, PROT_WRITE | PROT_EXEC, "deny", "allow")
        p.label("not_mmap")
        p.op(JEQ_K, NR_MPROTECT, "prot", 0)
        p.op(JEQ_K, NR_PKEY_MPROTECT, "prot", "allow")
        p.label("prot")
        p.op(LD_W_ABS, _arg(2))
        p.op(JSET_K, PROT_EXEC, "deny", "allow")
    return p.assemble()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(*, deny_groups: bool = True, deny_write_execute: bool = False) -> None:
    """NoNewPrivileges=yes plus the filter, for this process and every child it starts."""
    if platform.machine() != "x86_64":
        raise RuntimeError(f"seccomp_filter speaks x86-64 only, this is {platform.machine()}")
    program = build(deny_groups=deny_groups, deny_write_execute=deny_write_execute)
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def sysfs_probe() -> int:
    """sysfs(3): the number of filesystem types, callable by anyone; -EPERM under the filter."""
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(DENIED_GROUPS["@obsolete"]["sysfs"], 3)
    return result if result >= 0 else -ctypes.get_errno()


def workload(device: str) -> str:
    """What the render worker leans on: convolutions (the VAE), matmuls, and on CUDA a compiled
    (Triton) function; returns a one-line summary. Imported after `install`, like the service."""
    import torch

    dev = torch.device(device)
    # sizes at which oneDNN JIT-compiles its CPU kernels (tiny ones take a reference path)
    x = torch.randn(1, 16, 8, 64, 64, device=dev)
    conv3d = torch.nn.functional.conv3d(x, torch.randn(16, 16, 3, 3, 3, device=dev), padding=1)
    x2 = torch.randn(1, 64, 128, 128, device=dev)
    conv2d = torch.nn.functional.conv2d(x2, torch.randn(64, 64, 3, 3, device=dev), padding=1)
    a = torch.randn(512, 512, device=dev)
    matmul = a @ a
    parts = [f"conv3d {tuple(conv3d.shape)}", f"conv2d {tuple(conv2d.shape)}", f"matmul {matmul.shape[0]}"]
    if dev.type == "cuda":
        fn = torch.compile(lambda t: torch.nn.functional.gelu(t) * 2 + 1)
        out = fn(a)
        torch.testing.assert_close(out, torch.nn.functional.gelu(a) * 2 + 1)
        torch.cuda.synchronize()
        parts.append("compiled ok")
    return ", ".join(parts)
