"""The config file: frozen dataclasses, validated once at start (and by `check-config`); errors name the key.

Safety defaults are the shipped values of remediation-practice.md §6.2: dry-run, default-deny, fleet cap
min(4 nodes, 5 %), breaker at 10 nodes or 10 % in 10 min, 3 attempts per node per 24 h, undo off.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gpu_health_common import validate
from gpu_health_common.durations import parse_duration
from gpu_health_common.serving import Limits
from gpu_health_common.webconfig import WebConfig, load_web_config

from . import actions as actions_pkg
from . import inventory as inventory_pkg
from .actions.base import KNOWN_ACTIONS, Action, ActionDeps
from .errors import ConfigError
from .kube import KubernetesSettings
from .models import valid_node_name

_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_K8S_LABEL_KEY = re.compile(r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                            r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_K8S_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")


# ---------------------------------------------------------------------------------------------- helpers

# The validators the exporter's web config uses too, raising this package's ConfigError.
_str = partial(validate.string, error=ConfigError)
_bool = partial(validate.boolean, error=ConfigError)
_strings = partial(validate.strings, error=ConfigError)
_file = partial(validate.existing_file, error=ConfigError)


def _mapping(value: object, key: str, allowed: set[str] | None = None) -> dict[str, Any]:
    value = validate.mapping(value, key, error=ConfigError)
    for k in value:
        if not isinstance(k, str):
            raise ConfigError(f"{key}: keys must be strings, got {k!r}")
        if allowed is not None and k not in allowed:
            raise ConfigError(f"{key}.{k}: unknown key" if key else f"{k}: unknown key")
    return value


def _int(value: object, key: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def _percent(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        raise ConfigError(f"{key}: expected a percentage between 0 and 100, got {value!r}")
    return float(value)


def _duration(value: object, key: str) -> float:
    return parse_duration(value, key, error=ConfigError)


def _address(value: object, key: str) -> str:
    text = _str(value, key)
    try:
        split_address(text)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from exc
    return text


def split_address(text: str) -> tuple[str, int]:
    """'host:port', ':port' or '[v6]:port' -> (host, port); an empty host means every interface."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected [host]:port, got {text!r}")
    return host.strip("[]"), int(port)


# ------------------------------------------------------------------------------------------- dataclasses

@dataclass(frozen=True)
class ListenerConfig:
    """One HTTP listener (the receiver or the admin API) and its credentials."""

    listen_address: str
    web: WebConfig | None = None  # exporter-toolkit web config: TLS, client certificates, basic auth users
    bearer_tokens: tuple[str, ...] = field(default=(), repr=False)
    max_body_bytes: int = 1 << 20
    # Request bytes being read or handled at once, across all requests; past it a request waits, then 503.
    max_bytes_in_flight: int = 8 << 20
    limits: Limits = field(default_factory=Limits)  # read timeout and connection cap

    @property
    def client_cert_required(self) -> bool:
        import ssl

        ctx = self.web.ssl_context() if self.web else None
        return ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED

    @property
    def auth_enabled(self) -> bool:
        return bool(self.bearer_tokens) or bool(self.web and self.web.basic_auth_enabled) or self.client_cert_required


@dataclass(frozen=True)
class AlertmanagerConfig:
    """Alertmanager's API, asked before every mutating step. Several URLs: the peers of an HA cluster (one peer
    down is not a veto; all down is)."""

    urls: tuple[str, ...]
    bearer_token: str = field(default="", repr=False)
    basic_auth: tuple[str, str] | None = field(default=None, repr=False)
    ca_file: str = ""
    insecure_skip_verify: bool = False
    timeout: float = 5.0

    @property
    def url(self) -> str:
        return self.urls[0]


@dataclass(frozen=True)
class Rule:
    """Alerts matching `match` (exact) and `match_re` (full regex match) may run `ladder` up to the rung their
    `remediation` label names."""

    name: str
    match: Mapping[str, str]
    match_re: Mapping[str, re.Pattern[str]]
    ladder: tuple[str, ...]
    requires_approval: frozenset[str] = frozenset()
    dry_run: bool = False  # true forces dry-run for this rule even when the policy is live
    # requested remediation -> the rung of this ladder it runs up to ("replace, don't repair":
    # {reboot: replace} lets remediation=reboot alerts run cordon -> drain -> replace)
    remediation_map: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def rung_for(self, wanted: str) -> str:
        return self.remediation_map.get(wanted, wanted)

    def matches(self, labels: Mapping[str, str]) -> bool:
        return (all(labels.get(k) == v for k, v in self.match.items())
                and all(p.fullmatch(labels.get(k, "")) is not None for k, p in self.match_re.items()))


