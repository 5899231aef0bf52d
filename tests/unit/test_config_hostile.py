"""Hostile and unlucky scenario input: every case is one line, exit 2, fast, small, inert.

Each malformed scenario, the files of tests/data/configs/hostile/ (their first line says the
message: ``# expect: FILE:line: key.path: reason``, FILE standing for the file's path) and the
cases made at test time below (alias bombs, deep nesting, big files, special files, encodings),
is checked by the real ``harness validate`` (``harness.cli.main``) in a process of its own,
forked from a fresh interpreter that has imported the harness once, so a case costs
milliseconds, not an interpreter start.  For each case:

- exit code 2, nothing on stdout, exactly one line on stderr: the expected message;
- at most 2 s of wall-clock time (the child is killed at the limit);
- at most 100 MiB: the child's address space is capped there (RLIMIT_AS, so a case that
  needs more fails with MemoryError), and its peak RSS is read back (wait4's ru_maxrss);
- no side effect: an audit hook in the child records any process started, any file opened
  for writing or changed, and any file opened outside the scenario's folder, the harness's
  guest-images and Python's own; the working folder, HOME and the image cache stay empty.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness.config.loader import MAX_DEPTH, MAX_FILE_BYTES, MAX_VALUES, shared_host_from_env
from harness.errors import UsageError
from harness.images.builder import guest_images_dir

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "data" / "configs" / "hostile"
TIME_LIMIT_S = 2.0
MEMORY_LIMIT = 100 << 20

SCENARIO = "name: n\nvms:\n  - name: vm\n    devices: [{kind: virtio-net, id: net0}]\n"


# --- the fork server (runs in its own interpreter) -------------------------------------------

_SPAWNS = frozenset({"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                     "os.fork", "os.forkpty", "pty.spawn", "os.startfile"})
_CHANGES = frozenset({"os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod",
                      "os.chown", "os.truncate", "os.ftruncate", "os.symlink", "os.link",
                      "os.utime", "os.setxattr", "os.removexattr", "shutil.rmtree",
                      "shutil.copyfile", "shutil.move", "tempfile.mkstemp", "tempfile.mkdtemp",
                      "socket.bind", "socket.connect"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _audit(record: list[str], readable: tuple[str, ...], event: str,
           args: tuple[Any, ...]) -> None:
    """Every act of the validating process that reaches beyond reading the scenario."""
    try:
        if event in _SPAWNS or event in _CHANGES:
            record.append(f"{event} {args!r}"[:300])
        elif event in ("open", "os.listdir", "os.scandir"):
            path, mode, flags = (*args, None, None)[:3]
            if isinstance(path, int) or path is None:
                return
            path = os.path.abspath(os.fsdecode(path))
            writes = (isinstance(flags, int) and flags & _WRITE_FLAGS) or (
                isinstance(mode, str) and any(c in mode for c in "wax+"))
            if writes:
                record.append(f"{event} for writing {path}")
            elif not (path + os.sep).startswith(readable):
                record.append(f"{event} {path}")
    except Exception as exc:  # a hook that raises would break the audited call
        record.append(f"audit hook failed on {event}: {exc!r}")


def _child(request: Mapping[str, Any], out: int, err: int) -> int:
    from harness.cli import main

    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    resource.setrlimit(resource.RLIMIT_AS, (request["memory"], request["memory"]))
    report = open(request["report"], "w", encoding="utf-8")  # opened before the hook is set
    record: list[str] = []
    sys.addaudithook(functools.partial(_audit, record, tuple(request["readable"])))
    try:
        code = main(["validate", request["path"]])
    except BaseException:  # a traceback is a failure of the case: show it
        import traceback

        traceback.print_exc()
        code = 1
    json.dump(record, report)
    report.close()
    return code


def _fork_case(request: Mapping[str, Any]) -> dict[str, Any]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    out, err = (os.open(request[name], flags, 0o600) for name in ("stdout", "stderr"))
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code and files
        code = 70
        try:
            code = _child(request, out, err)
        finally:
            os._exit(code)
    os.close(out)
    os.close(err)
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], request["seconds"])
        if not ready:
            os.kill(pid, signal.SIGKILL)
        _, status, usage = os.wait4(pid, 0)
    finally:
        os.close(pidfd)
    return {"code": os.waitstatus_to_exitcode(status), "timed_out": not ready,
            "seconds": time.monotonic() - start, "max_rss_kib": usage.ru_maxrss}


def _serve() -> None:
    """Read one JSON request per line, run it in a forked child, answer one JSON line."""
    import harness.cli  # noqa: F401 - imported once, before any fork

    for line in sys.stdin:
        print(json.dumps(_fork_case(json.loads(line))), flush=True)


# --- the test side --------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str
    seconds: float
    max_rss_mib: float
    timed_out: bool
    acts: tuple[str, ...]  # what the audit hook saw beyond reading the scenario
    leftovers: tuple[str, ...]  # files in the working folder, HOME or the cache


def _acts(report: Path) -> tuple[str, ...]:
    """What the child's audit hook saw; a child killed at its limit may leave no report, or
    one it had not finished writing."""
    try:
        return tuple(json.loads(report.read_text()))
    except FileNotFoundError:
        return ("no report",)
    except ValueError:
        return ("report unfinished",)


class Validator:
    """``harness validate FILE`` in a forked child of a warm server, measured."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.count = 0
        self.server = subprocess.Popen(
            [sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, cwd=REPO)

    def run(self, path: Path | str, env: Mapping[str, str] | None = None,
            seconds: float = TIME_LIMIT_S, memory: int = MEMORY_LIMIT) -> Outcome:
        self.count += 1
        case = self.work / f"case{self.count}"
        folders = {name: case / name for name in ("cwd", "home", "cache")}
        for folder in folders.values():
            folder.mkdir(parents=True)
        # the scenario's folder, unless the scenario is no file to open at all (a FIFO)
        own = [os.path.dirname(os.path.abspath(path))] if os.path.isfile(path) else []
        readable = [*own, str(guest_images_dir()), str(REPO / "harness"), sys.prefix,
                    sys.base_prefix, sys.exec_prefix, *sysconfig.get_paths().values()]
        request = {
            "path": str(path), "cwd": str(folders["cwd"]), "seconds": seconds,
            "memory": memory,
            "stdout": str(case / "stdout"), "stderr": str(case / "stderr"),
            "report": str(case / "report.json"),
            "readable": sorted({os.path.abspath(p) + os.sep for p in readable}),
            "env": {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
                    "HOME": str(folders["home"]), "HARNESS_CACHE": str(folders["cache"]),
                    "XDG_CACHE_HOME": str(folders["cache"]), **(env or {})},
        }
        assert self.server.stdin is not None and self.server.stdout is not None
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        answer = json.loads(self.server.stdout.readline())
        report = case / "report.json"
        return Outcome(
            code=answer["code"], timed_out=answer["timed_out"], seconds=answer["seconds"],
            max_rss_mib=answer["max_rss_kib"] / 1024,
            stdout=(case / "stdout").read_text(encoding="utf-8", errors="replace"),
            stderr=(case / "stderr").read_text(encoding="utf-8", errors="replace"),
            acts=_acts(report),
            leftovers=tuple(str(p) for f in folders.values() for p in f.rglob("*")))

    def close(self) -> None:
        if self.server.stdin is not None:
            self.server.stdin.close()
        self.server.wait(timeout=10)
        if self.server.stdout is not None:  # else it is left to the collector, and warns
            self.server.stdout.close()


@pytest.fixture(scope="module")
def validator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Validator]:
    server = Validator(tmp_path_factory.mktemp("validate"))
    yield server
    server.close()


