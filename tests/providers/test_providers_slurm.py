"""Slurm with a fake `scontrol` on PATH that records its argv; hostile node names never reach it."""

from __future__ import annotations

import pytest

from remediation_webhook.inventory.base import NodeIdentity
from remediation_webhook.providers import InstanceRef, ProviderError
from remediation_webhook.providers.slurm import SlurmProvider


@pytest.fixture(name="slurm")
def _slurm(slurm_env):
    """A SlurmProvider over the fake scontrol (conftest's slurm_env); `calls()` lists the argv of every call."""
    provider = SlurmProvider.from_config({"timeout": "10s"}, "providers.slurm")
    provider.calls = slurm_env  # type: ignore[attr-defined]
    return provider


async def test_drain_reboot_resume_argv(slurm):
    ref = await slurm.resolve(NodeIdentity("gpu001", "u"))
    await slurm.drain(ref, "0123456789abcdef0123", "GPUXid79 on gpu001;\n rm -rf / \"x\"")
    await slurm.reboot(ref, "0123456789abcdef0123", "GPUXid79 on gpu001")
    await slurm.resume(ref)
    calls = slurm.calls()
    assert calls[0] == ["show", "node", "-o", "gpu001"]
    assert calls[1] == ["update", "NodeName=gpu001", "State=DRAIN",
                        "Reason=gpu-health:0123456789abcdef:GPUXid79 on gpu001; rm -rf / x"]
    assert calls[-2] == ["reboot", "ASAP", "nextstate=RESUME",
                         "reason=gpu-health:0123456789abcdef:GPUXid79 on gpu001", "gpu001"]
    assert calls[-1] == ["update", "NodeName=gpu001", "State=RESUME"]


@pytest.mark.parametrize("name", ["gpu[001-512]", "gpu001,gpu002", "gpu001 gpu002", "a=b", "-h", "gpu*", ""])
async def test_hostile_names_rejected_before_any_call(slurm, name):
    with pytest.raises(ProviderError) as err:
        await slurm.drain(InstanceRef("slurm", name), "r", "x")
    assert err.value.kind == "invalid"
    assert slurm.calls() == []


async def test_not_found_and_failure_messages(slurm, monkeypatch):
    with pytest.raises(ProviderError) as err:
        await slurm.resolve(NodeIdentity("gpu404", "u"))
    assert err.value.kind == "not_found"
    monkeypatch.setenv("SCONTROL_FAIL", "Access/permission denied")
    with pytest.raises(ProviderError) as err:
        await slurm.drain(InstanceRef("slurm", "gpu001"), "r", "x")
    assert err.value.kind == "auth" and "Slurm operator" in err.value.detail


async def test_slurm_inventory(slurm, monkeypatch):
    from remediation_webhook.errors import NodeNotFound
    from remediation_webhook.inventory.slurm import build

    inv = build(None, {"kind": "slurm"})
    node = await inv.resolve("gpu001")
    assert node.provider_id == "slurm://gpu001" and node.uid.startswith("gpu001@")
    assert await inv.pool_size({}) == 2
    await inv.ready()
    with pytest.raises(NodeNotFound):
        await inv.resolve("gpu[001-002]")
    assert slurm.calls() == [["show", "node", "-o", "gpu001"], ["show", "node", "-o"], ["ping"]]
