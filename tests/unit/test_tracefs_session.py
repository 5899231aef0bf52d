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
    """The files a session touches.  The kernel makes an instance's events/ when the instance
    is made; a directory cannot, so the fake instance ``inst`` exists beforehand."""
    root = tmp_path / "tracing"
    events = root / "instances" / "inst" / "events"
    (events / "grp").mkdir(parents=True)
    (events / "grp" / "enable").write_text("")
    (root / "kprobe_events").write_text("")
    (root / "available_filter_functions").write_text(
        "".join(f"{f} [somemod]\n" for f in functions))
    for tp in tracepoints:
        (events / tp).mkdir(parents=True)
        (events / tp / "enable").write_text("0\n")
    return root


PROBES = [ProbeSpec("a", "func_a", "x=$arg1:x64"), ProbeSpec("a_ret", "func_a", "ret=$retval",
                                                              ret=True),
          ProbeSpec("b", "func_b", optional=True)]


def test_session_adds_enables_in_its_instance_and_removes_exactly_its_own(
        tmp_path: Path) -> None:
    root = fake_tracefs(tmp_path, ["func_a"], ["kvm/kvm_pi_irte_update"])
    events = root / "instances" / "inst" / "events"
    with KprobeSession("grp", PROBES, ["kvm/kvm_pi_irte_update", "kvm/absent"], root,
                       instance="inst") as s:
        assert [p.name for p in s.added] == ["a", "a_ret"]
        assert (events / "grp" / "enable").read_text() == "1\n"
        assert (events / "kvm" / "kvm_pi_irte_update" / "enable").read_text() == "1\n"
        assert not (root / "events").exists(), "nothing is enabled outside the instance"
        assert any("func_b" in note for note in s.skipped)
        assert any("kvm/absent" in note for note in s.skipped)
    assert (root / "kprobe_events").read_text().splitlines() == [
        "p:grp/a somemod:func_a x=$arg1:x64", "r:grp/a_ret somemod:func_a ret=$retval",
        "-:grp/a_ret", "-:grp/a"]
    assert (events / "grp" / "enable").read_text() == "0\n"
    assert (events / "kvm" / "kvm_pi_irte_update" / "enable").read_text() == "0\n"


def test_an_instance_the_session_made_is_removed(tmp_path: Path) -> None:
    root = fake_tracefs(tmp_path, ["func_a"], [])
    session = KprobeSession("grp", [], [], root, instance="mine")
    session.start()
    assert (root / "instances" / "mine").is_dir()
    session.stop()
    assert not (root / "instances" / "mine").exists()


def test_a_missing_required_symbol_fails_and_removes_what_was_added(tmp_path: Path) -> None:
    root = fake_tracefs(tmp_path, ["func_a"], [])
    probes = [PROBES[0], ProbeSpec("c", "func_c")]
    session = KprobeSession("grp", probes, [], root, instance="inst")
    with pytest.raises(HostError, match="func_c: not in available_filter_functions"):
        session.start()
    assert (root / "kprobe_events").read_text().splitlines() == [
        "p:grp/a somemod:func_a x=$arg1:x64", "-:grp/a"]
    session.stop()  # twice is harmless
    assert (root / "kprobe_events").read_text().count("-:grp/a") == 1


def test_a_bad_group_name_is_refused() -> None:
    with pytest.raises(ValueError, match="bad kprobe group"):
        KprobeSession("a/b", PROBES)


def test_stale_sessions_of_dead_processes_are_removed_and_live_ones_kept(
        tmp_path: Path) -> None:
    import os

    from harness.host.tracefs import remove_stale_sessions

    root = tmp_path / "tracing"
    dead, alive = "hx_4194303", f"hx_{os.getpid()}"  # 4194303: above any pid_max
    for group in (dead, alive):
        enable = root / "instances" / group / "events" / group / "enable"
        enable.parent.mkdir(parents=True)
        enable.write_text("1\n")
    (root / "kprobe_events").write_text(
        f"p:{dead}/prod irqbypass:irq_bypass_register_producer\n"
        f"r10:{dead}/prod_ret irqbypass:irq_bypass_register_producer\n"
        f"p:{alive}/prod irqbypass:irq_bypass_register_producer\n")
    (root / "instances" / dead / "events" / dead / "enable").unlink()  # rmdir needs it empty
    (root / "instances" / dead / "events" / dead).rmdir()
    (root / "instances" / dead / "events").rmdir()
    assert remove_stale_sessions("hx", root) == [dead]
    removals = (root / "kprobe_events").read_text().splitlines()[3:]
    assert removals == [f"-:{dead}/prod_ret", f"-:{dead}/prod"]
    assert not (root / "instances" / dead).exists()
    assert (root / "instances" / alive).is_dir()


def test_available_finds_whole_names_only_with_their_modules(tmp_path: Path) -> None:
    """Lines as the kernel writes them: "name" for built-in code, "name [module]" else; a
    wanted name that is only a prefix or a part of other names is not there."""
    root = tmp_path / "tracing"
    root.mkdir()
    (root / "available_filter_functions").write_text(
        "kvm_irqfd_assign [kvm]\n"
        "irq_bypass_register_producer [irqbypass]\n"
        "__kvm_irqfd [kvm]\n"
        "kvm_irqfd [kvm]\n"
        "vfio_msi_set_vector_signal [vfio_pci_core]\n"
        "its_map_vlpi\n"
        "x_vgic_v4_set_forwarding_y\n")
    session = KprobeSession("grp", [], tracefs=root)
    found = session._available(["kvm_irqfd", "irq_bypass_register_producer", "its_map_vlpi",
                                "vgic_v4_set_forwarding", "kvm_irqfd", "missing"])
    assert found == {"kvm_irqfd": "kvm", "irq_bypass_register_producer": "irqbypass",
                     "its_map_vlpi": None}
