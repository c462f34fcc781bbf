"""Which audited operations escape a sandbox: a pure policy over PEP 578 audit events.

:class:`SandboxPolicy` turns one audit event (name and arguments, as ``sys.addaudithook`` receives them)
into an :class:`Escape` when the operation reaches outside the sandbox, or ``None`` when it stays inside:
an AF_UNIX socket, a write under an allowed directory, a connection to an allowed host. It installs no
hook and needs no Trainer, so every rule can be tested with plain tuples.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import socket
import stat
import tempfile
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Device files a write to which reaches nothing outside the process.
HARMLESS_WRITE_PATHS = frozenset({"/dev/null", "/dev/stdout", "/dev/stderr", "/dev/tty"})

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_HOST_NAME = re.compile(r"^(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_-]{1,63})*\.?$")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21}


@dataclass(frozen=True)
class Escape:
    """One operation that reaches outside the sandbox.

    Args:
        category: ``"network"``, ``"dns"``, ``"subprocess"`` or ``"write"``.
        audit_event: The audit event that showed it, e.g. ``"socket.connect"``.
        target: What it reaches: ``host:port``, a host name, a command line or a path.
        allow_hint: The ``SandboxCheck`` argument that would allow it, e.g. ``allow_hosts=['127.0.0.1:8080']``;
            empty where no argument allows it (raw sockets, servers, links out of the sandbox).
    """

    category: str
    audit_event: str
    target: str
    allow_hint: str


@dataclass(frozen=True)
class HostRule:
    """One ``allow_hosts`` entry: an IP network or a host name (``*.`` prefix for subdomains), optional port.

    Args:
        text: The entry as the user wrote it.
        network: The IP network, for address entries.
        name: The lower-case host name, for name entries.
        port: The only port allowed, or ``None`` for every port.
    """

    text: str
    network: IPNetwork | None = None
    name: str | None = None
    port: int | None = None

    def matches_name(self, host: str) -> bool:
        """Whether this rule allows looking up or connecting to the host name ``host`` (any port).

        Args:
            host: A host name.
        """
        if self.name is None:
            return False
        host = host.lower().rstrip(".")
        if self.name.startswith("*."):
            return host.endswith(self.name[1:])
        return host == self.name

    def matches_port(self, port: int | None) -> bool:
        """Whether this rule allows ``port``.

        Args:
            port: The destination port, or ``None`` when unknown.
        """
        return self.port is None or port is None or self.port == port


#: The forms an ``allow_hosts`` entry may take, for error messages.
HOST_FORMS = (
    "a host name ('api.example.com', '*.example.com'), an IP address ('192.168.1.7', '::1') or a CIDR range "
    "('10.0.0.0/8'), each with an optional port ('api.example.com:443', '10.0.0.0/8:443', '[::1]:80')"
)


def parse_host_rule(text: Any, argument: str = "allow_hosts") -> HostRule:
    """Parse one ``allow_hosts`` entry: ``"10.0.0.0/8"``, ``"127.0.0.1:8080"``, ``"[::1]:80"``, ``"*.corp.net"``.

    Args:
        text: The entry.
        argument: The argument's name, for the error message.
    """
    if not isinstance(text, str) or not text.strip():
        raise TypeError(f"{argument}: entry {text!r} must be a non-empty string such as 'api.example.com:443'.")
    scheme, found, rest = text.strip().partition("://")
    if found:
        host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
        port = {"http": ":80", "https": ":443"}.get(scheme.lower(), "") if ":" not in host else ""
        one_port = f" (or {host + port!r} to allow that port only)" if port else ""
        raise ValueError(
            f"{argument}: {text!r} is a URL, not a host; write the host alone, e.g. {host!r}{one_port}. "
            f"Allowed forms: {HOST_FORMS}."
        )
    host, port = _split_port(text.strip(), argument)
    try:
        return HostRule(text, network=ipaddress.ip_network(host, strict=False), port=port)
    except ValueError:
        pass
    if "/" in host or host.replace(".", "").isdigit() or ":" in host:
        raise ValueError(
            f"{argument}: {text!r} is not a valid host name, IP address or CIDR range. Allowed forms: {HOST_FORMS}."
        )
    if not _HOST_NAME.match(host):
        raise ValueError(
            f"{argument}: {text!r} is not a valid host name, IP address or CIDR range. Allowed forms: {HOST_FORMS}."
        )
    return HostRule(text, name=host.lower().rstrip("."), port=port)


def _split_port(text: str, argument: str) -> tuple[str, int | None]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if not rest:
            return host, None
        port_text = rest[1:] if rest.startswith(":") else rest
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        return text, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(
            f"{argument}: {text!r} has an invalid port {port_text!r}; ports are 1 to 65535. "
            f"Allowed forms: {HOST_FORMS}."
        )
    return host, int(port_text)


def check_write_dirs(argument: str, dirs: Any) -> tuple[str, ...]:
    """Absolute, resolved forms of ``allow_write_dirs``; a relative entry must name an existing directory.

    Args:
        argument: The argument's name, for the error message.
        dirs: A list of directory paths.
    """
    if isinstance(dirs, (str, bytes, Mapping)) or not isinstance(dirs, Iterable):
        hint = f" (write [{dirs!r}] for one)" if isinstance(dirs, (str, bytes, os.PathLike)) else ""
        raise TypeError(f"{argument}={dirs!r} must be a list of directories{hint}.")
    resolved = []
    for entry in dirs:
        if not isinstance(entry, (str, os.PathLike)) or not os.fspath(entry):
            raise TypeError(f"{argument}: entry {entry!r} must be a directory path.")
        path = os.fspath(entry)
        if not os.path.isabs(path) and not os.path.isdir(path):
            raise ValueError(
                f"{argument}: the relative directory {path!r} does not exist under the working directory "
                f"{os.getcwd()!r}; create it first or give an absolute path."
            )
        resolved.append(os.path.realpath(path))
    return tuple(resolved)


def check_programs(argument: str, programs: Any) -> tuple[str, ...]:
    """``allow_subprocess`` entries: program names (``"git"``) or absolute paths (``"/usr/bin/git"``).

    Args:
        argument: The argument's name, for the error message.
        programs: A list of program names or paths.
    """
    if isinstance(programs, (str, bytes, Mapping)) or not isinstance(programs, Iterable):
        hint = f" (write [{programs!r}] for one)" if isinstance(programs, (str, bytes)) else ""
        raise TypeError(f"{argument}={programs!r} must be a list of program names{hint}.")
    checked = []
    for entry in programs:
        if not isinstance(entry, str) or not entry.strip() or (os.sep in entry and not os.path.isabs(entry)):
            raise ValueError(f"{argument}: {entry!r} must be a program name such as 'git' or an absolute path.")
        checked.append(entry)
    return tuple(checked)


def resolve_programs(argument: str, programs: Sequence[str]) -> frozenset[str]:
    """The executables ``allow_subprocess`` allows: each name looked up on ``PATH`` now, each path resolved.

    A program is then allowed only when the file a command runs resolves to one of these, so a shell chain
    (``sh -c "git ..."``) or another file named ``git`` is not ``git``.

    Args:
        argument: The argument's name, for the error message.
        programs: Entries checked by :func:`check_programs`.
    """
    resolved = set()
    for entry in programs:
        found = entry if os.path.isabs(entry) else shutil.which(entry)
        if found is None or not os.path.isfile(found) or not os.access(found, os.X_OK):
            where = "is not an executable file" if os.path.isabs(entry) else "is not found on PATH"
            raise ValueError(
                f"{argument}: {entry!r} {where} (PATH={os.environ.get('PATH', '')!r}); the program is looked up "
                "when SandboxCheck is constructed, so install it first or give its absolute path."
            )
        resolved.add(os.path.realpath(found))
    return frozenset(resolved)


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _fd_path(fd: int) -> str | None:
    """The path an open descriptor refers to (``/proc/self/fd``), or ``None`` for a pipe, socket or unknown fd."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    return target if target.startswith(os.sep) else None