def assert_refused(outcome: Outcome, message: str | re.Pattern[str]) -> None:
    """Exit 2 with exactly the one expected line, within the bounds, with no side effect."""
    assert not outcome.timed_out, f"still running after {TIME_LIMIT_S} s; killed"
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1 and outcome.stderr.endswith("\n"), outcome.stderr[-3000:]
    line = lines[0].removeprefix("harness: error: ")
    if isinstance(message, str):
        assert line == message
    else:
        assert message.fullmatch(line), line
    assert (outcome.code, outcome.stdout) == (2, "")
    assert_bounded_and_inert(outcome)


def assert_bounded_and_inert(outcome: Outcome) -> None:
    assert outcome.seconds < TIME_LIMIT_S
    assert outcome.max_rss_mib < MEMORY_LIMIT >> 20
    assert outcome.acts == ()
    assert outcome.leftovers == ()


# --- the corpus on disk ---------------------------------------------------------------------


def _corpus_case(path: Path) -> tuple[str, dict[str, str]]:
    """The expected message and the environment, from the file's header comments."""
    lines = path.read_text(encoding="utf-8").splitlines()
    expect = lines[0].removeprefix("# expect: FILE")
    assert expect != lines[0], f"{path.name}: the first line must be '# expect: FILE:...'"
    env = dict(line.removeprefix("# env: ").split("=", 1) for line in lines[1:2]
               if line.startswith("# env: "))
    return expect, env


