"""Verdicts from evidence: every branch of classify(), and check() against expectations."""

from __future__ import annotations

import dataclasses

import pytest

from harness.bypass.tracker import Wiring
from harness.config import load_scenario_text
from harness.config.model import DeliveryPath, Expectation
from harness.host.vgic import VgicAgreement
from harness.verdict import (
    BOUNCE_MIN_RATIO,
    POSTED_MAX_RATIO,
    ExpectationResult,
    VectorVerdict,
    check,
    check_released,
    classify,
)

CONNECTED = Wiring(producer=True, consumer=True, connected=True)
POSTED = Wiring(producer=True, consumer=True, connected=True, posted=True)
PRODUCER_ONLY = Wiring(producer=True, consumer=False, connected=False)


# --- classify ---------------------------------------------------------------------------------


@pytest.mark.parametrize("emulated", [True, False])
@pytest.mark.parametrize("guest_delta", [0, -3])
def test_no_guest_interrupts_is_not_delivered(emulated: bool, guest_delta: int) -> None:
    path, reason = classify(emulated, guest_delta, 500, CONNECTED)
    assert path is DeliveryPath.NOT_DELIVERED
    assert reason == "the guest's count did not rise"


def test_emulated_device_ignores_host_evidence() -> None:
    path, reason = classify(True, 121, None, None)
    assert path is DeliveryPath.EMULATED
    assert "121 interrupts" in reason and "emulated device" in reason
    assert classify(True, 121, 999, PRODUCER_ONLY)[0] is DeliveryPath.EMULATED


def test_assigned_without_host_vector_is_inconclusive() -> None:
    path, reason = classify(False, 100, None, CONNECTED)
    assert path is None
    assert "host vfio vector was not found" in reason


def test_assigned_without_wiring_is_inconclusive() -> None:
    path, reason = classify(False, 100, 100, None)
    assert path is None
    assert "no bypass wiring was observed" in reason


def test_posted_when_irte_posted_and_host_quiet() -> None:
    path, reason = classify(False, 1000, 3, POSTED)
    assert path is DeliveryPath.POSTED
    assert "host 3 / guest 1000 = 0.00" in reason


def test_posted_boundary_ratio_is_inclusive() -> None:
    assert POSTED_MAX_RATIO == 0.1
    assert classify(False, 1000, 100, POSTED)[0] is DeliveryPath.POSTED
    assert classify(False, 1000, 101, POSTED)[0] is not DeliveryPath.POSTED


def test_irqfd_bounce_when_connected_and_host_saw_each_irq() -> None:
    path, reason = classify(False, 200, 201, CONNECTED)
    assert path is DeliveryPath.IRQFD_BOUNCE
    assert "host 201 / guest 200 = 1.00" in reason
    assert "KVM irqfd consumer" in reason


def test_bounce_boundary_ratio_is_inclusive() -> None:
    assert BOUNCE_MIN_RATIO == 0.5
    assert classify(False, 200, 100, CONNECTED)[0] is DeliveryPath.IRQFD_BOUNCE
    assert classify(False, 200, 99, CONNECTED)[0] is None


def test_posted_irte_but_host_saw_everything_is_a_bounce() -> None:
    # Posting that did not take: the host still handled every IRQ, so the evidence wins.
    assert classify(False, 100, 100, POSTED)[0] is DeliveryPath.IRQFD_BOUNCE


def test_userspace_bounce_when_producer_has_no_consumer() -> None:
    path, reason = classify(False, 80, 80, PRODUCER_ONLY)
    assert path is DeliveryPath.USERSPACE_BOUNCE
    assert "host 80 / guest 80 = 1.00" in reason
    assert "QEMU relays" in reason


def test_too_few_host_irqs_is_inconclusive_with_numbers_and_detail() -> None:
    wiring = Wiring(producer=True, consumer=True, connected=True, detail="IRTE remapped")
    path, reason = classify(False, 1000, 300, wiring)
    assert path is None
    assert "host 300 / guest 1000 = 0.30" in reason
    assert reason.endswith("is not posted: IRTE remapped")
    path, reason = classify(False, 1000, 300, CONNECTED)
    assert path is None and reason.endswith("is not posted")