def resolve_path(path: Any, dir_fd: Any = None) -> str | None:
    """The absolute, symlink-resolved form of a path argument, or ``None`` for a descriptor.

    A relative path is resolved against ``dir_fd`` when one is given (as the ``os`` functions' ``dir_fd=``
    argument), else against the current directory. A descriptor was judged when it was opened (or opened
    before the stage: a declared blind spot).

    Args:
        path: A ``str``, ``bytes`` or path-like object, or an ``int`` descriptor.
        dir_fd: The directory descriptor a relative path is relative to; ``None`` or ``-1`` for none.
    """
    if path is None or isinstance(path, int):
        return None
    text = os.fsdecode(path)
    if not os.path.isabs(text) and isinstance(dir_fd, int) and dir_fd >= 0:
        base = _fd_path(dir_fd)
        if base is None:
            return None
        text = os.path.join(base, text)
    return os.path.realpath(text)


def open_directories() -> list[str]:
    """Every directory this process holds a descriptor for (any could be an ``os.open(..., dir_fd=)``)."""
    found = []
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return found
    for name in names:
        target = _fd_path(int(name)) if name.isdigit() else None
        if target is not None and not target.startswith("/proc/") and os.path.isdir(target):
            found.append(target)
    return found


def _host_port(host: Any, port: Any) -> str:
    host = os.fsdecode(host) if isinstance(host, bytes) else str(host)
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}" if port not in (None, "") else shown


