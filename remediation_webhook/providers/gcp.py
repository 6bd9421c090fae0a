"""GCP (google-cloud-compute, REST transport): Compute Engine v1, for nodes whose providerID is
gce://<project>/<zone>/<name>.

  reboot          instances.reset (same host, hard reset, no guest shutdown)
  move            instances.reportHostAsFaulty (A3 Ultra / A4 / A4X, RUNNING, reservation-bound; new host); other
                  machine types: kind "unsupported", no call
  replace         recreateInstances on the instance's managed instance group, with a requestId derived from the
                  remediation id, verified through listManagedInstances: the operation is DONE once the flag is
                  set, so we wait until the instance's currentAction is NONE and its status RUNNING. The MIG
                  comes from the instance's `created-by` metadata:
                    projects/P/zones/Z/instanceGroupManagers/M    zonal: instanceGroupManagers.*, Z must be the
                                                                  instance's zone
                    projects/P/regions/R/instanceGroupManagers/M  regional: regionInstanceGroupManagers.*, the
                                                                  instance's zone must lie in R
                  With `report_faulty_host: true`, an eligible machine type (A3 Ultra, A4, A4X) is reported as
                  faulty instead (new host). An instance in no MIG, or in a MIG outside `allowed_groups`, is never
                  touched; a created-by that fails validation is kind "invalid" and nothing is written.
  tag             instances.setLabels with the current labelFingerprint (re-read once on 412)

Every mutating call carries a requestId (UUIDv5 of the remediation id and the verb), so a retry, or a re-run
after a crash, is the same request to Compute Engine. The returned operation is polled with zoneOperations.wait,
or regionOperations.wait for a regional MIG's recreateInstances; its name is the step's `operation`. 429 and 503
are retried by our full-jitter backoff (the client's own retry is off), zonal and regional calls alike. Blocking
calls run in a thread. Permissions: deploy/iam/gcp-custom-role.yaml.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from ..actions.base import Observation
from ..errors import ConfigError
from ..inventory.base import NodeIdentity
from . import (
    GCE_NAME,
    GCE_PROJECT,
    GCE_ZONE,
    InstanceRef,
    ProviderError,
    ProviderResult,
    duration,
    only_keys,
    opt,
    ref_of_node,
    with_backoff,
)

IAM_FILE = "deploy/iam/gcp-custom-role.yaml"
REQUEST_NS = uuid.UUID("5b0e7a3c-8a51-4c55-9f3e-6f1d2a8c0b71")  # fixed: request ids must be stable across runs
# reportHostAsFaulty works only on these families (remediation-practice.md §3.5)
FAULTY_HOST_TYPES = re.compile(r"(a3-ultragpu|a4-highgpu|a4x-highgpu|a4x-maxgpu)-.*")
# created-by of a MIG member; only the scope, location and name are used (the project is the node's own)
MIG_OF = re.compile(r"projects/[^/]+/(zones|regions)/([^/]+)/instanceGroupManagers/([^/]+)")
GCE_REGION = re.compile(r"[a-z]+-[a-z]+\d+")
CAPACITY = ("ZONE_RESOURCE_POOL_EXHAUSTED", "QUOTA_EXCEEDED", "RESOURCE_POOL_EXHAUSTED",
            "STOCKOUT", "INSUFFICIENT_CAPACITY")
FAULT_BEHAVIORS = ("UNRECOVERABLE_GPU_ERROR", "SILENT_DATA_CORRUPTION", "PERFORMANCE", "BEHAVIOR_UNSPECIFIED")


# Compute Engine remembers a requestId for at least 60 minutes; keep a margin below that.
REQUEST_ID_WINDOW = 3300.0


def _rfc3339(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def request_id(rid: str, verb: str) -> str:
    """The same remediation and verb always produce the same requestId (GCP dedupes it for ~60 minutes)."""
    return str(uuid.uuid5(REQUEST_NS, f"{rid}:{verb}"))


def label_value(value: str) -> str:
    """A GCP label value: lowercase letters, digits, _ and -, at most 63 characters."""
    return re.sub(r"[^a-z0-9_-]", "-", value.lower())[:63]


def _status(exc: Exception) -> int:
    code = getattr(exc, "code", None)
    try:
        return int(code) if code is not None else 0
    except (TypeError, ValueError):
        return 0


def classify(exc: Exception, what: str) -> ProviderError:
    """Any google-api-core / transport failure -> ProviderError with an operator-facing message."""
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exc

    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, auth_exc.DefaultCredentialsError):
        return ProviderError("auth", f"{what}: no GCP credentials (use GKE Workload Identity, or set "
                                     f"providers.gcp.credentials_file)", code="NoCredentials")
    if isinstance(exc, gexc.GoogleAPICallError):
        status, message = _status(exc), str(getattr(exc, "message", exc))[:300]
        if status in (401, 403):
            return ProviderError("auth", f"GCP refused {what} ({status}: {message}); grant the webhook's service "
                                         f"account the custom role in {IAM_FILE} on this instance / MIG",
                                 code=str(status))
        if status == 404:
            return ProviderError("not_found", f"{what}: not found ({message})", code="404")
        if status == 429:
            return ProviderError("throttled", f"{what}: still rate limited after retries (429: {message}); lower "
                                              f"the webhook's rate limits or retry later", code="429")
        if status == 503:
            return ProviderError("unavailable", f"{what}: Compute Engine unavailable after retries (503: "
                                                f"{message}); the outcome is unknown, the requestId makes a retry "
                                                f"safe", code="503")
        if any(c in message for c in CAPACITY):
            return ProviderError("capacity", f"{what}: {message}", code=str(status))
        return ProviderError("failed", f"{what}: {status or 'error'}: {message}", code=str(status))
    if isinstance(exc, auth_exc.GoogleAuthError):
        return ProviderError("auth", f"{what}: GCP authentication failed: {str(exc)[:200]}")
    if isinstance(exc, OSError | gexc.RetryError) or type(exc).__module__.startswith(("requests", "urllib3")):
        return ProviderError("unavailable", f"{what}: Compute Engine API unreachable: {str(exc)[:200]}")
    return ProviderError("failed", f"{what}: {type(exc).__name__}: {str(exc)[:200]}")


def _retryable(exc: Exception) -> bool:
    return isinstance(exc, ProviderError) and exc.code in ("429", "503")


def _enum(value: Any) -> str:
    return str(getattr(value, "name", value) or "")


@dataclass(frozen=True)
class Scope:
    """Where a MIG or an operation lives: a zone (the zonal APIs) or a region (the regional ones)."""

    regional: bool
    location: str

    @property
    def word(self) -> str:
        return "region" if self.regional else "zone"

    @property
    def where(self) -> dict[str, str]:
        """The request field naming the location: zone=… or region=…"""
        return {self.word: self.location}

    # (our client key, the Compute API resource named in messages), zonal or regional
    @property
    def migs(self) -> tuple[str, str]:
        return ("region_migs", "regionInstanceGroupManagers") if self.regional else ("migs", "instanceGroupManagers")

    @property
    def operations(self) -> tuple[str, str]:
        return ("region_operations", "regionOperations") if self.regional else ("operations", "zoneOperations")


@dataclass(frozen=True)
class Mig:
    name: str
    scope: Scope

    def describe(self) -> str:
        return f"{'regional' if self.scope.regional else 'zonal'} MIG {self.name} ({self.scope.location})"


def _is_instance(url: str, ref: InstanceRef) -> bool:
    """A managed instance's URL (…/zones/<z>/instances/<name>) names this instance, zone included when given."""
    m = re.search(r"(?:^|/)zones/([^/]+)/instances/([^/]+)$", url)
    if m:
        return m[1] == ref.zone and m[2] == ref.instance_id
    return url.rsplit("/", 1)[-1] == ref.instance_id


