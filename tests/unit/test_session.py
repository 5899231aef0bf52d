"""Sessions of harness up as other commands find them, and the parsing of the manual verbs;
the up process's control socket is served for real (a Unix socket in a temp folder)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from harness.cli import parse_args
from harness.errors import UsageError
from harness.manual_cli import (
    ConsoleRequest,
    HotplugRequest,
    LabUpRequest,
    QmpRequest,
    SshRequest,
    UpRequest,
    WatchRequest,
)
from harness.session import (
    FORMAT,
    RemoteError,
    Session,
    SessionInfo,
    find_session,
    live_sessions,
    parse_qmp_args,
    request,
    resolve_target,
)


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "runtime"
    monkeypatch.setenv("HARNESS_RUNTIME_DIR", str(root))
    return root


def write_session(root: Path, sid: str, run: str, vms: list[str], pid: int,
                  started: float) -> Path:
    folder = root / sid
    folder.mkdir(parents=True, mode=0o700)
    vm_entries = [{"name": name, "arch": "x86_64", "accel": "tcg",
                   "ssh": {"port": 2222, "user": "root", "key": f"/r/{name}.ssh-key",
                           "known_hosts": f"/r/{name}.known_hosts"},
                   "qmp": str(folder / f"{name}.qmp"), "console": f"/r/{name}.console.log",
                   "devices": [{"id": "net0", "kind": "virtio-net", "bdf": "0000:00:03.0",
                                "host": None, "emulated": True, "hotplug": False}]}
                  for name in vms]
    (folder / "session.json").write_text(json.dumps({
        "format": FORMAT, "pid": pid, "pid_start": None, "started": started,
        "run_dir": f"/runs/{run}", "scenario": "s", "vms": vm_entries}))
    return folder


def test_the_latest_live_session_is_the_default_and_dead_ones_are_swept(runtime: Path) -> None:
    write_session(runtime, "s-000001", "old-1", ["a"], os.getpid(), 1.0)
    write_session(runtime, "s-000002", "new-2", ["a", "b"], os.getpid(), 2.0)
    dead = write_session(runtime, "s-000003", "dead-3", ["a"], 2**22 + 12345, 3.0)
    assert [s.name for s in live_sessions()] == ["old-1", "new-2"]
    assert not dead.exists()
    assert find_session(None).name == "new-2"
    assert find_session("old-1").id == "s-000001"
    assert find_session("/runs/old-1").id == "s-000001"
    with pytest.raises(UsageError, match="no live session 'nope'"):
        find_session("nope")
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700


def test_run_and_vm_words_are_told_apart(runtime: Path) -> None:
    write_session(runtime, "s-000001", "one-1", ["solo"], os.getpid(), 1.0)
    write_session(runtime, "s-000002", "two-2", ["a", "b"], os.getpid(), 2.0)
    info, vm, rest = resolve_target(["b", "query-pci"])
    assert (info.name, vm.name, rest) == ("two-2", "b", ["query-pci"])
    info, vm, rest = resolve_target(["one-1", "query-pci"])  # a single VM may go unnamed
    assert (info.name, vm.name, rest) == ("one-1", "solo", ["query-pci"])
    with pytest.raises(UsageError, match=r"several VMs \(a, b\): name one \(not 'c'\)"):
        resolve_target(["c"])


def test_no_session_is_one_clear_line(runtime: Path) -> None:
    with pytest.raises(UsageError, match=r"no VMs are up \(start some with: harness up"):
        resolve_target(["a"])


def test_the_ssh_command_line_pins_the_host_key_and_uses_the_runs_key(runtime: Path) -> None:
    write_session(runtime, "s-000001", "one-1", ["a"], os.getpid(), 1.0)
    vm = find_session(None).vm("a")
    argv = vm.ssh_argv(["sh", "-c", "echo 'a b'"])
    assert argv[:5] == ["ssh", "-i", "/r/a.ssh-key", "-p", "2222"]
    assert "UserKnownHostsFile=/r/a.known_hosts" in argv
    assert "StrictHostKeyChecking=yes" in argv and "IdentitiesOnly=yes" in argv
    assert argv[-3:] == ["root@127.0.0.1", "--", "sh -c 'echo '\"'\"'a b'\"'\"''"]


def test_the_control_socket_answers_and_ends_the_session(runtime: Path, tmp_path: Path) -> None:
    session = Session("s", tmp_path / "run", print)
    session.add_handler("boom", lambda message: (_ for _ in ()).throw(UsageError("bad")))
    from harness.session import _ControlServer

    server = _ControlServer(session.folder / "control", session._handlers)
    try:
        assert stat.S_IMODE((session.folder / "control").stat().st_mode) == 0o600
        assert stat.S_IMODE(session.folder.stat().st_mode) == 0o700
        info = SessionInfo(session.id, session.folder, os.getpid(), None, 0.0,
                           tmp_path / "run", "s", ())
        assert request(info, "status")["ready"] is False
        with pytest.raises(RemoteError) as err:
            request(info, "boom")
        assert (str(err.value), err.value.exit_code) == ("bad", 2)
        with pytest.raises(RemoteError, match="unknown op 'nope'"):
            request(info, "nope")
        assert request(info, "down")["ok"] is True
        assert session._done.is_set()
    finally:
        server.close()
        session.close()
    assert not session.folder.exists()


def test_qmp_arguments_are_json_where_they_parse() -> None:
    assert parse_qmp_args(["id=net1", "addr=0x00", "port=5", "on=true", "x={\"a\": 1}"]) == {
        "id": "net1", "addr": "0x00", "port": 5, "on": True, "x": {"a": 1}}
    with pytest.raises(UsageError, match="arguments are key=value"):
        parse_qmp_args(["device_del"])


def test_the_manual_verbs_parse() -> None:
    assert parse_args(["up", "s.yaml", "--only", "x"])[0] == UpRequest(Path("s.yaml"), None,
                                                                      False, "x")
    assert parse_args(["ssh", "run-1", "g", "--", "ls", "-l", "--", "x"])[0] == SshRequest(
        ("run-1", "g"), ("ls", "-l", "--", "x"))
    assert parse_args(["qmp", "g", "device_del", "id=n"])[0] == QmpRequest(
        ("g", "device_del", "id=n"), False)
    assert parse_args(["console", "g", "-n", "5", "--no-follow"])[0] == ConsoleRequest(
        ("g",), 5, False)
    assert parse_args(["irq", "watch", "g", "--count", "3", "--json"])[0] == WatchRequest(
        ("g",), 1.0, 3, True, False)
    assert parse_args(["hotplug", "g", "replug", "nic", "--pause", "2"])[0] == HotplugRequest(
        ("g", "replug", "nic"), 2.0)
    assert parse_args(["lab", "up", "s.yaml"])[0] == LabUpRequest(Path("s.yaml"), None, None)
    for bad in (["irq", "watch", "--interval", "0"], ["irq", "watch", "--count", "0"],
                ["hotplug", "g", "unplug", "x", "--pause", "-1"]):
        with pytest.raises(UsageError):
            parse_args(bad)