def _as_port(port: Any) -> int | None:
    try:
        return int(port)
    except (TypeError, ValueError):
        return None


def _words(argv: Any) -> list[str]:
    if isinstance(argv, (str, bytes)):
        text = os.fsdecode(argv)
        try:
            return shlex.split(text)
        except ValueError:
            return text.split()
    return [os.fsdecode(a) if isinstance(a, (bytes, os.PathLike)) else str(a) for a in argv or ()]


_INET = (socket.AF_INET, socket.AF_INET6)
_RAW_FAMILIES = frozenset(f for f in (getattr(socket, "AF_PACKET", None),) if f is not None)


@dataclass(frozen=True)
class SandboxPolicy:
    """What is allowed in a sandboxed stage; :meth:`check` classifies one audit event.

    A policy is immutable: a sandboxed stage judges with the policy it started with.

    Args:
        allow_hosts: ``allow_hosts`` entries (see :func:`parse_host_rule`).
        write_dirs: Absolute directories under which files may be written, created, moved and removed.
        allow_subprocess: Program names or absolute paths that may be run.
        allow_temp: Whether the system temporary directory counts as an allowed write directory.
        resolve: Looks a host name up once (outside the sandbox) so that connections to its addresses
            are allowed; ``socket.getaddrinfo`` by default.
        programs: The executables ``allow_subprocess`` names, resolved (see :func:`resolve_programs`); by
            default resolved from ``allow_subprocess``.
    """

    allow_hosts: Sequence[HostRule] = ()
    write_dirs: Sequence[str] = ()
    allow_subprocess: Sequence[str] = ()
    allow_temp: bool = False
    resolve: Callable[[str], list[str]] | None = None
    programs: frozenset[str] | None = None
    _resolved: Mapping[str, frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        dirs = [os.path.realpath(d) for d in self.write_dirs]
        if self.allow_temp:
            dirs.append(os.path.realpath(tempfile.gettempdir()))
        object.__setattr__(self, "write_dirs", tuple(dict.fromkeys(dirs)))
        object.__setattr__(self, "allow_hosts", tuple(self.allow_hosts))
        object.__setattr__(self, "allow_subprocess", tuple(self.allow_subprocess))
        if self.programs is None:
            object.__setattr__(self, "programs", resolve_programs("allow_subprocess", self.allow_subprocess))

    def with_write_dirs(self, dirs: Iterable[str | os.PathLike[str]]) -> SandboxPolicy:
        """A copy that also allows writes under ``dirs`` (the run's log, checkpoint and W&B directories).

        Args:
            dirs: More directories.
        """
        extra = [os.path.realpath(os.fspath(d)) for d in dirs]
        write_dirs = (*self.write_dirs, *extra)
        return SandboxPolicy(
            self.allow_hosts, write_dirs, self.allow_subprocess, False, self.resolve, self.programs, self._resolved
        )

    def with_resolved_names(self) -> SandboxPolicy:
        """A copy in which every allowed host name is looked up once, so connections to its addresses pass.

        Call it outside the sandboxed window; a name that does not resolve allows only look-ups of it.
        """
        resolve = self.resolve or _getaddrinfo_addresses
        resolved = dict(self._resolved)
        for rule in self.allow_hosts:
            if rule.name is None or rule.name.startswith("*.") or rule.name in resolved:
                continue
            if rule.name == "localhost":
                resolved[rule.name] = frozenset(map(ipaddress.ip_address, ("127.0.0.1", "::1")))
                continue
            try:
                resolved[rule.name] = frozenset(ipaddress.ip_address(a) for a in resolve(rule.name))
            except (OSError, ValueError):
                resolved[rule.name] = frozenset()
        return SandboxPolicy(
            self.allow_hosts,
            self.write_dirs,
            self.allow_subprocess,
            False,
            self.resolve,
            self.programs,
            resolved,
        )

    # Classification ------------------------------------------------------------------------------------

    def check(self, event: str, args: tuple[Any, ...]) -> Escape | None:
        """The escape that audit event ``event`` with ``args`` would make, or ``None`` if it stays inside.

        Args:
            event: The audit event name, e.g. ``"socket.connect"``.
            args: The audit event's arguments.
        """
        handler = _handler_of(event)
        return handler(self, event, args) if handler is not None else None

    def write_allowed(self, path: str) -> bool:
        """Whether ``path`` (absolute, resolved) is under an allowed directory or a harmless device.

        Args:
            path: The resolved path.
        """
        return path in HARMLESS_WRITE_PATHS or any(_under(path, d) for d in self.write_dirs)

    def _write(self, event: str, path: Any, dir_fd: Any = None) -> Escape | None:
        resolved = resolve_path(path, dir_fd)
        if resolved is None or self.write_allowed(resolved):
            return None
        return Escape("write", event, resolved, f"allow_write_dirs=[{os.path.dirname(resolved)!r}]")

    def _open(self, event: str, args: tuple[Any, ...]) -> Escape | None:
        path, mode, flags = ((*tuple(args), None, None, 0))[:3]
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
        resolved = resolve_path(path) if writes else None
        if resolved is None:
            return None
        if not self.write_allowed(resolved):
            return Escape("write", event, resolved, f"allow_write_dirs=[{os.path.dirname(resolved)!r}]")
        if not os.path.isabs(os.fsdecode(path)):  # "open" does not say whether dir_fd= was given: try them all
            for directory in open_directories():
                escape = self._write(event, os.path.join(directory, os.fsdecode(path)))
                if escape is not None:
                    return escape
        return self._hard_linked(event, resolved)

    def _hard_linked(self, event: str, resolved: str) -> Escape | None:
        """A write through an existing file with more than one name: another name may be outside."""
        try:
            info = os.stat(resolved)
        except OSError:
            return None
        if not stat.S_ISREG(info.st_mode) or info.st_nlink < 2:
            return None
        return Escape("write", event, f"{resolved} (a hard link: {info.st_nlink} names)", "")

    def _path_dir_fd(self, event: str, args: tuple[Any, ...]) -> Escape | None:
        """``(path, ..., dir_fd)``: ``os.remove``, ``os.rmdir``, ``os.mkdir``, ``os.chmod``, ``os.utime`` ..."""
        return self._write(event, args[0], args[-1] if len(args) > 1 else None) if args else None

    def _first_path(self, event: str, args: tuple[Any, ...]) -> Escape | None:
        return self._write(event, args[0]) if args else None

    def _rename(self, event: str, args: tuple[Any, ...]) -> Escape | None:
        src, dst, src_fd, dst_fd = ((*tuple(args), None, None, None, None))[:4]
        return self._write(event, src, src_fd) or self._write(event, dst, dst_fd)

    def _link(self, event: str, args: tuple[Any, ...]) -> Escape | None:
        src, dst, src_fd, dst_fd = ((*tuple(args), None, None, None, None))[:4]
        escape = self._write(event, dst, dst_fd)
        if escape is not None:
            return escape
        source = resolve_path(src, src_fd)
        if source is not None and not self.write_allowed(source):  # writes to the new name would reach it
            return Escape("write", event, f"{source} (hard-linked into the sandbox)", "")
        return None

    def _symlink(self, event: str, args: tuple[Any, ...]) -> Escape | None:
        src, dst, dir_fd = ((*tuple(args), None, None, None))[:3]
        escape = self._write(event, dst, dir_fd)
        if escape is not None or src is None:
            return escape
        link = resolve_path(dst, dir_fd)
        text = os.fsdecode(src)
        target = os.path.realpath(os.path.join(os.path.dirname(link), text) if link else text)
        if not self.write_allowed(target):  # a write through the link (or a swap to it) would land there
            return Escape("write", event, f"{target} (symlinked into the sandbox)", "")
        return None

    def _second_path(self, event: str, args: tuple[Any, ...]) -> Escape | None:
        return self._write(event, args[1]) if len(args) > 1 else None

    def _two_paths(self, event: str, args: tuple[Any, ...]) -> Escape | None:
        return self._write(event, args[0]) or self._write(event, args[1])

    def _sqlite(self, event: str, args: tuple[Any, ...]) -> Escape | None:
        database = args[0] if args else None
        if isinstance(database, (bytes, os.PathLike)):
            database = os.fsdecode(database)
        if not isinstance(database, str) or database in ("", ":memory:"):
            return None
        if database.startswith("file:"):  # a URI: read-only and in-memory databases write nothing
            parts = urlsplit(database)
            if "mode=ro" in parts.query or "mode=memory" in parts.query or parts.path in ("", ":memory:"):
                return None
            database = unquote(parts.path)
        return self._write(event, database)

    def _host_allowed(self, host: str, port: int | None) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return any(rule.matches_name(host) and rule.matches_port(port) for rule in self.allow_hosts)
        for rule in self.allow_hosts:
            if not rule.matches_port(port):
                continue
            if rule.network is not None and address in rule.network:
                return True
            if rule.name is not None and address in self._resolved.get(rule.name, ()):
                return True
        return False

    def _network(self, event: str, host: Any, port: Any) -> Escape | None:
        if host is None:
            return None
        host = os.fsdecode(host) if isinstance(host, bytes) else str(host)
        if self._host_allowed(host, _as_port(port)):
            return None
        target = _host_port(host, port)
        return Escape("network", event, target, f"allow_hosts=[{target!r}]")

    def _socket(self, event: str, args: tuple[Any, ...]) -> Escape | None:
        sock, address = ((*tuple(args), None, None))[:2]
        family = getattr(sock, "family", None)
        if family not in _INET or not isinstance(address, tuple) or not address:
            return None  # AF_UNIX (W&B's service, multiprocessing), netlink, or a connected socket's sendmsg
        return self._network(event, address[0], address[1] if len(address) > 1 else None)

    def _before_lookup(self, event: str, args: tuple[Any, ...]) -> Escape | None:
        """A ``connect``/``sendto`` to a host *name*, judged by the name before C looks it up."""
        sock, address, original = ((*tuple(args), None, None, None))[:3]
        return self._socket(str(original or event), (sock, address))

    def _new_socket(self, event: str, args: tuple[Any, ...]) -> Escape | None:
        _, family, kind = ((*tuple(args), None, None, None))[:3]
        if family in _RAW_FAMILIES or kind == socket.SOCK_RAW:
            return Escape("network", event, f"raw socket (family {family}, type {kind})", "")
        return None

    def _server(self, event: str, args: tuple[Any, ...]) -> Escape | None:
        """``bind``, ``listen``, ``accept`` on an internet socket: a peer could connect in and receive data."""
        sock, address = ((*tuple(args), None, None))[:2]
        if getattr(sock, "family", None) not in _INET:
            return None
        if isinstance(address, tuple) and address:
            host, port = address[0], address[1] if len(address) > 1 else None
            if host not in ("", None) and self._host_allowed(str(host), _as_port(port)):
                return None
            target = _host_port(host or "0.0.0.0", port)
        else:  # listen/accept: judged by the address the socket is bound to (a server the user allowed)
            try:
                host, port = sock.getsockname()[:2]
            except OSError:
                return Escape("network", event, "inbound on an unbound socket", "")
            if self._host_allowed(str(host), _as_port(port)):
                return None
            target = _host_port(host, port)
        return Escape("network", event, f"inbound on {target}", f"allow_hosts=[{target!r}]")

    def _http(self, event: str, args: tuple[Any, ...]) -> Escape | None:
        return self._network(event, args[1], args[2] if len(args) > 2 else None)

    def _url(self, event: str, args: tuple[Any, ...]) -> Escape | None:
        parts = urlsplit(str(args[0]))
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            return None  # file:, data: and similar read local data
        return self._network(event, parts.hostname, parts.port or _DEFAULT_PORTS[parts.scheme])

    def _lookup(self, event: str, args: tuple[Any, ...]) -> Escape | None:
        host = args[0] if args else None
        if host is None:
            return None
        host = os.fsdecode(host) if isinstance(host, bytes) else str(host)
        try:
            ipaddress.ip_address(host.split("%")[0])
            return None  # a numeric address needs no look-up; the connect that follows is checked
        except ValueError:
            pass
        if any(rule.matches_name(host) for rule in self.allow_hosts):
            return None
        return Escape("dns", event, host, f"allow_hosts=[{host!r}]")

    def _reverse_lookup(self, event: str, args: tuple[Any, ...]) -> Escape | None:
        address = args[0] if args else None
        host = address[0] if isinstance(address, tuple) else address
        if host is None or self._host_allowed(str(host), None):
            return None
        return Escape("dns", event, str(host), f"allow_hosts=[{str(host)!r}]")

    def program_allowed(self, program: Any, cwd: Any = None, path: str | None = None) -> bool:
        """Whether ``program`` (a path, or a name looked up on ``path``) resolves to an allowed executable.

        Args:
            program: What a command runs: an absolute or relative path, or a name.
            cwd: The directory a relative path is relative to (``Popen(cwd=)``).
            path: The ``PATH`` a name is looked up on; the current one by default.
        """
        if not self.programs or program is None:
            return False
        name = os.fsdecode(program) if isinstance(program, (bytes, os.PathLike)) else str(program)
        if os.sep in name:
            base = os.fsdecode(cwd) if isinstance(cwd, (str, bytes, os.PathLike)) else os.getcwd()
            found: str | None = os.path.join(base, name)
        else:
            found = shutil.which(name, path=path)
        assert self.programs is not None
        return found is not None and os.path.realpath(found) in self.programs

    def _program(self, event: str, program: Any, command: str, cwd: Any = None, env: Any = None) -> Escape | None:
        path = env.get("PATH") if isinstance(env, Mapping) and isinstance(env.get("PATH"), str) else None
        if self.program_allowed(program, cwd, path):
            return None
        name = os.fsdecode(program) if isinstance(program, (bytes, os.PathLike)) else str(program or "")
        return Escape("subprocess", event, command or name, f"allow_subprocess=[{os.path.basename(name)!r}]")

    def _popen(self, event: str, args: tuple[Any, ...]) -> Escape | None:
        executable, argv, cwd, env = ((*tuple(args), None, None, None, None))[:4]
        words = _words(argv)
        program = executable if executable is not None else (words[0] if words else "")
        return self._program(event, program, " ".join(words) or str(program), cwd, env)

    def _system(self, event: str, args: tuple[Any, ...]) -> Escape | None:
        command = os.fsdecode(args[0]) if isinstance(args[0], bytes) else str(args[0])
        return self._program(event, "/bin/sh", f"/bin/sh -c {shlex.quote(command)}")  # a shell is never the program

    def _exec(self, event: str, args: tuple[Any, ...]) -> Escape | None:
        path, argv, env = ((*tuple(args), None, None, None))[:3]
        words = _words(argv) if isinstance(argv, (list, tuple)) else []
        return self._program(event, path, " ".join(words) or os.fsdecode(path), env=env)

    def _spawn(self, event: str, args: tuple[Any, ...]) -> Escape | None:
        return self._exec(event, tuple(args)[1:])

    def _pty_spawn(self, event: str, args: tuple[Any, ...]) -> Escape | None:
        words = _words([args[0]] if isinstance(args[0], str) else args[0])
        return self._program(event, words[0] if words else "", " ".join(words))

    def _fork_exec(self, event: str, args: tuple[Any, ...]) -> Escape | None:
        argv, executables = ((*tuple(args), None, None))[:2]
        words = _words(argv)
        candidates = [os.fsdecode(e) for e in executables or ()]
        program = next((c for c in candidates if os.path.isfile(c)), candidates[0] if candidates else "")
        return self._program(event, program, " ".join(words) or program)


def _getaddrinfo_addresses(name: str) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(name, None)})


