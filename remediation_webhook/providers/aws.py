"""AWS (boto3): EC2 and EC2 Auto Scaling, for nodes whose providerID is aws:///<zone>/i-<hex>.

  reboot          ec2:RebootInstances                     same host; no client token (journal first)
  replace         autoscaling:TerminateInstanceInAutoScalingGroup(ShouldDecrementDesiredCapacity=False)
                  (replace_mode: terminate, the default) or autoscaling:SetInstanceHealth(Unhealthy)
                  (replace_mode: unhealthy); verified: the old instance leaves service, a replacement
                  reaches InService, desired capacity unchanged. A failed launch (InsufficientInstanceCapacity)
                  is reported as kind "capacity". An instance in no ASG is never terminated.
  mark_unhealthy  autoscaling:SetInstanceHealth(Unhealthy)
  tag             ec2:CreateTags with keys under tag_prefix (the IAM policy allows only those keys)

Throttling (Throttling, RequestLimitExceeded) is retried by botocore's standard retry mode; ResourceContention
and ScalingActivityInProgress, which botocore does not retry, by our own full-jitter backoff.
Blocking boto3 calls run in a thread. Permissions: deploy/iam/aws-policy.json.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from ..actions.base import Observation
from ..errors import ConfigError
from ..inventory.base import NodeIdentity
from . import (
    AWS_INSTANCE_ID,
    InstanceRef,
    ProviderError,
    ProviderResult,
    duration,
    only_keys,
    opt,
    ref_of_node,
    with_backoff,
)

AUTH = {"AuthFailure", "UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "InvalidClientTokenId",
        "SignatureDoesNotMatch", "ExpiredToken", "UnrecognizedClientException", "OptInRequired"}
NOT_FOUND = {"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed", "ValidationError.NotFound"}
THROTTLED = {"Throttling", "ThrottlingException", "RequestLimitExceeded", "ResourceContention",
             "ScalingActivityInProgress", "TooManyRequestsException", "RequestThrottled"}
CAPACITY = ("InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity",
            "InsufficientReservedInstanceCapacity", "MaxSpotInstanceCountExceeded", "InstanceLimitExceeded")


def classify(exc: Exception, what: str) -> ProviderError:
    """Any boto3/botocore failure -> ProviderError with an operator-facing message."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.parsers import ResponseParserError

    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code, message = str(err.get("Code", "")), str(err.get("Message", ""))[:300]
        if code in AUTH:
            return ProviderError("auth", f"AWS refused {what} ({code}: {message}); check the webhook's IAM role "
                                         f"against deploy/iam/aws-policy.json and the instance's fleet tag", code=code)
        if code in NOT_FOUND or "NotFound" in code:
            return ProviderError("not_found", f"{what}: {code}: {message}", code=code)
        if code in THROTTLED:
            return ProviderError("throttled", f"{what}: still throttled after retries ({code}); lower the rate "
                                              f"limits or retry later", code=code)
        if any(c in code or c in message for c in CAPACITY):
            return ProviderError("capacity", f"{what}: {code}: {message}", code=code)
        return ProviderError("failed", f"{what}: {code or 'error'}: {message}", code=code)
    if isinstance(exc, NoCredentialsError):
        return ProviderError("auth", f"{what}: no AWS credentials (set providers.aws credentials, IRSA or "
                                     f"EKS Pod Identity)", code="NoCredentials")
    if isinstance(exc, ResponseParserError):  # moto answers unimplemented calls with a 500 HTML page
        return ProviderError("failed", f"{what}: unparseable AWS response: {str(exc)[:200]}")
    if isinstance(exc, BotoConnectionError | BotoCoreError):
        return ProviderError("unavailable", f"{what}: AWS API unreachable: {str(exc)[:200]}")
    return ProviderError("failed", f"{what}: {type(exc).__name__}: {str(exc)[:200]}")


def _secret(raw: Mapping[str, Any], key: str, name: str) -> str:
    if raw.get(f"{name}_file"):
        path = Path(str(raw[f"{name}_file"]))
        if not path.is_file():
            raise ConfigError(f"{key}.{name}_file: no such file {str(path)!r}")
        return path.read_text(encoding="utf-8").strip()
    value = raw.get(name, "")
    if not isinstance(value, str):
        raise ConfigError(f"{key}.{name}: expected a string")
    return value