class GcpProvider:
    name: ClassVar[str] = "gcp"
    sdk: ClassVar[tuple[tuple[str, str], ...]] = (("google.cloud.compute_v1", "google-cloud-compute"),
                                                   ("google.api_core", "google-api-core"))

    def __init__(self, *, endpoint: str = "", credentials_file: str = "", anonymous: bool = False,
                 report_faulty_host: bool = False, fault_behavior: str = "UNRECOVERABLE_GPU_ERROR",
                 label_prefix: str = "remediation-", allowed_groups: tuple[str, ...] = (),
                 max_attempts: int = 5, retry_base: float = 1.0, retry_cap: float = 30.0,
                 operation_timeout: float = 900.0, replacement_timeout: float = 1800.0,
                 poll_interval: float = 15.0, call_timeout: float = 60.0) -> None:
        self.endpoint = endpoint
        self.credentials_file = credentials_file
        self.anonymous = anonymous
        self.report_faulty_host = report_faulty_host
        self.fault_behavior = fault_behavior
        self.label_prefix = label_prefix
        self.allowed_groups = allowed_groups
        self.max_attempts = max_attempts
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.operation_timeout = operation_timeout
        self.replacement_timeout = replacement_timeout
        self.poll_interval = poll_interval
        self.call_timeout = call_timeout
        self._clients: dict[str, Any] = {}
        self.retries_seen = 0

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], key: str) -> GcpProvider:
        only_keys(raw, key, {"endpoint", "credentials_file", "anonymous", "report_faulty_host", "fault_behavior",
                             "label_prefix", "allowed_groups", "max_attempts", "retry_base", "retry_cap",
                             "operation_timeout", "replacement_timeout", "poll_interval", "call_timeout"})
        endpoint = opt(raw, key, "endpoint", str, "")
        if endpoint and not endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"{key}.endpoint: expected an http(s) URL")
        creds = opt(raw, key, "credentials_file", str, "")
        if creds and not Path(creds).is_file():
            raise ConfigError(f"{key}.credentials_file: no such file {creds!r}")
        anonymous = opt(raw, key, "anonymous", bool, False)
        if anonymous and not endpoint:
            raise ConfigError(f"{key}.anonymous: only for a test endpoint (set {key}.endpoint)")
        behavior = opt(raw, key, "fault_behavior", str, "UNRECOVERABLE_GPU_ERROR")
        if behavior not in FAULT_BEHAVIORS:
            raise ConfigError(f"{key}.fault_behavior: one of {', '.join(FAULT_BEHAVIORS)}")
        prefix = opt(raw, key, "label_prefix", str, "remediation-")
        if not re.fullmatch(r"[a-z][a-z0-9_-]{0,40}", prefix):
            raise ConfigError(f"{key}.label_prefix: lowercase letters, digits, _ and - (a GCP label key prefix)")
        groups = raw.get("allowed_groups") or []
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise ConfigError(f"{key}.allowed_groups: expected a list of managed instance group names")
        attempts = opt(raw, key, "max_attempts", int, 5)
        if attempts < 1:
            raise ConfigError(f"{key}.max_attempts: at least 1")
        return cls(endpoint=endpoint, credentials_file=creds, anonymous=anonymous,
                   report_faulty_host=opt(raw, key, "report_faulty_host", bool, False), fault_behavior=behavior,
                   label_prefix=prefix, allowed_groups=tuple(groups), max_attempts=attempts,
                   retry_base=duration(raw, key, "retry_base", "1s"), retry_cap=duration(raw, key, "retry_cap", "30s"),
                   operation_timeout=duration(raw, key, "operation_timeout", "15m"),
                   replacement_timeout=duration(raw, key, "replacement_timeout", "30m"),
                   poll_interval=duration(raw, key, "poll_interval", "15s"),
                   call_timeout=duration(raw, key, "call_timeout", "60s"))

    # ------------------------------------------------------------------------------------------ plumbing

    def client(self, service: str) -> Any:
        if service not in self._clients:
            from google.api_core.client_options import ClientOptions
            from google.cloud import compute_v1

            credentials: Any = None
            if self.anonymous:
                from google.auth.credentials import AnonymousCredentials

                credentials = AnonymousCredentials()
            elif self.credentials_file:
                from google.oauth2 import service_account

                credentials = service_account.Credentials.from_service_account_file(
                    self.credentials_file, scopes=["https://www.googleapis.com/auth/compute"])
            options = ClientOptions(api_endpoint=self.endpoint) if self.endpoint else None
            cls = {"instances": compute_v1.InstancesClient,
                   "migs": compute_v1.InstanceGroupManagersClient,
                   "operations": compute_v1.ZoneOperationsClient,
                   "region_migs": compute_v1.RegionInstanceGroupManagersClient,
                   "region_operations": compute_v1.RegionOperationsClient}[service]
            self._clients[service] = cls(credentials=credentials, client_options=options, transport="rest")
        return self._clients[service]

    def close(self) -> None:
        for client in self._clients.values():
            client.transport.close()
        self._clients.clear()

    async def call(self, service: str, op: str, what: str, **kwargs: Any) -> Any:
        async def once() -> Any:
            try:
                fn = getattr(self.client(service), op)
                return await asyncio.to_thread(lambda: fn(retry=None, timeout=self.call_timeout, **kwargs))
            except Exception as exc:
                raise classify(exc, what) from exc

        def count(_exc: Exception) -> None:
            self.retries_seen += 1

        return await with_backoff(once, retryable=_retryable, attempts=self.max_attempts, base=self.retry_base,
                                  cap=self.retry_cap, on_retry=count)

    async def wait_operation(self, ref: InstanceRef, op: Any, what: str, scope: Scope | None = None) -> str:
        """Poll an operation until DONE: zonal (zoneOperations.wait, in the instance's zone unless `scope` says
        otherwise) or regional (regionOperations.wait, `scope` regional). An operation error becomes kind failed
        (or capacity, auth)."""
        from google.cloud import compute_v1

        scope = scope or Scope(False, ref.zone)
        wait = compute_v1.WaitRegionOperationRequest if scope.regional else compute_v1.WaitZoneOperationRequest
        name = str(op.name)
        deadline = time.monotonic() + self.operation_timeout
        while _enum(op.status) != "DONE":
            if time.monotonic() > deadline:
                raise ProviderError("failed", f"{what}: operation {name} not DONE within "
                                              f"{self.operation_timeout:.0f}s; check it with `gcloud compute "
                                              f"operations describe {name} --{scope.word} {scope.location}`")
            service, api = scope.operations
            op = await self.call(service, "wait", f"compute.{api}.wait({name})",
                                 request=wait(project=ref.project, operation=name, **scope.where))
            if _enum(op.status) != "DONE":
                await asyncio.sleep(self.poll_interval)
        errors = list(op.error.errors) if op.error else []
        if errors:
            text = "; ".join(f"{e.code}: {e.message}" for e in errors)[:400]
            kind = "capacity" if any(c in text for c in CAPACITY) else "failed"
            if any(e.code in ("PERMISSION_DENIED", "FORBIDDEN") for e in errors):
                kind = "auth"
            raise ProviderError(kind, f"{what}: operation {name} failed: {text}", code=str(errors[0].code))
        return name

    # ------------------------------------------------------------------------------------------ verbs

    async def resolve(self, node: NodeIdentity) -> InstanceRef:
        return ref_of_node(node, "gcp", "gce://<project>/<zone>/<name>")

    def _check(self, ref: InstanceRef) -> None:
        if ref.provider != "gcp" or not (GCE_PROJECT.fullmatch(ref.project) and GCE_ZONE.fullmatch(ref.zone)
                                         and GCE_NAME.fullmatch(ref.instance_id)):
            raise ProviderError("invalid", f"{ref.describe()} is not a valid GCE project/zone/instance")

    async def _instance(self, ref: InstanceRef) -> Any:
        return await self.call("instances", "get", f"compute.instances.get({ref.instance_id})",
                               project=ref.project, zone=ref.zone, instance=ref.instance_id)

    async def tag(self, ref: InstanceRef, tags: Mapping[str, str]) -> None:
        from google.cloud import compute_v1

        self._check(ref)
        for attempt in (1, 2):
            inst = await self._instance(ref)
            labels = dict(inst.labels)
            labels.update({f"{self.label_prefix}{k}"[:63]: label_value(v) for k, v in tags.items()})
            try:
                op = await self.call(
                    "instances", "set_labels_unary", f"compute.instances.setLabels({ref.instance_id})",
                    project=ref.project, zone=ref.zone, instance=ref.instance_id,
                    instances_set_labels_request_resource=compute_v1.InstancesSetLabelsRequest(
                        labels=labels, label_fingerprint=inst.label_fingerprint))
            except ProviderError as exc:
                if exc.code == "412" and attempt == 1:  # fingerprint changed under us: re-read, once
                    continue
                raise
            await self.wait_operation(ref, op, f"setLabels on {ref.instance_id}")
            return

    async def reboot(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult:
        self._check(ref)
        await self.tag(ref, {"id": rid, "action": "reboot"})
        from google.cloud import compute_v1

        op = await self.call("instances", "reset_unary", f"compute.instances.reset({ref.instance_id})",
                             request=compute_v1.ResetInstanceRequest(
                                 project=ref.project, zone=ref.zone, instance=ref.instance_id,
                                 request_id=request_id(rid, "reset")))
        name = await self.wait_operation(ref, op, f"reset of {ref.instance_id}")
        return ProviderResult(f"instances.reset done for {ref.instance_id} (same host)", operation=name)

    async def move(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult:
        self._check(ref)
        inst = await self._instance(ref)
        return await self._report_faulty(ref, inst, rid, reason)

    async def _report_faulty(self, ref: InstanceRef, inst: Any, rid: str, reason: str) -> ProviderResult:
        from google.cloud import compute_v1

        machine = str(inst.machine_type).rsplit("/", 1)[-1]
        if not FAULTY_HOST_TYPES.fullmatch(machine):
            raise ProviderError("unsupported", f"{ref.instance_id} is a {machine or 'unknown machine type'}: "
                                               f"reportHostAsFaulty works only on A3 Ultra, A4 and A4X VMs")
        if str(inst.status) != "RUNNING":
            raise ProviderError("unsupported", f"{ref.instance_id} is {inst.status}: reportHostAsFaulty needs a "
                                               f"RUNNING VM")
        await self.tag(ref, {"id": rid, "action": "report-faulty-host"})
        body = compute_v1.InstancesReportHostAsFaultyRequest(
            disruption_schedule="IMMEDIATE",
            fault_reasons=[compute_v1.InstancesReportHostAsFaultyRequestFaultReason(
                behavior=self.fault_behavior, description=f"gpu-health {rid}: {reason}"[:1000])])
        op = await self.call("instances", "report_host_as_faulty_unary",
                             f"compute.instances.reportHostAsFaulty({ref.instance_id})",
                             request=compute_v1.ReportHostAsFaultyInstanceRequest(
                                 project=ref.project, zone=ref.zone, instance=ref.instance_id,
                                 request_id=request_id(rid, "report-faulty-host"),
                                 instances_report_host_as_faulty_request_resource=body))
        name = await self.wait_operation(ref, op, f"reportHostAsFaulty on {ref.instance_id}")
        return ProviderResult(f"reportHostAsFaulty done for {ref.instance_id}: the VM moves to a new host",
                              new_host=True, operation=name)

    async def mark_unhealthy(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult:
        raise ProviderError("unsupported", "GCP has no mark-unhealthy; use replace (recreateInstances)")

    @staticmethod
    def _mig(ref: InstanceRef, inst: Any) -> Mig | None:
        """The instance's MIG from its created-by metadata, zonal or regional, every part validated; None when no
        MIG created it. A created-by naming a MIG that does not validate, or whose zone / region does not hold
        the instance's zone, is kind invalid (nothing written)."""
        for item in inst.metadata.items if inst.metadata else []:
            if item.key != "created-by":
                continue
            value = str(item.value)
            m = MIG_OF.fullmatch(value)
            if m is None:
                if "instanceGroupManagers" in value:
                    raise ProviderError("invalid", f"{ref.instance_id}: created-by {value[:200]!r} is not "
                                                   f"projects/…/(zones|regions)/…/instanceGroupManagers/<name>; "
                                                   f"not touched")
                return None
            kind, location, name = m.groups()
            scope = Scope(kind == "regions", location)
            valid = GCE_REGION.fullmatch(location) if scope.regional else GCE_ZONE.fullmatch(location)
            if not (valid and GCE_NAME.fullmatch(name)):
                raise ProviderError("invalid", f"{ref.instance_id}: created-by {value[:200]!r} names no valid "
                                               f"{scope.word} / MIG name; not touched")
            holds = ref.zone.startswith(location + "-") if scope.regional else ref.zone == location
            if not holds:
                raise ProviderError("invalid", f"{ref.instance_id} is in zone {ref.zone}, but its created-by names "
                                               f"MIG {name} in {scope.word} {location}; not touched")
            return Mig(name, scope)
        return None

    async def replaced(self, ref: InstanceRef, rid: str, since: float | None = None) -> Observation:
        """After a restart, from the instance's labels and creation time. We label the VM with the remediation id
        before we send anything, and a MIG recreates a VM from its template, which drops instance labels:
          our label still there    not recreated yet: sending (again) is right; the requestId dedupes a retry.
                                   A reportHostAsFaulty older than the requestId window is AMBIGUOUS instead
                                   (a second report would move the VM again).
          no label, created since  the VM under this name was created after the step began: recreated, DONE.
          no label, older          the step died before it labelled, so before it sent anything: NOT_DONE.
        A VM that is missing (deleted mid-recreate) is AMBIGUOUS."""
        self._check(ref)
        try:
            inst = await self._instance(ref)
        except ProviderError as exc:
            if exc.kind == "not_found":
                return Observation.AMBIGUOUS
            raise
        labels = dict(inst.labels)
        if labels.get(f"{self.label_prefix}id"[:63]) == label_value(rid):
            faulty = labels.get(f"{self.label_prefix}action"[:63]) == "report-faulty-host"
            if faulty and since is not None and time.time() - since > REQUEST_ID_WINDOW:
                return Observation.AMBIGUOUS
            return Observation.NOT_DONE
        created = _rfc3339(str(inst.creation_timestamp or ""))
        if since is not None and created is not None and created >= since:
            return Observation.DONE
        return Observation.NOT_DONE

    async def replace(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult:
        self._check(ref)
        inst = await self._instance(ref)
        machine = str(inst.machine_type).rsplit("/", 1)[-1]
        if self.report_faulty_host and FAULTY_HOST_TYPES.fullmatch(machine):
            return await self._report_faulty(ref, inst, rid, reason)
        mig = self._mig(ref, inst)
        if mig is None:
            raise ProviderError("unsupported", f"{ref.instance_id} is in no managed instance group: nothing would "
                                               f"recreate it, so it was not touched. Replace it by hand, or use "
                                               f"replace with human")
        if self.allowed_groups and mig.name not in self.allowed_groups:
            raise ProviderError("unsupported", f"{ref.instance_id} is in {mig.describe()}, which "
                                               f"providers.gcp.allowed_groups does not list; not touched")
        old_id = str(inst.id)
        await self.tag(ref, {"id": rid, "action": "replace", "state": "replacing"})
        name = await self._recreate(ref, mig, rid)
        return await self._await_recreated(ref, mig, old_id, name)

    async def _recreate(self, ref: InstanceRef, mig: Mig, rid: str) -> str:
        """recreateInstances of this one instance, zonal or regional (same requestId scheme), and its operation
        waited for in the MIG's scope. Returns the operation's name."""
        from google.cloud import compute_v1

        instances = [f"zones/{ref.zone}/instances/{ref.instance_id}"]
        common = {"project": ref.project, "instance_group_manager": mig.name,
                  "request_id": request_id(rid, "recreate"), **mig.scope.where}
        if mig.scope.regional:
            regional_body = compute_v1.RegionInstanceGroupManagersRecreateRequest(instances=instances)
            request: Any = compute_v1.RecreateInstancesRegionInstanceGroupManagerRequest(
                region_instance_group_managers_recreate_request_resource=regional_body, **common)
        else:
            zonal_body = compute_v1.InstanceGroupManagersRecreateInstancesRequest(instances=instances)
            request = compute_v1.RecreateInstancesInstanceGroupManagerRequest(
                instance_group_managers_recreate_instances_request_resource=zonal_body, **common)
        service, api = mig.scope.migs
        op = await self.call(service, "recreate_instances_unary", f"compute.{api}.recreateInstances({mig.name})",
                             request=request)
        return await self.wait_operation(ref, op, f"recreateInstances of {ref.instance_id} in {mig.describe()}",
                                         mig.scope)

    async def _await_recreated(self, ref: InstanceRef, mig: Mig, old_id: str, operation: str) -> ProviderResult:
        """DONE means "flag set": wait for currentAction NONE and status RUNNING in listManagedInstances (the
        zonal or the regional one, as the MIG is)."""
        service, api = mig.scope.migs
        deadline = time.monotonic() + self.replacement_timeout
        last = "absent"
        while True:
            pager = await self.call(service, "list_managed_instances",
                                    f"compute.{api}.listManagedInstances({mig.name})",
                                    project=ref.project, instance_group_manager=mig.name, **mig.scope.where)
            rows = await asyncio.to_thread(list, pager)
            mine = [m for m in rows if _is_instance(str(m.instance), ref)]
            if mine:
                m = mine[0]
                action, status = _enum(m.current_action), _enum(m.instance_status)
                last = f"currentAction {action}, status {status}"
                if action == "NONE" and status == "RUNNING":
                    new_id = str(m.id) if m.id else ""
                    changed = f"; instance id {old_id} -> {new_id}" if new_id and new_id != old_id else ""
                    return ProviderResult(f"recreated {ref.instance_id} in {mig.describe()}: RUNNING with no "
                                          f"pending action{changed}", new_host=True, operation=operation,
                                          replacement=new_id)
            if time.monotonic() > deadline:
                raise ProviderError("failed", f"{mig.describe()}: {ref.instance_id} not recreated and RUNNING "
                                              f"within {self.replacement_timeout:.0f}s (last seen: {last}); check "
                                              f"`gcloud compute instance-groups managed list-instances {mig.name} "
                                              f"--{mig.scope.word} {mig.scope.location}`")
            await asyncio.sleep(self.poll_interval)


PROVIDER = GcpProvider
