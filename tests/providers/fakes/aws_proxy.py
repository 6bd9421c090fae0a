"""An HTTP proxy in front of moto's server that can answer the next N calls of an AWS action (by the Query
API `Action=` form field) with a scripted status and body: throttling, AccessDenied, failed scaling activities.
Everything else is forwarded to moto unchanged, so the real boto3 client talks real HTTP throughout."""

from __future__ import annotations

import http.server
import urllib.parse
from typing import Any

import requests

from gpu_health_stack.receiver import LoopbackServer

THROTTLING = (400, '<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded'
                   '</Message></Error><RequestId>t</RequestId></ErrorResponse>')
ACCESS_DENIED = (403, '<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>User: '
                      'arn:aws:sts::123456789012:assumed-role/gpu-health is not authorized to perform: '
                      'autoscaling:TerminateInstanceInAutoScalingGroup</Message></Error><RequestId>a</RequestId>'
                      '</ErrorResponse>')


def capacity_failure(asg: str) -> tuple[int, str]:
    return (200, f'<DescribeScalingActivitiesResponse xmlns="http://autoscaling.amazonaws.com/doc/2011-01-01/">'
                 f'<DescribeScalingActivitiesResult><Activities><member><ActivityId>act-1</ActivityId>'
                 f'<AutoScalingGroupName>{asg}</AutoScalingGroupName><Description>Launching a new EC2 instance. '
                 f'Status Reason: We currently do not have sufficient p5.48xlarge capacity in the Availability '
                 f'Zone you requested. Launching EC2 instance failed.</Description><Cause>replacement</Cause>'
                 f'<StartTime>2999-01-01T00:00:00Z</StartTime><StatusCode>Failed</StatusCode><StatusMessage>'
                 f'We currently do not have sufficient p5.48xlarge capacity (InsufficientInstanceCapacity)'
                 f'</StatusMessage><Progress>100</Progress></member></Activities></DescribeScalingActivitiesResult>'
                 f'<ResponseMetadata><RequestId>c</RequestId></ResponseMetadata></DescribeScalingActivitiesResponse>')


class AwsProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.script: dict[str, list[tuple[int, str]]] = {}
        self.seen: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                form = urllib.parse.parse_qs(body.decode(errors="replace"))
                action = (form.get("Action") or [""])[0]
                outer.seen.append(action)
                queue = outer.script.get(action)
                if queue:
                    status, text = queue.pop(0)
                    data = text.encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "text/xml")
                else:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                    r = requests.request(self.command, outer.upstream + self.path, data=body, headers=headers,
                                         timeout=30)
                    data = r.content
                    self.send_response(r.status_code)
                    for k, v in r.headers.items():
                        if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding",
                                             "server", "date"):
                            self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_GET = _any

            def log_message(self, *args: Any) -> None:
                return None

        self._http = LoopbackServer(Handler)
        self.url = self._http.url

    def close(self) -> None:
        self._http.close()
