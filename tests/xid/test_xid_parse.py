"""The kernel-log parser against every real line in tests/fixtures/kmsg-samples.txt and the shapes around it."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from exporter.xid.parse import KernelEvent, RecordAssembler, SxidDetail, parse_line, parse_sxid_detail, unescape_kmsg

SAMPLES = Path(__file__).resolve().parent.parent / "fixtures" / "kmsg-samples.txt"

# One row per data line of kmsg-samples.txt, in file order: what parse_line must return for that line alone.
# (kind, code, pci_bus_id, start of message, other fields that must be set) or None for "no event from this line".
# Written by hand from the lines, not from the parser's output.
EXPECTED: list[tuple[str, int | None, str, str, dict[str, Any]] | None] = [
    ("xid", 13, "00000000:CB:00.0", "Graphics SM Warp Exception on (GPC 7", {}),
    ("xid", 13, "00000000:CB:00.0", "Graphics SM Global Exception", {}),
    ("xid", 13, "00000000:CB:00.0", "Graphics Exception: ESR 0x57c730", {}),
    ("xid", 43, "00000000:00:05.0", "Ch 00000008", {}),
    ("xid", 43, "00000000:00:05.0", "Ch 00000008", {}),
    ("xid", 31, "00000000:00:07.0", "Ch 00000008, intr 00000000. MMU Fault", {}),
    ("xid", 94, "00000000:00:08.0", "Contained: SM (0x1)", {}),
    None,  # SXid 22013 "Data {...}": a continuation line of the incident below, not an incident (parse_sxid_detail)
    ("sxid", 22013, "00000000:04:00.0", "Non-fatal, Link 44", {"fatal": False}),
    None,  # SXid 22013 "Severity 0 Engine instance 44 ...": a continuation line of the same incident
    ("xid", 144, "00000000:01:00.0", "SAW_MVB Nonfatal XC0", {"fatal": False}),
    ("xid", 149, "00000000:00:00.0", "NETIR_LINK_EVT Fatal XC0", {"fatal": True}),
    ("xid", 145, "00000018:01:00.0", "RLW_RXPIPE Nonfatal", {"fatal": False}),
    ("xid", 62, "00000000:01:00.0", "323f0f30 0000c3d8", {}),
    ("xid", 154, "00000000:01:00.0", "GPU recovery action changed from 0x0", {"recovery_action": 1}),
    ("xid", 79, "00000000:44:00.0", "GPU has fallen off the bus", {}),
    ("xid", 32, "00000000:01:00.0", "Channel ID 00000005", {}),
    ("xid", 31, "00000000:01:00.0", "Ch 0000000b, engmask", {}),
    ("xid", 119, "00000000:61:00.0", "Timeout waiting for RPC from GSP! Expected function 103", {}),
    ("xid", 119, "00000000:61:00.0", "Timeout waiting for RPC from GSP! Expected function 76", {}),
    ("xid", 119, "00000000:9B:00.0", "Timeout after 6s of waiting for RPC response from GPU4 GSP! Expected function 103", {}),
    ("xid", 119, "00000000:9B:00.0", "Timeout after 6s of waiting for RPC response from GPU4 GSP! Expected function 10 ", {}),
    ("xid", 119, "00000000:9B:00.0", "Timeout after 6s of waiting for RPC response from GPU4 GSP! Expected function 76", {}),
    ("xid", 119, "00000000:9B:00.0", "Timeout after 6s of waiting for RPC response from GPU4 GSP! Expected function 76", {}),
    ("xid", 120, "00000000:01:00.0", "GSP kernel exception: store access page fault", {}),
    ("xid", 154, "00000000:01:00.0", "GPU recovery action changed from 0x0", {"recovery_action": 1}),
    ("xid", 62, "00000000:01:00.0", "223b6a66 00002100", {}),
    ("xid", 45, "00000000:01:00.0", "channel 0x00000002", {}),
    ("xid", 79, "00000000:C6:00.0", "GPU has fallen off the bus.", {}),
    ("xid", 32, "00000000:01:00.0", "Channel ID 00000000 intr 00004000", {}),
    ("xid", 31, "00000000:01:00.0", "Ch 00000003, engmask 00000101", {}),
    ("xid", 13, "00000000:B5:00.0", "Graphics SM Warp Exception on (GPC 1", {}),
    ("xid", 13, "00000000:B5:00.0", "Graphics Exception: ESR 0x50df30", {}),
    ("xid", 74, "00000003:00:00.0", "NVLink: fatal error detected on link 14", {}),
    ("xid", 32, "00000000:66:00.0", "Channel ID 0000000d intr0", {}),
    ("xid", 154, "00000008:01:00.0", "GPU recovery action changed from 0x0 (None) to 0x1", {"recovery_action": 1}),
    ("xid", 154, "00000008:01:00.0", "GPU recovery action changed from 0x1 (GPU Reset Req", {"recovery_action": 0}),
    ("sxid", 20009, "00000000:06:00.0", "Non-fatal, Link 04 RX Short Error Rate", {"fatal": False}),
    ("sxid", 24007, "00000000:C3:00.0", "Fatal, Link 28 sourcetrack timeout error (First)", {"fatal": True}),
    ("sxid", 26008, "00000004:00:00.0", "SOE Watchdog error", {}),
    ("sxid", 26006, "00000004:00:00.0", "SOE HALTED", {}),
    ("sxid", 26007, "00000004:00:00.0", "SOE EXTERR", {}),
    ("xid", 149, "00000018:01:00.0", "NETIR_BER_EVENT Nonfatal", {"fatal": False}),
    ("xid", 145, "00000018:01:00.0", "RLW_RXPIPE Nonfatal XC0 i0 Link 13", {"fatal": False}),
    ("xid", 145, "00000019:01:00.0", "RLW_SRC_TRACK Nonfatal XC1 i0 Link 12", {"fatal": False}),
    ("xid", 145, "00000008:01:00.0", "RLW_SRC_TRACK Nonfatal XC1 i0 Link 03", {"fatal": False}),
    ("xid", 149, "00000008:01:00.0", "NETIR_LINK_EVT Fatal XC0 i0 Link 08", {"fatal": True}),
    ("xid", 94, "00000000:01:00.0", "Contained: CE User Channel (0x9)", {}),
    ("xid", 95, "00000000:01:00.0", "Uncontained: LTC TAG (0x2, 0x1)", {}),
    ("xid", 120, "00000000:3B:00.0", "GSP Error: Task 1 raised error code 0x5", {}),
    ("xid", 119, "00000000:3B:00.0", "Timeout waiting for RPC from GSP! Expected function FREE", {}),
    ("xid", 32, "00000000:01:00.0", "Channel ID 00000009 intr 00800000", {}),
    ("xid", 32, "00000000:01:00.0", "Channel ID 00000009 intr 00800000", {}),
    None,  # [ 1843.308145] NVRM: The NVIDIA GPU 0000:b3:00.0          (first line of the probe-time record)
    None,  # NVRM: (PCI ID: 10de:26b5) installed in this system has
    None,  # NVRM: fallen off the bus and is not responding to commands.  (only RecordAssembler sees the whole record)
]

_OPTIONAL = ("gpu_instance", "compute_instance", "caused_by", "recovery_action", "fatal")
PROBE_MESSAGE = (
    "NVRM: The NVIDIA GPU 0000:b3:00.0\n"
    "NVRM: (PCI ID: 10de:26b5) installed in this system has\n"
    "NVRM: fallen off the bus and is not responding to commands."
)


def sample_lines() -> list[str]:
    """The data lines of the fixture (comment lines start with '#')."""
    return [line for line in SAMPLES.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]


def test_table_covers_every_sample_line() -> None:
    assert len(sample_lines()) == len(EXPECTED)


@pytest.mark.parametrize(("line", "expected"), list(zip(sample_lines(), EXPECTED)))
def test_sample_line(line: str, expected: tuple[str, int | None, str, str, dict[str, Any]] | None) -> None:
    event = parse_line(line)
    if expected is None:
        assert event is None
        return
    kind, code, pci, message_start, extra = expected
    assert event is not None, line
    assert (event.kind, event.code, event.pci_bus_id) == (kind, code, pci)
    assert event.message.startswith(message_start)
    assert "pid=" not in event.message and "name=" not in event.message
    for key in _OPTIONAL:
        assert getattr(event, key) == extra.get(key), key


def test_assembler_over_whole_file_adds_one_fallen_off_bus_event() -> None:
    assembler = RecordAssembler()
    events = [event for line in sample_lines() for event in assembler.feed(line)] + assembler.flush()
    singles = [row for row in EXPECTED if row is not None]
    assert [(e.kind, e.code, e.pci_bus_id) for e in events[:-1]] == [(k, c, p) for k, c, p, _, _ in singles]
    assert events[-1] == KernelEvent("fallen_off_bus", None, "00000000:B3:00.0", PROBE_MESSAGE)


@pytest.mark.parametrize(
    "line",
    [
        "nvidia-smi: query Xid errors",
        "[  5.1] NVRM: GPU at PCI:0000:01:00: GPU-34d7319c-5b19-1e75-186d-c187099e4fe5",
        "NVRM: GPU Board Serial Number: 1234567890123",
        "Xid 79 happened yesterday",
        "kernel: foo: NVRM: Xid (bogus)",
        "nvidia-nvswitch0: SXid errors are reported below",
        "nvidia-nvswitch0: SXid 20009, Non-fatal",
        " SUBSYSTEM=tpm",
        " DEVICE=c10:224",
        "node1: kern: warning: [2023-08-18T13:36:47.378241465Z]: tpm tpm0: [Firmware Bug]: TPM interrupt not working",
        "NVRM: fallen off the bus and is not responding to commands.",  # no PCI id without the record's first line
        "",
    ],
)
def test_not_an_event(line: str) -> None:
    assert parse_line(line) is None


@pytest.mark.parametrize(
    "prefix",
    [
        "",
        "[ 1843.308145] ",
        "[Fri Aug 30 11:43:09 2024] ",
        "Dec  2 11:38:47 worker4 kernel: [  219.470994] ",
        "Mar 29 15:38:59 kernel: ",
        "kern  :err   : 2025-01-25T10:34:54,859532+00:00 ",
        "node1: kern:     err: [2023-08-18T13:36:47.378241465Z]: ",
    ],
)
def test_any_prefix(prefix: str) -> None:
    event = parse_line(prefix + "NVRM: Xid (PCI:0000:CB:00): 48, An uncorrectable double bit error (DBE)\n")
    assert event == KernelEvent("xid", 48, "00000000:CB:00.0", "An uncorrectable double bit error (DBE)")


def test_mig_instances() -> None:
    event = parse_line("NVRM: Xid (PCI:0000:01:00 GPU-I:05 GPU-CI:01): 13, pid=42, name=python, Graphics Exception")
    assert event == KernelEvent("xid", 13, "00000000:01:00.0", "Graphics Exception", gpu_instance=5, compute_instance=1)
    event = parse_line("NVRM: Xid (PCI:0001:6c:00 GPU-I:14): 31, Ch 00000008, intr 00000000")
    assert event is not None
    assert (event.pci_bus_id, event.gpu_instance, event.compute_instance) == ("00000001:6C:00.0", 14, None)


def test_runs_of_spaces_keep_code_and_severity() -> None:
    line = (
        "NVRM: Xid (PCI:0018:01:00): 149, NETIR_LINK_EVT  Fatal   XC0 i0 Link 09 "
        "(0x004505c6 0x00000000 0x00000000 0x00000000 0x00000000 0x00000000)"
    )
    event = parse_line(line)
    assert event is not None
    assert (event.kind, event.code, event.pci_bus_id, event.fatal) == ("xid", 149, "00000018:01:00.0", True)
    assert event.message.startswith("NETIR_LINK_EVT  Fatal   XC0")


@pytest.mark.parametrize(("code", "fatal"), [(c, f) for c in range(144, 151) for f in (True, False)])
def test_nvlink5_fatal_word(code: int, fatal: bool) -> None:
    word = "Fatal" if fatal else "Nonfatal"
    event = parse_line(f"NVRM: Xid (PCI:0008:01:00): {code}, UNIT_X {word} XC0 i0 Link 01 (0x1 0x0 0x0 0x0 0x0 0x0)")
    assert event is not None and event.fatal is fatal


def test_fatal_word_only_read_for_144_to_150() -> None:
    event = parse_line("NVRM: Xid (PCI:0000:01:00): 13, SOMETHING Fatal happened")
    assert event is not None and event.fatal is None


@pytest.mark.parametrize(
    ("text", "action"),
    [
        ("from 0x0 (None) to 0x1 (GPU Reset Required)", 1),
        ("from 0x1 (GPU Reset Required) to 0x0 (None)", 0),
        ("from 0x0 (None) to 0x2 (Node Reboot Required)", 2),
    ],
)
def test_xid_154_recovery_action_is_the_new_value(text: str, action: int) -> None:
    event = parse_line(f"NVRM: Xid (PCI:0008:01:00): 154, GPU recovery action changed {text}")
    assert event is not None and event.recovery_action == action


def test_xid_45_caused_by_previous_xid() -> None:
    event = parse_line("NVRM: Xid (PCI:0008:01:00): 45, pid=3, name=python, Ch 00000001 caused by previous Xid 149")
    assert event is not None
    assert (event.code, event.caused_by, event.message) == (45, 149, "Ch 00000001 caused by previous Xid 149")


@pytest.mark.parametrize(
    "line",
    [
        "NVRM: Xid (PCI:0000:01:00): 63, pid=1896, Row Remapper: New row marked for remapping, reset gpu to activate.",
        "NVRM: Xid (PCI:0000:01:00): 63, pid='<unknown>', name=<unknown>, Row Remapper: New row marked for remapping, "
        "reset gpu to activate.",
        "NVRM: Xid (PCI:0000:01:00): 63, Row Remapper: New row marked for remapping, reset gpu to activate.",
        "NVRM: Xid (PCI:0000:01:00): 63, pid=1896, name=nvc:[driver], Row Remapper: New row marked for remapping, "
        "reset gpu to activate.",
    ],
)
def test_pid_and_name_never_reach_the_event(line: str) -> None:
    assert parse_line(line) == KernelEvent(
        "xid", 63, "00000000:01:00.0", "Row Remapper: New row marked for remapping, reset gpu to activate."
    )


def test_xid_without_text_after_the_code() -> None:
    assert parse_line("NVRM: Xid (PCI:0000:00:1e): 31") == KernelEvent("xid", 31, "00000000:00:1E.0", "")


def test_runtime_fallen_off_the_bus_line() -> None:
    message = "NVRM: GPU 0000:3B:00.0: GPU has fallen off the bus."
    assert parse_line(f"[ 2010.1] {message}") == KernelEvent("fallen_off_bus", None, "00000000:3B:00.0", message)


def test_probe_record_as_three_prefixed_lines() -> None:
    assembler = RecordAssembler()
    lines = [
        "Jun  3 10:00:01 host kernel: [ 1843.308145] NVRM: The NVIDIA GPU 0000:b3:00.0\n",
        "Jun  3 10:00:01 host kernel: NVRM: (PCI ID: 10de:26b5) installed in this system has\n",
        "Jun  3 10:00:01 host kernel: NVRM: fallen off the bus and is not responding to commands.\n",
    ]
    events = [event for line in lines for event in assembler.feed(line)] + assembler.flush()
    assert events == [KernelEvent("fallen_off_bus", None, "00000000:B3:00.0", PROBE_MESSAGE)]


def test_probe_record_as_one_record_with_newlines() -> None:
    record = "[ 1843.308145] " + PROBE_MESSAGE.replace("\n", "\n               ")
    assert parse_line(record) == KernelEvent("fallen_off_bus", None, "00000000:B3:00.0", PROBE_MESSAGE)
    assembler = RecordAssembler()
    assert assembler.feed(record) == [KernelEvent("fallen_off_bus", None, "00000000:B3:00.0", PROBE_MESSAGE)]
    assert assembler.flush() == []


def test_probe_record_from_raw_kmsg() -> None:
    raw = (
        r"NVRM: The NVIDIA GPU 0000:b3:00.0\x0aNVRM: (PCI ID: 10de:26b5) installed in this system has"
        r"\x0aNVRM: fallen off the bus and is not responding to commands.\x0a"
    )
    assert "\n" not in raw
    assert RecordAssembler().feed(unescape_kmsg(raw)) == [
        KernelEvent("fallen_off_bus", None, "00000000:B3:00.0", PROBE_MESSAGE)
    ]


def test_probe_record_from_rsyslog_escaped_newlines() -> None:
    line = "host kernel: " + PROBE_MESSAGE.replace("\n", "#012")
    event = parse_line(line)
    assert event is not None and (event.kind, event.pci_bus_id) == ("fallen_off_bus", "00000000:B3:00.0")


PROBE_LINES = [
    "Jun  3 10:00:01 gpu7 kernel: [ 1843.308145] NVRM: The NVIDIA GPU 0000:b3:00.0",
    "Jun  3 10:00:01 gpu7 kernel: [ 1843.308150] NVRM: (PCI ID: 10de:26b5) installed in this system has",
    "Jun  3 10:00:01 gpu7 kernel: [ 1843.308152] NVRM: fallen off the bus and is not responding to commands.",
]


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_probe_record_in_any_order(order: tuple[int, int, int]) -> None:
    """A pipeline that sorts by time or merges CPUs' buffers may deliver the record's lines in any order."""
    assembler = RecordAssembler()
    events = [event for i in order for event in assembler.feed(PROBE_LINES[i])] + assembler.flush()
    assert [(e.kind, e.code, e.pci_bus_id) for e in events] == [("fallen_off_bus", None, "00000000:B3:00.0")]
    # The message is in the driver's order; the middle line is in it when it came before the record was complete.
    if order.index(1) < max(order.index(0), order.index(2)):
        assert events[0].message == PROBE_MESSAGE
    else:
        assert events[0].message == PROBE_MESSAGE.replace("NVRM: (PCI ID: 10de:26b5) installed in this system has\n", "")


def test_probe_record_without_its_middle_line_or_domain() -> None:
    assembler = RecordAssembler()
    assert assembler.feed("[ 12.5] NVRM: fallen off the bus and is not responding to commands.") == []
    [event] = assembler.feed("[ 12.5] NVRM: The NVIDIA GPU 18:00.0 (PCI ID: 10de:2330)")
    assert (event.kind, event.pci_bus_id) == ("fallen_off_bus", "00000000:18:00.0")


def test_probe_record_survives_a_few_unrelated_lines_and_they_still_count() -> None:
    assembler = RecordAssembler()
    assert assembler.feed(PROBE_LINES[0]) == []
    events = assembler.feed("kernel: NVRM: Xid (PCI:0000:01:00): 79, GPU has fallen off the bus.")
    assert [(e.kind, e.code, e.pci_bus_id) for e in events] == [("xid", 79, "00000000:01:00.0")]
    assert assembler.feed("kernel: pcieport 0000:00:01.0: AER: Uncorrected (Fatal) error received") == []
    [event] = assembler.feed(PROBE_LINES[2])
    assert event.pci_bus_id == "00000000:B3:00.0"


def test_unfinished_probe_record_is_dropped_after_the_gap() -> None:
    assembler = RecordAssembler()
    assert assembler.feed(PROBE_LINES[0]) == []
    for _ in range(RecordAssembler.MAX_GAP + 1):
        assert assembler.feed("kernel: usb 1-1: new high-speed USB device") == []
    assert assembler.feed(PROBE_LINES[2]) == []  # waits for its own first line now
    assert assembler.flush() == []


def test_a_repeated_first_line_starts_a_new_record() -> None:
    assembler = RecordAssembler()
    assembler.feed("NVRM: The NVIDIA GPU 0000:b3:00.0")
    assembler.feed("NVRM: The NVIDIA GPU 0000:cb:00.0")
    [event] = assembler.feed("NVRM: fallen off the bus and is not responding to commands.")
    assert event.pci_bus_id == "00000000:CB:00.0"


def test_other_records_that_begin_like_the_probe_record_are_not_events() -> None:
    assembler = RecordAssembler()
    lines = [
        "NVRM: The NVIDIA GPU 0000:01:00.0 (PCI ID: 10de:1b80)",
        "NVRM: installed in this system is not supported by the",
        "NVRM: NVIDIA 550.90.07 driver release.",
    ]
    assert [event for line in lines for event in assembler.feed(line)] + assembler.flush() == []


@pytest.mark.parametrize(
    ("line", "pci"),
    [
        ("NVRM: GPU 18:00.0: GPU has fallen off the bus.", "00000000:18:00.0"),  # no domain
        ("[ 2010.1] NVRM: GPU 0000:3b:00.0: GPU has fallen off the bus.", "00000000:3B:00.0"),
        ("kernel: NVRM: GPU 10000:01:00.0: GPU has fallen off the bus.", "00010000:01:00.0"),  # VMD domain kept whole
        ("NVRM: GPU PCI:0000:3b:00: GPU has fallen off the bus.", "00000000:3B:00.0"),
    ],
)
def test_runtime_fallen_off_the_bus_in_every_form(line: str, pci: str) -> None:
    event = parse_line(line)
    assert event is not None and (event.kind, event.pci_bus_id) == ("fallen_off_bus", pci)
    assert RecordAssembler().feed(line) == [event]


@pytest.mark.parametrize(
    ("line", "pci"),
    [
        ("NVRM: Xid (PCI:10000:01:00): 79, GPU has fallen off the bus.", "00010000:01:00.0"),
        ("NVRM: Xid (PCI:0018:01:00): 145, RLW_RXPIPE Nonfatal XC0 i0 Link 13 (0x0)", "00000018:01:00.0"),
        ("NVRM: Xid (0000:01:00): 31, Ch 0000000b", "00000000:01:00.0"),
        ("nvidia-nvswitch0: SXid (PCI:10001:c3:00.0): 24007, Fatal, Link 28", "00010001:C3:00.0"),
    ],
)
def test_every_pci_id_in_nvml_spelling(line: str, pci: str) -> None:
    event = parse_line(line)
    assert event is not None and event.pci_bus_id == pci


def test_sxid_continuation_lines_are_details_not_events() -> None:
    prefix = "[   38.18] nvidia-nvswitch3: SXid (PCI:0000:04:00.0): 22013, "
    assert parse_line(prefix + "Severity 0 Engine instance 44 Sub-engine instance 00") is None
    assert parse_sxid_detail(prefix + "Severity 0 Engine instance 44 Sub-engine instance 00") == SxidDetail(
        22013, "00000000:04:00.0", severity=0, engine_instance=44, sub_engine_instance=0
    )
    detail = parse_sxid_detail(prefix + "Data {0x0000002b, 0x80005302, 0x00000000}")
    assert detail == SxidDetail(22013, "00000000:04:00.0", data=("0x0000002b", "0x80005302", "0x00000000"))
    head = parse_line(prefix + "Non-fatal, Link 44 Minion Link DLREQ interrupt")
    assert head is not None and (head.fatal, head.link) == (False, 44)
    assert parse_sxid_detail(prefix + "Non-fatal, Link 44 Minion Link DLREQ interrupt") is None
    correctable = parse_line(prefix + "Correctable, Link 03 TX replay")
    assert correctable is not None and (correctable.fatal, correctable.link) == (False, 3)


def test_unescape_kmsg() -> None:
    assert unescape_kmsg(r"a\x0ab\x5cc") == "a\nb\\c"
    assert unescape_kmsg(r"caf\xc3\xa9") == "café"
    assert unescape_kmsg(r"bad \xff byte") == r"bad \xff byte"
    assert unescape_kmsg("plain") == "plain"


def test_event_is_frozen_and_has_no_pid_or_name() -> None:
    event = KernelEvent("xid", 13, "00000000:01:00.0", "x")
    with pytest.raises(AttributeError):
        event.code = 14  # type: ignore[misc]
    assert not hasattr(event, "pid") and not hasattr(event, "name")
