"""One spelling of a PCI address everywhere: NVML's, as ``gpu_info`` carries it (``00000000:18:00.0``).

The kernel prints the same device three ways: Xid lines ``0000:18:00`` (no function), SXid and NVRM lines
``0000:04:00.0``, and some NVRM lines no domain at all (``18:00.0``). NVML prints an 8-digit upper-case domain and
the function. Series only join when the label value is byte-for-byte the same, so every PCI id the exporter reads
from a log is converted here, once, to NVML's form.

A VMD (Intel Volume Management Device) domain has 5 hex digits (``10000``): it is kept whole, never cut to 4,
because ``0000:01:00`` and ``10000:01:00`` are different devices on the same node.
"""

from __future__ import annotations

import re

__all__ = ["canonical_pci_id", "nvml_pci_id"]

# [PCI:][domain:]bus:device[.function]; the domain is 1-8 hex digits (4 from the kernel, 5 on VMD, 8 from NVML)
_PCI_RE = re.compile(
    r"(?:PCI:)?(?:(?P<domain>[0-9a-fA-F]{1,8}):)?(?P<bus>[0-9a-fA-F]{2}):(?P<device>[0-9a-fA-F]{2})"
    r"(?:\.(?P<function>[0-7]))?"
)


def canonical_pci_id(text: str) -> str:
    """``0000:18:00``, ``18:00.0``, ``10000:01:00`` or ``00000000:18:00.0`` -> NVML's ``00000000:18:00.0``.

    A missing domain is domain 0 (the only one on a machine whose driver leaves it out); a missing function is 0
    (the kernel's Xid line names the device, and a GPU's device is function 0). Raises ValueError for anything
    that is not a PCI address, so a bad id is never turned into a plausible-looking wrong one.
    """
    m = _PCI_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a PCI address: {text!r}")
    domain = int(m.group("domain") or "0", 16)
    return f"{domain:08X}:{m.group('bus').upper()}:{m.group('device').upper()}.{m.group('function') or '0'}"


def nvml_pci_id(text: str) -> str:
    """A GPU's id as NVML (or DCGM) gave it, normalised; kept as given when it is not a PCI address, so a GPU is
    never dropped for an odd id."""
    try:
        return canonical_pci_id(text)
    except ValueError:
        return text
