"""The GPU Operator's operands on one node: paused around a GPU reset, always put back (docs/reset.md, 2 and 3b).

The Operator runs each operand as a DaemonSet selecting nodes labelled `nvidia.com/gpu.deploy.<operand>=true`; any
other value takes its pod off that node only, and the Operator leaves a non-empty value alone. We pause with
"false", never touch the driver, and only the operands that hold the GPU: device-plugin, gpu-feature-discovery, dcgm,
dcgm-exporter.

The node itself carries what to restore: the PATCH that writes "false" also writes the replaced values into our
annotation and our label (the sweep finds paused nodes by it). A webhook crash, a lost journal or a failed Job
cannot then leave the device plugin off, which would cost the node its GPUs for good. Restoring puts back every
label still "false" (one someone changed meanwhile is theirs) and removes our marks, in one PATCH.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..providers import duration, only_keys, opt
from .base import PREFIX, annotations

OPERANDS = ("device-plugin", "gpu-feature-discovery", "dcgm", "dcgm-exporter")
# The `app` label of each operand's pods (the GPU Operator's DaemonSets; k8s-driver-manager waits on the same).
APPS = {"device-plugin": "nvidia-device-plugin-daemonset", "gpu-feature-discovery": "gpu-feature-discovery",
        "dcgm": "nvidia-dcgm", "dcgm-exporter": "nvidia-dcgm-exporter"}
DEPLOY = "nvidia.com/gpu.deploy."
LABEL_PAUSED = f"{PREFIX}/operands-paused"
ANN_PAUSED = f"{PREFIX}/paused-operands"
DRIVER_UPGRADE = "paused-for-driver-upgrade"
_SELECTOR = re.compile(r"[A-Za-z0-9./_-]{1,253}=[A-Za-z0-9._-]{0,63}")
_NS = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class OperandSettings:
    namespace: str = "gpu-operator"
    operands: tuple[str, ...] = OPERANDS
    timeout: float = 120.0  # for their pods to leave the node
    device_plugin_selector: str = "app=nvidia-device-plugin-daemonset"
    restart_after: float = 60.0  # allocatable not back by then: restart the device plugin pod

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], key: str, verify_timeout: float) -> OperandSettings:
        namespace = opt(raw, key, "operator_namespace", str, "gpu-operator")
        if not _NS.fullmatch(namespace):
            raise ConfigError(f"{key}.operator_namespace: not a namespace name")
        operands = raw.get("pause_operands", list(OPERANDS))
        if not isinstance(operands, list) or any(o not in OPERANDS for o in operands):
            raise ConfigError(f"{key}.pause_operands: a list of {', '.join(OPERANDS)} (never the driver), "
                              f"got {operands!r}")
        selector = opt(raw, key, "device_plugin_selector", str, "app=nvidia-device-plugin-daemonset")
        if not _SELECTOR.fullmatch(selector):
            raise ConfigError(f"{key}.device_plugin_selector: one label as key=value, got {selector!r}")
        restart = duration(raw, key, "restart_device_plugin_after", f"{max(1, int(verify_timeout // 2))}s")
        if restart > verify_timeout:
            raise ConfigError(f"{key}.restart_device_plugin_after: at most verify_timeout ({verify_timeout:.0f}s)")
        return cls(namespace, tuple(operands), duration(raw, key, "operands_timeout", "2m"), selector, restart)

    KEYS = frozenset({"operator_namespace", "pause_operands", "operands_timeout", "device_plugin_selector",
                      "restart_device_plugin_after"})


def check_keys(raw: Mapping[str, Any], key: str, own: set[str]) -> None:
    only_keys(raw, key, own | OperandSettings.KEYS)


@dataclass(frozen=True)
class Paused:
    """What our marks on a node say: who paused, the label values replaced, the GPUs the node had."""

    remediation: str  # the full id, or the label's first 16 characters when the annotation is unreadable
    labels: Mapping[str, str]
    gpus: int
    at: float = 0.0
    readable: bool = True


def paused(node: Mapping[str, Any]) -> Paused | None:
    labels = (node.get("metadata") or {}).get("labels") or {}
    raw = annotations(node).get(ANN_PAUSED)
    if raw is None:
        return None if LABEL_PAUSED not in labels else Paused(str(labels[LABEL_PAUSED]), {}, 0,
                                                                  readable=False)
    try:
        data = json.loads(raw)
        saved = {str(k): str(v) for k, v in dict(data["labels"]).items() if str(k).startswith(DEPLOY)}
        return Paused(str(data["remediation"]), saved, int(data.get("gpus") or 0), float(data.get("at") or 0))
    except (ValueError, KeyError, TypeError, AttributeError):
        return Paused(str(labels.get(LABEL_PAUSED, "")), {}, 0, readable=False)


def driver_upgrade(node: Mapping[str, Any]) -> str:
    """A deploy label k8s-driver-manager paused: the Operator is reloading the driver here ("" if not)."""
    labels = (node.get("metadata") or {}).get("labels") or {}
    return next((k for k, v in labels.items() if k.startswith(DEPLOY) and str(v).endswith(DRIVER_UPGRADE)), "")


def pause_patch(node: Mapping[str, Any], settings: OperandSettings, rid: str, gpus: int,
                now: float) -> dict[str, Any] | None:
    """The PATCH that pauses the operands this node runs (None when it runs none of them: not Operator-managed)."""
    labels = (node.get("metadata") or {}).get("labels") or {}
    saved = {DEPLOY + o: str(labels[DEPLOY + o]) for o in settings.operands
             if str(labels.get(DEPLOY + o, "")) not in ("", "false")}
    if not saved:
        return None
    note = json.dumps({"remediation": rid, "labels": saved, "gpus": gpus, "at": round(now, 3)}, sort_keys=True)
    return {"metadata": {"labels": {**{k: "false" for k in saved}, LABEL_PAUSED: rid[:16]},
                         "annotations": {ANN_PAUSED: note}}}


def restore_patch(node: Mapping[str, Any]) -> tuple[dict[str, Any], list[str], list[str]] | None:
    """(PATCH, labels put back, labels left as someone else set them); None when the saved values cannot be read
    (someone edited our annotation): no label is touched then, since a "false" may be an administrator's own (a
    host DCGM instead of the Operator's), and our mark stays, so that GPURemediationOperandsPausedTooLong names
    the node for a person."""
    mark = paused(node)
    if mark is None or not mark.readable:
        return None
    labels = (node.get("metadata") or {}).get("labels") or {}
    patch_labels: dict[str, str | None] = {LABEL_PAUSED: None}
    back, kept = [], []
    for k, v in sorted(mark.labels.items()):
        if str(labels.get(k, "")) == "false":
            patch_labels[k] = v
            back.append(f"{k}={v}")
        else:
            kept.append(f"{k}={labels.get(k, '')}")
    return {"metadata": {"labels": patch_labels, "annotations": {ANN_PAUSED: None}}}, back, kept


def pods_of(pods: list[Mapping[str, Any]], namespace: str, apps: set[str]) -> list[str]:
    """Names of the pods in `namespace` whose app label is one of `apps` and that have not finished."""
    return sorted(str(p["metadata"]["name"]) for p in pods
                  if (p.get("metadata") or {}).get("namespace") == namespace
                  and ((p.get("metadata") or {}).get("labels") or {}).get("app") in apps
                  and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed"))


def selected(pods: list[Mapping[str, Any]], namespace: str, selector: str) -> list[Mapping[str, Any]]:
    key, _, value = selector.partition("=")
    return [p for p in pods if (p.get("metadata") or {}).get("namespace") == namespace
            and ((p.get("metadata") or {}).get("labels") or {}).get(key) == value]


__all__ = ["ANN_PAUSED", "APPS", "DEPLOY", "LABEL_PAUSED", "OPERANDS", "OperandSettings", "Paused", "check_keys",
           "driver_upgrade", "pause_patch", "paused", "pods_of", "restore_patch", "selected"]
