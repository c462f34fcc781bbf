"""The red-team suite: escapes tried from inside a sandboxed ``validation_step``, each with its side effect checked.

One ``Trainer.validate`` (``on_violation="block"``, ``allow_subprocess=["git"]``) runs every escape at its
first batch; the decision comes from the audit hook SandboxCheck installs. Each escape is then a test case:
it was refused (or, run in a child or a late thread, refused there), its violation names it, and its side
effect is absent: the local TCP server saw no connection, the UDP listener no datagram, the inbound peer
received nothing, the file outside was not created, changed or removed. The same escapes run once more with
no sandbox, to show that every side-effect check sees the effect when it happens.
"""

from __future__ import annotations

import _posixsubprocess
import _socket
import contextlib
import json
import multiprocessing
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helpers
import lightning.pytorch as pl
import pytest
from digits import DigitsClassifier, DigitsDataModule
from helpers import read_jsonl, small_trainer

from lightning_phases import SandboxCheck, SandboxViolation
from lightning_phases.sandbox import audit_hook
from lightning_phases.sandbox.policy import SandboxPolicy

ROOT = Path(__file__).resolve().parents[2]
IS_ROOT = os.geteuid() == 0
PEER = textwrap.dedent(
    """
    import socket, sys
    line = sys.argv[1] if len(sys.argv) > 1 else sys.stdin.readline().strip()
    if not line:
        sys.exit(0)
    received = b""
    try:
        with socket.create_connection(("127.0.0.1", int(line)), timeout=5) as conn:
            print("connected", flush=True)
            while chunk := conn.recv(64):
                received += chunk
    except OSError:
        pass
    print(received.decode(errors="replace"), flush=True)
    """
)


@dataclass
class Arena:
    """Directories, victims, servers and peers the escapes aim at, all made before the sandboxed stage."""

    base: Path
    root: Path = field(init=False)
    outside: Path = field(init=False)
    fake_bin: Path = field(init=False)
    tcp: dict[str, socket.socket] = field(default_factory=dict)
    udp: dict[str, socket.socket] = field(default_factory=dict)
    peers: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    created: set[str] = field(default_factory=set)
    late: dict[str, BaseException | None] = field(default_factory=dict)
    stage_over: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    sandbox: SandboxCheck | None = None

    def __post_init__(self) -> None:
        self.root, self.outside, self.fake_bin = self.base / "root", self.base / "outside", self.base / "bin"
        for directory in (self.root, self.outside, self.fake_bin):
            directory.mkdir(parents=True)
        for name in ("remove", "rename", "chdir", "link", "prelinked", "symlink", "swap", "chmod", "chmod_fd"):
            (self.outside / f"victim_{name}").write_text("original")
        for name in ("chmod", "chmod_fd", "utime", "chown"):
            (self.outside / f"victim_{name}").write_text("original")
            (self.outside / f"victim_{name}").chmod(0o644)
        os.link(self.outside / "victim_prelinked", self.root / "prelinked")  # a hard link made before the stage
        os.symlink(self.outside / "victim_swap", self.root / "swap_link")  # a symlink made before the stage
        fake_git = self.fake_bin / "git"
        fake_git.write_text(f"#!/bin/sh\ntouch {self.outside}/fake_git_ran\n")
        fake_git.chmod(0o755)
        for name in ("connect_by_name", "connect_ex_by_name", "c_level_connect_by_name"):
            server = socket.socket()
            server.bind(("127.0.0.1", 0))
            server.listen(4)
            self.tcp[name] = server
        for name in ("sendto_by_name", "sendto_flags_by_name"):
            listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            listener.bind(("127.0.0.1", 0))
            self.udp[name] = listener
        self.pre_listening = socket.socket()
        self.pre_listening.bind(("127.0.0.1", 0))
        self.pre_listening.listen(4)
        for name in ("bind_and_serve", "listen_unbound"):
            self.peers[name] = self._peer()
        self.peers["accept"] = self._peer(str(self.pre_listening.getsockname()[1]))
        assert self.peers["accept"].stdout is not None and self.peers["accept"].stdout.readline() == "connected\n"

    def _peer(self, port: str | None = None) -> subprocess.Popen[str]:
        args = [sys.executable, "-c", PEER] + ([port] if port else [])
        return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def port_of(self, name: str, table: dict[str, socket.socket]) -> int:
        return table[name].getsockname()[1]

    def serve(self, name: str, server: socket.socket) -> None:
        """Tell peer ``name`` where to connect, accept it, and send it a secret."""
        peer = self.peers[name]
        assert peer.stdin is not None
        peer.stdin.write(f"{server.getsockname()[1]}\n")
        peer.stdin.flush()
        server.settimeout(5)
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"secret")

    def finish(self) -> None:
        """After the stage: let late threads act, release every peer, and close the servers."""
        self.stage_over.set()
        for thread in self.threads:
            thread.join(10)
        for peer in self.peers.values():
            with contextlib.suppress(OSError):
                assert peer.stdin is not None
                peer.stdin.close()
        self.pre_listening.close()
        self.received = {}
        for name, peer in self.peers.items():
            assert peer.stdout is not None
            self.received[name] = peer.stdout.read()
            peer.wait(10)
            peer.stdout.close()

    def peer_received(self, name: str) -> bool:
        return "secret" in self.received[name]

    def datagrams(self, name: str) -> bool:
        listener = self.udp[name]
        listener.settimeout(0.3)
        try:
            listener.recvfrom(64)
        except TimeoutError:
            return False
        return True

    def outside_text(self, name: str) -> str:
        return (self.outside / name).read_text()

    def mode(self, name: str) -> int:
        return (self.outside / name).stat().st_mode & 0o777


