"""The provider seam: what a machine-level action needs from whoever owns the machine.

One module per provider (aws, gcp, azure, slurm, human, k8s_native), each defining PROVIDER (or PROVIDERS): a class
with `from_config(raw, key)`. A provider resolves a node to an instance (validating every identifier before
any call), and offers the verbs it really has; a verb it lacks raises ProviderError(kind="unsupported").

Errors are classified once, here, so every provider journals and counts them alike:
  auth         the cloud refused our identity or permission (fix IAM / the token)
  not_found    the instance (or its group) does not exist any more
  throttled    still throttled after the retries
  capacity     a replacement cannot launch (InsufficientInstanceCapacity and friends): loud
  invalid      an identifier failed validation; no call was made
  unsupported  the provider or the machine cannot do this (no ASG, not a MIG, MIG mode...)
  failed       the operation ran and failed
  unavailable  the API could not be reached; the outcome of a mutating call is unknown
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import pkgutil
import random
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Protocol, TypeVar

from ..actions.base import Observation
from ..errors import ConfigError, WebhookError
from ..inventory.base import NodeIdentity

T = TypeVar("T")

ERROR_KINDS = ("auth", "not_found", "throttled", "capacity", "invalid", "unsupported", "failed", "unavailable")

# Strict identifier shapes, checked before any call (remediation-practice.md §3.1).
AWS_INSTANCE_ID = re.compile(r"i-[0-9a-f]{8,17}")
AWS_ZONE = re.compile(r"[a-z]{2}(-[a-z]+)+-\d[a-z]")
GCE_PROJECT = re.compile(r"[a-z][-a-z0-9.:]{4,61}[a-z0-9]")
GCE_ZONE = re.compile(r"[a-z]+-[a-z]+\d+-[a-z]")
GCE_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
AZ_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
AZ_NAME = re.compile(r"[A-Za-z0-9][-A-Za-z0-9_.()]{0,89}")
AZ_INSTANCE = re.compile(r"\d{1,9}")


class ProviderError(WebhookError):
    """A provider call failed; `kind` is one of ERROR_KINDS and `detail` tells an operator what to do."""

    def __init__(self, kind: str, detail: str, *, code: str = "") -> None:
        assert kind in ERROR_KINDS, kind
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.code = code


@dataclass(frozen=True)
class InstanceRef:
    """A validated machine identity at one provider. `group` is the ASG / MIG / VMSS / NodePool, if any."""

    provider: str
    instance_id: str
    zone: str = ""
    project: str = ""  # GCP project; Azure subscription
    resource_group: str = ""  # Azure
    scale_set: str = ""  # Azure VMSS name
    group: str = ""
    extra: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def describe(self) -> str:
        where = "/".join(p for p in (self.project, self.resource_group, self.zone, self.scale_set) if p)
        return f"{self.provider}:{where + '/' if where else ''}{self.instance_id}"


@dataclass(frozen=True)
class ProviderResult:
    """What a verb did; `new_host` says whether the machine is known to come back on different hardware."""

    detail: str
    new_host: bool = False
    operation: str = ""  # operation name / activity id / async URL, for the journal
    replacement: str = ""  # the replacement instance, when one is known


def parse_provider_id(provider_id: str) -> InstanceRef | None:
    """Kubernetes spec.providerID -> a validated InstanceRef, or None when it names no cloud we know.

    Raises ProviderError(invalid) when the prefix is known but a part is malformed: we never guess."""
    pid = provider_id.strip()
    if pid.startswith("aws://"):
        parts = pid[len("aws://"):].strip("/").split("/")
        instance = parts[-1]
        zone = parts[-2] if len(parts) >= 2 else ""
        if not AWS_INSTANCE_ID.fullmatch(instance) or (zone and not AWS_ZONE.fullmatch(zone)):
            raise ProviderError("invalid", f"providerID {pid[:200]!r} is not aws:///<zone>/i-<hex>")
        return InstanceRef("aws", instance, zone=zone)
    if pid.startswith("gce://"):
        parts = pid[len("gce://"):].split("/")
        if len(parts) != 3 or not GCE_PROJECT.fullmatch(parts[0]) or not GCE_ZONE.fullmatch(parts[1]) \
                or not GCE_NAME.fullmatch(parts[2]):
            raise ProviderError("invalid", f"providerID {pid[:200]!r} is not gce://<project>/<zone>/<name>")
        return InstanceRef("gcp", parts[2], zone=parts[1], project=parts[0])
    if pid.lower().startswith("azure://"):
        m = re.fullmatch(r"azure:///subscriptions/([^/]+)/resourcegroups/([^/]+)/providers/microsoft\.compute/"
                         r"virtualmachinescalesets/([^/]+)/virtualmachines/([^/]+)", pid, re.IGNORECASE)
        if m is None:
            m2 = re.fullmatch(r"azure:///subscriptions/([^/]+)/resourcegroups/([^/]+)/providers/microsoft\.compute/"
                              r"virtualmachines/([^/]+)", pid, re.IGNORECASE)
            if m2 and AZ_GUID.fullmatch(m2[1]) and AZ_NAME.fullmatch(m2[2]) and AZ_NAME.fullmatch(m2[3]):
                return InstanceRef("azure", m2[3], project=m2[1], resource_group=m2[2])
            raise ProviderError("invalid", f"providerID {pid[:200]!r} is not an Azure VMSS VM or VM resource id")
        sub, rg, vmss, inst = m.groups()
        if not (AZ_GUID.fullmatch(sub) and AZ_NAME.fullmatch(rg) and AZ_NAME.fullmatch(vmss)
                and AZ_INSTANCE.fullmatch(inst)):
            raise ProviderError("invalid", f"providerID {pid[:200]!r}: a part failed validation")
        return InstanceRef("azure", inst, project=sub, resource_group=rg, scale_set=vmss)
    return None


def ref_of_node(node: NodeIdentity, provider: str, shape: str) -> InstanceRef:
    """The node's providerID as `provider`'s InstanceRef, or ProviderError(invalid) saying the `shape` expected."""
    ref = parse_provider_id(node.provider_id) if node.provider_id else None
    if ref is None or ref.provider != provider:
        raise ProviderError("invalid", f"node {node.name}: providerID {node.provider_id[:200]!r} is not {shape}")
    return ref


PROVIDER_OF_PREFIX = {"aws": "aws", "gce": "gcp", "azure": "azure"}


def provider_name_for(node: NodeIdentity) -> str:
    """Which cloud a node lives in, from its providerID ('' for bare metal / unknown)."""
    scheme = node.provider_id.split(":", 1)[0].lower() if ":" in node.provider_id else ""
    return PROVIDER_OF_PREFIX.get(scheme, "")


class Provider(Protocol):
    """Every verb takes a validated InstanceRef; verbs a provider lacks raise ProviderError('unsupported')."""

    name: ClassVar[str]

    async def resolve(self, node: NodeIdentity) -> InstanceRef: ...
    async def reboot(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult: ...
    async def replace(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult: ...
    async def mark_unhealthy(self, ref: InstanceRef, rid: str, reason: str) -> ProviderResult: ...
    async def tag(self, ref: InstanceRef, tags: Mapping[str, str]) -> None: ...
    async def replaced(self, ref: InstanceRef, rid: str, since: float | None = None) -> Observation:
        """After a restart: DONE (we replaced it), NOT_DONE (replace is safe to send again) or AMBIGUOUS (it may
        have happened and cannot safely be repeated: a human decides). `since`: when the interrupted step began
        (unix seconds), where the journal knows it."""
        ...


def discover() -> dict[str, Any]:
    """Provider name -> class, for every sibling module that defines PROVIDER."""
    found: dict[str, Any] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for cls in (getattr(module, "PROVIDER", None), *getattr(module, "PROVIDERS", ())):
            if cls is not None:
                found[cls.name] = cls
    return found


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module with no spec
        return False


def build_providers(raw: object, kubernetes: Any = None) -> dict[str, Any]:
    """The `providers:` section -> configured provider instances (clients are created lazily).

    Providers that work through the Kubernetes API (karpenter, cluster_api) get the `kubernetes:` settings."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("providers: expected a mapping of provider name to its settings")
    available = discover()
    out: dict[str, Any] = {}
    for name, spec in raw.items():
        if name not in available:
            raise ConfigError(f"providers.{name}: unknown provider; available: {', '.join(sorted(available))}")
        if spec is not None and not isinstance(spec, dict):
            raise ConfigError(f"providers.{name}: expected a mapping")
        missing = [dist for module, dist in getattr(available[name], "sdk", ()) if not importable(module)]
        if missing:
            # Found now, not at the first replace (a ModuleNotFoundError in the middle of a remediation).
            raise ConfigError(f"providers.{name}: needs the Python package {', '.join(missing)}, which is not "
                              f"installed (pip install 'gpu-health[{name}]'; the webhook image: build it with "
                              f"--build-arg PROVIDERS including {name})")
        out[name] = available[name].from_config(spec or {}, f"providers.{name}")
        bind = getattr(out[name], "bind_kubernetes", None)
        if bind is not None:
            bind(kubernetes, f"providers.{name}")
    return out


async def with_backoff(fn: Callable[[], Awaitable[T]], *, retryable: Callable[[Exception], bool], attempts: int,
                       base: float, cap: float, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                       on_retry: Callable[[Exception], None] | None = None) -> T:
    """Full-jitter exponential backoff around `fn` for the errors `retryable` accepts."""
    delay = base
    for attempt in range(1, attempts + 1):
        try:
            return await fn()
        except Exception as exc:
            if attempt == attempts or not retryable(exc):
                raise
            if on_retry is not None:
                on_retry(exc)
            await sleep(random.uniform(0, delay))
            delay = min(cap, delay * 2)
    raise AssertionError("unreachable")


def opt(raw: Mapping[str, Any], key: str, name: str, kind: type, default: Any) -> Any:
    value = raw.get(name, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}.{name}: expected {kind.__name__}, got {value!r}")
    return value


def duration(raw: Mapping[str, Any], key: str, name: str, default: str) -> float:
    from gpu_health_common.durations import parse_duration

    return float(parse_duration(raw.get(name, default), f"{key}.{name}", error=ConfigError))


def only_keys(raw: Mapping[str, Any], key: str, allowed: set[str]) -> None:
    unknown = sorted(set(map(str, raw)) - allowed)
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key")
