"""Azure against a local HTTPS fake of ARM's Microsoft.Compute API, with the real ComputeManagementClient."""

from __future__ import annotations

import datetime as dt
import gc
import ipaddress
import sys
import time
import warnings
from pathlib import Path

import pytest

pytest.importorskip("azure.mgmt.compute")

from azure.core.credentials import AccessToken
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).parent))
from fakes.azure_compute import FORBIDDEN, THROTTLED, AzureFake

from remediation_webhook.actions.base import Observation
from remediation_webhook.errors import ConfigError
from remediation_webhook.inventory.base import NodeIdentity
from remediation_webhook.providers import ProviderError
from remediation_webhook.providers.azure import AzureProvider

SUB = "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"
PID = f"azure:///subscriptions/{SUB}/resourceGroups/gpu-rg/providers/Microsoft.Compute/virtualMachineScaleSets/{{}}/" \
      f"virtualMachines/{{}}"


class StaticToken:
    """A TokenCredential that always hands out the same token."""

    def __init__(self, token: str = "good-token") -> None:
        self.token = token

    def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        return AccessToken(self.token, int(time.time()) + 3600)


@pytest.fixture(scope="module", name="tls")
def _tls(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1: (cert file = CA file, key file)."""
    d = tmp_path_factory.mktemp("azure-tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return str(d / "cert.pem"), str(d / "key.pem")


@pytest.fixture(name="az")
def _az(tls):
    fake = AzureFake(*tls, subscription=SUB)
    fake.add_scale_set("gpu-rg", "gpu-vmss", instances=3)
    fake.add_scale_set("gpu-rg", "aks-gpu-vmss", instances=2, tags={"aks-managed-poolName": "gpu"})
    fake.providers = []
    yield fake
    for p in fake.providers:
        p.close()
    fake.close()
    # urllib3 drops (does not close) the TLS socket of a connection azure-core abandons on an error response;
    # collect it here, inside this fixture, instead of in whichever later test the GC happens to run.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def provider(az, tls, token: str = "good-token", **extra) -> AzureProvider:
    p = AzureProvider.from_config({"base_url": az.url, "ca_file": tls[0], "polling_interval": "10ms",
                                   "retry_base": "10ms", "max_attempts": 3, "operation_timeout": "10s", **extra},
                                  "providers.azure")
    p.credential = StaticToken(token)
    az.providers.append(p)
    return p


async def ref_of(p, vmss="gpu-vmss", instance="1"):
    return await p.resolve(NodeIdentity("n", "u", provider_id=PID.format(vmss, instance)))


async def test_reboot_is_a_per_instance_restart(az, tls):
    p = provider(az, tls)
    result = await p.reboot(await ref_of(p), "rem-1", "t")
    assert not result.new_host and "/operations/" in result.operation
    paths = [path for verb, path in az.seen if verb == "restart"]
    assert paths == [(f"/subscriptions/{SUB}/resourceGroups/gpu-rg/providers/Microsoft.Compute/"
                      f"virtualMachineScaleSets/gpu-vmss/virtualMachines/1/restart")]
    assert az.verbs().count("operation") >= 2  # InProgress, then Succeeded
    assert az.scale_set_actions == []


async def test_replace_redeploys_to_a_new_host(az, tls):
    p = provider(az, tls)
    result = await p.replace(await ref_of(p, instance="2"), "rem-2", "xid 79")
    assert result.new_host and "redeploy" in result.detail
    assert "redeploy" in az.verbs() and az.scale_set_actions == []


async def test_replace_by_delete_scales_back_out(az, tls):
    p = provider(az, tls, replace_mode="delete")
    ref = await ref_of(p, instance="0")
    result = await p.replace(ref, "rem-3", "t")
    assert result.new_host
    assert ("gpu-rg", "gpu-vmss", "0") not in az.vms
    assert az.scale_sets[("gpu-rg", "gpu-vmss")]["sku"]["capacity"] == 3  # put back after the delete
    assert az.verbs().index("delete") < az.verbs().index("update")
    assert await p.replaced(ref, "rem-3") == Observation.DONE
    assert az.scale_set_actions == []


async def test_reimage_is_per_instance(az, tls):
    p = provider(az, tls, replace_mode="reimage")
    result = await p.replace(await ref_of(p), "rem-4", "t")
    assert not result.new_host and "reimage" in az.verbs()
    assert az.scale_set_actions == []  # never .../virtualMachineScaleSets/{vmss}/reimage


async def test_aks_managed_scale_sets_are_refused(az, tls):
    p = provider(az, tls)
    with pytest.raises(ProviderError) as err:
        await p.replace(await ref_of(p, vmss="aks-gpu-vmss", instance="0"), "rem-5", "t")
    assert err.value.kind == "unsupported" and "agentPools" in err.value.detail and "AKS" in err.value.detail
    mc = await p.resolve(NodeIdentity("n", "u", provider_id=PID.replace("gpu-rg", "MC_rg_cluster_eastus")
                                      .format("gpu-vmss", "0")))
    with pytest.raises(ProviderError) as err:
        await p.reboot(mc, "rem-6", "t")
    assert err.value.kind == "unsupported" and "MC_" in err.value.detail
    assert not {"restart", "redeploy", "reimage", "delete"} & set(az.verbs())


async def test_throttled_then_success(az, tls):
    p = provider(az, tls)
    az.script["redeploy"] = [THROTTLED, THROTTLED]
    result = await p.move(await ref_of(p), "rem-7", "t")
    assert result.new_host and az.verbs().count("redeploy") == 3


async def test_throttled_for_good(az, tls):
    p = provider(az, tls, max_attempts=2)
    az.script["restart"] = [THROTTLED, THROTTLED]
    with pytest.raises(ProviderError) as err:
        await p.reboot(await ref_of(p), "rem-8", "t")
    assert err.value.kind == "throttled"


async def test_auth_errors(az, tls):
    p = provider(az, tls)
    az.script["redeploy"] = [FORBIDDEN]
    with pytest.raises(ProviderError) as err:
        await p.replace(await ref_of(p), "rem-9", "t")
    assert err.value.kind == "auth" and "deploy/iam/azure-role-definition.json" in err.value.detail
    assert "AuthorizationFailed" in err.value.detail
    bad = provider(az, tls, token="stale")
    with pytest.raises(ProviderError) as err:
        await bad.reboot(await ref_of(bad), "rem-10", "t")
    assert err.value.kind == "auth"


async def test_not_found(az, tls):
    p = provider(az, tls, replace_mode="delete")
    with pytest.raises(ProviderError) as err:
        await p.replace(await ref_of(p, instance="42"), "rem-11", "t")
    assert err.value.kind == "not_found"
    with pytest.raises(ProviderError) as err:
        await p.reboot(await ref_of(p, vmss="nope"), "rem-12", "t")
    assert err.value.kind == "not_found"
    assert az.scale_sets[("gpu-rg", "gpu-vmss")]["sku"]["capacity"] == 3


async def test_operation_failed(az, tls):
    p = provider(az, tls)
    az.op_errors["redeploy"] = {"code": "AllocationFailed",
                                "message": ("Allocation failed. We do not have sufficient capacity for the "
                                            "requested VM size")}
    with pytest.raises(ProviderError) as err:
        await p.replace(await ref_of(p), "rem-13", "t")
    assert err.value.kind == "capacity" and "AllocationFailed" in err.value.detail
    az.op_errors["restart"] = {"code": "InternalExecutionError", "message": "An internal execution error occurred."}
    with pytest.raises(ProviderError) as err:
        await p.reboot(await ref_of(p), "rem-14", "t")
    assert err.value.kind == "failed" and "InternalExecutionError" in err.value.detail


async def test_hostile_ids_make_no_call(az, tls):
    p = provider(az, tls)
    for bad in (PID.format("gpu-vmss", "1;rm"), PID.format("gpu/../x", "1"),
                PID.replace(SUB, "not-a-guid").format("gpu-vmss", "1"), "gce://gpu-proj/us-central1-a/x"):
        with pytest.raises(ProviderError) as err:
            await p.resolve(NodeIdentity("n", "u", provider_id=bad))
        assert err.value.kind == "invalid"
    assert az.seen == []


def test_config_errors_name_keys():
    with pytest.raises(ConfigError, match=r"providers.azure.base_url"):
        AzureProvider.from_config({"base_url": "http://127.0.0.1:1"}, "providers.azure")
    with pytest.raises(ConfigError, match=r"providers.azure.replace_mode"):
        AzureProvider.from_config({"replace_mode": "reimage_all"}, "providers.azure")
