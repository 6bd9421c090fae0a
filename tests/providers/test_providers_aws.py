"""AWS against moto in server mode over real HTTP (through a scripting proxy for throttling and errors)."""

from __future__ import annotations

import pytest

pytest.importorskip("moto")
pytest.importorskip("boto3")

from tests.providers.fakes.aws_proxy import ACCESS_DENIED, THROTTLING, capacity_failure
from tests.providers.fakes.support import (
    FakeAlertmanager,
    alert,
    await_for,
    aws_cfg,
    base_config,
    close_harness,
    make_harness,
    notification,
    replace_config,
)

from remediation_webhook.inventory.base import NodeIdentity
from remediation_webhook.providers import ProviderError
from remediation_webhook.providers.aws import AwsProvider


def group(aws):
    return aws.asg.describe_auto_scaling_groups(AutoScalingGroupNames=["gpu-asg"])["AutoScalingGroups"][0]


def tags(aws, iid):
    res = aws.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    return {t["Key"]: t["Value"] for t in res.get("Tags", [])}, res["State"]["Name"]


async def test_replace_through_the_webhook_ladder(tmp_path, kube, aws):
    """remediation=reboot under a "replace, don't repair" rule: cordon -> drain -> replace in the ASG."""
    victim = aws.ids[0]
    kube.add_node("gpu-a", provider_id=f"aws:///us-east-1a/{victim}")
    kube.add_pod("kube-system", "dcgm-a", "gpu-a", daemonset=True)
    raw = replace_config(tmp_path, kube.url, "aws", aws_cfg(aws), rule="replace-dont-repair")
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    try:
        payload = notification(alert("gpu-a", remediation="reboot"))
        assert (await h.post(payload)).status == 200
        await await_for(lambda: h.states().get("gpu-a") == "SUCCEEDED", timeout=20, what="replace")
        g = group(aws)
        assert g["DesiredCapacity"] == 3
        members = {i["InstanceId"] for i in g["Instances"]}
        assert victim not in members and len(members) == 3
        t, state = tags(aws, victim)
        assert state == "terminated"
        rid = h.sql("SELECT id FROM remediation WHERE node='gpu-a'")[0][0]
        assert t["remediation/id"] == rid and t["remediation/action"] == "replace"
        steps = [r[0] for r in h.sql("SELECT action FROM step WHERE remediation_id=? ORDER BY seq", rid)]
        assert steps == ["cordon", "drain", "replace"]
        terminations = aws.proxy.seen.count("TerminateInstanceInAutoScalingGroup")
        assert terminations == 1
        # a second delivery of the same alert does nothing
        assert (await h.post(payload)).status == 200
        await h.settle()
        assert aws.proxy.seen.count("TerminateInstanceInAutoScalingGroup") == 1
        assert len(h.sql("SELECT 1 FROM remediation")) == 1
    finally:
        await close_harness(h)


def test_replace_requires_approval_by_default(tmp_path):
    from remediation_webhook.config import build_config

    raw = base_config(tmp_path, "http://127.0.0.1:1", providers={"aws": {"region": "us-east-1"}},
                      policy={"dry_run": True, "rules": [{"name": "r", "match": {"alertname": "X"},
                                                          "ladder": ["cordon", "replace"]}]},
                      actions={"replace": {"using": "aws"}})
    assert build_config(raw, base=tmp_path).policy.rules[0].requires_approval == frozenset({"replace"})


async def test_throttling_then_success(aws):
    p = AwsProvider.from_config(aws_cfg(aws), "providers.aws")
    aws.proxy.script["TerminateInstanceInAutoScalingGroup"] = [THROTTLING, THROTTLING]
    aws.proxy.script["DescribeAutoScalingInstances"] = [THROTTLING]
    node = NodeIdentity("n", "u", provider_id=f"aws:///us-east-1a/{aws.ids[1]}")
    result = await p.replace(await p.resolve(node), "rid-1", "test")
    assert result.new_host and result.replacement
    assert aws.proxy.seen.count("TerminateInstanceInAutoScalingGroup") == 3
    assert group(aws)["DesiredCapacity"] == 3


async def test_capacity_failure_is_reported(aws):
    p = AwsProvider.from_config(aws_cfg(aws), "providers.aws")
    aws.proxy.script["DescribeScalingActivities"] = [capacity_failure("gpu-asg")]
    node = NodeIdentity("n", "u", provider_id=f"aws:///us-east-1a/{aws.ids[2]}")
    with pytest.raises(ProviderError) as err:
        await p.replace(await p.resolve(node), "rid-2", "test")
    assert err.value.kind == "capacity" and "InsufficientInstanceCapacity" in err.value.detail


