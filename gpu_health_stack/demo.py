"""The whole thing, on this machine, in one command (`make demo`, or `python -m gpu_health_stack.demo`).

A simulated fleet of four 8-GPU H100 nodes, each with its gpu-health exporter; Debian's Prometheus with the
health rules; Debian's Alertmanager with the shipped route; the remediation webhook, live against a local
Kubernetes API (kmock: Node and Pod objects, so cordons and drains are real API calls you can look at) and a
local fake of AWS (moto: an auto scaling group whose instances back the nodes; no real cloud is called).
Faults are injected on a timeline and every step is printed as it happens: fault -> alert -> decision -> action.
Ctrl-C stops everything and removes the temporary folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from types import FrameType

from .scenarios import EXECUTOR_NAMESPACE, SXID_FATAL, policy_config, xid13, xid45, xid79
from .stack import ALERTMANAGER, PROMETHEUS, missing_binaries

PACKAGES = {PROMETHEUS: "prometheus", ALERTMANAGER: "prometheus-alertmanager"}
NODE_B = {"gpus": 8, "faults": [{"kind": "row_remap_pending", "gpu": 1, "at": "0s"}]}
NODE_C = {"gpus": 8, "faults": [{"kind": "nvlink_errors", "gpu": 2, "link": 3, "counter": "crc_flit", "rate": 50},
                                {"kind": "throttle", "gpu": 6, "reasons": ["hw_thermal_slowdown"]},
                                {"kind": "utilization", "gpu": 6, "percent": 100, "memory_percent": 80}]}


class Stopped(Exception):
    """Ctrl-C or SIGTERM."""


def ensure_binaries() -> bool:
    """Debian's Prometheus and Alertmanager: install them with apt-get when root, else say exactly how."""
    missing = missing_binaries()
    if not missing:
        return True
    packages = " ".join(PACKAGES[b] for b in missing)
    command = f"apt-get install -y {packages}"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        print(f"The demo needs Debian's {packages} ({', '.join(missing)} not found). Install them with:\n\n"
              f"    sudo apt-get update && sudo {command}\n\nthen run `make demo` again.", file=sys.stderr)
        return False
    print(f"Installing {packages} with apt-get (the packages' services are not needed and may not start) ...",
          flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages.split()]):
        if subprocess.run(argv, env=env, check=False).returncode != 0:
            print(f"`{' '.join(argv)}` failed; install {packages} and run `make demo` again.", file=sys.stderr)
            return False
    return not missing_binaries()


