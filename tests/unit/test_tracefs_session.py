"""KprobeSession's bookkeeping against a plain directory standing in for tracefs.

A directory cannot reject a bad probe the way the kernel does; these tests check only what the
session writes and in which order (add, enable, and exactly the matching removals), which is
what keeps a host clean.  The real kernel accepts the 6.1 definitions: see test_tracker.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import HostError
from harness.host.tracefs import KprobeSession, ProbeSpec


def fake_tracefs(tmp_path: Path, functions: list[str], tracepoints: list[str]) -> Path:
    root = tmp_path / "tracing"
    (root / "events" / "grp").mkdir(parents=True)
    (root / "events" / "grp" / "enable").write_text("")  # the kernel makes it with the group
    (root / "kprobe_events").write_text("")
    (root / "trace").write_text("stale records\n")
    (root / "available_filter_functions").write_text(
        "".join(f"{f} [somemod]\n" for f in functions))
    for tp in tracepoints:
        (root / "events" / tp).mkdir(parents=True)
        (root / "events" / tp / "enable").write_text("0\n")
    return root


PROBES = [ProbeSpec("a", "func_a", "x=$arg1:x64"), ProbeSpec("a_ret", "func_a", "ret=$retval",
                                                              ret=True),
          ProbeSpec("b", "func_b", optional=True)]


def test_session_adds_enables_and_removes_exactly_its_own(tmp_path: Path) -> None:
    root = fake_tracefs(tmp_path, ["func_a"], ["kvm/kvm_pi_irte_update"])
    with KprobeSession("grp", PROBES, ["kvm/kvm_pi_irte_update", "kvm/absent"], root) as s:
        assert (root / "trace").read_text() == "\n", "the buffer is cleared at start"
        assert [p.name for p in s.added] == ["a", "a_ret"]
        assert (root / "events" / "grp" / "enable").read_text() == "1\n"
        assert (root / "events" / "kvm" / "kvm_pi_irte_update" / "enable").read_text() == "1\n"
        assert any("func_b" in note for note in s.skipped)
        assert any("kvm/absent" in note for note in s.skipped)
    assert (root / "kprobe_events").read_text().splitlines() == [
        "p:grp/a somemod:func_a x=$arg1:x64", "r:grp/a_ret somemod:func_a ret=$retval",
        "-:grp/a_ret", "-:grp/a"]
    assert (root / "events" / "grp" / "enable").read_text() == "0\n"
    assert (root / "events" / "kvm" / "kvm_pi_irte_update" / "enable").read_text() == "0\n"


def test_a_missing_required_symbol_fails_and_removes_what_was_added(tmp_path: Path) -> None:
    root = fake_tracefs(tmp_path, ["func_a"], [])
    probes = [PROBES[0], ProbeSpec("c", "func_c")]
    session = KprobeSession("grp", probes, [], root)
    with pytest.raises(HostError, match="func_c: not in available_filter_functions"):
        session.start()
    assert (root / "kprobe_events").read_text().splitlines() == [
        "p:grp/a somemod:func_a x=$arg1:x64", "-:grp/a"]
    session.stop()  # twice is harmless
    assert (root / "kprobe_events").read_text().count("-:grp/a") == 1


def test_a_bad_group_name_is_refused() -> None:
    with pytest.raises(ValueError, match="bad kprobe group"):
        KprobeSession("a/b", PROBES)