def test_too_few_host_irqs_with_posted_irte_does_not_deny_posting() -> None:
    path, reason = classify(False, 1000, 300, POSTED)
    assert path is None
    assert "not posted" not in reason


def test_inconsistent_wiring_is_inconclusive_and_shows_it() -> None:
    wiring = Wiring(producer=False, consumer=True, connected=False)
    path, reason = classify(False, 50, 50, wiring)
    assert path is None
    assert "host 50 / guest 50 = 1.00" in reason
    assert "producer=False consumer=True connected=False" in reason


# --- arm64: GICv4 vLPIs and the VM's vgic-state ---------------------------------------------------

VLPI = Wiring(producer=True, consumer=True, connected=True, posted=True, vlpi=True)


def vgic(hw_lpis: int, traced: tuple[int, ...]) -> VgicAgreement:
    return VgicAgreement(301, ("/sys/kernel/debug/kvm/301-11/vgic-state",), 3, hw_lpis,
                         traced, "task 306 belongs to process 301")


def with_state(wiring: Wiring, state: VgicAgreement) -> Wiring:
    return Wiring(wiring.producer, wiring.consumer, wiring.connected, wiring.posted,
                  wiring.detail, wiring.vlpi, state)


def test_posted_vlpi_with_agreeing_state_names_the_mechanism_and_the_state() -> None:
    path, reason = classify(False, 102, 0, with_state(VLPI, vgic(3, (26, 27, 28))))
    assert path is DeliveryPath.POSTED
    assert reason == ("forwarded as a vLPI (GICv4 direct injection) and the host did not see "
                      "the IRQs (host 0 / guest 102 = 0.00); vgic-state agrees: VM of pid 301: "
                      "3 of 3 LPIs with H (hw) set in vgic-state, 3 vLPI mapping(s) in force "
                      "in the trace (host irqs 26, 27, 28)")


def test_posted_vlpi_without_state_says_it_was_not_read() -> None:
    path, reason = classify(False, 102, 0, VLPI)
    assert path is DeliveryPath.POSTED and reason.endswith("; vgic-state not read")


@pytest.mark.parametrize(("hw", "traced", "says"), [
    (0, (26, 27, 28), "forwarded in the trace but no H LPIs"),
    (2, (26, 27, 28), "forwarded in the trace but too few H LPIs"),
    (3, (), "H LPIs without traced forwarding"),
])
@pytest.mark.parametrize(("wiring", "host"), [(VLPI, 0), (CONNECTED, 102)])
def test_a_state_that_contradicts_the_trace_gives_no_verdict(
        hw: int, traced: tuple[int, ...], says: str, wiring: Wiring, host: int) -> None:
    path, reason = classify(False, 102, host, with_state(wiring, vgic(hw, traced)))
    assert path is None
    assert reason.startswith(f"the bypass trace and the kernel's vgic-state disagree, {says}")
    assert f"{hw} of 3 LPIs with H (hw) set" in reason
    assert reason.endswith(f"(host {host} / guest 102 = {host / 102:.2f})")


def test_an_agreeing_state_without_vlpis_leaves_the_bounce_verdicts_alone() -> None:
    assert classify(False, 102, 102, with_state(CONNECTED, vgic(0, ())))[0] is (
        DeliveryPath.IRQFD_BOUNCE)
    assert classify(False, 101, 101, with_state(PRODUCER_ONLY, vgic(0, ())))[0] is (
        DeliveryPath.USERSPACE_BOUNCE)


def test_vlpi_with_too_many_host_irqs_names_the_vlpi() -> None:
    path, reason = classify(False, 1000, 300, VLPI)
    assert path is None
    assert "forwarded as a vLPI, yet the host saw more IRQs than posting allows" in reason


def test_x86_posted_reason_is_unchanged() -> None:
    assert classify(False, 1000, 3, POSTED) == (
        DeliveryPath.POSTED, "IRTE posted and the host did not see the IRQs "
        "(host 3 / guest 1000 = 0.00)")