@contextlib.contextmanager
def _outside_dir_fd(arena: Arena) -> Iterator[int]:
    fd = os.open(arena.outside, os.O_RDONLY)  # reading a directory is allowed; writing relative to it is not
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _in_outside(arena: Arena) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(arena.outside)
    try:
        yield
    finally:
        os.chdir(before)


# Escapes: each does its worst; the name of the function is the "function" its violation names.


def connect_by_name(a: Arena) -> None:
    with socket.socket() as sock:
        sock.settimeout(2)
        sock.connect(("localhost", a.port_of("connect_by_name", a.tcp)))


def c_level_connect_by_name(a: Arena) -> None:
    with socket.socket() as sock:  # a blind spot for the look-up (made before the audit event), not the connect
        _socket.socket.connect(sock, ("localhost", a.port_of("c_level_connect_by_name", a.tcp)))


def connect_ex_by_name(a: Arena) -> None:
    with socket.socket() as sock:
        sock.settimeout(2)
        sock.connect_ex(("localhost", a.port_of("connect_ex_by_name", a.tcp)))


def sendto_by_name(a: Arena) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"secret-token", ("localhost", a.port_of("sendto_by_name", a.udp)))


def sendto_flags_by_name(a: Arena) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"secret-token", 0, ("localhost", a.port_of("sendto_flags_by_name", a.udp)))


def bind_and_serve(a: Arena) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        a.serve("bind_and_serve", server)


def listen_unbound(a: Arena) -> None:
    with socket.socket() as server:
        server.listen(1)  # binds a free port itself, with no socket.bind event
        a.serve("listen_unbound", server)


def accept(a: Arena) -> None:
    a.pre_listening.settimeout(5)
    conn, _ = a.pre_listening.accept()  # a server opened before the stage; its peer is waiting
    with conn:
        conn.sendall(b"secret")


def raw_packet(a: Arena) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)) as sock:
        a.created.add("raw_packet")
        sock.bind(("lo", 0))
        sock.send(b"\xff" * 12 + b"\x88\xb5" + b"secret-token")


def raw_inet(a: Arena) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP):
        a.created.add("raw_inet")


def open_dir_fd(a: Arena) -> None:
    with _outside_dir_fd(a) as fd:
        os.close(os.open("dir_fd_created", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))


def mkdir_dir_fd(a: Arena) -> None:
    with _outside_dir_fd(a) as fd:
        os.mkdir("dir_fd_dir", dir_fd=fd)


def remove_dir_fd(a: Arena) -> None:
    with _outside_dir_fd(a) as fd:
        os.remove("victim_remove", dir_fd=fd)


def rename_dir_fd(a: Arena) -> None:
    with _outside_dir_fd(a) as fd:
        os.rename("victim_rename", "renamed", src_dir_fd=fd, dst_dir_fd=fd)