@dataclass(frozen=True)
class TargetsConfig:
    node_selector: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    opt_out_label: str = "gpu-health.io/remediation-opt-out"
    control_plane_labels: tuple[str, ...] = ("node-role.kubernetes.io/control-plane",
                                             "node-role.kubernetes.io/master")


@dataclass(frozen=True)
class PolicyConfig:
    dry_run: bool = True
    rules: tuple[Rule, ...] = ()
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    max_alert_age: float = 86400.0
    future_skew: float = 300.0
    # A remediation whose alert resolves before it finished waits this long for the same alert to fire again.
    resolved_hold: float = 900.0
    # A condition alert (no fault_timestamp) still firing this long after its rung succeeded climbs to the rule's
    # next rung (escalation by persistence); 0 turns that off.
    settle_time: float = 900.0


@dataclass(frozen=True)
class RateLimit:
    max: int
    per: float


@dataclass(frozen=True)
class BreakerConfig:
    window: float = 600.0
    max_nodes: int = 10
    max_percent: float = 10.0
    min_nodes: int = 2
    trip_on_truncated: bool = True
    trip_on_alerts: tuple[str, ...] = ("GPURemediationStorm",)

    def threshold(self, pool: int | None) -> int:
        """More distinct alerting nodes than this within `window` trips the breaker: the percentage of the
        pool, but never below min_nodes (small pools) and never above max_nodes."""
        if not pool:
            return self.max_nodes
        return min(self.max_nodes, max(self.min_nodes, math.ceil(pool * self.max_percent / 100)))


@dataclass(frozen=True)
class SafetyConfig:
    fleet_cap_nodes: int = 4
    fleet_cap_percent: float = 5.0
    rate_limits: Mapping[str, RateLimit] = field(default_factory=lambda: MappingProxyType({
        "cordon": RateLimit(10, 3600.0), "taint": RateLimit(10, 3600.0), "drain": RateLimit(3, 3600.0)}))
    cooldown: float = 3600.0
    max_attempts: int = 3
    attempts_window: float = 86400.0
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    undo_enabled: bool = False
    healthy_delay: float = 900.0
    # Test-only (the fleet soak shows its oracle can fail): never set from the config file, only by the
    # environment variable TEST_ONLY_NO_ALREADY_REMEDIATED in cli.main, which logs a warning when it does.
    already_remediated_check: bool = True

    def fleet_cap(self, pool: int | None) -> int:
        """Nodes we may hold cordoned at once: min(absolute, percentage of the pool rounded up)."""
        if pool is None:
            return self.fleet_cap_nodes
        return min(self.fleet_cap_nodes, math.ceil(pool * self.fleet_cap_percent / 100))


@dataclass(frozen=True)
class RetentionConfig:
    """How long the journal keeps finished work: what decisions still read is kept whatever its age
    (journal/retention.py)."""

    age: float = 90 * 86400.0
    interval: float = 3600.0  # how often the pruning runs


# Retention may not drop what a decision still reads: a week and a day at least (the shipped rules count a week).
RETENTION_MIN = 8 * 86400.0


@dataclass(frozen=True)
class EngineConfig:
    tick: float = 5.0
    pool_refresh: float = 60.0
    verify_retries: int = 3


@dataclass(frozen=True)
class Config:
    path: str
    web: ListenerConfig
    admin: ListenerConfig
    journal_path: str
    alertmanager: AlertmanagerConfig | None
    inventory_kind: str
    inventory_raw: Mapping[str, Any]
    kubernetes: KubernetesSettings | None
    policy: PolicyConfig
    safety: SafetyConfig
    engine: EngineConfig
    actions: Mapping[str, Action]
    policy_hash: str
    effective: Mapping[str, Any] = field(repr=False, default_factory=dict)
    retention: RetentionConfig = field(default_factory=RetentionConfig)


# --------------------------------------------------------------------------------------------- loading

def load_config(path: str | os.PathLike[str]) -> Config:
    name = os.fspath(path)
    raw = validate.read_yaml(name, name, error=ConfigError)
    return build_config(raw, base=Path(name).parent, path=name)


