"""AWS for the stack: moto in server mode (a real HTTP endpoint, as boto3 sees AWS) with an auto scaling group whose
instances back the Kubernetes nodes (their providerID is aws:///<az>/<instance-id>).

moto is faithful to the request and response contract of the calls used here, not to timing: termination is
instant and a replacement instance is launched synchronously (see /work/shared/reference/real-components.md).
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from .procs import free_port

REGION = "us-east-1"
ZONE = "us-east-1a"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


class AwsFake:
    def __init__(self, *, asg_name: str = "", size: int = 4, instance_type: str = "p5.48xlarge") -> None:
        from moto.server import ThreadedMotoServer

        # moto's servers in one process share their accounts: unique names keep two stacks (or a test of the
        # providers that ran before) apart.
        asg_name = asg_name or f"gpu-nodes-{secrets.token_hex(4)}"
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.asg_name = asg_name
        self.ec2 = self.client("ec2")
        self.autoscaling = self.client("autoscaling")
        image = self.ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        self.ec2.create_launch_template(LaunchTemplateName=f"{asg_name}-lt", LaunchTemplateData={
            "ImageId": image, "InstanceType": instance_type})
        self.autoscaling.create_auto_scaling_group(
            AutoScalingGroupName=asg_name, LaunchTemplate={"LaunchTemplateName": f"{asg_name}-lt"},
            MinSize=0, MaxSize=size * 2, DesiredCapacity=size, AvailabilityZones=[ZONE])
        self.initial = self.instance_ids()

    def client(self, service: str) -> Any:
        import boto3

        return boto3.client(service, endpoint_url=self.url, region_name=REGION, **CREDENTIALS)

    def env(self) -> dict[str, str]:
        """Environment for a process (the webhook) whose boto3 must reach this endpoint."""
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION,
                "AWS_ENDPOINT_URL": self.url, "AWS_EC2_METADATA_DISABLED": "true"}

    @staticmethod
    def provider_id(instance_id: str) -> str:
        return f"aws:///{ZONE}/{instance_id}"

    def group(self) -> dict[str, Any]:
        return dict(self.autoscaling.describe_auto_scaling_groups(
            AutoScalingGroupNames=[self.asg_name])["AutoScalingGroups"][0])

    def instance_ids(self) -> list[str]:
        """In-service members of the group, in launch order."""
        return [i["InstanceId"] for i in self.group()["Instances"]]

    def state(self, instance_id: str) -> str:
        res = self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        return str(res[0]["Instances"][0]["State"]["Name"]) if res else "unknown"

    def close(self) -> None:
        self._server.stop()