def chmod_dir_fd(a: Arena) -> None:
    with _outside_dir_fd(a) as fd:
        os.chmod("victim_chmod_fd", 0o777, dir_fd=fd)


def chdir_write(a: Arena) -> None:
    with _in_outside(a), open("chdir_created", "w") as handle:
        handle.write("escaped")


def chdir_remove(a: Arena) -> None:
    with _in_outside(a):
        os.remove("victim_chdir")


def hard_link_in(a: Arena) -> None:
    os.link(a.outside / "victim_link", a.root / "linked")
    (a.root / "linked").write_text("escaped")


def write_through_hard_link(a: Arena) -> None:
    (a.root / "prelinked").write_text("escaped")


def symlink_out(a: Arena) -> None:
    os.symlink(a.outside / "victim_symlink", a.root / "symlinked")
    (a.root / "symlinked").write_text("escaped")


def symlink_swap(a: Arena) -> None:
    os.replace(a.root / "swap_link", a.root / "report.txt")  # swap the link in where a write will follow
    (a.root / "report.txt").write_text("escaped")


def chmod(a: Arena) -> None:
    os.chmod(a.outside / "victim_chmod", 0o777)


def utime(a: Arena) -> None:
    os.utime(a.outside / "victim_utime", (0, 0))


def chown(a: Arena) -> None:
    os.chown(a.outside / "victim_chown", 12345, 12345)


def mkfifo(a: Arena) -> None:
    os.mkfifo(a.outside / "fifo")


def mknod(a: Arena) -> None:
    os.mknod(a.outside / "node")


def sqlite_connect(a: Arena) -> None:
    with contextlib.closing(sqlite3.connect(a.outside / "escape.db")) as db:
        db.execute("create table t (x)")


def shell_chain_git(a: Arena) -> None:
    subprocess.run(f"git --version > /dev/null; touch {a.outside}/shell_chain", shell=True, check=False)


def system_chain_git(a: Arena) -> None:
    os.system(f"git --version > /dev/null; touch {a.outside}/system_chain")


def another_git(a: Arena) -> None:
    subprocess.run([str(a.fake_bin / "git")], check=False)


def git_on_another_path(a: Arena) -> None:
    subprocess.run(["git"], env={"PATH": str(a.fake_bin)}, check=False)


def _fork_exec_touch(fork_exec: Callable[..., int], target: Path) -> None:
    touch = os.fsencode(shutil.which("touch") or "/usr/bin/touch")
    read, write = os.pipe()
    try:
        pid = fork_exec(
            [touch, os.fsencode(target)], [touch], True, (), None, None, -1, -1, -1, -1, -1, -1, read, write,
            False, False, -1, None, None, None, -1, None, False,
        )  # fmt: skip
    finally:
        os.close(read)
        os.close(write)
    os.waitpid(pid, 0)


def posixsubprocess_fork_exec(a: Arena) -> None:
    _fork_exec_touch(_posixsubprocess.fork_exec, a.outside / "fork_exec_ran")


def subprocess_fork_exec(a: Arena) -> None:
    _fork_exec_touch(subprocess._fork_exec, a.outside / "subprocess_fork_exec_ran")  # type: ignore[attr-defined]


def _child(a: Arena, method: str) -> None:
    process = multiprocessing.get_context(method).Process(
        target=helpers.write_file, args=(str(a.outside / f"{method}_child"),)
    )
    process.start()
    process.join(120)


def spawn_child(a: Arena) -> None:
    _child(a, "spawn")


def forkserver_child(a: Arena) -> None:
    _child(a, "forkserver")


def _late_write(a: Arena) -> None:
    a.stage_over.wait(30)
    try:
        helpers.write_file(str(a.outside / "late_thread"))
        a.late["thread_after_stage"] = None
    except BaseException as error:
        a.late["thread_after_stage"] = error


def thread_after_stage(a: Arena) -> None:
    thread = threading.Thread(target=_late_write, args=(a,))
    thread.start()  # started in the sandboxed stage; it writes only after the Trainer call has ended
    a.threads.append(thread)


def flip_settings(a: Arena) -> None:
    if a.sandbox is not None:
        a.sandbox.on_violation = "warn"
        a.sandbox.stages = ()
    helpers.write_file(str(a.outside / "after_flip"))