def _tokens(path: Path, key: str) -> tuple[str, ...]:
    tokens = tuple(line.strip() for line in validate.read_text(path, key, error=ConfigError).splitlines()
                   if line.strip())
    if not tokens:
        raise ConfigError(f"{key}: {str(path)!r} holds no token")
    if any(len(t) < 16 for t in tokens):
        raise ConfigError(f"{key}: tokens must be at least 16 characters")
    return tokens


def _listener(raw: object, key: str, base: Path, default_address: str, body: bool) -> ListenerConfig:
    allowed = {"listen_address", "config_file", "bearer_token_file", "read_timeout", "max_connections",
               "max_connections_per_client"} | (
        {"max_body_bytes", "max_bytes_in_flight"} if body else set())
    sec = _mapping(raw, key, allowed)
    web = None
    if sec.get("config_file"):
        cfg_path = _file(sec["config_file"], f"{key}.config_file", base)
        try:
            web = load_web_config(cfg_path, error=ConfigError)
        except ConfigError as exc:
            raise ConfigError(f"{key}.config_file: {exc}") from exc
    tokens: tuple[str, ...] = ()
    if sec.get("bearer_token_file"):
        tokens = _tokens(_file(sec["bearer_token_file"], f"{key}.bearer_token_file", base), f"{key}.bearer_token_file")
    max_body = _int(sec.get("max_body_bytes", 1 << 20), f"{key}.max_body_bytes", 1024)
    in_flight = _int(sec.get("max_bytes_in_flight", 8 << 20), f"{key}.max_bytes_in_flight", 1024)
    if in_flight < max_body:
        raise ConfigError(f"{key}.max_bytes_in_flight: {in_flight} is less than {key}.max_body_bytes ({max_body}): "
                          f"a notification of the largest size allowed could never be received")
    read_timeout = _duration(sec.get("read_timeout", "10s"), f"{key}.read_timeout")
    if read_timeout <= 0:
        raise ConfigError(f"{key}.read_timeout: must be positive")
    limits = Limits(read_timeout=read_timeout,
                    max_connections=_int(sec.get("max_connections", Limits.max_connections),
                                         f"{key}.max_connections", 1),
                    max_connections_per_client=_int(sec.get("max_connections_per_client",
                                                            Limits.max_connections_per_client),
                                                    f"{key}.max_connections_per_client", 1))
    return ListenerConfig(listen_address=_address(sec.get("listen_address", default_address), f"{key}.listen_address"),
                          web=web, bearer_tokens=tokens, max_body_bytes=max_body, max_bytes_in_flight=in_flight,
                          limits=limits)


def _separate_credentials(web: ListenerConfig, admin: ListenerConfig) -> None:
    """The admin API can pause, approve and cancel: Alertmanager's (or a scraper's) credential must not open it,
    and without credentials of its own it must stay on loopback."""
    shared = set(web.bearer_tokens) & set(admin.bearer_tokens)
    if shared:
        raise ConfigError("admin.bearer_token_file: a token of the admin API is also a token of the receiver "
                          "(web.bearer_token_file): give the admin API its own")
    if web.web is not None and admin.web is not None:
        same = {u for u, h in admin.web.users.items() if web.web.users.get(u) == h}
        if same:
            raise ConfigError(f"admin.config_file: basic-auth user {sorted(same)[0]!r} has the same password hash "
                              f"as on the receiver (web.config_file): give the admin API its own")
    if not admin.auth_enabled:
        host, _ = split_address(admin.listen_address)
        if not _loopback(host):
            raise ConfigError(f"admin.listen_address: {admin.listen_address} is not loopback and the admin API has "
                              f"no credentials (admin.bearer_token_file or admin.config_file)")


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return bool(host) and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_USERINFO = re.compile(r"(://[^:/@\s]*):[^@/\s]*@")


def redact_url(text: str) -> str:
    """A URL (or a message holding URLs) as it may be shown or logged: a password in it
    (http://user:secret@host) becomes ***."""
    return _USERINFO.sub(r"\1:***@", text)