# --- check --------------------------------------------------------------------------------------


def verdict(name: str, entry: int | None, delta: int, path: DeliveryPath | None,
            device: str = "net0", vm: str = "guest0", reason: str = "why") -> VectorVerdict:
    return VectorVerdict(vm=vm, device=device, bdf="0000:00:03.0", entry=entry, name=name,
                         irq=str(24 + (entry or 0)), guest_delta=delta, host_delta=None,
                         wiring=None, path=path, reason=reason)


E = DeliveryPath.EMULATED
ND = DeliveryPath.NOT_DELIVERED

VIRTIO_NET = [
    verdict("virtio0-config", 0, 0, ND),
    verdict("virtio0-input.0", 1, 121, E),
    verdict("virtio0-output.0", 2, 7, E),
    verdict("virtio1-req.1", 1, 128, E, device="disk0"),
    verdict("virtio0-input.0", 1, 999, E, vm="guest1"),
]


def expect(vectors: tuple[str, ...] = (), min_delta: int = 1,
           path: DeliveryPath = E) -> Expectation:
    return Expectation(vm="guest0", device="net0", path=path, vectors=vectors,
                       min_delta=min_delta)


def test_select_by_name_pattern() -> None:
    result = check(expect(("*-input.*",), min_delta=50), VIRTIO_NET)
    assert result.passed
    assert [v.name for v in result.vectors] == ["virtio0-input.0"]
    assert result.message == "guest0/net0 expects emulated: 1 vector(s), 121 interrupts"


def test_select_by_entry_number() -> None:
    result = check(expect(("1", "2")), VIRTIO_NET)
    assert result.passed
    assert [(v.name, v.entry) for v in result.vectors] == [("virtio0-input.0", 1),
                                                          ("virtio0-output.0", 2)]
    assert result.message.endswith("2 vector(s), 128 interrupts")


def test_a_vector_selected_twice_counts_once() -> None:
    result = check(expect(("1", "*-input.*")), VIRTIO_NET)
    assert len(result.vectors) == 1


def test_unmatched_pattern_lists_the_guests_names() -> None:
    result = check(expect(("*-rx-*", "1", "9")), VIRTIO_NET)
    assert not result.passed
    assert result.message == (
        "guest0/net0 expects emulated: no vector matches *-rx-*, 9 (the guest has: "
        "virtio0-config, virtio0-input.0, virtio0-output.0)")


def test_unmatched_pattern_on_a_device_without_vectors() -> None:
    exp = Expectation(vm="guest0", device="nvme0", path=DeliveryPath.POSTED, vectors=("1",))
    result = check(exp, VIRTIO_NET)
    assert not result.passed
    assert result.message.endswith("no vector matches 1 (the guest has: none)")


def test_empty_selection_is_the_vectors_that_fired_with_a_device_total() -> None:
    # 121 + 7 = 128 interrupts over two vectors; neither alone reaches 100.
    result = check(expect(min_delta=100), VIRTIO_NET)
    assert result.passed
    assert [v.name for v in result.vectors] == ["virtio0-input.0", "virtio0-output.0"]
    assert result.message.endswith("2 vector(s), 128 interrupts")


def test_empty_selection_below_min_delta_fails_on_the_total() -> None:
    result = check(expect(min_delta=200), VIRTIO_NET)
    assert not result.passed
    assert result.message == "guest0/net0 expects emulated: 128 interrupts in all < 200"


def test_empty_selection_with_nothing_fired() -> None:
    quiet = [verdict("virtio0-input.0", 1, 0, ND)]
    result = check(expect(), quiet)
    assert not result.passed
    assert result.message == "guest0/net0 expects emulated: no vector of the device fired"
    assert result.vectors == ()


def test_named_vector_below_min_delta() -> None:
    result = check(expect(("2",), min_delta=10), VIRTIO_NET)
    assert not result.passed
    assert result.message == ("guest0/net0 expects emulated: virtio0-output.0: "
                              "7 interrupts < 10")