def patch_policy(a: Arena) -> None:
    check = SandboxPolicy.check
    SandboxPolicy.check = lambda *_args: None  # type: ignore[method-assign]
    try:
        if a.sandbox is not None:
            a.sandbox.policy = SandboxPolicy(write_dirs=["/"])
        helpers.write_file(str(a.outside / "after_patch"))
    finally:
        SandboxPolicy.check = check  # type: ignore[method-assign]


def through_the_reporter(a: Arena) -> None:
    def draw(path: Path) -> None:  # noqa: ARG001
        helpers.write_file(str(a.outside / "via_reporter"))

    if a.sandbox is None:
        draw(a.root)
    else:  # the package's own reporting runs unjudged; a callable handed to it must not
        a.sandbox.reporter.save_plot(a.sandbox.name, "attack", draw)


def unjudged_user_code(a: Arena) -> None:
    audit_hook.unjudged(lambda: helpers.write_file(str(a.outside / "unjudged")))()


@dataclass(frozen=True)
class Case:
    """One escape: the attempt, the audit event its violation names, and whether its side effect happened.

    Args:
        escape: The attempt.
        audit_event: The violation's ``audit_event``.
        happened: Whether the side effect is there (checked after the stage).
        refused_with: What the attempt raises in the sandboxed stage (``None``: it raises nothing there, the
            refusal happens in a child process or a late thread).
        function: The ``function`` the violation names; by default the escape's own.
        root_only: The unsandboxed attempt needs root (the check cannot show the effect otherwise).
    """

    escape: Callable[[Arena], None]
    audit_event: str | None
    happened: Callable[[Arena], bool]
    refused_with: type[BaseException] | None = SandboxViolation
    function: str | None = None
    root_only: bool = False


def _exists(name: str) -> Callable[[Arena], bool]:
    return lambda a: (a.outside / name).exists()


def _gone(name: str) -> Callable[[Arena], bool]:
    return lambda a: not (a.outside / name).exists()


def _changed(name: str) -> Callable[[Arena], bool]:
    return lambda a: a.outside_text(name) != "original"


