"""The KVM probe: its hand-assembled programs, and how it reads what QEMU answers.

The programs are checked here by their structure (every jump lands where the comment beside
it says); tests/system/test_kvm_probe.py runs them under TCG.  The answers are read from
stand-in QEMUs: small executables that behave as QEMU does in each case (the marker on the
serial port, an error on stderr and an abort as on this CI machine, an early exit, silence)
and are started through the same argv, pipes and process group as the real one.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

from harness.host import accel
from harness.host.accel import (
    PROBE_MARKER,
    PROBE_TIMEOUT_S,
    KvmProbe,
    cached_probe_kvm,
    choose_accel,
    probe_kvm,
    run_probe_program,
)
from harness.platform import ARM64, PLATFORMS, X86_64, Accel, host_platform

# --- the programs ---------------------------------------------------------------------------


def test_x86_program_starts_at_the_reset_vector_and_reads_the_marker_through_cs() -> None:
    image = X86_64.kvm_probe.build(PROBE_MARKER)
    assert len(image) == 0x10000  # QEMU's -bios takes whole 64 KiB units
    # jmp near rel16 at 0xfff0 (CS:IP at reset), landing on cli at the code's start
    assert image[0xFFF0] == 0xE9
    code = 0xFFF3 + struct.unpack_from("<h", image, 0xFFF1)[0]
    assert image[code:code + 2] == b"\xfa\xfc"  # cli; cld
    assert image[code + 2:code + 5] == b"\xba\xf8\x03"  # mov dx, COM1
    assert image[code + 5] == 0xBE  # mov si, marker
    text = struct.unpack_from("<H", image, code + 6)[0]
    assert image[text:text + len(PROBE_MARKER) + 1] == PROBE_MARKER + b"\0"
    loop = code + 8
    assert image[loop:loop + 2] == b"\x2e\xac"  # cs lodsb
    jz, jmp = loop + 4, loop + 7
    assert image[jz] == 0x74 and image[jmp] == 0xEB
    done = jz + 2 + struct.unpack_from("<b", image, jz + 1)[0]
    assert jmp + 2 + struct.unpack_from("<b", image, jmp + 1)[0] == loop
    assert image[done:done + 6] == b"\xba\xf9\x0c\xb0\x06\xee"  # out 0xcf9, 6: reset
    halt = done + 6
    assert image[halt] == 0xF4 and halt + 3 + struct.unpack_from("<b", image, halt + 2)[0] == halt
    # nothing else in the image: the program, the marker and the reset vector
    rest = bytearray(image)
    rest[code:halt + 3] = bytes(halt + 3 - code)
    rest[text:text + len(PROBE_MARKER)] = bytes(len(PROBE_MARKER))
    rest[0xFFF0:0xFFF3] = bytes(3)
    assert not any(rest)


def _a64_words(program: bytes, count: int) -> list[int]:
    return list(struct.unpack_from(f"<{count}I", program))


def test_arm64_program_jumps_land_on_its_own_instructions_and_the_marker() -> None:
    program = ARM64.kvm_probe.build(PROBE_MARKER)
    code_words = 13
    words = _a64_words(program, code_words)
    assert program[code_words * 4:] == PROBE_MARKER + b"\0"
    assert words[0] == 0xD2A12001  # movz x1, #0x0900, lsl #16: the PL011 at 0x09000000
    adr = words[3]
    assert adr & 0x9F000000 == 0x10000000 and adr & 0x1F == 2
    imm = ((adr >> 5) & 0x7FFFF) << 2 | (adr >> 29) & 3
    assert 3 * 4 + imm == code_words * 4  # adr x2 -> the marker, right after the code
    cbz = words[5]
    assert cbz & 0xFF000000 == 0x34000000
    done = 5 * 4 + (((cbz >> 5) & 0x7FFFF) << 2)
    assert done == 8 * 4
    branch = words[7]
    offset = (branch & 0x3FFFFFF) - (1 << 26) if branch & (1 << 25) else branch & 0x3FFFFFF
    assert 7 * 4 + offset * 4 == 4 * 4  # b loop -> ldrb
    # w0 = 0x84000008 (PSCI SYSTEM_OFF), then hvc #0
    assert words[8] == 0x52800000 | 0x0008 << 5
    assert words[9] == 0x72A00000 | 0x8400 << 5
    assert words[10] == 0xD4000002


@pytest.mark.parametrize("platform", list(PLATFORMS.values()), ids=str)
def test_a_marker_with_a_nul_is_refused(platform: object) -> None:
    with pytest.raises(ValueError, match="NUL"):
        platform.kvm_probe.build(b"a\0b")  # type: ignore[attr-defined]


# --- reading QEMU's answer ------------------------------------------------------------------


def _stand_in(tmp_path: Path, body: str) -> str:
    """An executable that answers as QEMU does in one case (it gets QEMU's argv).  In its
    body, ``running`` answers the probe's two QMP commands on the descriptor the argv names,
    as QEMU does once its paused vCPU is let run."""
    path = tmp_path / "fake-qemu"
    path.write_text("#!/bin/bash\n"
                    'for a in "$@"; do\n'
                    '  case "$a" in socket,id=qmp,fd=*) fd=${a##*fd=};; esac\n'
                    'done\n'
                    "running() { printf '%s\\n' '{\"return\": {}}' '{\"return\": {}}' >&$fd; }\n"
                    f"{body}\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def kvm_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    # /dev/kvm's own check is not what these tests are about; what QEMU answers is.
    monkeypatch.setattr(accel, "kvm_device_problem", lambda dev=None: None)


def test_the_marker_on_the_serial_port_means_usable(tmp_path: Path, kvm_opens: None) -> None:
    qemu = _stand_in(tmp_path, "running; sleep 0.2; printf 'HARNESS-KVM-PROBE-OK\\n'; "
                               "exec sleep 30")
    probe = probe_kvm(host_platform(), qemu)
    assert probe.usable and probe.definite, probe
    assert re.fullmatch(r"a guest program ran under KVM and wrote to the serial port \d+ ms "
                        r"after its vCPU started \(QEMU's own start: \d+ ms\)", probe.reason)
    assert probe.seconds < 30  # answered at the marker, QEMU not waited for


def test_qemus_error_is_quoted(tmp_path: Path, kvm_opens: None) -> None:
    # As on this CI machine: QEMU 7.2 asserts while setting the vCPU's MSRs, and aborts.
    qemu = _stand_in(tmp_path, "echo \"qemu: ../../target/i386/kvm/kvm.c:3183: "
                               "kvm_buf_set_msrs: Assertion failed.\" >&2; kill -ABRT $$")
    probe = probe_kvm(host_platform(), qemu)
    assert not probe.usable and probe.definite
    assert probe.reason == ("QEMU with -accel kvm -cpu host failed: qemu: ../../target/i386/kvm/"
                            "kvm.c:3183: kvm_buf_set_msrs: Assertion failed.")


def test_a_silent_exit_is_named_with_its_status(tmp_path: Path, kvm_opens: None) -> None:
    probe = probe_kvm(host_platform(), _stand_in(tmp_path, "exit 3"))
    assert not probe.usable and probe.definite
    assert probe.reason == ("QEMU exited 3 under KVM before the guest program wrote anything "
                            "to the serial port")


def test_silence_ends_at_the_timeout_and_is_not_cached(tmp_path: Path, kvm_opens: None) -> None:
    # QEMU up, its vCPU let run, and nothing on the serial port: a vCPU that never runs.
    qemu = _stand_in(tmp_path, "running; exec sleep 30")
    probe = cached_probe_kvm(host_platform(), qemu, tmp_path / "cache")
    assert not probe.usable and not probe.definite
    assert probe.reason == (f"a guest program wrote nothing under KVM within "
                            f"{PROBE_TIMEOUT_S:g} s of its vCPU starting (/dev/kvm exists but "
                            "runs no guest code)")
    assert probe.seconds < 10  # the stand-in was killed, not waited for
    assert not (tmp_path / "cache" / "kvm-probe.json").exists()


def test_the_limit_counts_from_the_vcpus_start_not_from_qemus(
        tmp_path: Path, kvm_opens: None) -> None:
    # As in the lab's emulated host, where QEMU takes seconds to start: 1.5 s of start-up,
    # then the marker at once, is usable (the program's own time is what is limited).
    qemu = _stand_in(tmp_path, "sleep 1.5; running; printf 'HARNESS-KVM-PROBE-OK\\n'; "
                               "exec sleep 30")
    run = run_probe_program(host_platform(), qemu)
    assert run.marker_seen and run.start_seconds is not None and run.start_seconds >= 1.5
    assert probe_kvm(host_platform(), qemu).usable


def test_a_qemu_that_never_starts_is_not_cached(tmp_path: Path, kvm_opens: None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "START_TIMEOUT_S", 0.5)
    probe = cached_probe_kvm(host_platform(), _stand_in(tmp_path, "exec sleep 30"),
                             tmp_path / "cache")
    assert (probe.usable, probe.definite) == (False, False)
    assert probe.reason == "QEMU did not start its vCPU under KVM within 0.5 s"
    assert not (tmp_path / "cache").exists()


def test_a_definite_answer_is_cached_for_this_qemu(tmp_path: Path, kvm_opens: None) -> None:
    marker_file = tmp_path / "ran"
    qemu = _stand_in(tmp_path, f"echo run >> {marker_file}; echo 'no KVM for you' >&2; exit 1")
    cache = tmp_path / "cache"
    first = cached_probe_kvm(host_platform(), qemu, cache)
    again = cached_probe_kvm(host_platform(), qemu, cache)
    assert first == again and not first.usable and "no KVM for you" in first.reason
    assert marker_file.read_text() == "run\n"  # QEMU ran once
    stored = json.loads((cache / "kvm-probe.json").read_text())
    assert stored["probe"]["reason"] == first.reason
    # Another QEMU binary is another answer.
    other = _stand_in(tmp_path / "cache", "echo 'other' >&2; exit 1")
    assert "other" in cached_probe_kvm(host_platform(), other, cache).reason


def test_a_qemu_that_cannot_start_is_named(tmp_path: Path, kvm_opens: None) -> None:
    probe = probe_kvm(host_platform(), str(tmp_path / "no-such-qemu"))
    assert not probe.usable
    assert probe.reason == f"{tmp_path / 'no-such-qemu'} is not installed, so KVM cannot be probed"


def test_auto_falls_back_to_tcg_with_the_probes_reason(tmp_path: Path,
                                                       kvm_opens: None) -> None:
    qemu = _stand_in(tmp_path, "echo 'qemu: failed to initialize kvm' >&2; exit 1")
    decision = choose_accel(Accel.AUTO, host_platform(), qemu, tmp_path)
    assert (decision.accel, decision.kvm_usable) == ("tcg", False)
    assert decision.reason == ("KVM not usable, falling back to TCG: QEMU with -accel kvm "
                               "-cpu host failed: qemu: failed to initialize kvm")


def test_the_program_reaches_qemu_as_a_memfd(tmp_path: Path, kvm_opens: None) -> None:
    # The stand-in copies what QEMU would load (the argument after the platform's option).
    copy = tmp_path / "loaded"
    option = host_platform().kvm_probe.option
    qemu = _stand_in(tmp_path, f'while [ "$1" != "{option}" ]; do shift; done\n'
                               f'cat "$2" > {copy}; exit 0')
    probe_kvm(host_platform(), qemu)
    assert copy.read_bytes() == host_platform().kvm_probe.build(PROBE_MARKER)
    assert not any(p.name.startswith("harness-kvm-probe") for p in tmp_path.iterdir())


def test_kvm_probe_wrapper_names_a_missing_qemu(tmp_path: Path, kvm_opens: None) -> None:
    probe = accel.kvm_probe(qemu=str(tmp_path / "absent"))()
    assert probe == KvmProbe(False, f"{tmp_path / 'absent'} is not installed, so KVM cannot "
                             "be probed", 0.0)


def test_a_missing_dev_kvm_is_named(tmp_path: Path) -> None:
    problem = accel.kvm_device_problem(tmp_path / "kvm")
    assert problem is not None and problem.startswith("/dev/kvm does not exist")