async def test_auth_error_not_found_and_no_asg(aws):
    p = AwsProvider.from_config(aws_cfg(aws, max_attempts=1), "providers.aws")
    aws.proxy.script["TerminateInstanceInAutoScalingGroup"] = [ACCESS_DENIED]
    ref = await p.resolve(NodeIdentity("n", "u", provider_id=f"aws:///us-east-1a/{aws.ids[0]}"))
    with pytest.raises(ProviderError) as err:
        await p.replace(ref, "rid-3", "test")
    assert err.value.kind == "auth" and "deploy/iam/aws-policy.json" in err.value.detail
    missing = await p.resolve(NodeIdentity("n", "u", provider_id="aws:///us-east-1a/i-0123456789abcdef0"))
    with pytest.raises(ProviderError) as err:
        await p.replace(missing, "rid-4", "test")
    assert err.value.kind == "not_found"
    ami = aws.ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    lone = aws.ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    with pytest.raises(ProviderError) as err:
        await p.replace(await p.resolve(NodeIdentity("n", "u", provider_id=f"aws:///us-east-1a/{lone}")), "r", "t")
    assert err.value.kind == "unsupported" and "no auto scaling group" in err.value.detail
    assert tags(aws, lone)[1] == "running"


async def test_reboot_and_hostile_ids(aws):
    p = AwsProvider.from_config(aws_cfg(aws), "providers.aws")
    ref = await p.resolve(NodeIdentity("n", "u", provider_id=f"aws:///us-east-1a/{aws.ids[0]}"))
    result = await p.reboot(ref, "rid-5", "test")
    assert not result.new_host and "RebootInstances" in result.detail
    assert tags(aws, aws.ids[0])[0]["remediation/action"] == "reboot"
    before = len(aws.proxy.seen)
    for bad in ("aws:///us-east-1a/i-XYZ", "aws:///us-east-1a/i-0123;rm -rf", "aws:///../i-0123456789abcdef0"):
        with pytest.raises(ProviderError) as err:
            await p.resolve(NodeIdentity("n", "u", provider_id=bad))
        assert err.value.kind == "invalid"
    assert len(aws.proxy.seen) == before


async def test_private_dns_name_lookup(aws):
    p = AwsProvider.from_config({**aws_cfg(aws), "lookup": "private-dns-name"}, "providers.aws")
    victim = aws.ids[1]
    dns = aws.ec2.describe_instances(InstanceIds=[victim])["Reservations"][0]["Instances"][0]["PrivateDnsName"]
    ref = await p.resolve(NodeIdentity(dns, "u"))
    assert ref.instance_id == victim and ref.zone.startswith("us-east-1")
    with pytest.raises(ProviderError) as err:
        await p.resolve(NodeIdentity("ip-10-9-9-9.ec2.internal", "u"))
    assert err.value.kind == "not_found"

    async def two(*args, **kwargs):  # EC2 answering two live instances for one name (moto cannot make one)
        return {"Reservations": [{"Instances": [{"InstanceId": aws.ids[0]}, {"InstanceId": aws.ids[1]}]}]}

    p.call = two
    with pytest.raises(ProviderError) as err:
        await p.resolve(NodeIdentity(dns, "u"))
    assert err.value.kind == "invalid" and "2 instances" in err.value.detail  # ambiguous is not "gone"


def test_the_iam_policy_grants_exactly_the_calls_the_provider_makes() -> None:
    """Least privilege both ways: a call the policy lacks fails at the first remediation; an action the policy grants
    that no code calls (ec2:StopInstances and StartInstances were, for a move nothing reached) is a right to take
    away."""
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    source = (root / "remediation_webhook" / "providers" / "aws.py").read_text(encoding="utf-8")
    called = {f"{svc}:{''.join(w.capitalize() for w in op.split('_'))}"
              for svc, op in re.findall(r'self\.call\("(ec2|autoscaling)", "(\w+)"', source)}
    policy = json.loads((root / "deploy" / "iam" / "aws-policy.json").read_text(encoding="utf-8"))
    granted = {a for st in policy["Statement"] for a in ([st["Action"]] if isinstance(st["Action"], str)
                                                         else st["Action"])}
    assert called and called == granted, (sorted(called - granted), sorted(granted - called))