#: Audit events the guards (:mod:`lightning_phases.sandbox.guards`) raise for what CPython does not audit.
GUARD_EVENTS = types.MappingProxyType(
    {
        "connect_by_name": "lightning_phases.socket.before_lookup",
        "listen": "lightning_phases.socket.listen",
        "accept": "lightning_phases.socket.accept",
        "mkfifo": "lightning_phases.os.mkfifo",
        "mknod": "lightning_phases.os.mknod",
        "fork_exec": "lightning_phases._posixsubprocess.fork_exec",
    }
)

_HANDLERS: Mapping[str, Callable[[SandboxPolicy, str, tuple[Any, ...]], Escape | None]] = types.MappingProxyType(
    {
        "open": SandboxPolicy._open,
        "os.remove": SandboxPolicy._path_dir_fd,
        "os.rmdir": SandboxPolicy._path_dir_fd,
        "os.mkdir": SandboxPolicy._path_dir_fd,
        "os.chmod": SandboxPolicy._path_dir_fd,
        "os.chown": SandboxPolicy._path_dir_fd,
        "os.utime": SandboxPolicy._path_dir_fd,
        "os.chflags": SandboxPolicy._first_path,
        "os.setxattr": SandboxPolicy._first_path,
        "os.removexattr": SandboxPolicy._first_path,
        "os.truncate": SandboxPolicy._first_path,
        "os.rename": SandboxPolicy._rename,
        "os.link": SandboxPolicy._link,
        "os.symlink": SandboxPolicy._symlink,
        GUARD_EVENTS["mkfifo"]: SandboxPolicy._path_dir_fd,
        GUARD_EVENTS["mknod"]: SandboxPolicy._path_dir_fd,
        "sqlite3.connect": SandboxPolicy._sqlite,
        "shutil.copyfile": SandboxPolicy._second_path,
        "shutil.copytree": SandboxPolicy._second_path,
        "shutil.move": SandboxPolicy._two_paths,
        "shutil.rmtree": SandboxPolicy._first_path,
        "shutil.make_archive": SandboxPolicy._first_path,
        "shutil.unpack_archive": SandboxPolicy._second_path,
        "socket.__new__": SandboxPolicy._new_socket,
        "socket.bind": SandboxPolicy._server,
        GUARD_EVENTS["listen"]: SandboxPolicy._server,
        GUARD_EVENTS["accept"]: SandboxPolicy._server,
        "socket.connect": SandboxPolicy._socket,
        "socket.sendto": SandboxPolicy._socket,
        "socket.sendmsg": SandboxPolicy._socket,
        GUARD_EVENTS["connect_by_name"]: SandboxPolicy._before_lookup,
        "http.client.connect": SandboxPolicy._http,
        "urllib.Request": SandboxPolicy._url,
        "socket.getaddrinfo": SandboxPolicy._lookup,
        "socket.gethostbyname": SandboxPolicy._lookup,
        "socket.gethostbyname_ex": SandboxPolicy._lookup,
        "socket.gethostbyaddr": SandboxPolicy._reverse_lookup,
        "socket.getnameinfo": SandboxPolicy._reverse_lookup,
        "subprocess.Popen": SandboxPolicy._popen,
        "os.system": SandboxPolicy._system,
        "os.exec": SandboxPolicy._exec,
        "os.posix_spawn": SandboxPolicy._exec,
        "os.spawn": SandboxPolicy._spawn,
        "pty.spawn": SandboxPolicy._pty_spawn,
        GUARD_EVENTS["fork_exec"]: SandboxPolicy._fork_exec,
    }
)

_handler_of = dict(_HANDLERS).get  # a private copy: the read-only table above cannot change what is judged

#: The audit events the policy judges; every other event is ignored at the cost of one set look-up.
WATCHED_EVENTS = frozenset(_HANDLERS)
