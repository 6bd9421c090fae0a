"""Slurm over slurmrestd (providers.slurm.rest) against a local fake slurmrestd speaking data_parser v0.0.41:
request bodies, the JWT header and its rotation, error classification, retries, and config errors; and the Slurm
inventory over the same transport (inventory.rest): resolve, pool size from GET /nodes, readiness from GET /ping."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from remediation_webhook.config import build_config
from remediation_webhook.errors import ConfigError, InventoryUnavailable, NodeNotFound
from remediation_webhook.inventory import build_inventory
from remediation_webhook.inventory.base import NodeIdentity
from remediation_webhook.inventory.slurm import SlurmInventory
from remediation_webhook.inventory.slurm import validate as validate_slurm_inventory
from remediation_webhook.providers import InstanceRef, ProviderError, build_providers
from remediation_webhook.providers.slurm import SlurmProvider
from tests.providers.fakes.slurmrestd import (
    ACCESS_DENIED,
    CTLD_DOWN,
    RATE_LIMITED,
    UNAVAILABLE,
    SlurmrestdFake,
)

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdW4iOiJzbHVybSJ9.c2VjcmV0LXNpZ25hdHVyZS1vbmU"
ROTATED = "eyJhbGciOiJIUzI1NiJ9.eyJzdW4iOiJzbHVybSJ9.c2VjcmV0LXNpZ25hdHVyZS10d28"
RID = "0123456789abcdef0123"


@pytest.fixture(name="fake")
def _fake():
    fake = SlurmrestdFake(TOKEN)
    yield fake
    fake.close()


@pytest.fixture(name="token_file")
def _token_file(tmp_path):
    path = tmp_path / "slurm-jwt"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(name="slurm")
def _slurm(fake, token_file):
    provider = SlurmProvider.from_config({"rest": {"url": fake.url, "token_file": str(token_file), "user": "slurm",
                                                   "timeout": "5s"}}, "providers.slurm")
    sleeps: list[float] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    provider.rest.sleep = sleep  # type: ignore[union-attr]
    provider.sleeps = sleeps  # type: ignore[attr-defined]
    return provider


def node_ref(name: str = "gpu001") -> InstanceRef:
    return InstanceRef("slurm", name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_resolve_drain_resume_bodies_and_headers(slurm, fake):
    ref = await slurm.resolve(NodeIdentity("gpu001", "u"))
    assert ref == InstanceRef("slurm", "gpu001")
    result = await slurm.drain(ref, RID, "GPUXid79 on gpu001;\n rm -rf / \"x\"")
    assert "DRAIN" in result.detail
    assert fake.nodes["gpu001"]["state"] == ["IDLE", "DRAIN"]
    await slurm.resume(ref)
    assert fake.nodes["gpu001"]["state"] == ["IDLE"]
    calls = [(m, p, b) for m, p, _h, b in fake.seen]
    assert calls == [
        ("GET", "/slurm/v0.0.41/node/gpu001", None),
        ("POST", "/slurm/v0.0.41/node/gpu001",
         {"state": ["DRAIN"], "reason": "gpu-health:0123456789abcdef:GPUXid79 on gpu001; rm -rf / x"}),
        ("POST", "/slurm/v0.0.41/node/gpu001", {"state": ["RESUME"]}),
    ]
    for _m, _p, headers, _b in fake.seen:
        lower = {k.lower(): v for k, v in headers.items()}
        assert lower["x-slurm-user-token"] == TOKEN
        assert lower["x-slurm-user-name"] == "slurm"
        assert "authorization" not in lower


async def test_show_maps_the_node_to_scontrol_keys(slurm, fake):
    fake.nodes["gpu002"]["state"] = ["MIXED", "DRAIN"]
    fake.nodes["gpu002"]["partitions"] = ["gpu", "debug"]
    rec = await slurm.show("gpu002")
    assert rec == {"NodeName": "gpu002", "State": "MIXED+DRAIN", "Partitions": "gpu,debug",
                   "BootTime": "1704067200", "Reason": ""}


async def test_reboot_over_rest_is_unsupported_and_calls_nothing(slurm, fake):
    with pytest.raises(ProviderError) as err:
        await slurm.reboot(node_ref(), RID, "GPUXid79")
    assert err.value.kind == "unsupported"
    assert "providers.slurm.scontrol" in err.value.detail and "reboot" in err.value.detail
    assert fake.seen == []


async def test_the_fake_refuses_reboot_requested_like_slurmctld(slurm, fake):
    """Why reboot is unsupported: update_node() rejects REBOOT_REQUESTED as an invalid state (2028)."""
    with pytest.raises(ProviderError) as err:
        await slurm.rest.update("gpu001", {"state": ["REBOOT_REQUESTED"], "reason": "x"})
    assert err.value.kind == "failed" and "Invalid node state specified (2028)" in err.value.detail


async def test_token_is_reread_after_rotation(slurm, fake, token_file):
    await slurm.drain(node_ref(), RID, "one")
    token_file.write_text(ROTATED)
    fake.token = ROTATED  # the old token is no longer accepted
    await slurm.resume(node_ref())
    tokens = [{k.lower(): v for k, v in h.items()}["x-slurm-user-token"] for _m, _p, h, _b in fake.seen]
    assert tokens == [TOKEN, ROTATED]


async def test_token_never_in_errors_or_logs(slurm, fake, token_file, caplog):
    caplog.set_level(logging.DEBUG)
    details = []
    # a server that echoes the token back, in an error and in a 503 body
    fake.script["update"] = [(500, {"errors": [{"description": f"bad token {TOKEN}", "error_number": 9000,
                                                "error": "Invalid query"}], "warnings": []}),
                             *[(503, f"upstream said {TOKEN}")] * 4]
    for _ in range(2):
        with pytest.raises(ProviderError) as err:
            await slurm.drain(node_ref(), RID, "x")
        details.append(str(err.value))
    assert "<token>" in details[0] and "<token>" in details[1]
    fake.token = "something-else"
    with pytest.raises(ProviderError) as err:
        await slurm.resume(node_ref())
    assert err.value.kind == "auth"
    details.append(str(err.value))
    token_file.write_text(f"{TOKEN} trailing words")
    with pytest.raises(ProviderError) as err:
        await slurm.resume(node_ref())
    assert err.value.kind == "auth" and str(token_file) in err.value.detail
    details.append(str(err.value))
    token_file.unlink()
    with pytest.raises(ProviderError) as err:
        await slurm.resume(node_ref())
    assert err.value.kind == "auth" and "cannot read" in err.value.detail
    details.append(str(err.value))
    assert len(fake.seen) == 6  # 1 + 4 + 1: the last two never left the process
    for text in (*details, caplog.text):
        assert TOKEN not in text
        assert "c2VjcmV0LXNpZ25hdHVyZS1vbmU" not in text
    assert "retrying" in caplog.text  # the 503s were logged, without the token


@pytest.mark.parametrize("name", ["gpu[001-512]", "gpu001,gpu002", "gpu001 gpu002", "a=b", "-h", "gpu*", "",
                                  "../../openapi", "gpu001/../x", "gpu%2f001", "gpu001?x=1"])
async def test_hostile_names_rejected_before_any_request(slurm, fake, name):
    for call in (lambda: slurm.drain(node_ref(name), RID, "x"), lambda: slurm.resume(node_ref(name)),
                 lambda: slurm.reboot(node_ref(name), RID, "x"), lambda: slurm.resolve(NodeIdentity(name, "u"))):
        with pytest.raises(ProviderError) as err:
            await call()
        assert err.value.kind == "invalid"
    assert fake.seen == []


async def test_401_is_auth(slurm, fake):
    fake.token = "a-different-token"
    with pytest.raises(ProviderError) as err:
        await slurm.drain(node_ref(), RID, "x")
    assert err.value.kind == "auth"
    assert "401" in err.value.detail and "Authentication failure" in err.value.detail
    assert len(fake.seen) == 1  # not retried


async def test_non_operator_token_is_auth(slurm, fake):
    fake.script["update"] = [ACCESS_DENIED]
    with pytest.raises(ProviderError) as err:
        await slurm.drain(node_ref(), RID, "x")
    assert err.value.kind == "auth" and "operator" in err.value.detail


async def test_unknown_nodes_are_not_found_but_a_bare_404_is_not(slurm, fake):
    fake.script["get"] = [(404, "Unable find requested URL. Please view /openapi/v3 for API reference.")]
    with pytest.raises(ProviderError) as err:  # a wrong path or api version says nothing about the node
        await slurm.resolve(NodeIdentity("gpu001", "u"))
    assert err.value.kind == "failed" and "api_version" in err.value.detail
    with pytest.raises(ProviderError) as err:  # GET: 200, no nodes, "Failure to query node"
        await slurm.resolve(NodeIdentity("gpu404", "u"))
    assert err.value.kind == "not_found" and "Failure to query node gpu404" in err.value.detail
    with pytest.raises(ProviderError) as err:  # POST: 500, 2017 Invalid node name specified
        await slurm.drain(node_ref("gpu404"), RID, "x")
    assert err.value.kind == "not_found" and "Invalid node name specified" in err.value.detail
    assert len(fake.seen) == 3


async def test_get_returning_another_node_is_not_found(slurm, fake):
    fake.script["get"] = [(200, {"nodes": [dict(fake.nodes["gpu002"])], "errors": [], "warnings": []})]
    with pytest.raises(ProviderError) as err:
        await slurm.resolve(NodeIdentity("gpu001", "u"))
    assert err.value.kind == "not_found"


async def test_wrong_api_version_fails_naming_the_key(fake, token_file):
    slurm = SlurmProvider.from_config({"rest": {"url": fake.url, "token_file": str(token_file),
                                                "api_version": "v0.0.42"}}, "providers.slurm")
    with pytest.raises(ProviderError) as err:
        await slurm.resolve(NodeIdentity("gpu001", "u"))
    assert err.value.kind == "failed" and "providers.slurm.rest.api_version" in err.value.detail
    assert fake.seen[0][1] == "/slurm/v0.0.42/node/gpu001"


async def test_429_then_success(slurm, fake):
    fake.script["update"] = [RATE_LIMITED]
    result = await slurm.drain(node_ref(), RID, "x")
    assert "DRAIN" in result.detail
    assert [m for m, *_ in fake.seen] == ["POST", "POST"]
    assert len(slurm.sleeps) == 1
    assert fake.nodes["gpu001"]["state"] == ["IDLE", "DRAIN"]


async def test_429_throughout_is_throttled(slurm, fake):
    fake.script["update"] = [RATE_LIMITED] * 10
    with pytest.raises(ProviderError) as err:
        await slurm.drain(node_ref(), RID, "x")
    assert err.value.kind == "throttled"
    assert len(fake.seen) == slurm.rest.attempts == 4


async def test_503_after_retries_is_unavailable(slurm, fake):
    fake.script["update"] = [UNAVAILABLE] * 10
    with pytest.raises(ProviderError) as err:
        await slurm.resume(node_ref())
    assert err.value.kind == "unavailable" and "503" in err.value.detail
    assert len(fake.seen) == 4 and len(slurm.sleeps) == 3
    assert fake.script["update"] == [UNAVAILABLE] * 6


async def test_slurmctld_down_behind_slurmrestd_is_unavailable(slurm, fake):
    fake.script["get"] = [CTLD_DOWN] * 4
    with pytest.raises(ProviderError) as err:
        await slurm.resolve(NodeIdentity("gpu001", "u"))
    assert err.value.kind == "unavailable" and "Unable to contact slurm controller" in err.value.detail


async def test_connection_refused_is_unavailable(token_file):
    port = free_port()
    slurm = SlurmProvider.from_config({"rest": {"url": f"http://127.0.0.1:{port}", "token_file": str(token_file),
                                                "timeout": "2s"}}, "providers.slurm")
    sleeps: list[float] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    slurm.rest.sleep = sleep  # type: ignore[union-attr]
    with pytest.raises(ProviderError) as err:
        await slurm.drain(node_ref(), RID, "x")
    assert err.value.kind == "unavailable" and "providers.slurm.rest.url" in err.value.detail
    assert len(sleeps) == 3


async def test_other_errors_are_failed(slurm, fake):
    fake.script["update"] = [(500, {"errors": [{"description": "Failure to update node gpu001", "error_number": 2028,
                                                "error": "Invalid node state specified"}], "warnings": []})]
    with pytest.raises(ProviderError) as err:
        await slurm.drain(node_ref(), RID, "x")
    assert err.value.kind == "failed" and "Invalid node state specified" in err.value.detail
    assert len(fake.seen) == 1


def test_build_providers_finds_slurm_rest(fake, token_file):
    providers = build_providers({"slurm": {"rest": {"url": fake.url + "/", "token_file": str(token_file)}}})
    assert set(providers) == {"slurm"}
    assert providers["slurm"].rest.url == fake.url and providers["slurm"].rest.api_version == "v0.0.41"


def _cfg(tmp_path: Path, **rest: object) -> dict[str, object]:
    token = tmp_path / "jwt"
    if not token.exists():
        token.write_text(TOKEN)
    return {"rest": {"url": "https://slurmrestd:6820", "token_file": str(token), **rest}}


@pytest.mark.parametrize(("change", "key"), [
    (lambda c, t: {**c, "scontrol": "/usr/bin/scontrol"}, "providers.slurm.rest"),
    (lambda c, t: {**c, "rest": None}, "providers.slurm.rest"),
    (lambda c, t: {**c, "rest": "https://slurmrestd:6820"}, "providers.slurm.rest"),
    (lambda c, t: {**c, "bogus": 1}, "providers.slurm.bogus"),
    (lambda c, t: {"rest": {**c["rest"], "bogus": 1}}, "providers.slurm.rest.bogus"),
    (lambda c, t: {"rest": {k: v for k, v in c["rest"].items() if k != "url"}}, "providers.slurm.rest.url"),
    (lambda c, t: {"rest": {**c["rest"], "url": "ftp://slurmrestd"}}, "providers.slurm.rest.url"),
    (lambda c, t: {"rest": {**c["rest"], "url": "slurmrestd:6820"}}, "providers.slurm.rest.url"),
    (lambda c, t: {"rest": {**c["rest"], "url": "https://u:p@slurmrestd:6820"}}, "providers.slurm.rest.url"),
    (lambda c, t: {"rest": {**c["rest"], "url": 6820}}, "providers.slurm.rest.url"),
    (lambda c, t: {"rest": {k: v for k, v in c["rest"].items() if k != "token_file"}},
     "providers.slurm.rest.token_file"),
    (lambda c, t: {"rest": {**c["rest"], "token_file": str(t / "missing")}}, "providers.slurm.rest.token_file"),
    (lambda c, t: {"rest": {**c["rest"], "token_file": str(t)}}, "providers.slurm.rest.token_file"),
    (lambda c, t: {"rest": {**c["rest"], "api_version": "v0.0.37"}}, "providers.slurm.rest.api_version"),
    (lambda c, t: {"rest": {**c["rest"], "user": "root; rm"}}, "providers.slurm.rest.user"),
    (lambda c, t: {"rest": {**c["rest"], "timeout": "soon"}}, "providers.slurm.rest.timeout"),
    (lambda c, t: {"rest": {**c["rest"], "ca_file": str(t / "missing.pem")}}, "providers.slurm.rest.ca_file"),
    (lambda c, t: {"rest": {**c["rest"], "url": "https://slurmrestd:6820", "ca_file": str(t / "jwt")}},
     "providers.slurm.rest.ca_file"),
    (lambda c, t: {"rest": {**c["rest"], "url": "http://slurmrestd:6820"}}, "providers.slurm.rest.url"),
])
def test_config_errors_name_the_key(tmp_path, change, key):
    raw = change(_cfg(tmp_path), tmp_path)
    with pytest.raises(ConfigError) as err:
        SlurmProvider.from_config(raw, "providers.slurm")
    assert str(err.value).startswith(key + ":") or str(err.value).startswith(key + " "), str(err.value)


@pytest.mark.parametrize("content", ["", "   \n", f"{TOKEN} {TOKEN}", f"{TOKEN}\x00"])
def test_bad_token_file_is_a_config_error_without_the_token(tmp_path, content):
    raw = _cfg(tmp_path)
    Path(raw["rest"]["token_file"]).write_text(content)  # type: ignore[index]
    with pytest.raises(ConfigError) as err:
        SlurmProvider.from_config(raw, "providers.slurm")
    assert str(err.value).startswith("providers.slurm.rest.token_file:")
    assert TOKEN not in str(err.value)


def test_unreadable_token_file_is_a_config_error(tmp_path):
    raw = _cfg(tmp_path)
    token = Path(raw["rest"]["token_file"])  # type: ignore[index]
    token.unlink()
    token.mkdir()  # unreadable as a file even for root (CI runs as root, so chmod 0 would not do)
    with pytest.raises(ConfigError) as err:
        SlurmProvider.from_config(raw, "providers.slurm")
    assert str(err.value).startswith("providers.slurm.rest.token_file:") and "cannot read" in str(err.value)
    assert "directory" in str(err.value)


def test_top_level_timeout_applies_to_rest_and_scontrol_still_default(tmp_path):
    rest = SlurmProvider.from_config({**_cfg(tmp_path), "timeout": "7s"}, "providers.slurm")
    assert rest.rest is not None and rest.rest.timeout == 7.0
    plain = SlurmProvider.from_config({}, "providers.slurm")
    assert plain.rest is None and plain.scontrol == "scontrol"


def test_reboot_using_a_rest_only_slurm_is_a_config_error():
    from remediation_webhook.actions.base import ActionDeps
    from remediation_webhook.actions.reboot import Reboot
    from remediation_webhook.providers.slurm import SlurmProvider

    rest_only = ActionDeps(providers={"slurm": SlurmProvider(rest=object())})
    for using in ("slurm", "auto"):  # auto would pick slurm for every slurm:// node
        with pytest.raises(ConfigError, match=r"actions.reboot.using: slurm reboots need scontrol"):
            Reboot.from_config({"using": using}, "actions.reboot", rest_only)
    scontrol = ActionDeps(providers={"slurm": SlurmProvider()})
    assert Reboot.from_config({"using": "slurm"}, "actions.reboot", scontrol).using == "slurm"


# ------------------------------------------------------------------------------ the Slurm inventory over slurmrestd

HOSTILE = ["gpu[001-512]", "gpu001,gpu002", "gpu001 gpu002", "a=b", "-h", "gpu*", "", "../../openapi",
           "gpu001/../x", "gpu%2f001", "gpu001?x=1", "../ping", "gpu001/ping"]


def inventory(url: str, token_file: Path, **extra: object) -> SlurmInventory:
    """inventory: {kind: slurm, rest: {...}, ...} through the config loader and build_inventory, as the webhook does."""
    raw = {"kind": "slurm", "rest": {"url": url, "token_file": str(token_file), "timeout": "5s"}, **extra}
    config = build_config({"inventory": raw, "journal": {"path": "j.db"}}, base=token_file.parent)
    inv = build_inventory(config.inventory_kind, None, config.inventory_raw)
    assert isinstance(inv, SlurmInventory) and inv.slurm.rest is not None
    sleeps: list[float] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    inv.slurm.rest.sleep = sleep
    inv.sleeps = sleeps  # type: ignore[attr-defined]
    return inv


@pytest.fixture(name="pool")
def _pool():
    """Four nodes: gpu001, gpu002 and gpu004 in partition gpu, gpu003 only in debug."""
    fake = SlurmrestdFake(TOKEN, nodes=("gpu001", "gpu002", "gpu003", "gpu004"))
    fake.nodes["gpu003"]["partitions"] = ["debug"]
    fake.nodes["gpu004"]["partitions"] = ["debug", "gpu"]
    yield fake
    fake.close()


async def test_inventory_over_rest_resolves_with_boot_time_and_drain(pool, token_file):
    inv = inventory(pool.url, token_file, partition="gpu")
    pool.nodes["gpu001"]["state"] = ["IDLE", "DRAIN"]
    pool.nodes["gpu002"]["state"] = ["MIXED"]
    pool.nodes["gpu002"]["boot_time"] = {"set": True, "infinite": False, "number": 1717171717}
    drained, busy = await inv.resolve("gpu001"), await inv.resolve("gpu002")
    assert drained.uid == "gpu001@1704067200" and drained.provider_id == "slurm://gpu001"
    assert drained.unschedulable and drained.labels["slurm.partitions"] == "gpu"
    assert busy.uid == "gpu002@1717171717" and not busy.unschedulable  # a reboot is another machine
    assert [(m, p) for m, p, _h, _b in pool.seen] == [("GET", "/slurm/v0.0.41/node/gpu001"),
                                                        ("GET", "/slurm/v0.0.41/node/gpu002")]
    assert {k.lower(): v for k, v in pool.seen[0][2].items()}["x-slurm-user-token"] == TOKEN
    with pytest.raises(NodeNotFound):
        await inv.resolve("gpu404")
    pool.script["get"] = [(404, "Unable find requested URL. Please view /openapi/v3 for API reference.")]
    with pytest.raises(InventoryUnavailable, match="does not serve this path"):  # not "node gone"
        await inv.resolve("gpu001")


@pytest.mark.parametrize("name", HOSTILE)
async def test_inventory_over_rest_rejects_hostile_names_before_any_request(pool, token_file, name):
    inv = inventory(pool.url, token_file)
    with pytest.raises(NodeNotFound):
        await inv.resolve(name)
    assert pool.seen == []


async def test_inventory_pool_size_counts_the_partition_from_get_nodes(pool, token_file):
    assert await inventory(pool.url, token_file, partition="gpu").pool_size({}) == 3
    assert await inventory(pool.url, token_file, partition="debug").pool_size({}) == 2
    assert await inventory(pool.url, token_file).pool_size({}) == 4
    assert [(m, p) for m, p, _h, _b in pool.seen] == [("GET", "/slurm/v0.0.41/nodes")] * 3


async def test_inventory_pool_size_unavailable_when_slurmctld_is_down(pool, token_file):
    inv = inventory(pool.url, token_file, partition="gpu")
    pool.controllers["slurmctld-0"] = False
    with pytest.raises(InventoryUnavailable, match="Unable to contact slurm controller"):
        await inv.pool_size({})
    with pytest.raises(InventoryUnavailable, match="Unable to contact slurm controller"):
        await inv.resolve("gpu001")
    assert len(inv.sleeps) == 6  # both retried, then reported


async def test_inventory_ready_follows_slurmrestds_ping(pool, token_file):
    inv = inventory(pool.url, token_file)
    await inv.ready()
    pool.controllers.update({"slurmctld-0": False, "slurmctld-1": True})
    await inv.ready()  # the backup answers
    pool.controllers["slurmctld-1"] = False
    with pytest.raises(InventoryUnavailable) as err:
        await inv.ready()
    assert "slurmctld-0 DOWN" in str(err.value) and "slurmctld-1 DOWN" in str(err.value)
    assert [(m, p) for m, p, _h, _b in pool.seen] == [("GET", "/slurm/v0.0.41/ping")] * 3
    assert inv.sleeps == []  # a DOWN controller is an answer, not a transport error


@pytest.mark.parametrize(("pings", "ready"), [
    ([{"hostname": "c0", "responding": True, "primary": True, "latency": 900}], True),  # v0.0.42+ shape
    ([{"hostname": "c0", "responding": False, "primary": True, "latency": 9}], False),
    ([{"hostname": "c0", "pinged": "DOWN", "mode": "primary"}, {"hostname": "c1", "pinged": "UP"}], True),
    ([], False),
    (None, False),
])
async def test_inventory_ready_reads_both_ping_shapes(pool, token_file, pings, ready):
    inv = inventory(pool.url, token_file)
    pool.script["ping"] = [(200, {"pings": pings, "errors": [], "warnings": []})]
    if ready:
        await inv.ready()
    else:
        with pytest.raises(InventoryUnavailable, match="no slurmctld answers the ping"):
            await inv.ready()


async def test_inventory_not_ready_when_slurmrestd_is_unreachable_or_refuses(pool, token_file):
    inv = inventory(f"http://127.0.0.1:{free_port()}", token_file)
    with pytest.raises(InventoryUnavailable, match=r"inventory\.rest\.url"):
        await inv.ready()
    assert len(inv.sleeps) == 3
    inv = inventory(pool.url, token_file)
    pool.script["ping"] = [UNAVAILABLE] * 4
    with pytest.raises(InventoryUnavailable, match="503"):
        await inv.ready()
    pool.token = "another-token"
    with pytest.raises(InventoryUnavailable, match="refused the token"):
        await inv.ready()


def _inv_cfg(tmp_path: Path, **rest: object) -> dict[str, object]:
    return {"kind": "slurm", **_cfg(tmp_path, **rest)}


@pytest.mark.parametrize(("change", "key"), [
    (lambda c, t: {**c, "scontrol": "/usr/bin/scontrol"}, "inventory.rest"),
    (lambda c, t: {**c, "rest": None}, "inventory.rest"),
    (lambda c, t: {**c, "bogus": 1}, "inventory.bogus"),
    (lambda c, t: {**c, "partition": "gpu,debug"}, "inventory.partition"),
    (lambda c, t: {**c, "timeout": "soon"}, "inventory.timeout"),
    (lambda c, t: {**c, "rest": {**c["rest"], "bogus": 1}}, "inventory.rest.bogus"),
    (lambda c, t: {**c, "rest": {k: v for k, v in c["rest"].items() if k != "url"}}, "inventory.rest.url"),
    (lambda c, t: {**c, "rest": {**c["rest"], "url": "ftp://slurmrestd"}}, "inventory.rest.url"),
    (lambda c, t: {**c, "rest": {k: v for k, v in c["rest"].items() if k != "token_file"}},
     "inventory.rest.token_file"),
    (lambda c, t: {**c, "rest": {**c["rest"], "token_file": str(t / "missing")}}, "inventory.rest.token_file"),
    (lambda c, t: {**c, "rest": {**c["rest"], "api_version": "v0.0.37"}}, "inventory.rest.api_version"),
    (lambda c, t: {**c, "rest": {**c["rest"], "timeout": "soon"}}, "inventory.rest.timeout"),
])
def test_inventory_config_errors_name_the_key(tmp_path, change, key):
    raw = change(_inv_cfg(tmp_path), tmp_path)
    for check in (lambda: validate_slurm_inventory(raw, "inventory"),
                  lambda: build_config({"inventory": raw, "journal": {"path": "j.db"}}, base=tmp_path)):
        with pytest.raises(ConfigError) as err:
            check()
        assert str(err.value).startswith(key + ":"), str(err.value)
    assert TOKEN not in str(err.value)


def test_inventory_timeout_applies_to_rest(tmp_path):
    raw = {**_inv_cfg(tmp_path), "timeout": "7s"}
    validate_slurm_inventory(raw, "inventory")
    inv = build_inventory("slurm", None, raw)
    assert inv.slurm.rest is not None and inv.slurm.rest.timeout == 7.0 and inv.slurm.rest.key == "inventory.rest"