CORPUS_FILES = sorted(CORPUS.glob("*.yaml"))


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.stem)
def test_corpus_file_is_one_line_exit_2(validator: Validator, path: Path) -> None:
    expect, env = _corpus_case(path)

    assert_refused(validator.run(path, env), f"{path}{expect}")


# --- cases made at test time ------------------------------------------------------------------

# A case builds its file(s) in an empty folder and gives the path to validate and the message
# expected after "harness: error: " (exact text, or a pattern for counts that are incidental).
Case = Callable[[Path], tuple[Path, str | re.Pattern[str]]]
MADE: dict[str, Case] = {}


def made(name: str) -> Callable[[Case], Case]:
    def register(case: Case) -> Case:
        MADE[name] = case
        return case
    return register


def _write(folder: Path, text: str | bytes, name: str = "s.yaml") -> Path:
    path = folder / name
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


def _exact(path: Path, rest: str) -> str:
    return f"{path}{rest}"


def _pattern(path: Path, rest: str) -> re.Pattern[str]:
    return re.compile(re.escape(str(path)) + rest)


# alias bombs: each a few KB; without a bound, minutes and hundreds of MB

@made("bomb-vms-of-devices")
def _bomb_vms(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    # valid fields all the way down (the issue's shape): 300 VMs of 300 devices, 2.5 KB
    devices = ", ".join(["&d {kind: virtio-blk, id: d}"] + ["*d"] * 299)
    vm = f"&v {{name: vm, devices: [{{kind: virtio-net, id: net0}}, {devices}]}}"
    path = _write(folder, "name: bomb\nvms: [" + ", ".join([vm] + ["*v"] * 299) + "]\n")
    return path, _pattern(path, rf":2: vms\[\d+\]: YAML aliases make the file more than "
                                rf"{MAX_VALUES} values \(this one stands for 1510\)")


@made("bomb-billion-laughs")
def _bomb_laughs(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    lines = ["name: lol", "description:", '  - &a0 ["lol","lol","lol","lol","lol","lol","lol",'
             '"lol","lol"]']
    lines += [f"  - &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    path = _write(folder, "\n".join(lines) + "\n" + SCENARIO.split("\n", 1)[1])
    return path, _pattern(path, r":7: description\[4\]\[\d\]: YAML aliases make the file "
                                rf"more than {MAX_VALUES} values \(this one stands "
                                r"for \d+\)")


@made("bomb-workloads")
def _bomb_workloads(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    run = "&r [" + ", ".join(["uptime"] * 100) + "]"
    work = ", ".join([f"&w {{vm: vm, run: {run}}}"] + ["*w"] * 199)
    path = _write(folder, SCENARIO + f"workloads: [{work}]\n")
    return path, _pattern(path, r":5: workloads\[\d+\]: YAML aliases make the file more "
                                rf"than {MAX_VALUES} values \(this one stands for 105\)")


@made("bomb-mappings")
def _bomb_mappings(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    keys = "abcdefghij"
    lines = ["name: n", "lab:", "  m0: &m0 {" + ", ".join(f"{k}: x" for k in keys) + "}"]
    lines += [f"  m{i}: &m{i} {{" + ", ".join(f"{k}: *m{i - 1}" for k in keys) + "}"
              for i in range(1, 8)]
    path = _write(folder, "\n".join(lines) + "\n" + SCENARIO.split("\n", 1)[1])
    return path, _pattern(path, r":\d+: lab\.m\d\.[a-j]: YAML aliases make the file more "
                                rf"than {MAX_VALUES} values \(this one stands for \d+\)")


@made("bomb-keys")
def _bomb_keys(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    big = "&big [" + ", ".join(["x"] * 2000) + "]"
    path = _write(folder, f"name: n\nunused: {big}\n" + "".join(
        f"? [{i}, *big]\n: y\n" for i in range(10)) + SCENARIO.split("\n", 1)[1])
    return path, _pattern(path, rf":\d+: <key>\[1\]: YAML aliases make the file more than "
                                rf"{MAX_VALUES} values \(this one stands for 2001\)")


@made("bomb-across-documents")
def _bomb_documents(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    run = "[" + ", ".join(["uptime"] * 4000) + "]"
    docs = [f"name: s{i}\n{SCENARIO.split(chr(10), 1)[1]}workloads:\n  - {{vm: vm, run: {run}}}\n"
            for i in range(3)]
    path = _write(folder, "---\n".join(docs))
    return path, _pattern(path, r":\d+: workloads\[0\]\.run\[\d+\]: the file holds more than "
                                rf"{MAX_VALUES} values, the most a scenario file may have")


# nesting: 500 levels gave a 3,001-line RecursionError traceback

def _deep(folder: Path, text: str, rest: str) -> tuple[Path, str | re.Pattern[str]]:
    path = _write(folder, text)
    return path, _pattern(path, rest + re.escape(f": nested deeper than {MAX_DEPTH} levels"))


@made("depth-flow-lists")
def _depth_lists(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    return _deep(folder, SCENARIO + "description: " + "[" * 500 + "]" * 500 + "\n",
                 r":5: description(\[0\]){31}")


@made("depth-block-mappings")
def _depth_block(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    nested = "".join(" " * i + "k:\n" for i in range(500))
    return _deep(folder, SCENARIO + "lab:\n" + "".join(" " + line for line in
                                                        nested.splitlines(True)),
                 r":36: lab(\.k){30}\.<key>")


@made("depth-flow-mappings")
def _depth_maps(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    return _deep(folder, SCENARIO + "lab: " + "{a: " * 500 + "x" + "}" * 500 + "\n",
                 r":5: lab(\.a){30}\.<key>")


@made("depth-unclosed")
def _depth_unclosed(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    return _deep(folder, "name: n\nvms: " + "[" * 100_000 + "\n", r":2: vms(\[0\]){31}")


@made("depth-in-a-key")
def _depth_key(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    return _deep(folder, "? " + "[" * 500 + "]" * 500 + "\n: x\n", r":1: <key>(\[0\]){31}")


# sizes

@made("size-over-the-limit")
def _size_over(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    path = _write(folder, SCENARIO + ("# " + "x" * 77 + "\n") * (MAX_FILE_BYTES // 80 + 1))
    return path, _pattern(path, r": is \d+ bytes; a scenario file is at most 256 KiB")


@made("size-sparse-4-gib")
def _size_sparse(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    path = _write(folder, SCENARIO)
    os.truncate(path, 4 << 30)  # never read: refused by its size alone
    return path, _exact(path, ": is 4294967296 bytes; a scenario file is at most 256 KiB")


@made("size-many-values")
def _size_values(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    path = _write(folder, SCENARIO + "workloads:\n  - vm: vm\n    run: ["
                  + ",".join(["a"] * (MAX_VALUES + 1)) + "]\n")
    return path, _pattern(path, r":7: workloads\[0\]\.run\[\d+\]: the file holds more than "
                                rf"{MAX_VALUES} values, the most a scenario file may have")


@made("size-long-name")
def _size_name(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    path = _write(folder, "name: " + "a" * 200_000 + "\n" + SCENARIO.split("\n", 1)[1])
    return path, _exact(path, ":1: name: must be at most 64 characters, got 200000")


@made("size-long-vm-name")
def _size_vm_name(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    path = _write(folder, SCENARIO.replace("name: vm", "name: v" + "m" * 32))
    return path, _exact(path, ":3: vms[0].name: must be at most 32 characters, got 33")


@made("size-long-key")
def _size_key(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    path = _write(folder, SCENARIO + "k" * 1000 + ".x: 1\n")
    return path, _exact(path, f":5: {'k' * 40!r}... (1002 characters): unknown key; allowed "
                              "keys: name, vms, description, workloads, expect, timeouts, lab")


@made("size-long-text-then-error")
def _size_text(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    # the YAML scanner's slowest input: one long plain scalar, nearly the whole limit
    path = _write(folder, SCENARIO + "description: " + "word " * (MAX_FILE_BYTES // 5 - 40)
                  + "\ncpus: 2\n")
    return path, _exact(path, ":6: cpus: unknown key; allowed keys: name, vms, description, "
                              "workloads, expect, timeouts, lab")


@made("size-long-number")
def _size_number(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    path = _write(folder, SCENARIO.replace("    devices", "    cpus: " + "9" * 5000
                                           + "\n    devices"))
    return path, _exact(path, ":4: vms[0].cpus: a number of 5000 characters; no field takes "
                              "one of more than 100")


@made("size-long-undefined-alias")
def _size_alias(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    path = _write(folder, SCENARIO + "description: *" + "a" * 100_000 + "\n")
    return path, _pattern(path, r":5: invalid YAML: found undefined alias 'a{177}\.\.\. "
                                r"\(100024 characters\)")


# special files: none may be opened (a FIFO would block, a device act or never end)

@made("special-fifo")
def _fifo(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    path = folder / "fifo.yaml"
    os.mkfifo(path)
    return path, _exact(path, ": is a FIFO (named pipe), not a scenario file")


@made("special-directory")
def _directory(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    path = folder / "dir.yaml"
    path.mkdir()
    return path, _exact(path, ": is a directory, not a scenario file")


@made("special-dev-zero")
def _dev_zero(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    path = folder / "zero.yaml"
    path.symlink_to("/dev/zero")  # read, it filled 24 GB before
    return path, _exact(path, ": is a character device, not a scenario file")


@made("special-dev-null")
def _dev_null(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    return Path("/dev/null"), "/dev/null: is a character device, not a scenario file"


@made("special-socket")
def _socket(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    path = folder / "sock.yaml"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
    return path, _exact(path, ": is a socket, not a scenario file")


@made("special-missing")
def _missing(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    path = folder / "nope.yaml"
    return path, _exact(path, ": cannot read: No such file or directory")


@made("special-dangling-symlink")
def _dangling(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    path = folder / "link.yaml"
    path.symlink_to(folder / "gone.yaml")
    return path, _exact(path, ": cannot read: No such file or directory")


@made("special-symlink-loop")
def _loop(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    path = folder / "loop.yaml"
    path.symlink_to(path)
    return path, _exact(path, ": cannot read: Too many levels of symbolic links")


@made("special-under-a-file")
def _under_file(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    path = _write(folder, SCENARIO) / "s.yaml"
    return path, _exact(path, ": cannot read: Not a directory")


def _with_image(folder: Path, image: str) -> Path:
    return _write(folder, SCENARIO.replace("    devices", f"    arch: x86_64\n    image: {image}"
                                                          "\n    devices"))


@made("special-kernel-fifo")
def _kernel_fifo(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    os.mkfifo(folder / "bzImage")
    path = _with_image(folder, "{kind: kernel, kernel: bzImage}")
    return path, _exact(path, f":5: vms[0].image.kernel: {folder / 'bzImage'} is a FIFO (named "
                              "pipe), not a file")


@made("special-kernel-dev-zero")
def _kernel_zero(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    path = _with_image(folder, "{kind: kernel, kernel: /dev/zero}")
    return path, _exact(path, ":5: vms[0].image.kernel: /dev/zero is a character device, not "
                              "a file")


@made("special-modules-not-a-folder")
def _modules_file(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    _write(folder, "", "modules.dep")
    path = _with_image(folder, "{kind: kernel, kernel: bzImage, modules: modules.dep}")
    return path, _exact(path, f":5: vms[0].image.modules: {folder / 'modules.dep'} is a file, "
                              "not a folder")


@made("special-disk-directory")
def _disk_directory(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    path = _with_image(folder, "{kind: cloud, disk: .}")
    return path, _exact(path, f":5: vms[0].image.disk: {folder} is a directory, not a file")


# encodings: one line naming the encoding or the first bad byte, never the content

def _encoded(folder: Path, data: bytes, rest: str) -> tuple[Path, str | re.Pattern[str]]:
    path = _write(folder, data)
    return path, _exact(path, rest)


@made("encoding-utf16-le")
def _utf16le(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    return _encoded(folder, SCENARIO.encode("utf-16"), ": is UTF-16 text (it starts with a "
                                                       "UTF-16 byte order mark); save it as UTF-8")


@made("encoding-utf16-be")
def _utf16be(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    return _encoded(folder, b"\xfe\xff" + SCENARIO.encode("utf-16-be"),
                    ": is UTF-16 text (it starts with a UTF-16 byte order mark); save it as "
                    "UTF-8")


@made("encoding-utf32")
def _utf32(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    return _encoded(folder, SCENARIO.encode("utf-32"), ": is UTF-32 text (it starts with a "
                                                       "UTF-32 byte order mark); save it as UTF-8")


@made("encoding-utf16-without-bom")
def _utf16_bare(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    return _encoded(folder, SCENARIO.encode("utf-16-le"),
                    ":1: holds a NUL byte (at byte 1): a binary or UTF-16 file, not UTF-8 text")


@made("encoding-latin1")
def _latin1(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    return _encoded(folder, (SCENARIO + "description: café\n").encode("latin-1"),
                    f":5: not UTF-8 text (invalid continuation byte at byte {len(SCENARIO) + 16})")


@made("encoding-overlong-utf8")
def _overlong(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    return _encoded(folder, SCENARIO.encode() + b"description: \xc0\xaf\n",
                    f":5: not UTF-8 text (invalid start byte at byte {len(SCENARIO) + 13})")


@made("encoding-utf8-surrogate")
def _surrogate(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    return _encoded(folder, SCENARIO.encode() + b"description: \xed\xa0\x80\n",
                    f":5: not UTF-8 text (invalid continuation byte at byte {len(SCENARIO) + 13})")


@made("encoding-nul-in-line-3")
def _nul(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    return _encoded(folder, SCENARIO.replace("name: vm", "name: v\0m").encode(),
                    ":3: holds a NUL byte (at byte 24): a binary or UTF-16 file, not UTF-8 text")


@made("encoding-elf-binary")
def _elf(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    return _encoded(folder, b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4,
                    ":1: holds a NUL byte (at byte 7): a binary or UTF-16 file, not UTF-8 text")


@made("encoding-gzip")
def _gzip(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    import gzip

    return _encoded(folder, gzip.compress(SCENARIO.encode(), mtime=0),
                    ":1: holds a NUL byte (at byte 3): a binary or UTF-16 file, not UTF-8 text")


@made("encoding-c1-control")
def _c1(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    return _encoded(folder, (SCENARIO + "description: a\u0080b\n").encode(),
                    ":5: invalid YAML: special characters are not allowed (U+0080)")


# what validate must never do: run the binary a scenario names

MARKER_SCRIPT = "#!/bin/sh\ntouch {marker}\n"


@made("trust-qemu-script-not-run")
def _qemu_script(folder: Path) -> tuple[Path, str | re.Pattern[str]]:
    script = _write(folder, MARKER_SCRIPT.format(marker=folder / "ran"), "make-marker.sh")
    script.chmod(0o755)
    path = _write(folder, SCENARIO.replace("    devices", "    arch: x86_64\n    qemu: "
                                                          "./make-marker.sh\n    devices"))
    return path, _exact(path, ":5: vms[0].qemu: must be a QEMU system emulator named "
                              "qemu-system-x86_64 (or qemu-system-x86_64-SUFFIX), on PATH or as a "
                              "path, got './make-marker.sh'; the harness runs it as root")


@pytest.mark.parametrize("name", sorted(MADE))
def test_made_case_is_one_line_exit_2(validator: Validator, name: str, tmp_path: Path) -> None:
    path, message = MADE[name](tmp_path)
    before = sorted(tmp_path.rglob("*"))

    assert_refused(validator.run(path), message)
    assert sorted(tmp_path.rglob("*")) == before  # nothing made, nothing removed


def test_the_corpus_is_large_enough() -> None:
    assert len(CORPUS_FILES) + len(MADE) >= 80


# --- what still validates ---------------------------------------------------------------------


def test_a_qemu_named_as_one_is_accepted_and_never_run(validator: Validator,
                                                       tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    script = _write(tmp_path, MARKER_SCRIPT.format(marker=marker), "qemu-system-x86_64")
    script.chmod(0o755)
    path = _write(tmp_path, SCENARIO.replace("    devices", "    arch: x86_64\n    qemu: "
                                                            "./qemu-system-x86_64\n    devices"))

    outcome = validator.run(path)

    assert (outcome.code, outcome.stderr) == (0, ""), outcome.stderr
    assert outcome.stdout == f"{path}: ok (n: 1 VM(s), 0 workload(s), 0 expectation(s))\n"
    assert not marker.exists()
    assert_bounded_and_inert(outcome)


@pytest.mark.parametrize(("name", "text"), [
    ("utf8-bom", "\ufeff" + SCENARIO),
    ("crlf", SCENARIO.replace("\n", "\r\n")),
    ("at-the-size-limit", SCENARIO + "#" * (MAX_FILE_BYTES - len(SCENARIO) - 1) + "\n"),
    ("every-allowed-option", SCENARIO.replace("    devices", """\
    machine: q35,kernel-irqchip=split
    arch: x86_64
    extra_args: [-device, "virtio-rng-pci,rng=rng0,id=rng-dev", -object, "rng-random,id=rng0,\
filename=/dev/urandom", -global, "virtio-pci.disable-legacy=on", -trace, "vfio_*", -trace,
                 "enable=kvm_*", -d, "int,guest_errors,trace:pci_*", --icount, "shift=auto",
                 -rtc, "base=utc,clock=vm", -overcommit, "mem-lock=off", -msg, "timestamp=on"]
    devices""")),
])
def test_valid_edges_still_validate(validator: Validator, tmp_path: Path, name: str,
                                    text: str) -> None:
    path = _write(tmp_path, text)

    outcome = validator.run(path)

    assert (outcome.code, outcome.stderr) == (0, ""), outcome.stderr
    assert_bounded_and_inert(outcome)


def test_the_measures_can_fail(validator: Validator, tmp_path: Path) -> None:
    # Each bound must be able to catch a case: too slow, too big, or acting outside.
    path, _ = MADE["size-long-text-then-error"](tmp_path)

    assert validator.run(path, seconds=0.001).timed_out
    assert validator.run(path, memory=_vm_size()).code != 2  # MemoryError: no room to read
    moved = validator.run(_write(tmp_path, SCENARIO.replace(
        "    devices", "    image: {kind: builtin, recipe: nosuch}\n    devices"), "r.yaml"),
        {"HARNESS_GUEST_IMAGES": "/proc/self"})  # recipes listed outside the allowed folders
    assert moved.code == 2
    assert any(act.startswith("os.scandir /proc/self") for act in moved.acts), moved.acts


def _vm_size() -> int:
    """The address space of a fresh interpreter with the harness imported, in bytes."""
    done = subprocess.run([sys.executable, "-c", "import harness.cli, harness.config; "
                           "print(open('/proc/self/status').read())"],
                          capture_output=True, text=True, check=True)
    found = re.search(r"VmSize:\s+(\d+) kB", done.stdout)
    assert found is not None
    return int(found.group(1)) << 10


# --- the real command line ------------------------------------------------------------------


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _harness_validate(path: Path, env: Mapping[str, str] | None = None
                      ) -> tuple[subprocess.CompletedProcess[str], float]:
    """``python -m harness.cli validate`` in a fresh interpreter whose address space is capped
    at 100 MiB; its result and wall time (an interpreter start included)."""
    start = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "harness.cli", "validate", str(path)], capture_output=True,
            text=True, preexec_fn=_limit_memory, timeout=20, check=False, cwd=path.parent,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HARNESS_SHARED_HOST": "0",
                 **(env or {})})
    except subprocess.TimeoutExpired:
        pytest.fail(f"harness validate {path.name} still running after 20 s")
    return done, time.monotonic() - start


@pytest.mark.parametrize("name", ["bomb-vms-of-devices", "depth-flow-lists", "special-fifo",
                                  "size-long-text-then-error"])
def test_the_command_line_gives_the_same_line(tmp_path: Path, name: str) -> None:
    path, message = MADE[name](tmp_path)

    done, seconds = _harness_validate(path)

    assert (done.returncode, done.stdout) == (2, "")
    line = done.stderr.removeprefix("harness: error: ").removesuffix("\n")
    assert "\n" not in line
    assert line == message if isinstance(message, str) else message.fullmatch(line), line
    assert seconds < 10  # an interpreter start included; the 2 s bound is measured above


def test_the_command_line_on_a_shared_host(tmp_path: Path) -> None:
    path = _write(tmp_path, SCENARIO.replace("    devices", "    extra_args: [-trace, vfio_*]\n"
                                                            "    devices"))

    done, _ = _harness_validate(path, {"HARNESS_SHARED_HOST": "1"})

    assert (done.returncode, done.stderr) == (2, (
        f"harness: error: {path}:4: vms[0].extra_args: refused on a shared host "
        "(HARNESS_SHARED_HOST=1): a scenario may not pass QEMU arguments of its own\n"))
    done, _ = _harness_validate(path, {"HARNESS_SHARED_HOST": "0"})
    assert done.returncode == 0, done.stderr


def test_shared_host_setting_is_0_or_1() -> None:
    assert shared_host_from_env({}) is False
    assert shared_host_from_env({"HARNESS_SHARED_HOST": "0"}) is False
    assert shared_host_from_env({"HARNESS_SHARED_HOST": "1"}) is True
    with pytest.raises(UsageError) as info:
        shared_host_from_env({"HARNESS_SHARED_HOST": "yes"})
    assert str(info.value) == "HARNESS_SHARED_HOST must be 1 (a shared host) or 0, got 'yes'"
    assert info.value.exit_code == 2


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