class AwsProvider:
    name: ClassVar[str] = "aws"
    # (module to import, distribution that provides it): checked by build_providers at config time.
    sdk: ClassVar[tuple[tuple[str, str], ...]] = (("boto3", "boto3"), ("botocore", "botocore"))

    def __init__(self, *, region: str, endpoint_url: str = "", access_key_id: str = "", secret_access_key: str = "",
                 session_token: str = "", replace_mode: str = "terminate", tag_prefix: str = "remediation/",
                 max_attempts: int = 5, retry_base: float = 1.0, retry_cap: float = 30.0,
                 replacement_timeout: float = 900.0, poll_interval: float = 15.0,
                 allowed_groups: tuple[str, ...] = (), lookup: str = "provider-id",
                 call_timeout: float = 30.0) -> None:
        self.region = region
        self.endpoint_url = endpoint_url
        self._creds = (access_key_id, secret_access_key, session_token)
        self.replace_mode = replace_mode
        self.tag_prefix = tag_prefix
        self.max_attempts = max_attempts
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.replacement_timeout = replacement_timeout
        self.poll_interval = poll_interval
        self.allowed_groups = allowed_groups
        self.lookup = lookup
        self.call_timeout = call_timeout
        self._clients: dict[str, Any] = {}
        self.retries_seen = 0  # our own retries (botocore's are on top), for tests and logs

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], key: str) -> AwsProvider:
        only_keys(raw, key, {"region", "endpoint_url", "access_key_id", "access_key_id_file", "secret_access_key",
                             "secret_access_key_file", "session_token", "replace_mode", "tag_prefix",
                             "max_attempts", "retry_base", "retry_cap", "replacement_timeout", "poll_interval",
                             "allowed_groups", "lookup", "call_timeout"})
        region = opt(raw, key, "region", str, "")
        if not region:
            raise ConfigError(f"{key}.region: required (e.g. us-east-1)")
        endpoint = opt(raw, key, "endpoint_url", str, "")
        if endpoint and not endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"{key}.endpoint_url: expected an http(s) URL")
        mode = opt(raw, key, "replace_mode", str, "terminate")
        if mode not in ("terminate", "unhealthy"):
            raise ConfigError(f"{key}.replace_mode: terminate or unhealthy")
        lookup = opt(raw, key, "lookup", str, "provider-id")
        if lookup not in ("provider-id", "private-dns-name"):
            raise ConfigError(f"{key}.lookup: provider-id or private-dns-name")
        prefix = opt(raw, key, "tag_prefix", str, "remediation/")
        if not prefix or prefix.startswith("aws:"):
            raise ConfigError(f"{key}.tag_prefix: a non-empty prefix outside aws:")
        groups = raw.get("allowed_groups") or []
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise ConfigError(f"{key}.allowed_groups: expected a list of auto scaling group names")
        access, secret = _secret(raw, key, "access_key_id"), _secret(raw, key, "secret_access_key")
        if bool(access) != bool(secret):
            raise ConfigError(f"{key}: set both access_key_id and secret_access_key, or neither (default chain)")
        return cls(region=region, endpoint_url=endpoint, access_key_id=access, secret_access_key=secret,
                   session_token=opt(raw, key, "session_token", str, ""), replace_mode=mode, tag_prefix=prefix,
                   max_attempts=opt(raw, key, "max_attempts", int, 5),
                   retry_base=duration(raw, key, "retry_base", "1s"), retry_cap=duration(raw, key, "retry_cap", "30s"),
                   replacement_timeout=duration(raw, key, "replacement_timeout", "15m"),
                   poll_interval=duration(raw, key, "poll_interval", "15s"), allowed_groups=tuple(groups),
                   lookup=lookup, call_timeout=duration(raw, key, "call_timeout", "30s"))

    # ------------------------------------------------------------------------------------------ plumbing

    def client(self, service: str) -> Any:
        if service not in self._clients:
            import boto3
            from botocore.config import Config as BotoConfig

            access, secret, token = self._creds
            session = boto3.session.Session(aws_access_key_id=access or None, aws_secret_access_key=secret or None,
                                            aws_session_token=token or None, region_name=self.region)
            cfg = BotoConfig(retries={"mode": "standard", "max_attempts": self.max_attempts},
                             connect_timeout=self.call_timeout, read_timeout=self.call_timeout,
                             user_agent_extra="gpu-health-webhook")
            self._clients[service] = session.client(service, endpoint_url=self.endpoint_url or None, config=cfg)
        return self._clients[service]

    async def call(self, service: str, op: str, **kwargs: Any) -> dict[str, Any]:
        what = f"{service}:{''.join(p.capitalize() for p in op.split('_'))}"

        async def once() -> dict[str, Any]:
            try:
                return await asyncio.to_thread(lambda: getattr(self.client(service), op)(**kwargs))  # type: ignore[no-any-return]
            except Exception as exc:
                raise classify(exc, what) from exc

        def count(_exc: Exception) -> None:
            self.retries_seen += 1

        return await with_backoff(once, retryable=lambda e: isinstance(e, ProviderError) and e.kind == "throttled",
                                  attempts=self.max_attempts, base=self.retry_base, cap=self.retry_cap,
                                  on_retry=count)

    # ------------------------------------------------------------------------------------------ verbs

    async def resolve(self, node: NodeIdentity) -> InstanceRef:
        if node.provider_id:
            return ref_of_node(node, "aws", "AWS")
        if self.lookup != "private-dns-name":
            raise ProviderError("invalid", f"node {node.name} has no providerID; set providers.aws.lookup: "
                                           f"private-dns-name to look it up by its private DNS name")
        out = await self.call("ec2", "describe_instances", Filters=[
            {"Name": "private-dns-name", "Values": [node.name]},
            {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}])
        found = [i for r in out.get("Reservations", []) for i in r.get("Instances", [])]
        if not found:
            raise ProviderError("not_found", f"node {node.name}: no live instance has that private DNS name")
        if len(found) > 1:  # ambiguous, not gone: never read as "already replaced" after a restart
            raise ProviderError("invalid", f"node {node.name}: {len(found)} instances have that private DNS name "
                                           f"(need exactly one); use providers.aws.lookup: provider-id")
        iid = str(found[0]["InstanceId"])
        if not AWS_INSTANCE_ID.fullmatch(iid):
            raise ProviderError("invalid", f"node {node.name}: EC2 returned a malformed instance id")
        return InstanceRef("aws", iid, zone=str(found[0].get("Placement", {}).get("AvailabilityZone", "")))

    def _check(self, ref: InstanceRef) -> str:
        if ref.provider != "aws" or not AWS_INSTANCE_ID.fullmatch(ref.instance_id):
            raise ProviderError("invalid", f"{ref.describe()} is not a valid EC2 instance id")
        return ref.instance_id

    async def _instance(self, iid: str) -> dict[str, Any]:
        out = await self.call("ec2", "describe_instances", InstanceIds=[iid])
        found = [i for r in out.get("Reservations", []) for i in r.get("Instances", [])]
        if not found:
            raise ProviderError("not_found", f"instance {iid} not found in {self.region}")
        return dict(found[0])

    async def tag(self, ref: InstanceRef, tags: Mapping[str, str]) -> None:
        iid = self._check(ref)
        await self.call("ec2", "create_tags", Resources=[iid],
                        Tags=[{"Key": f"{self.tag_prefix}{k}", "Value": v[:255]} for k, v in tags.items()])

    async def reboot(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult:
        iid = self._check(ref)
        await self.tag(ref, {"id": rid, "action": "reboot"})
        await self.call("ec2", "reboot_instances", InstanceIds=[iid])
        return ProviderResult(f"RebootInstances accepted for {iid} (same host)")

    async def _membership(self, iid: str) -> dict[str, Any] | None:
        out = await self.call("autoscaling", "describe_auto_scaling_instances", InstanceIds=[iid])
        rows = out.get("AutoScalingInstances", [])
        return dict(rows[0]) if rows else None

    async def _group(self, name: str) -> dict[str, Any]:
        out = await self.call("autoscaling", "describe_auto_scaling_groups", AutoScalingGroupNames=[name])
        groups = out.get("AutoScalingGroups", [])
        if not groups:
            raise ProviderError("not_found", f"auto scaling group {name} not found")
        return dict(groups[0])

    async def mark_unhealthy(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult:
        iid = self._check(ref)
        await self.tag(ref, {"id": rid, "action": "mark-unhealthy"})
        await self.call("autoscaling", "set_instance_health", InstanceId=iid, HealthStatus="Unhealthy",
                        ShouldRespectGracePeriod=False)
        return ProviderResult(f"{iid} marked Unhealthy; its group replaces it")

    async def replaced(self, ref: InstanceRef, rid: str, since: float | None = None) -> Observation:
        """DONE once our tagged instance is terminating; otherwise replace is safe to send again, because it
        checks the instance's lifecycle state before it terminates anything."""
        iid = self._check(ref)
        try:
            inst = await self._instance(iid)
        except ProviderError as exc:
            if exc.kind == "not_found":
                return Observation.DONE
            raise
        tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
        gone = inst.get("State", {}).get("Name") in ("shutting-down", "terminated")
        return Observation.DONE if gone and tags.get(f"{self.tag_prefix}id") == rid else Observation.NOT_DONE

    async def replace(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult:
        iid = self._check(ref)
        member = await self._membership(iid)
        if member is None:
            await self._instance(iid)  # not_found if the instance itself is gone
            raise ProviderError("unsupported", f"{iid} is in no auto scaling group: nothing would launch a "
                                               f"replacement, so it was not terminated. Replace it by hand, or "
                                               f"use replace with karpenter / cluster_api / human")
        asg = str(member["AutoScalingGroupName"])
        if self.allowed_groups and asg not in self.allowed_groups:
            raise ProviderError("unsupported", f"{iid} is in group {asg}, which providers.aws.allowed_groups "
                                               f"does not list; not touched")
        if str(member.get("LifecycleState", "")).startswith("Terminating"):
            return ProviderResult(f"{iid} in {asg} is already {member['LifecycleState']}; not sent again",
                                  new_host=True)
        group = await self._group(asg)
        suspended = {p.get("ProcessName") for p in group.get("SuspendedProcesses", [])}
        needed = {"Launch", "Terminate"} | ({"ReplaceUnhealthy", "HealthCheck"} if self.replace_mode == "unhealthy"
                                            else set())
        if suspended & needed:
            raise ProviderError("unsupported", f"group {asg} has {', '.join(sorted(suspended & needed))} suspended: "
                                               f"no replacement would launch; resume the processes first")
        desired = int(group.get("DesiredCapacity", 0))
        before = {str(i["InstanceId"]) for i in group.get("Instances", [])}
        await self.tag(ref, {"id": rid, "action": "replace", "state": "replacing"})
        started = datetime.now(UTC)
        if self.replace_mode == "terminate":
            out = await self.call("autoscaling", "terminate_instance_in_auto_scaling_group", InstanceId=iid,
                                  ShouldDecrementDesiredCapacity=False)
            operation = str((out.get("Activity") or {}).get("ActivityId", ""))
        else:
            await self.call("autoscaling", "set_instance_health", InstanceId=iid, HealthStatus="Unhealthy",
                            ShouldRespectGracePeriod=False)
            operation = ""
        return await self._await_replacement(iid, asg, desired, before, started, operation)

    async def _await_replacement(self, iid: str, asg: str, desired: int, before: set[str], started: datetime,
                                 operation: str) -> ProviderResult:
        deadline = time.monotonic() + self.replacement_timeout
        while True:
            await self._launch_failures(asg, started)
            group = await self._group(asg)
            now_desired = int(group.get("DesiredCapacity", 0))
            if now_desired != desired:
                raise ProviderError("failed", f"group {asg}: desired capacity changed from {desired} to "
                                              f"{now_desired} during the replace; check who scaled it")
            members = {str(i["InstanceId"]): i for i in group.get("Instances", [])}
            old = members.get(iid)
            old_gone = old is None or str(old.get("LifecycleState", "")).startswith("Terminat")
            fresh = sorted(i for i, m in members.items() if i not in before and m.get("LifecycleState") == "InService")
            if old_gone and fresh:
                return ProviderResult(f"replaced {iid} in {asg}: {fresh[0]} is InService, desired capacity "
                                      f"{desired} unchanged", new_host=True, operation=operation,
                                      replacement=fresh[0])
            if time.monotonic() > deadline:
                raise ProviderError("failed", f"group {asg}: no replacement for {iid} reached InService within "
                                              f"{self.replacement_timeout:.0f}s (old instance "
                                              f"{'gone' if old_gone else 'still in service'})")
            await asyncio.sleep(self.poll_interval)

    async def _launch_failures(self, asg: str, since: datetime) -> None:
        """A failed launch since we started (InsufficientInstanceCapacity...) is reported as kind capacity."""
        out = await self.call("autoscaling", "describe_scaling_activities", AutoScalingGroupName=asg, MaxRecords=20)
        for act in out.get("Activities", []):
            start = act.get("StartTime")
            if isinstance(start, datetime) and start.tzinfo is None:
                start = start.replace(tzinfo=UTC)
            if act.get("StatusCode") not in ("Failed", "Cancelled") or (isinstance(start, datetime)
                                                                       and start < since.replace(microsecond=0)):
                continue
            text = f"{act.get('StatusMessage', '')} {act.get('Description', '')}"
            if any(c in text for c in CAPACITY):
                raise ProviderError("capacity", f"group {asg}: the replacement cannot launch: "
                                                f"{str(act.get('StatusMessage', ''))[:300]} (activity "
                                                f"{act.get('ActivityId', '?')}); the node stays cordoned and drained, "
                                                f"capacity is short until AWS can place the instance",
                                    code="InsufficientInstanceCapacity")


PROVIDER = AwsProvider