def test_wrong_path_names_the_path_and_the_reason() -> None:
    result = check(expect(("*-input.*",), path=DeliveryPath.POSTED), VIRTIO_NET)
    assert not result.passed
    assert result.message == "guest0/net0 expects posted: virtio0-input.0: emulated (why)"


def test_inconclusive_vector_shows_no_path() -> None:
    verdicts = [verdict("vfio-msix[1]", 1, 50, None, device="nvme0",
                        reason="assigned device, but no bypass wiring was observed")]
    exp = Expectation(vm="guest0", device="nvme0", path=DeliveryPath.POSTED)
    result = check(exp, verdicts)
    assert not result.passed
    assert result.message == ("guest0/nvme0 expects posted: vfio-msix[1]: no path "
                              "(assigned device, but no bypass wiring was observed)")


def test_several_problems_are_joined() -> None:
    result = check(expect(("0", "1"), min_delta=5, path=DeliveryPath.IRQFD_BOUNCE), VIRTIO_NET)
    assert result.message == ("guest0/net0 expects irqfd-bounce: virtio0-config: 0 interrupts "
                              "< 5; virtio0-input.0: emulated (why)")


def test_label_shows_entry_when_known() -> None:
    assert VIRTIO_NET[1].label == "guest0/net0#1 virtio0-input.0"
    assert verdict("virtio0-input.0", None, 1, E).label == "guest0/net0 virtio0-input.0"


SCENARIO_WITH_VECTORS = """\
name: entries
vms:
  - name: guest0
    devices:
      - {kind: virtio-net, id: net0}
expect:
  - {vm: guest0, device: net0, path: emulated, vectors: [%s]}
"""


def test_signed_entry_number_accepted_by_the_loader_selects_the_entry() -> None:
    scenario = load_scenario_text(SCENARIO_WITH_VECTORS % '"+1"', "entries.yaml")
    result = check(scenario.expect[0], VIRTIO_NET)
    assert [v.entry for v in result.vectors] == [1]
    assert result.passed


def test_non_ascii_digit_pattern_does_not_crash_check() -> None:
    scenario = load_scenario_text(SCENARIO_WITH_VECTORS % '"²"', "entries.yaml")
    result = check(scenario.expect[0], VIRTIO_NET)
    assert not result.passed
    assert "no vector matches ²" in result.message


# --- released: nothing left forwarded after the release stage --------------------------------


def _posted_result() -> ExpectationResult:
    e = Expectation(vm="l2", device="nic", path=DeliveryPath.POSTED, released=True)
    return ExpectationResult(e, True, "l2/nic expects posted: 2 vector(s), 409 interrupts")


def test_released_passes_when_nothing_is_left_and_says_how_it_knows() -> None:
    done = check_released(_posted_result(), "0000:00:05.0", [], 0, ())
    assert done.passed
    assert done.message.endswith("l2/nic released: nothing left forwarded (every vLPI mapping "
                                 "the trace saw was undone; vgic-state: no hw LPI left)")
    unread = check_released(_posted_result(), "0000:00:05.0", [], None, ("no debugfs",))
    assert unread.passed and "vgic-state not read (no debugfs)" in unread.message


@pytest.mark.parametrize(("left", "hw", "shown"), [
    ([(35, "its_map_vlpi returned 0 in kvm_vgic_v4_set_forwarding")], 0,
     "still forwarded after the release: host irq 35 (its_map_vlpi returned 0"),
    ([], 2, "vgic-state still shows 2 LPI(s) with the hw bit"),
])
def test_released_fails_on_a_mapping_left_in_force_by_either_witness(
        left: list[tuple[int, str]], hw: int, shown: str) -> None:
    done = check_released(_posted_result(), "0000:00:05.0", left, hw, ())
    assert not done.passed and shown in done.message
    assert done.message.startswith("l2/nic expects posted: 2 vector(s)")  # the path part kept


def test_released_does_not_rescue_a_failed_path() -> None:
    failed = dataclasses.replace(_posted_result(), passed=False)
    assert not check_released(failed, "0000:00:05.0", [], 0, ()).passed