def _alertmanager(raw: object, base: Path) -> AlertmanagerConfig | None:
    key = "alertmanager"
    sec = _mapping(raw, key, {"url", "urls", "bearer_token_file", "basic_auth", "ca_file", "insecure_skip_verify",
                              "timeout"})
    if not sec:
        return None
    if sec.get("url") is not None and sec.get("urls") is not None:
        raise ConfigError(f"{key}.urls: set either url (one Alertmanager) or urls (the peers of an HA cluster)")
    if sec.get("urls") is not None:
        urls = _strings(sec["urls"], f"{key}.urls")
        if not urls:
            raise ConfigError(f"{key}.urls: at least one URL")
        keys = [f"{key}.urls[{i}]" for i in range(len(urls))]
    else:
        urls, keys = (_str(sec.get("url"), f"{key}.url"),), [f"{key}.url"]
    clean = []
    for k, url in zip(keys, urls, strict=True):
        url = url.rstrip("/")
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
            raise ConfigError(f"{k}: expected http(s)://host[:port][/prefix], got {url!r}")
        if url in clean:
            raise ConfigError(f"{k}: {url} is listed twice")
        clean.append(url)
    token = ""
    if sec.get("bearer_token_file"):
        token = _tokens(_file(sec["bearer_token_file"], f"{key}.bearer_token_file", base), f"{key}.bearer_token_file")[0]
    basic = None
    if sec.get("basic_auth") is not None:
        ba = _mapping(sec["basic_auth"], f"{key}.basic_auth", {"username", "password_file"})
        user = _str(ba.get("username"), f"{key}.basic_auth.username")
        pw_path = _file(ba.get("password_file"), f"{key}.basic_auth.password_file", base)
        basic = (user, validate.read_text(pw_path, f"{key}.basic_auth.password_file", error=ConfigError).strip())
        if token:
            raise ConfigError(f"{key}.basic_auth: set either basic_auth or bearer_token_file, not both")
    ca = str(_file(sec["ca_file"], f"{key}.ca_file", base)) if sec.get("ca_file") else ""
    return AlertmanagerConfig(urls=tuple(clean), bearer_token=token, basic_auth=basic, ca_file=ca,
                              insecure_skip_verify=_bool(sec.get("insecure_skip_verify", False),
                                                         f"{key}.insecure_skip_verify"),
                              timeout=_duration(sec.get("timeout", "5s"), f"{key}.timeout"))


def _kubernetes(raw: object, base: Path) -> KubernetesSettings | None:
    key = "kubernetes"
    if raw is None:
        return None
    sec = _mapping(raw, key, {"kubeconfig", "context", "in_cluster", "host", "event_namespace", "request_timeout"})
    kubeconfig = str(_file(sec["kubeconfig"], f"{key}.kubeconfig", base)) if sec.get("kubeconfig") else ""
    host = _str(sec.get("host", ""), f"{key}.host")
    if host and not re.fullmatch(r"https?://\S+", host):
        raise ConfigError(f"{key}.host: expected an http(s) URL")
    in_cluster = _bool(sec.get("in_cluster", False), f"{key}.in_cluster")
    if sum(bool(x) for x in (kubeconfig, host, in_cluster)) > 1:
        raise ConfigError(f"{key}: set only one of kubeconfig, host and in_cluster")
    ns = _str(sec.get("event_namespace", "default"), f"{key}.event_namespace")
    if not valid_node_name(ns) or "." in ns:
        raise ConfigError(f"{key}.event_namespace: not a namespace name")
    return KubernetesSettings(kubeconfig=kubeconfig, context=_str(sec.get("context", ""), f"{key}.context"),
                              in_cluster=in_cluster, host=host, event_namespace=ns,
                              request_timeout=_duration(sec.get("request_timeout", "10s"), f"{key}.request_timeout"))


def _label_map(value: object, key: str, k8s: bool) -> dict[str, str]:
    sec = _mapping(value, key)
    out = {}
    for k, v in sec.items():
        v = _str(v, f"{key}.{k}")
        if k8s and (not _K8S_LABEL_KEY.fullmatch(k) or not _K8S_LABEL_VALUE.fullmatch(v)):
            raise ConfigError(f"{key}.{k}: not a Kubernetes label key and value")
        if not k8s and not _LABEL_NAME.fullmatch(k):
            raise ConfigError(f"{key}.{k}: not a Prometheus label name")
        out[k] = v
    return out