CASES: dict[str, Case] = {
    "connect_by_name": Case(
        connect_by_name, "socket.connect", lambda a: helpers.connections(a.tcp["connect_by_name"]) > 0
    ),
    "connect_ex_by_name": Case(
        connect_ex_by_name, "socket.connect", lambda a: helpers.connections(a.tcp["connect_ex_by_name"]) > 0
    ),
    "c_level_connect_by_name": Case(
        c_level_connect_by_name, "socket.connect", lambda a: helpers.connections(a.tcp["c_level_connect_by_name"]) > 0
    ),
    "sendto_by_name": Case(sendto_by_name, "socket.sendto", lambda a: a.datagrams("sendto_by_name")),
    "sendto_flags_by_name": Case(sendto_flags_by_name, "socket.sendto", lambda a: a.datagrams("sendto_flags_by_name")),
    "bind_and_serve": Case(bind_and_serve, "socket.bind", lambda a: a.peer_received("bind_and_serve")),
    "listen_unbound": Case(
        listen_unbound, "lightning_phases.socket.listen", lambda a: a.peer_received("listen_unbound")
    ),
    "accept": Case(accept, "lightning_phases.socket.accept", lambda a: a.peer_received("accept")),
    "raw_packet": Case(raw_packet, "socket.__new__", lambda a: "raw_packet" in a.created, root_only=True),
    "raw_inet": Case(raw_inet, "socket.__new__", lambda a: "raw_inet" in a.created, root_only=True),
    "open_dir_fd": Case(open_dir_fd, "open", _exists("dir_fd_created")),
    "mkdir_dir_fd": Case(mkdir_dir_fd, "os.mkdir", _exists("dir_fd_dir")),
    "remove_dir_fd": Case(remove_dir_fd, "os.remove", _gone("victim_remove")),
    "rename_dir_fd": Case(rename_dir_fd, "os.rename", _gone("victim_rename")),
    "chmod_dir_fd": Case(chmod_dir_fd, "os.chmod", lambda a: a.mode("victim_chmod_fd") == 0o777),
    "chdir_write": Case(chdir_write, "open", _exists("chdir_created")),
    "chdir_remove": Case(chdir_remove, "os.remove", _gone("victim_chdir")),
    "hard_link_in": Case(hard_link_in, "os.link", _changed("victim_link")),
    "write_through_hard_link": Case(write_through_hard_link, "open", _changed("victim_prelinked")),
    "symlink_out": Case(symlink_out, "os.symlink", _changed("victim_symlink")),
    "symlink_swap": Case(symlink_swap, "os.rename", _changed("victim_swap")),
    "chmod": Case(chmod, "os.chmod", lambda a: a.mode("victim_chmod") == 0o777),
    "utime": Case(utime, "os.utime", lambda a: (a.outside / "victim_utime").stat().st_mtime == 0),
    "chown": Case(chown, "os.chown", lambda a: (a.outside / "victim_chown").stat().st_uid == 12345, root_only=True),
    "mkfifo": Case(mkfifo, "lightning_phases.os.mkfifo", _exists("fifo")),
    "mknod": Case(mknod, "lightning_phases.os.mknod", _exists("node")),
    "sqlite_connect": Case(sqlite_connect, "sqlite3.connect", _exists("escape.db")),
    "shell_chain_git": Case(shell_chain_git, "subprocess.Popen", _exists("shell_chain")),
    "system_chain_git": Case(system_chain_git, "os.system", _exists("system_chain")),
    "another_git": Case(another_git, "subprocess.Popen", _exists("fake_git_ran")),
    "git_on_another_path": Case(git_on_another_path, "subprocess.Popen", _exists("fake_git_ran")),
    "posixsubprocess_fork_exec": Case(
        posixsubprocess_fork_exec,
        "lightning_phases._posixsubprocess.fork_exec",
        _exists("fork_exec_ran"),
        function="_fork_exec_touch",
    ),
    "subprocess_fork_exec": Case(
        subprocess_fork_exec,
        "lightning_phases._posixsubprocess.fork_exec",
        _exists("subprocess_fork_exec_ran"),
        function="_fork_exec_touch",
    ),
    "spawn_child": Case(spawn_child, "open", _exists("spawn_child"), refused_with=None, function="write_file"),
    "forkserver_child": Case(
        forkserver_child, "open", _exists("forkserver_child"), refused_with=None, function="write_file"
    ),
    "thread_after_stage": Case(thread_after_stage, None, _exists("late_thread"), refused_with=None),
    "flip_settings": Case(flip_settings, "open", _exists("after_flip"), function="write_file"),
    "patch_policy": Case(patch_policy, "open", _exists("after_patch"), function="write_file"),
    "unjudged_user_code": Case(unjudged_user_code, None, _exists("unjudged"), refused_with=ValueError),
    "through_the_reporter": Case(through_the_reporter, "open", _exists("via_reporter"), function="write_file"),
}
#: Escapes that change the callback itself: they run last.
LAST = ("flip_settings", "patch_policy")


class Attacker(DigitsClassifier):
    """The digits classifier whose first validation batch tries every escape, recording what each raised."""

    arena: Arena
    names: list[str]

    def __init__(self) -> None:
        super().__init__()
        self.raised: dict[str, BaseException | None] = {}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            for name in self.names:
                try:
                    CASES[name].escape(self.arena)
                    self.raised[name] = None
                except Exception as error:
                    self.raised[name] = error
        super().validation_step(batch, batch_idx)


ORDER = [name for name in CASES if name not in LAST] + list(LAST)


@pytest.fixture(scope="module")
def sandboxed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Arena, Attacker, list[dict[str, Any]]]:
    arena = Arena(tmp_path_factory.mktemp("red_team"))
    arena.sandbox = SandboxCheck(on_violation="block", allow_subprocess=["git"])
    model = Attacker()
    model.arena, model.names = arena, ORDER
    with pytest.warns(Warning):  # each violation is also a console warning
        small_trainer([arena.sandbox], default_root_dir=arena.root, limit_val_batches=1).validate(
            model, DigitsDataModule(), verbose=False
        )
    arena.finish()
    return arena, model, read_jsonl(arena.root / "phase_events.jsonl")


@pytest.fixture(scope="module")
def unsandboxed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Arena, dict[str, BaseException | None]]:
    arena = Arena(tmp_path_factory.mktemp("control"))
    raised: dict[str, BaseException | None] = {}
    for name in ORDER:
        if name in ("flip_settings", "patch_policy", "unjudged_user_code") or (CASES[name].root_only and not IS_ROOT):
            continue
        try:
            CASES[name].escape(arena)
            raised[name] = None
        except Exception as error:
            raised[name] = error
    arena.finish()
    return arena, raised


