"""The checks a real cluster makes on a pod spec that a schema cannot see: the cross-field rules of the API server's
validation, its ServiceAccount admission, Pod Security Admission, and the kubelet's checks at container start. Only
the rules for what this project's manifests and Jobs use; each names where it comes from.

    problems(objects)  -> ["DaemonSet/gpu-health-exporter container exporter: ...", ...]

Sources (Kubernetes 1.31):
- API server, pkg/apis/core/validation/validation.go: ValidateSecurityContext ("cannot set `allowPrivilegeEscalation`
  to false and `privileged` to true", and the same for capabilities.add CAP_SYS_ADMIN); ValidateResourceRequirements
  (a request "must be less than or equal to" its limit); probes need exactly one handler.
- API server, pkg/apis/apps/validation: a workload's `selector` must match its template's labels ("`selector` does not
  match template `labels`").
- ServiceAccount admission plugin: a pod naming a ServiceAccount that does not exist is refused at creation.
- Pod Security Admission (pod-security.kubernetes.io/enforce on the namespace): `baseline` forbids privileged
  containers, hostPID/hostIPC/hostNetwork, hostPath volumes and adding capabilities beyond its list; `restricted`
  further needs runAsNonRoot, allowPrivilegeEscalation false, capabilities drop ALL and a seccomp profile.
- kubelet, at container start: runAsNonRoot true with runAsUser 0 ("container's runAsUser breaks non-root policy").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

WORKLOADS = ("DaemonSet", "StatefulSet", "Deployment", "Job")
# Baseline's allowed added capabilities (Pod Security Standards).
BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                 "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
# Where this project means to use host access: (kind, name or name prefix) -> what it may use.
HOST_ACCESS = {
    ("DaemonSet", "gpu-health-exporter"): {"hostPath", "privileged"},  # privileged: GKE, components/kmsg
    ("Job", "gpu-health-"): {"hostPath", "hostPID", "privileged"},  # the executor's Jobs (remediation_webhook/executor.py)
}
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
_SCALE = {None: 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
          "Ti": 2**40}


def quantity(value: Any) -> float:
    match = _QUANTITY.match(str(value))
    if match is None:
        raise ValueError(f"not a quantity: {value!r}")
    return float(match.group(1)) * _SCALE[match.group(2)]


def _pod(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    if obj.get("kind") == "Pod":
        return obj.get("spec") or {}
    if obj.get("kind") in WORKLOADS:
        return ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    return None


def _allowed(kind: str, name: str) -> set[str]:
    return next((what for (k, n), what in HOST_ACCESS.items() if k == kind and name.startswith(n)), set())


def problems(objects: Iterable[Mapping[str, Any]], *, namespaces: Mapping[str, str] | None = None,
             service_accounts: Iterable[tuple[str, str]] | None = None) -> list[str]:
    """Everything a cluster would refuse (or the kubelet fail to start) among `objects`. `namespaces`: namespace ->
    its Pod Security enforce level, beyond the Namespace objects given; `service_accounts`: (namespace, name) that
    exist beyond the ServiceAccount objects given."""
    objs = list(objects)
    levels = dict(namespaces or {})
    levels.update({o["metadata"]["name"]: (o["metadata"].get("labels") or {}).get(
        "pod-security.kubernetes.io/enforce", "privileged") for o in objs if o.get("kind") == "Namespace"})
    accounts = set(service_accounts or ()) | {(o["metadata"].get("namespace", ""), o["metadata"]["name"])
                                              for o in objs if o.get("kind") == "ServiceAccount"}
    out: list[str] = []
    for obj in objs:
        pod = _pod(obj)
        if pod is None:
            continue
        kind, meta = obj["kind"], obj.get("metadata") or {}
        name, ns = str(meta.get("name", "")), str(meta.get("namespace", ""))
        where = f"{kind}/{name}"
        out += [f"{where}: {p}" for p in _workload(obj)]
        sa = pod.get("serviceAccountName")
        if sa and (ns, sa) not in accounts:
            out.append(f"{where}: ServiceAccount {ns}/{sa} does not exist (ServiceAccount admission)")
        allowed = _allowed(kind, name)
        for used in _host_access(pod) - allowed:
            out.append(f"{where}: uses {used}, which this project does not mean it to")
        level = levels.get(ns)
        if level is None:
            out.append(f"{where}: namespace {ns!r} is not in the rendering: its Pod Security level is unknown")
        else:
            out += [f"{where}: {p} (Pod Security {level!r} of namespace {ns})" for p in _pod_security(pod, level)]
        pod_ctx = pod.get("securityContext") or {}
        for c in [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]:
            out += [f"{where} container {c.get('name')}: {p}" for p in _container(c, pod_ctx)]
    return out


def _workload(obj: Mapping[str, Any]) -> list[str]:
    if obj["kind"] not in ("DaemonSet", "StatefulSet", "Deployment"):
        return []
    spec = obj.get("spec") or {}
    wanted = (spec.get("selector") or {}).get("matchLabels") or {}
    labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    if any(labels.get(k) != v for k, v in wanted.items()):
        return ["`selector` does not match template `labels`"]
    return []


def _host_access(pod: Mapping[str, Any]) -> set[str]:
    used = {f for f in ("hostPID", "hostIPC", "hostNetwork") if pod.get(f)}
    if any("hostPath" in v for v in pod.get("volumes") or []):
        used.add("hostPath")
    if any((c.get("securityContext") or {}).get("privileged") for c in pod.get("containers") or []):
        used.add("privileged")
    return used


def _pod_security(pod: Mapping[str, Any], level: str) -> list[str]:
    if level == "privileged":
        return []
    out = [f"{f} is forbidden" for f in ("hostPID", "hostIPC", "hostNetwork") if pod.get(f)]
    out += [f"hostPath volume {v.get('name')} is forbidden" for v in pod.get("volumes") or [] if "hostPath" in v]
    pod_ctx = pod.get("securityContext") or {}
    for c in pod.get("containers") or []:
        ctx = c.get("securityContext") or {}
        if ctx.get("privileged"):
            out.append(f"container {c.get('name')} is privileged")
        added = set((ctx.get("capabilities") or {}).get("add") or [])
        if added - BASELINE_CAPS:
            out.append(f"container {c.get('name')} adds {sorted(added - BASELINE_CAPS)}")
        if level == "restricted":
            if not (ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot"))):
                out.append(f"container {c.get('name')} must set runAsNonRoot")
            if ctx.get("allowPrivilegeEscalation") is not False:
                out.append(f"container {c.get('name')} must set allowPrivilegeEscalation false")
            if "ALL" not in ((ctx.get("capabilities") or {}).get("drop") or []):
                out.append(f"container {c.get('name')} must drop ALL capabilities")
            if not (ctx.get("seccompProfile") or pod_ctx.get("seccompProfile")):
                out.append(f"container {c.get('name')} needs a seccomp profile")
    return out


def _container(c: Mapping[str, Any], pod_ctx: Mapping[str, Any]) -> list[str]:
    out = []
    ctx = c.get("securityContext") or {}
    if ctx.get("allowPrivilegeEscalation") is False:
        if ctx.get("privileged"):
            out.append("cannot set `allowPrivilegeEscalation` to false and `privileged` to true")
        if "CAP_SYS_ADMIN" in ((ctx.get("capabilities") or {}).get("add") or []) or \
                "SYS_ADMIN" in ((ctx.get("capabilities") or {}).get("add") or []):
            out.append("cannot set `allowPrivilegeEscalation` to false and `capabilities.Add` CAP_SYS_ADMIN")
    resources = c.get("resources") or {}
    for res, request in (resources.get("requests") or {}).items():
        limit = (resources.get("limits") or {}).get(res)
        if limit is not None and quantity(request) > quantity(limit):
            out.append(f"resources.requests[{res}] {request} must be less than or equal to its limit {limit}")
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        handlers = [h for h in ("exec", "httpGet", "tcpSocket", "grpc") if h in (c.get(probe) or {})]
        if probe in c and len(handlers) != 1:
            out.append(f"{probe} must have exactly one handler, has {handlers or 'none'}")
    non_root = ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot"))
    user = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
    if non_root and user == 0:
        out.append("runAsNonRoot with runAsUser 0: the kubelet refuses to start it")
    return out


__all__ = ["HOST_ACCESS", "problems", "quantity"]
