"""The sandbox policy on plain audit-event tuples, and the hook's attribution, without a Trainer."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_phases.exceptions import SandboxViolation
from lightning_phases.sandbox import audit_hook as audit
from lightning_phases.sandbox.policy import SandboxPolicy, parse_host_rule


def policy(**kwargs: object) -> SandboxPolicy:
    hosts = tuple(parse_host_rule(h) for h in kwargs.pop("hosts", ()))  # type: ignore[union-attr]
    return SandboxPolicy(allow_hosts=hosts, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "network", "name", "port"),
    [
        ("10.0.0.0/8", "10.0.0.0/8", None, None),
        ("127.0.0.1:8080", "127.0.0.1/32", None, 8080),
        ("[::1]:80", "::1/128", None, 80),
        ("::1", "::1/128", None, None),
        ("API.example.com", None, "api.example.com", None),
        ("*.example.com:443", None, "*.example.com", 443),
    ],
)
def test_host_rules_parse(text: str, network: str | None, name: str | None, port: int | None) -> None:
    rule = parse_host_rule(text)
    assert (str(rule.network) if rule.network else None, rule.name, rule.port) == (network, name, port)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("https://example.com", "is a URL, not a host; write the host alone, e.g. 'example.com' (or 'example.com:443'"),
        ("http://user@api.example.com:8080/v1", "e.g. 'api.example.com:8080'."),
        ("example.com:http", "has an invalid port 'http'"),
        ("example.com/api", "is not a valid host name, IP address or CIDR range"),
    ],
)
def test_bad_host_rules_name_the_argument_the_value_and_the_allowed_forms(text: str, says: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_host_rule(text)
    message = str(info.value)
    assert message.startswith(f"allow_hosts: {text!r} ") and says in message
    assert "Allowed forms: a host name" in message and "'10.0.0.0/8:443'" in message


def test_connections_are_judged_by_family_address_and_port() -> None:
    p = policy(hosts=["10.0.0.0/8:443", "localhost"]).with_resolved_names()
    with socket.socket(socket.AF_INET) as inet, socket.socket(socket.AF_UNIX) as unix:
        assert p.check("socket.connect", (unix, "/tmp/wandb.sock")) is None
        assert p.check("socket.connect", (inet, ("10.1.2.3", 443))) is None
        assert p.check("socket.connect", (inet, ("127.0.0.1", 9))) is None  # localhost's address
        escape = p.check("socket.connect", (inet, ("10.1.2.3", 80)))
        assert escape is not None and escape.target == "10.1.2.3:80" and escape.category == "network"
        assert escape.allow_hint == "allow_hosts=['10.1.2.3:80']"
        assert p.check("socket.sendto", (inet, ("8.8.8.8", 53))) is not None
        assert p.check("socket.sendmsg", (inet, None)) is None  # connected socket: its connect was judged


def test_loopback_is_not_allowed_by_default() -> None:
    with socket.socket(socket.AF_INET) as inet:
        assert policy().check("socket.connect", (inet, ("127.0.0.1", 8080))) is not None


def test_dns_lookups_and_urls() -> None:
    p = policy(hosts=["*.example.com"])
    assert p.check("socket.getaddrinfo", ("api.example.com", 443, 0, 0, 0)) is None
    assert p.check("socket.getaddrinfo", ("127.0.0.1", 80, 0, 0, 0)) is None  # numeric: no look-up
    assert p.check("socket.getaddrinfo", (None, 80, 0, 0, 0)) is None
    assert p.check("socket.gethostbyname", ("evil.org",)).category == "dns"  # type: ignore[union-attr]
    assert p.check("urllib.Request", ("file:///etc/hosts", None, {}, "GET")) is None
    escape = p.check("urllib.Request", ("https://evil.org/x", None, {}, "GET"))
    assert escape is not None and escape.target == "evil.org:443"


def test_writes_need_an_allowed_directory(tmp_path: Path) -> None:
    inside, outside = tmp_path / "in", tmp_path / "out"
    p = policy(write_dirs=[str(inside)])
    assert p.check("open", (str(inside / "a"), "w", 0)) is None
    assert p.check("open", (str(outside / "a"), "r", 0)) is None
    assert p.check("open", (str(outside / "a"), "rb+", 0)) is not None
    assert p.check("open", (str(outside / "a"), None, os.O_WRONLY | os.O_CREAT)) is not None
    assert p.check("open", (7, "w", 0)) is None  # an already-open descriptor: a documented blind spot
    assert p.check("open", ("/dev/null", "w", 0)) is None
    assert p.check("os.rename", (str(inside / "a"), str(outside / "b"), -1, -1)).target == str(outside / "b")  # type: ignore[union-attr]
    escape = p.check("os.remove", (str(outside / "a"), -1))
    assert escape is not None and escape.allow_hint == f"allow_write_dirs=[{str(outside)!r}]"


def test_symlinks_cannot_smuggle_a_write_out(tmp_path: Path) -> None:
    inside = tmp_path / "in"
    inside.mkdir()
    (inside / "link").symlink_to(tmp_path)
    assert policy(write_dirs=[str(inside)]).check("open", (str(inside / "link" / "x"), "w", 0)) is not None


def test_subprocess_commands_are_judged_by_the_resolved_executable(tmp_path: Path) -> None:
    p = policy(allow_subprocess=("git",))
    git = shutil.which("git")
    assert p.check("subprocess.Popen", ("git", ["git", "status"], None, None)) is None
    assert p.check("subprocess.Popen", (None, [git, "log"], None, None)) is None
    assert p.check("os.posix_spawn", (git, ["git"], None)) is None
    # a shell is never git, whatever its command line starts with
    escape = p.check("subprocess.Popen", ("/bin/sh", ["/bin/sh", "-c", "git status; curl evil.org"], None, None))
    assert escape is not None and escape.target == "/bin/sh -c git status; curl evil.org"
    assert escape.allow_hint == "allow_subprocess=['sh']"
    assert p.check("os.system", ("git status",)) is not None
    assert p.check("os.exec", ("/bin/ls", ["ls"], None)) is not None
    # another file named git is not the git that was looked up at construction
    fake = tmp_path / "git"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert p.check("subprocess.Popen", (None, [str(fake)], None, None)) is not None
    assert p.check("subprocess.Popen", ("git", ["git"], None, {"PATH": str(tmp_path)})) is not None
    assert p.check("subprocess.Popen", (None, ["./git"], str(tmp_path), None)) is not None


def test_allow_subprocess_is_looked_up_at_construction() -> None:
    with pytest.raises(ValueError, match=r"allow_subprocess: 'no-such-program-xyz' is not found on PATH"):
        policy(allow_subprocess=("no-such-program-xyz",))
    with pytest.raises(ValueError, match=r"allow_subprocess: '/no/such/git' is not an executable file"):
        policy(allow_subprocess=("/no/such/git",))


def test_hook_blocks_only_while_a_session_is_active_and_names_the_users_line(tmp_path: Path) -> None:
    target = tmp_path / "x"
    events = []
    session = audit.Session(policy(), "block", "test", report=lambda v: events.append(v) or "event")
    audit.activate(session)
    try:
        with pytest.raises(SandboxViolation) as raised:
            target.write_text("no")
        line = sys._getframe().f_lineno - 1
    finally:
        audit.activate(None)
    target.write_text("yes")  # no session: allowed
    assert target.read_text() == "yes"
    [violation] = events
    assert violation.location.endswith(f"test_policy.py:{line}") and violation.function.startswith("test_hook")
    assert raised.value.event == "event"


def test_a_forked_child_reports_through_the_spool(tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    session = audit.Session(policy(), "block", "train", report=lambda _violation: None, spool=str(spool))
    audit.activate(session)
    try:
        pid = os.fork()
        if pid == 0:  # the child: its exec must be blocked and spooled
            try:
                os.execv("/bin/true", ["/bin/true"])
            except SandboxViolation:
                os._exit(3)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
    finally:
        audit.activate(None)
    assert os.waitstatus_to_exitcode(status) == 3
    [record] = audit.SpoolReader(str(spool)).read_new()
    assert record["data"]["process"] == "child process" and record["data"]["audit_event"] == "os.exec"


def test_an_installed_but_inactive_hook_blocks_nothing() -> None:
    audit.install()
    assert not audit.is_active()
    subprocess.run(["true"], check=True)  # installed but inactive: nothing is blocked


def test_the_new_rules_are_quiet_on_what_stays_inside(tmp_path: Path) -> None:
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    p = policy(write_dirs=[str(inside)], hosts=["127.0.0.1:8080"])
    with socket.socket() as inet, socket.socket(socket.AF_UNIX) as unix:
        assert p.check("socket.bind", (inet, ("127.0.0.1", 8080))) is None  # an allowed host and port
        assert p.check("socket.bind", (unix, str(inside / "sock"))) is None  # AF_UNIX: multiprocessing, W&B
        assert p.check("socket.bind", (inet, ("127.0.0.1", 9090))) is not None
    assert p.check("socket.__new__", (None, socket.AF_INET, socket.SOCK_STREAM, 0)) is None
    assert p.check("socket.__new__", (None, socket.AF_INET, socket.SOCK_RAW, 1)) is not None
    assert p.check("sqlite3.connect", (":memory:",)) is None
    assert p.check("sqlite3.connect", (f"file:{outside / 'db'}?mode=ro",)) is None  # read-only
    assert p.check("sqlite3.connect", (str(inside / "db"),)) is None
    assert p.check("sqlite3.connect", (f"file:{outside / 'db'}",)).target == str(outside / "db")  # type: ignore[union-attr]
    (inside / "data").write_text("x")
    assert p.check("os.symlink", ("data", str(inside / "latest"), -1)) is None  # a link that stays inside
    assert p.check("os.symlink", (str(outside), str(inside / "out"), -1)) is not None
    assert p.check("os.link", (str(inside / "data"), str(inside / "copy"), -1, -1)) is None
    fd = os.open(inside, os.O_RDONLY)
    try:
        assert p.check("os.mkdir", ("sub", 0o777, fd)) is None  # relative to an allowed directory
        assert p.check("os.chmod", ("data", 0o600, fd)) is None
    finally:
        os.close(fd)
    fd = os.open(outside, os.O_RDONLY)
    try:
        assert p.check("os.mkdir", ("sub", 0o777, fd)).target == str(outside / "sub")  # type: ignore[union-attr]
    finally:
        os.close(fd)