@pytest.mark.parametrize("name", ORDER)
def test_escape_is_refused_and_its_side_effect_is_absent(
    sandboxed: tuple[Arena, Attacker, list[dict[str, Any]]], name: str
) -> None:
    arena, model, events = sandboxed
    case = CASES[name]
    raised = model.raised[name]
    if case.refused_with is None:
        assert raised is None
    else:
        assert isinstance(raised, case.refused_with), raised
    assert not case.happened(arena)
    if case.audit_event is not None:
        function = case.function or case.escape.__name__
        matching = [
            e
            for e in events
            if e["kind"] == "sandbox_violation"
            and e["data"]["audit_event"] == case.audit_event
            and e["data"]["function"] == function
        ]
        assert matching, f"no {case.audit_event} violation from {function}"
        assert all(e["data"]["blocked"] for e in matching)


@pytest.mark.parametrize("name", [n for n in ORDER if n not in ("flip_settings", "patch_policy", "unjudged_user_code")])
def test_without_the_sandbox_the_side_effect_check_sees_the_escape(
    unsandboxed: tuple[Arena, dict[str, BaseException | None]], name: str
) -> None:
    if CASES[name].root_only and not IS_ROOT:
        pytest.skip("needs root to take effect")
    arena, raised = unsandboxed
    assert raised[name] is None, raised[name]
    assert CASES[name].happened(arena)


def test_children_and_late_threads_are_refused_where_they_run(
    sandboxed: tuple[Arena, Attacker, list[dict[str, Any]]],
) -> None:
    arena, _, events = sandboxed
    written = [e for e in events if e["kind"] == "sandbox_violation" and e["data"]["function"] == "write_file"]
    processes = {e["data"]["process"] for e in written}
    assert "multiprocessing child" in processes
    assert isinstance(arena.late["thread_after_stage"], SandboxViolation)  # after the Trainer call had ended


def test_settings_changed_mid_stage_are_ignored_and_reported(
    sandboxed: tuple[Arena, Attacker, list[dict[str, Any]]],
) -> None:
    arena, _, events = sandboxed
    [changed] = [e for e in events if e["kind"] == "sandbox_settings_changed"]
    assert changed["data"]["changed"] == ["on_violation", "stages", "policy"]
    assert changed["data"]["on_violation"] == "block"
    assert changed["data"]["stages"] == ["sanity_check", "train", "validate", "test"]  # as at setup
    assert arena.sandbox is not None
    assert [obs.verdict for obs in arena.sandbox.phase_observations()] == ["violated"]


BLIND = {  # what stays blind: a phrase of its info-event entry, and of its README row
    "native code (torch.save(obj, path), C extensions, ctypes) in the main process": "native code in the main process",
    "processes started before the sandboxed stage": "processes started before the stage",
    "_socket.socket methods called": "`_socket.socket` methods called directly",
    "_thread.start_new_thread": "`_thread.start_new_thread` once the stage has ended",
    "symlink swapped in between check and open": "symlink swapped in between check and open",
    "start-up before the sandbox is activated": "start-up before the sandbox is activated",
    "hostile code": "hostile code in the main process can switch an audit hook off",
    "descriptors opened before": "descriptors opened before the stage",
}


def test_what_stays_blind_is_named_in_the_info_event_and_the_readme(
    sandboxed: tuple[Arena, Attacker, list[dict[str, Any]]],
) -> None:
    _, _, events = sandboxed
    [info] = [e for e in events if e["kind"] == "sandbox_blind_spots"]
    readme = (ROOT / "README.md").read_text()
    blind_row = next(line for line in readme.splitlines() if line.startswith("| **blind**"))
    for in_event, in_readme in BLIND.items():
        assert any(in_event in spot for spot in info["data"]["blind_spots"]), in_event
        assert in_readme in blind_row or in_readme in readme, in_readme


def test_the_reporters_switch_is_not_reachable() -> None:
    assert not hasattr(audit_hook, "suspended") and not hasattr(audit_hook, "_busy")
    assert not hasattr(audit_hook, "_active") and not hasattr(audit_hook, "active_sessions")


