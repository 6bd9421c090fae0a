"""Fixtures the provider tests share: kmock (`kube`), moto behind the recording proxy (`moto_url`, `aws`), the
HTTPS Azure fake with its certificate (`tls`, `az`) and the fake scontrol on PATH (`slurm_env`).

Helpers live in fakes/support.py; test modules import them from there, never from this conftest (tests/webhook,
tests/dcgm and others have a conftest too; which one `import conftest` finds depends on the load order).
"""

from __future__ import annotations

import datetime as dt
import gc
import ipaddress
import json
import logging
import os
import warnings
from pathlib import Path

import pytest

from tests.providers.fakes.support import AWS_KW, AZURE_SUB
from tests.webhook.webhook_support import _kube  # noqa: F401  (the `kube` fixture: a KubeFake, closed after)

FAKES = Path(__file__).parent / "fakes"


# ------------------------------------------------------------------------------------------------ AWS (moto)


@pytest.fixture(scope="module", name="moto_url")
def _moto():
    """moto in server mode on 127.0.0.1, one per test module."""
    pytest.importorskip("moto")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    yield f"http://{host}:{port}"
    srv.stop()


@pytest.fixture(name="aws")
def _aws(moto_url):
    """A 3-instance ASG in moto, behind the recording proxy (aws.proxy.seen lists every API action called)."""
    boto3 = pytest.importorskip("boto3")
    import requests

    from tests.providers.fakes.aws_proxy import AwsProxy

    requests.post(f"{moto_url}/moto-api/reset", timeout=10)
    proxy = AwsProxy(moto_url)
    ec2 = boto3.client("ec2", endpoint_url=moto_url, **AWS_KW)
    asg = boto3.client("autoscaling", endpoint_url=moto_url, **AWS_KW)
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    lt = ec2.create_launch_template(LaunchTemplateName="gpu", LaunchTemplateData={
        "ImageId": ami, "InstanceType": "p5.48xlarge"})["LaunchTemplate"]["LaunchTemplateId"]
    asg.create_auto_scaling_group(AutoScalingGroupName="gpu-asg", MinSize=0, MaxSize=5, DesiredCapacity=3,
                                  LaunchTemplate={"LaunchTemplateId": lt}, AvailabilityZones=["us-east-1a"],
                                  Tags=[{"Key": "remediation-fleet", "Value": "gpu", "PropagateAtLaunch": True}])
    ids = [i["InstanceId"] for i in asg.describe_auto_scaling_groups(
        AutoScalingGroupNames=["gpu-asg"])["AutoScalingGroups"][0]["Instances"]]
    yield type("Aws", (), {"proxy": proxy, "ec2": ec2, "asg": asg, "ids": ids, "url": proxy.url})
    proxy.close()


# ------------------------------------------------------------------------------------------------ Azure


@pytest.fixture(scope="module", name="tls")
def _tls(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1: (cert file = CA file, key file)."""
    pytest.importorskip("azure.mgmt.compute")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

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
    """The Azure fake (subscription AZURE_SUB) with the 3-instance scale set gpu-rg/gpu-vmss. Providers made with
    support.azure_provider / azure_credential are closed here, before the fake."""
    from tests.providers.fakes.azure_compute import AzureFake

    fake = AzureFake(*tls, subscription=AZURE_SUB)
    fake.add_scale_set("gpu-rg", "gpu-vmss", instances=3)
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


# ------------------------------------------------------------------------------------------------ Slurm


@pytest.fixture(name="slurm_env")
def _slurm_env(tmp_path, monkeypatch):
    """The fake scontrol first on PATH (nodes gpu001, gpu002); returns a function listing the argv of every call
    it got."""
    log = tmp_path / "scontrol.log"
    monkeypatch.setenv("PATH", f"{FAKES}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SCONTROL_LOG", str(log))
    monkeypatch.setenv("SCONTROL_NODES", "gpu001,gpu002")
    return lambda: [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