class Demo:
    def __init__(self, *, color: bool | None, keep: bool) -> None:
        from .fleet import Fleet
        from .timeline import Timeline

        print("Starting a simulated fleet of 4 nodes x 8 H100 GPUs: exporters, Prometheus, Alertmanager, kmock, "
              "moto and the webhook (about 15 s) ...", flush=True)
        self.fleet = Fleet.start({"node-a": None, "node-b": NODE_B, "node-c": NODE_C, "node-d": None},
                                 webhook_config=policy_config, cloud="moto", keep_dir=keep)
        self.started = time.time()
        self.timeline = Timeline(self.fleet.stack, webhook=self.fleet.webhook, kube=self.fleet.kube,
                                 color=color, start=self.started)
        self._jobs_done: set[str] = set()
        self._replaced: set[str] = set()

    def banner(self) -> None:
        f = self.fleet
        w = f.webhook
        assert f.aws is not None
        print(f"""
  Prometheus     {f.stack.prom_url}/alerts          (rules from rules/; 1 s scrape and evaluation)
  Alertmanager   {f.stack.am_url}/#/alerts          (the shipped route, deploy/alertmanager/alertmanager.yml)
  Webhook admin  curl -s -H 'Authorization: Bearer {w.admin_token}' {w.admin_url}/v1/remediations
  Kubernetes     curl -s {f.kube.url}/api/v1/nodes   (kmock: cordons and evictions land here)
  AWS (moto)     auto scaling group {f.aws.asg_name}: {', '.join(f'{n}={i}' for n, i in f.instances.items())}
  Files          {f.stack.dir}

Policy: a node whose GPU fell off the bus is replaced, not rebooted (cordon, drain, replace in its auto scaling
group); a GPU with a pending row remap is reset (cordon, drain, a reset Job on the node); more than 2 of the 4
nodes asking at once trips the circuit breaker. Ctrl-C stops everything.
""", flush=True)

    # ---- the parts kmock and moto do not play: the kubelet, the Job controller, the cloud's new machine

    def play_cluster(self) -> None:
        kube, aws = self.fleet.kube, self.fleet.aws
        for job in kube.jobs(EXECUTOR_NAMESPACE):
            name = job["metadata"]["name"]
            node = job["metadata"].get("annotations", {}).get("gpu-health.io/node", "")
            if name in self._jobs_done or not node:
                continue
            self._jobs_done.add(name)
            self.timeline.emit("kube", node, f"kubelet (simulated): Job {EXECUTOR_NAMESPACE}/{name} runs the GPU "
                               f"reset on {node} and succeeds")
            kube.finish_job(EXECUTOR_NAMESPACE, name)
        assert aws is not None
        for node, instance in self.fleet.instances.items():
            if node in self._replaced or instance in aws.instance_ids():
                continue
            self._replaced.add(node)
            new = next(i for i in aws.instance_ids() if i not in self.fleet.instances.values())
            self.fleet.instances[node] = new
            kube.replace_node(node, aws.provider_id(new))
            self.timeline.forget_cordon(node)
            self.timeline.emit("kube", node, f"the replacement instance {new} joins the cluster as {node} "
                               f"(new Node object, new boot)")
            self.fleet.stack.restart_exporter(node, new_boot=True)

    # ---- the fault timeline

    def schedule(self) -> list[tuple[float, str, Callable[[], None]]]:
        s, tl = self.fleet.stack, self.timeline

        def fatal_xid() -> None:
            tl.fault("node-a", "Xid 79 on GPU 3 (PCI 5d): GPU has fallen off the bus -> expect replace")
            s.inject_xid("node-a", xid79(3))

        def storm() -> None:
            tl.fault("node-c", "400 application Xids (13 and 45) on GPU 1 -> the job's problem: expect no action")
            for _ in range(200):
                s.inject_xid("node-c", xid13(1))
                s.inject_xid("node-c", xid45(1))

        def storm_outcome() -> None:
            counted = sum(s.query('sum(gpu_xid_errors_total{node="node-c",xid=~"13|45"})'))
            acting = [a for a in s.prometheus_alerts("pending") + s.prometheus_alerts("firing")
                      if a["labels"].get("node") == "node-c" and a["labels"].get("remediation", "none") != "none"]
            tl.info(f"node-c: {counted:.0f} application Xids counted in Prometheus, {len(acting)} alerts asking for "
                    f"an action, nothing sent to the webhook")

        def kill_exporter() -> None:
            tl.fault("node-d", "its exporter is killed -> GPUExporterDown (for: 5m); missing data never acts")
            s.kill_exporter("node-d")

        def revive_exporter() -> None:
            tl.info("node-d's exporter is back")
            s.start_exporter("node-d")

        def half_the_fleet() -> None:
            tl.fault("node-c", "Xid 79 on GPU 5, and at the same moment ...")
            tl.fault("node-d", "... a fatal NVSwitch SXid: 4 of 4 nodes have asked within 15 min -> expect the "
                               "breaker to trip, nothing done to node-c and node-d")
            s.inject_xid("node-c", xid79(5))
            s.inject_xid("node-d", SXID_FATAL)

        def done() -> None:
            tl.info(f"end of the fault timeline. Look around (URLs above); Ctrl-C stops everything. "
                    f"Reset the breaker: curl -s -XPOST -H 'Authorization: Bearer {self.fleet.webhook.admin_token}' "
                    f"-d '{{\"mode\": \"skip-backlog\"}}' {self.fleet.webhook.admin_url}/v1/breaker:reset")

        self.timeline.fault("node-b", "a row remap is pending on GPU 1 since boot -> GPURowRemapPending after its "
                                      "for: 2m, then expect a GPU reset")
        return [(10, "fatal", fatal_xid), (30, "storm", storm), (40, "storm outcome", storm_outcome),
                (45, "kill", kill_exporter),
                (140, "revive", revive_exporter), (160, "half", half_the_fleet), (185, "done", done)]

    def run(self) -> None:
        self.banner()
        pending = self.schedule()
        while True:
            elapsed = time.time() - self.started
            while pending and pending[0][0] <= elapsed:
                pending.pop(0)[2]()
            self.timeline.poll()
            self.play_cluster()
            time.sleep(0.5)

    def close(self) -> None:
        self.fleet.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpu_health_stack.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-color", action="store_true", help="plain output")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, journal) at the end")
    args = parser.parse_args(argv)
    if not ensure_binaries():
        return 1

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Stopped

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    demo = None
    try:
        demo = Demo(color=False if args.no_color else None, keep=args.keep)
        demo.run()
    except Stopped:
        pass
    finally:
        # A second Ctrl-C while stopping must not leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if demo is not None:
            print("\nStopping: webhook, Prometheus, Alertmanager, exporters, kmock, moto ...", flush=True)
            folder = demo.fleet.stack.dir
            demo.close()
            print(f"Stopped.{' Files kept in ' + str(folder) if args.keep else ''}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