def _rule(raw: object, key: str, executors: Mapping[str, Action]) -> Rule:
    sec = _mapping(raw, key, {"name", "match", "match_re", "ladder", "requires_approval", "dry_run",
                              "remediation_map"})
    name = _str(sec.get("name"), f"{key}.name")
    if not _RULE_NAME.fullmatch(name):
        raise ConfigError(f"{key}.name: letters, digits, '.', '_' and '-' only (at most 63)")
    match = _label_map(sec.get("match"), f"{key}.match", k8s=False)
    match_re: dict[str, re.Pattern[str]] = {}
    for k, v in _label_map(sec.get("match_re"), f"{key}.match_re", k8s=False).items():
        try:
            match_re[k] = re.compile(v)
        except re.error as exc:
            raise ConfigError(f"{key}.match_re.{k}: not a regular expression: {exc}") from exc
    if not match and not match_re:
        raise ConfigError(f"{key}.match: a rule must match at least one label (alertname, usually)")
    ladder = _strings(sec.get("ladder"), f"{key}.ladder")
    if not ladder:
        raise ConfigError(f"{key}.ladder: at least one action")
    for i, step in enumerate(ladder):
        k = f"{key}.ladder[{i}]"
        if step in executors and not getattr(executors[step], "internal", False):
            continue
        if step in KNOWN_ACTIONS:
            raise ConfigError(f"{k}: {step} has no executor configured (set actions.{step}; see "
                              f"docs/providers.md); available: {', '.join(sorted(_public(executors)))}")
        raise ConfigError(f"{k}: unknown action {step!r}; known: {', '.join(KNOWN_ACTIONS)}")
    if len(set(ladder)) != len(ladder):
        raise ConfigError(f"{key}.ladder: an action appears twice")
    # Replace needs approval unless the rule opts in by listing requires_approval itself (even as []).
    default_approval = ["replace"] if "replace" in ladder else []
    approval = _strings(sec.get("requires_approval", default_approval), f"{key}.requires_approval")
    for i, step in enumerate(approval):
        if step not in ladder:
            raise ConfigError(f"{key}.requires_approval[{i}]: {step} is not in this rule's ladder")
    rmap = _mapping(sec.get("remediation_map"), f"{key}.remediation_map")
    for wanted, rung in rmap.items():
        if wanted not in KNOWN_ACTIONS:
            raise ConfigError(f"{key}.remediation_map.{wanted}: not a remediation an alert can ask for; known: "
                              f"{', '.join(KNOWN_ACTIONS)}")
        if not isinstance(rung, str) or rung not in ladder:
            raise ConfigError(f"{key}.remediation_map.{wanted}: {rung!r} is not in this rule's ladder")
    return Rule(name=name, match=MappingProxyType(match), match_re=MappingProxyType(match_re), ladder=ladder,
                requires_approval=frozenset(approval), dry_run=_bool(sec.get("dry_run", False), f"{key}.dry_run"),
                remediation_map=MappingProxyType(dict(rmap)))


def _public(executors: Mapping[str, Action]) -> list[str]:
    return [n for n, a in executors.items() if not getattr(a, "internal", False)]


def _policy(raw: object, executors: Mapping[str, Action]) -> PolicyConfig:
    key = "policy"
    sec = _mapping(raw, key, {"dry_run", "rules", "targets", "max_alert_age", "future_skew", "resolved_hold",
                              "settle_time"})
    rules_raw = sec.get("rules") or []
    if not isinstance(rules_raw, list):
        raise ConfigError(f"{key}.rules: expected a list")
    rules = tuple(_rule(r, f"{key}.rules[{i}]", executors) for i, r in enumerate(rules_raw))
    names = [r.name for r in rules]
    for i, n in enumerate(names):
        if names.index(n) != i:
            raise ConfigError(f"{key}.rules[{i}].name: {n} is used twice")
    t = _mapping(sec.get("targets"), f"{key}.targets", {"node_selector", "opt_out_label", "control_plane_labels"})
    defaults = TargetsConfig()
    opt_out = _str(t.get("opt_out_label", defaults.opt_out_label), f"{key}.targets.opt_out_label")
    if not _K8S_LABEL_KEY.fullmatch(opt_out):
        raise ConfigError(f"{key}.targets.opt_out_label: not a Kubernetes label key")
    cp = _strings(t.get("control_plane_labels", list(defaults.control_plane_labels)), f"{key}.targets.control_plane_labels")
    for i, label in enumerate(cp):
        if not _K8S_LABEL_KEY.fullmatch(label):
            raise ConfigError(f"{key}.targets.control_plane_labels[{i}]: not a Kubernetes label key")
    if not cp:
        raise ConfigError(f"{key}.targets.control_plane_labels: control-plane nodes must be recognisable; "
                          f"keep at least node-role.kubernetes.io/control-plane")
    targets = TargetsConfig(node_selector=MappingProxyType(_label_map(t.get("node_selector"), f"{key}.targets.node_selector", k8s=True)),
                            opt_out_label=opt_out, control_plane_labels=cp)
    return PolicyConfig(dry_run=_bool(sec.get("dry_run", True), f"{key}.dry_run"), rules=rules, targets=targets,
                        max_alert_age=_duration(sec.get("max_alert_age", "24h"), f"{key}.max_alert_age"),
                        future_skew=_duration(sec.get("future_skew", "5m"), f"{key}.future_skew"),
                        resolved_hold=_duration(sec.get("resolved_hold", "15m"), f"{key}.resolved_hold"),
                        settle_time=_duration(sec.get("settle_time", "15m"), f"{key}.settle_time"))