# Escapes that need a Trainer of their own --------------------------------------------------------------------


def test_a_host_name_connect_sends_no_dns_query(tmp_path: Path) -> None:
    """The resolver points at a local UDP listener (a private mount namespace binds /etc/resolv.conf): the
    control look-up reaches it; the sandboxed connect and sendto to host names raise before any query."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    unshare = shutil.which("unshare")
    if not IS_ROOT or unshare is None:
        pytest.skip("needs root and unshare to point the resolver at a local listener")
    probe = subprocess.run(
        [unshare, "-m", "sh", "-c", f"mount --bind {resolv} /etc/resolv.conf"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.decode(errors='replace').strip()}")
    script = ROOT / "tests" / "scripts" / "sandbox_dns.py"
    result = subprocess.run(
        [
            *(unshare, "-m", "sh", "-c", f'mount --bind {resolv} /etc/resolv.conf && exec "$0" "$@"'),
            *(sys.executable, str(script), str(tmp_path / "root")),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=helpers.child_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert "control-token.example" in seen["control"]  # the listener sees a query when one is made
    assert seen["sandboxed"] == []  # ... and none from the sandboxed stage
    assert seen["raised"] == {"connect": "SandboxViolation", "sendto": "SandboxViolation"}
    events = [e for e in read_jsonl(tmp_path / "root" / "phase_events.jsonl") if e["kind"] == "sandbox_violation"]
    assert {e["data"]["target"] for e in events} == {
        "secret-token-connect.example:80",
        "secret-token-sendto.example:53",
    }


class WritesOutside(DigitsClassifier):
    """Writes ``path`` at the first validation batch, remembering what that raised."""

    path: str
    raised: BaseException | None = None

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0 and not self.trainer.sanity_checking:
            try:
                helpers.write_file(self.path)
            except Exception as error:
                self.raised = error
        super().validation_step(batch, batch_idx)


@pytest.mark.parametrize("lenient_last", [True, False])
def test_two_sandboxes_never_switch_each_other_off(tmp_path: Path, lenient_last: bool) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    strict = SandboxCheck(name="strict")
    lenient = SandboxCheck(name="lenient", allow_write_dirs=[str(outside)])
    model = WritesOutside()
    model.path = str(outside / "escaped")
    checks = [strict, lenient] if lenient_last else [lenient, strict]
    with pytest.warns(Warning, match="write escape blocked"):
        small_trainer(checks, default_root_dir=tmp_path / "root", limit_val_batches=1).validate(
            model, DigitsDataModule(), verbose=False
        )
    assert isinstance(model.raised, SandboxViolation)  # the strictest wins
    assert not (outside / "escaped").exists()
    assert [obs.verdict for obs in strict.phase_observations()] == ["violated"]
    assert [obs.verdict for obs in lenient.phase_observations()] == ["verified"]


class RaisesOnException(pl.Callback):
    """Another callback whose ``on_exception`` raises, so the callbacks after it never get theirs."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:  # noqa: ARG002
        raise RuntimeError("on_exception of another callback failed")


class FailsInValidation(DigitsClassifier):
    def validation_step(self, batch: Any, batch_idx: int) -> None:  # noqa: ARG002
        raise ValueError("the user's step failed")


def test_the_sandbox_is_off_after_a_failed_call_whose_cleanup_never_ran(tmp_path: Path) -> None:
    sandbox = SandboxCheck()
    trainer = small_trainer([RaisesOnException(), sandbox], default_root_dir=tmp_path / "a", limit_val_batches=1)
    with pytest.raises(RuntimeError, match="on_exception of another callback failed"):
        trainer.validate(FailsInValidation(), DigitsDataModule(), verbose=False)
    assert audit_hook.is_active()  # SandboxCheck's own cleanup did not run ...
    helpers.write_file(str(tmp_path / "after.txt"))  # ... yet the stage is over: nothing is judged any more
    assert (tmp_path / "after.txt").read_text() == "escaped"
    assert not audit_hook.is_active()
    small_trainer([SandboxCheck()], default_root_dir=tmp_path / "b", limit_val_batches=1).validate(
        DigitsClassifier(), DigitsDataModule(), verbose=False
    )  # the next Trainer creates its directory and runs
    assert (tmp_path / "b" / "phase_events.jsonl").exists()
