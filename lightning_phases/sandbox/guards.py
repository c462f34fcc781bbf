"""Audit events for what CPython does not audit, or audits too late: installed once with the audit hook.

* ``socket.connect``/``connect_ex``/``sendto``/``sendmsg`` to a host *name*: CPython looks the name up in C
  before it raises ``socket.connect``, so a DNS query (which can carry data in the name) would leave before
  any hook could refuse it. The guard raises an audit event with the name first.
* ``listen`` and ``accept`` (not audited): a server a peer connects in to.
* ``os.mkfifo`` and ``os.mknod`` (not audited): they create files.
* ``_posixsubprocess.fork_exec`` called directly (``subprocess.Popen`` raises its own event first).

Each guard raises one audit event (:data:`~lightning_phases.sandbox.policy.GUARD_EVENTS`) and then calls the
original; with no sandbox active the hook ignores the event after one set look-up. A guard is a module
attribute, so code that took the original before the guards were installed (``from os import mkfifo``),
or calls ``_socket.socket`` methods directly, passes them: a blind spot the README names.
"""

from __future__ import annotations

import _posixsubprocess
import _socket
import functools
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from lightning_phases.sandbox.policy import GUARD_EVENTS

_SUBPROCESS_FILE = subprocess.__file__
_MULTIPROCESSING_DIR = os.path.dirname(os.path.abspath(__import__("multiprocessing").__file__))
_INET = (socket.AF_INET, socket.AF_INET6)
_installed = False

#: Threads whose next C-level connect/sendto was judged by its host name already (so it is counted once).
_prejudged: set[int] = set()


def _names_a_host(sock: Any, address: Any) -> bool:
    if getattr(sock, "family", None) not in _INET or not isinstance(address, tuple) or not address:
        return False
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    try:
        socket.inet_pton(sock.family, host.split("%")[0])
    except (OSError, ValueError):
        return host != ""
    return False


def _by_name(method: Callable[..., Any], address_at: int, event: str) -> Callable[..., Any]:
    @functools.wraps(method)
    def guard(self: Any, *args: Any) -> Any:
        address = args[address_at] if len(args) > address_at else None
        if not _names_a_host(self, address):
            return method(self, *args)
        sys.audit(GUARD_EVENTS["connect_by_name"], self, address, event)
        ident = threading.get_ident()
        _prejudged.add(ident)
        try:
            return method(self, *args)
        finally:
            _prejudged.discard(ident)

    return guard


def _sendto(method: Callable[..., Any]) -> Callable[..., Any]:
    by_name = _by_name(method, 1, "socket.sendto")  # sendto(data, address) or sendto(data, flags, address)
    by_name_flags = _by_name(method, 2, "socket.sendto")

    @functools.wraps(method)
    def guard(self: Any, *args: Any) -> Any:
        return (by_name_flags if len(args) > 2 else by_name)(self, *args)

    return guard


def _audited(method: Callable[..., Any], event: str, with_args: bool = False) -> Callable[..., Any]:
    @functools.wraps(method)
    def guard(*args: Any, **kwargs: Any) -> Any:
        if with_args:
            sys.audit(event, args[0] if args else kwargs.get("path"), kwargs.get("dir_fd"))
        else:
            sys.audit(event, args[0] if args else None)
        return method(*args, **kwargs)

    return guard


def _fork_exec(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def guard(*args: Any) -> Any:
        caller = sys._getframe(1).f_code.co_filename
        # subprocess.Popen raised its own event; multiprocessing's spawned child gets the hook at start-up
        if caller != _SUBPROCESS_FILE and not caller.startswith(_MULTIPROCESSING_DIR):
            sys.audit(GUARD_EVENTS["fork_exec"], args[0] if args else None, args[1] if len(args) > 1 else None)
        return original(*args)

    return guard


def install() -> None:
    """Install every guard, once per process."""
    global _installed
    if _installed:
        return
    _installed = True
    cls = socket.socket
    cls.connect = _by_name(_socket.socket.connect, 0, "socket.connect")  # type: ignore[method-assign]
    cls.connect_ex = _by_name(_socket.socket.connect_ex, 0, "socket.connect")  # type: ignore[method-assign]
    cls.sendto = _sendto(_socket.socket.sendto)  # type: ignore[method-assign]
    cls.sendmsg = _by_name(_socket.socket.sendmsg, 3, "socket.sendmsg")  # type: ignore[method-assign]
    cls.listen = _audited(_socket.socket.listen, GUARD_EVENTS["listen"])  # type: ignore[method-assign]
    cls.accept = _audited(cls.accept, GUARD_EVENTS["accept"])  # type: ignore[method-assign]
    if hasattr(os, "mkfifo"):
        os.mkfifo = _audited(os.mkfifo, GUARD_EVENTS["mkfifo"], with_args=True)
    if hasattr(os, "mknod"):
        os.mknod = _audited(os.mknod, GUARD_EVENTS["mknod"], with_args=True)
    _posixsubprocess.fork_exec = _fork_exec(_posixsubprocess.fork_exec)
    if getattr(subprocess, "_fork_exec", None) is not None:
        subprocess._fork_exec = _fork_exec(subprocess._fork_exec)  # type: ignore[attr-defined]