def _safety(raw: object) -> SafetyConfig:
    key = "safety"
    d = SafetyConfig()
    sec = _mapping(raw, key, {"fleet_cap", "rate_limits", "per_node", "breaker", "undo"})
    fc = _mapping(sec.get("fleet_cap"), f"{key}.fleet_cap", {"max_nodes", "max_percent"})
    rl_raw = _mapping(sec.get("rate_limits"), f"{key}.rate_limits")
    rate_limits = dict(d.rate_limits)
    for action, spec in rl_raw.items():
        k = f"{key}.rate_limits.{action}"
        if action not in KNOWN_ACTIONS:
            raise ConfigError(f"{k}: unknown action")
        s = _mapping(spec, k, {"max", "per"})
        per = _duration(s.get("per", "1h"), f"{k}.per")
        if per <= 0:
            raise ConfigError(f"{k}.per: must be positive")
        rate_limits[action] = RateLimit(_int(s.get("max"), f"{k}.max"), per)
    pn = _mapping(sec.get("per_node"), f"{key}.per_node", {"cooldown", "max_attempts", "attempts_window"})
    br = _mapping(sec.get("breaker"), f"{key}.breaker",
                  {"window", "max_nodes", "max_percent", "min_nodes", "trip_on_truncated", "trip_on_alerts"})
    db = BreakerConfig()
    breaker = BreakerConfig(
        window=_duration(br.get("window", "10m"), f"{key}.breaker.window"),
        max_nodes=_int(br.get("max_nodes", db.max_nodes), f"{key}.breaker.max_nodes", 1),
        max_percent=_percent(br.get("max_percent", db.max_percent), f"{key}.breaker.max_percent"),
        min_nodes=_int(br.get("min_nodes", db.min_nodes), f"{key}.breaker.min_nodes", 0),
        trip_on_truncated=_bool(br.get("trip_on_truncated", True), f"{key}.breaker.trip_on_truncated"),
        trip_on_alerts=_strings(br.get("trip_on_alerts", list(db.trip_on_alerts)), f"{key}.breaker.trip_on_alerts"))
    undo = _mapping(sec.get("undo"), f"{key}.undo", {"enabled", "healthy_delay"})
    return SafetyConfig(
        fleet_cap_nodes=_int(fc.get("max_nodes", d.fleet_cap_nodes), f"{key}.fleet_cap.max_nodes"),
        fleet_cap_percent=_percent(fc.get("max_percent", d.fleet_cap_percent), f"{key}.fleet_cap.max_percent"),
        rate_limits=MappingProxyType(rate_limits),
        cooldown=_duration(pn.get("cooldown", "1h"), f"{key}.per_node.cooldown"),
        max_attempts=_int(pn.get("max_attempts", d.max_attempts), f"{key}.per_node.max_attempts", 1),
        attempts_window=_duration(pn.get("attempts_window", "24h"), f"{key}.per_node.attempts_window"),
        breaker=breaker,
        undo_enabled=_bool(undo.get("enabled", False), f"{key}.undo.enabled"),
        healthy_delay=_duration(undo.get("healthy_delay", "15m"), f"{key}.undo.healthy_delay"))


