"""Kernel confinement with Linux Landlock, through its three system calls (no library needed).

:func:`confine` restricts the calling process, for the rest of its life, to writing (creating, removing,
renaming, truncating, making devices, FIFOs, sockets and links) only beneath the given directories, and,
where the kernel's Landlock ABI has network rules (4 and later), to TCP ``connect`` only to the allowed
ports and no TCP ``bind``. Reading and executing stay allowed. Nothing the process does afterwards, native
code included, can undo it; it is applied in DataLoader workers and ``multiprocessing`` children, never in
the main process (whose later stages must not be confined).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Iterable

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446  # the same on every Linux architecture
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH, _RULE_NET_PORT = 1, 2
_PR_SET_NO_NEW_PRIVS = 38

_WRITE_FILE, _REMOVE_DIR, _REMOVE_FILE = 1 << 1, 1 << 4, 1 << 5
_MAKE = sum(1 << bit for bit in range(6, 13))  # make char, dir, reg, sock, fifo, block, sym
_REFER, _TRUNCATE = 1 << 13, 1 << 14
_FILE_ONLY = 1 | _WRITE_FILE | (1 << 2) | _TRUNCATE  # the rights a rule on a file (not a directory) may hold
_BIND_TCP, _CONNECT_TCP = 1 << 0, 1 << 1

#: Files outside every allowed directory that a confined process may still write.
DEVICES = ("/dev/null",)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def abi_version() -> int:
    """The Landlock ABI version the running kernel offers, or 0 where it offers none (not Linux, too old a
    kernel, Landlock not enabled at boot, or system calls filtered by a container)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        version = _libc().syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), _CREATE_RULESET_VERSION)
    except (OSError, AttributeError):
        return 0
    return max(int(version), 0)


def unsupported_reason() -> str | None:
    """Why kernel confinement is not available here, or ``None`` where it is."""
    if not sys.platform.startswith("linux"):
        return f"Landlock is Linux-only (this is {sys.platform})"
    if abi_version() == 0:
        errno = ctypes.get_errno()
        return (
            f"Landlock is not available in this kernel ({platform.release()}): "
            f"landlock_create_ruleset failed ({os.strerror(errno) if errno else 'unknown error'})"
        )
    return None


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"Landlock {what} failed: {os.strerror(errno)}")
    return result


def confine(write_dirs: Iterable[str], connect_ports: Iterable[int] | None) -> int:
    """Confine this process: writes only beneath ``write_dirs``; TCP connects only to ``connect_ports``.

    Returns the ABI version used. Raises ``OSError`` where Landlock is unavailable or a rule cannot be made.

    Args:
        write_dirs: Directories beneath which writing stays allowed (those that do not exist are skipped).
        connect_ports: TCP ports a connect may reach, with no TCP bind at all; ``None`` leaves the network
            to the audit hook (an allowed host without a port cannot be said as a port rule).
    """
    abi = abi_version()
    if abi == 0:
        raise OSError(unsupported_reason())
    libc = _libc()
    fs = _WRITE_FILE | _REMOVE_DIR | _REMOVE_FILE | _MAKE | (_REFER if abi >= 2 else 0) | (_TRUNCATE if abi >= 3 else 0)
    net = (_BIND_TCP | _CONNECT_TCP) if abi >= 4 and connect_ports is not None else 0
    attr = _RulesetAttr(fs, net)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 4 else ctypes.sizeof(ctypes.c_uint64)
    ruleset = _check(libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0), "create")
    try:
        for path in [*write_dirs, *DEVICES]:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                rights = fs if os.path.isdir(path) else fs & _FILE_ONLY
                rule = _PathBeneathAttr(rights, fd)
                _check(libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0), "add_rule")
            finally:
                os.close(fd)
        for port in sorted(set(connect_ports or ())) if net else ():
            rule = _NetPortAttr(_CONNECT_TCP, port)
            _check(libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_NET_PORT, ctypes.byref(rule), 0), "add_rule")
        _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
        _check(libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0), "restrict_self")
    finally:
        os.close(ruleset)
    return abi
