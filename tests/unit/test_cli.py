"""The ``harness`` command in-process: exit codes, one-line errors, and what it prints.

Only subcommands that boot nothing are run here (validate, schema, irq diff, and the usage and
input errors every subcommand reports before it starts anything).
"""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import jsonschema  # type: ignore[import-untyped]
import pytest

from harness.cli import main
from harness.config import scenario_json_schema

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "tests" / "data" / "configs"
IRQ = REPO / "tests" / "data" / "interrupts"
BEFORE = IRQ / "arm64-xen-dom0-before.txt"
AFTER = IRQ / "arm64-xen-dom0-after.txt"


@pytest.fixture(autouse=True)
def process_state() -> Iterator[None]:
    """main() installs a SIGTERM handler and may configure logging: put both back."""
    handler = signal.getsignal(signal.SIGTERM)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, handler)
        root.handlers[:] = handlers
        root.setLevel(level)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("harness: error: ")
    return lines[0].removeprefix("harness: error: ")


# --- validate ----------------------------------------------------------------------------------


def test_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    smoke = REPO / "configs" / "smoke.yaml"
    minimal = CONFIGS / "valid-minimal.yaml"
    code, out, err = run(capsys, "validate", str(smoke), str(minimal))
    assert code == 0
    assert err == ""
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{smoke}: ok (smoke: 1 VM(s), ")
    assert lines[1].startswith(f"{minimal}: ok (")


def test_validate_error_is_exit_2_and_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    bad = CONFIGS / "bad-enum.yaml"
    code, out, err = run(capsys, "validate", str(bad))
    assert code == 2
    assert out == ""
    assert one_line_error(err) == (f"{bad}:4: vms[0].accel: unknown value 'kvmm' (did you mean "
                                   "'kvm'?); allowed values: auto, kvm, tcg")


def test_validate_stops_at_the_first_bad_file(capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = CONFIGS / "valid-minimal.yaml", CONFIGS / "bad-enum.yaml"
    code, out, err = run(capsys, "validate", str(good), str(bad))
    assert code == 2
    assert out.startswith(f"{good}: ok")
    assert one_line_error(err).startswith(f"{bad}:4: ")


def test_validate_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "validate", str(tmp_path / "nope.yaml"))
    assert code == 2
    missing = tmp_path / "nope.yaml"
    assert one_line_error(err) == f"{missing}: cannot read: No such file or directory"


def test_run_refuses_a_bad_scenario_before_starting_anything(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run(capsys, "run", str(CONFIGS / "bad-enum.yaml"), "--out", str(tmp_path))
    assert code == 2
    assert out == ""
    assert one_line_error(err).startswith(f"{CONFIGS / 'bad-enum.yaml'}:4: vms[0].accel: ")
    assert list(tmp_path.iterdir()) == []  # no run folder for a run that never started


# --- schema ---------------------------------------------------------------------------------------


def test_schema_prints_the_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "schema")
    assert code == 0 and err == ""
    schema = json.loads(out)
    assert schema == json.loads(json.dumps(scenario_json_schema()))
    jsonschema.validators.validator_for(schema).check_schema(schema)
    root = schema["$defs"][schema["$ref"].removeprefix("#/$defs/")]
    assert "vms" in root["properties"]
    # The copy published for editors is this output.
    assert json.loads((REPO / "configs" / "scenario.schema.json").read_text()) == schema


# --- irq diff -------------------------------------------------------------------------------------


def table_rows(out: str) -> dict[tuple[str, str], list[str]]:
    lines = out.splitlines()
    assert lines[0].split() == ["IRQ", "DEVICE", "ENTRY", "NAME", "CPU0", "CPU1", "TOTAL", "NOTE"]
    assert set(lines[1]) <= {"-", " "}
    rows: dict[tuple[str, str], list[str]] = {}
    for line in lines[2:]:
        if line.strip():
            cells = line.split()
            rows[(cells[0], cells[3])] = cells
    return rows


def test_irq_diff_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "irq", "diff", str(BEFORE), str(AFTER))
    assert code == 0 and err == ""
    rows = table_rows(out)
    # xenbus: 0 92 -> 0 94.
    assert rows[("0", "xenbus")] == ["0", "-", "-", "xenbus", "0", "2", "2"]
    # nvme0q0 (ITS-MSI 524288 = 0000:01:00.0 entry 0) dropped 17 -> 10: a reboot in between.
    assert rows[("37", "nvme0q0")] == ["37", "0000:01:00.0", "0", "nvme0q0", "10", "0", "10",
                                       "reset"]
    # IRQ 38 and 40 swapped owners: the old rows vanished, the new ones appeared.
    assert rows[("38", "nvme0q1")][-2:] == ["48", "appeared"]
    assert rows[("38", "sysmon-irq")][-1] == "vanished"
    assert rows[("39", "nvme0q2")][1:3] == ["0000:01:00.0", "2"]
    # Unchanged rows (the RC-Event ones) are left out without --all.
    assert ("15", "LINK_DOWN") not in rows