def _actions(raw: object, deps: ActionDeps | None = None) -> dict[str, Action]:
    key = "actions"
    deps = deps or ActionDeps()
    available = actions_pkg.discover()
    sec = _mapping(raw, key)
    out: dict[str, Action] = {}
    for name, spec in sec.items():
        if name not in available or available[name].internal:
            if name in KNOWN_ACTIONS:
                raise ConfigError(f"{key}.{name}: no executor for {name} yet (it arrives with the providers issue)")
            raise ConfigError(f"{key}.{name}: unknown action")
    for name, cls in available.items():
        if getattr(cls, "opt_in", False):
            # reset_gpu, reboot, replace: absent means "no executor configured"; they need their deps.
            if name in sec:
                out[name] = cls.from_config(_mapping(sec.get(name), f"{key}.{name}"), f"{key}.{name}",  # type: ignore[call-arg]
                                            deps)
            continue
        out[name] = cls.from_config(_mapping(sec.get(name), f"{key}.{name}"), f"{key}.{name}")
    taint = out.get("taint")
    if "uncordon" in out and taint is not None:
        out["uncordon"] = type(out["uncordon"])(taint.key)  # type: ignore[call-arg]
    return out


def build_config(raw: object, *, base: Path = Path("."), path: str = "<config>") -> Config:
    top = _mapping(raw, "", {"web", "admin", "journal", "alertmanager", "inventory", "kubernetes", "policy",
                             "safety", "engine", "actions", "executor", "providers"})
    web = _listener(top.get("web"), "web", base, "127.0.0.1:9096", body=True)
    admin = _listener(top.get("admin"), "admin", base, "127.0.0.1:9097", body=False)
    _separate_credentials(web, admin)
    journal = _mapping(top.get("journal"), "journal", {"path", "retention", "prune_interval"})
    journal_path = str(base / _str(journal.get("path", "gpu-health-webhook.db"), "journal.path"))
    kinds = inventory_pkg.discover()
    inv = _mapping(top.get("inventory"), "inventory")
    kind = _str(inv.get("kind", "kubernetes"), "inventory.kind")
    if kind not in kinds:
        raise ConfigError(f"inventory.kind: unknown inventory {kind!r}; available: {', '.join(sorted(kinds))}")
    validate = getattr(kinds[kind], "validate", None)
    if validate is not None:
        validate(inv, "inventory")
    elif set(inv) - {"kind"}:
        raise ConfigError(f"inventory.{sorted(set(inv) - {'kind'})[0]}: unknown key")
    kubernetes = _kubernetes(top.get("kubernetes"), base)
    if kind == "kubernetes" and kubernetes is None:
        raise ConfigError("kubernetes: required by inventory.kind kubernetes (e.g. kubernetes: {in_cluster: true})")
    from .executor import JobExecutor, executor_settings
    from .providers import build_providers

    ex_settings = executor_settings(top.get("executor"))
    if ex_settings is not None and kubernetes is None:
        raise ConfigError("executor: needs the kubernetes: section (the executor is a Kubernetes Job)")
    executor = JobExecutor(ex_settings, kubernetes) if ex_settings is not None else None
    actions = _actions(top.get("actions"), ActionDeps(kubernetes, executor, build_providers(top.get("providers"), kubernetes)))
    policy = _policy(top.get("policy"), actions)
    safety = _safety(top.get("safety"))
    retention = _retention(journal, policy, safety)
    eng = _mapping(top.get("engine"), "engine", {"tick", "pool_refresh", "verify_retries"})
    engine = EngineConfig(tick=_duration(eng.get("tick", "5s"), "engine.tick"),
                          pool_refresh=_duration(eng.get("pool_refresh", "60s"), "engine.pool_refresh"),
                          verify_retries=_int(eng.get("verify_retries", 3), "engine.verify_retries", 1))
    if engine.tick <= 0:
        raise ConfigError("engine.tick: must be positive")
    alertmanager = _alertmanager(top.get("alertmanager"), base)
    live = not policy.dry_run and any(not r.dry_run for r in policy.rules)
    if live and alertmanager is None:
        raise ConfigError("alertmanager.url: required when policy.dry_run is false: every mutating step is "
                          "verified against Alertmanager first")
    if kubernetes is None and any(a in ("cordon", "taint", "drain") for r in policy.rules for a in r.ladder):
        raise ConfigError("kubernetes: required by the cordon, taint and drain actions")
    effective = {"policy": top.get("policy") or {}, "safety": top.get("safety") or {},
                 "actions": top.get("actions") or {}, "inventory": inv, "executor": top.get("executor") or {},
                 "providers": sorted(top.get("providers") or {})}
    policy_hash = hashlib.sha256(json.dumps(effective, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Config(path=path, web=web, admin=admin, journal_path=journal_path, alertmanager=alertmanager,
                  inventory_kind=kind, inventory_raw=MappingProxyType(dict(inv)), kubernetes=kubernetes,
                  policy=policy, safety=safety, engine=engine, actions=MappingProxyType(actions),
                  policy_hash=policy_hash, effective=effective, retention=retention)


PRUNE_INTERVAL_MAX = 12 * 3600.0


def _retention(journal: Mapping[str, Any], policy: PolicyConfig, safety: SafetyConfig) -> RetentionConfig:
    out = RetentionConfig(age=_duration(journal.get("retention", "90d"), "journal.retention"),
                          interval=_duration(journal.get("prune_interval", "1h"), "journal.prune_interval"))
    needs = {"8 days": RETENTION_MIN, "safety.cooldown": safety.cooldown,
             "safety.attempts_window": safety.attempts_window, "policy.max_alert_age": policy.max_alert_age,
             "policy.resolved_hold": policy.resolved_hold, "safety.breaker.window": safety.breaker.window,
             **{f"safety.rate_limits.{k}.per": v.per for k, v in safety.rate_limits.items()}}
    for what, seconds in needs.items():
        if out.age < seconds:
            raise ConfigError(f"journal.retention: {out.age:g}s is shorter than {what} ({seconds:g}s): the journal "
                              f"would forget what that decision reads")
    if not 0 < out.interval <= PRUNE_INTERVAL_MAX:
        # GPURemediationJournalNotPruned fires when no pass completed for a day.
        raise ConfigError(f"journal.prune_interval: must be above zero and at most {PRUNE_INTERVAL_MAX / 3600:g}h "
                          f"(GPURemediationJournalNotPruned fires after a day without a pass)")
    return out


# The shipped remediation alerts keep firing 10 minutes after their fault stands no more (keep_firing_for); a settle
# time below this would climb the ladder for every condition a reset fixed.
SETTLE_MIN = 11 * 60.0


def warnings(config: Config) -> list[str]:
    """What is valid but probably wrong: said by check-config and logged at start."""
    out = []
    if 0 < config.policy.settle_time < SETTLE_MIN:
        out.append(f"policy.settle_time: {config.policy.settle_time:g}s is shorter than the shipped alerts' "
                   f"keep_firing_for (10m) plus a minute: a condition fixed by its rung would still fire and climb")
    return out


def effective_policy(config: Config) -> dict[str, Any]:
    """The policy as the webhook will apply it (defaults filled in), for GET /v1/policy."""
    p, s = config.policy, config.safety
    return {
        "policy_hash": config.policy_hash,
        "dry_run": p.dry_run,
        "default": "deny",
        "max_alert_age_seconds": p.max_alert_age,
        "future_skew_seconds": p.future_skew,
        "resolved_hold_seconds": p.resolved_hold,
        "settle_time_seconds": p.settle_time,
        "targets": {"node_selector": dict(p.targets.node_selector), "opt_out_label": p.targets.opt_out_label,
                    "control_plane_labels": list(p.targets.control_plane_labels)},
        "rules": [{"name": r.name, "match": dict(r.match), "match_re": {k: v.pattern for k, v in r.match_re.items()},
                   "ladder": list(r.ladder), "requires_approval": sorted(r.requires_approval),
                   "remediation_map": dict(r.remediation_map),
                   "dry_run": p.dry_run or r.dry_run} for r in p.rules],
        "safety": {
            "fleet_cap": {"max_nodes": s.fleet_cap_nodes, "max_percent": s.fleet_cap_percent},
            "rate_limits": {k: {"max": v.max, "per_seconds": v.per} for k, v in s.rate_limits.items()},
            "per_node": {"cooldown_seconds": s.cooldown, "max_attempts": s.max_attempts,
                         "attempts_window_seconds": s.attempts_window},
            "breaker": {"window_seconds": s.breaker.window, "max_nodes": s.breaker.max_nodes,
                        "max_percent": s.breaker.max_percent, "min_nodes": s.breaker.min_nodes,
                        "trip_on_truncated": s.breaker.trip_on_truncated,
                        "trip_on_alerts": list(s.breaker.trip_on_alerts)},
            "undo": {"enabled": s.undo_enabled, "healthy_delay_seconds": s.healthy_delay},
        },
        "actions": sorted(n for n, a in config.actions.items() if not a.internal),
        "journal": {"retention_seconds": config.retention.age, "prune_interval_seconds": config.retention.interval},
        "inventory": config.inventory_kind,
        "alertmanager": [redact_url(u) for u in config.alertmanager.urls] if config.alertmanager else None,
    }