def test_irq_diff_all_rows(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "irq", "diff", "--all", str(BEFORE), str(AFTER))
    assert code == 0
    rows = table_rows(out)
    assert rows[("15", "LINK_DOWN")] == ["15", "-", "-", "LINK_DOWN", "0", "0", "0"]


def test_irq_diff_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "irq", "diff", str(BEFORE), str(AFTER), "--json")
    assert code == 0 and err == ""
    data = json.loads(out)
    assert data["before"] == str(BEFORE) and data["after"] == str(AFTER)
    assert data["cpus"] == ["CPU0", "CPU1"] and data["cpus_changed"] is False
    by_key = {(r["label"], r["name"], r["status"]): r for r in data["rows"]}
    appeared = by_key[("38", "nvme0q1", "appeared")]
    # ITS-MSI hwirq 524289 = (0x0100 << 11) | 1, i.e. 0000:01:00.0 entry 1; the arm64 ITS
    # domain does not say whether it is MSI or MSI-X.
    assert appeared["vector"] == {"bdf": "0000:01:00.0", "entry": 1, "kind": "msi-or-msix"}
    assert appeared["per_cpu"] == [48, 0] and appeared["total"] == 48
    xenbus = by_key[("0", "xenbus", "both")]
    assert xenbus["per_cpu"] == [0, 2] and xenbus["reset"] is False
    assert by_key[("37", "nvme0q0", "both")]["reset"] is True


def test_irq_diff_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "before.txt"
    code, out, err = run(capsys, "irq", "diff", str(missing), str(AFTER))
    assert code == 2 and out == ""
    assert one_line_error(err) == f"{missing}: No such file or directory"


def test_irq_diff_of_text_that_is_not_proc_interrupts(
        capsys: pytest.CaptureFixture[str]) -> None:
    smoke = REPO / "configs" / "smoke.yaml"
    code, _, err = run(capsys, "irq", "diff", str(smoke), str(AFTER))
    assert code == 2
    assert one_line_error(err).startswith(f"{smoke}:1: ")


def test_irq_diff_of_a_binary_file_is_a_one_line_error(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    binary = tmp_path / "core"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(128, 256)))
    code, _, err = run(capsys, "irq", "diff", str(binary), str(AFTER))
    assert code == 2
    assert one_line_error(err).startswith(f"{binary}: ")


# --- usage ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: command"),
    (["irq"], "the following arguments are required: irq_command"),
    (["irq", "diff", "only-one"], "the following arguments are required: after"),
    (["bench", "x.yaml", "--repeat", "0"], "--repeat must be at least 1"),
    (["bench", "x.yaml", "--repeat", "many"], "invalid int value: 'many'"),
    (["validate"], "the following arguments are required: files"),
])
def test_usage_errors_are_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str],
                                 message: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert message in one_line_error(err)


def test_image_build_of_an_unknown_recipe_is_bad_input(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "packages.txt").write_text("kernel linux-image-amd64\n")
    monkeypatch.setenv("HARNESS_GUEST_IMAGES", str(tmp_path))
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    code, out, err = run(capsys, "image", "build", "nope")
    assert code == 2 and out == ""
    assert one_line_error(err) == "no image recipe 'nope'; the recipes are mine"


@pytest.mark.parametrize(("argv", "message"), [
    (["image", "build", "nosuch"], "harness: error: no image recipe 'nosuch'; the recipes are "),
    (["preflight", "--device", "zzzz"], "harness: error: --device zzzz: not a PCI address"),
    (["preflight", "--root", "/nonexistent"],
     "harness: error: --root /nonexistent: not a folder"),
])
def test_bad_input_to_other_commands_is_exit_2_and_one_line(
        capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1
