"""A local HTTP fake of slurmrestd, OpenAPI data_parser v0.0.41 (Slurm 24.05 .. 25.05), just the calls the Slurm
provider's REST transport and the Slurm inventory make; a real HTTP server on 127.0.0.1 in a thread.

  GET  /slurm/v0.0.41/node/{node_name}   -> 200 {"nodes": [<node>], "last_update", "meta", "errors", "warnings"}
  POST /slurm/v0.0.41/node/{node_name}   body UPDATE_NODE_MSG ({"state": [...], "reason": ...}) -> 200 {"meta",
                                            "errors": [], "warnings": []}
  GET  /slurm/v0.0.41/nodes              -> 200 {"nodes": [<every node>], "last_update", "meta", "errors", "warnings"}
  GET  /slurm/v0.0.41/ping               -> 200 {"pings": [{"hostname", "pinged": "UP"|"DOWN", "latency", "mode"}],
                                            "meta", "errors": [], "warnings": []}

Faithful, as read from SchedMD/slurm (src/slurmrestd/plugins/openapi/slurmctld/nodes.c, src/slurmrestd/
operations.c, src/slurmctld/node_mgr.c, src/plugins/data_parser/v0.0.41/parsers.c), to:
  - auth: a missing or wrong X-SLURM-USER-TOKEN answers 401 with the text body "Authentication failure";
  - an unknown path or api version answers 404 "Unable find requested URL. ...";
  - GET of a node slurmctld does not know: 200 with "nodes": [] and an error "Failure to query node <n>"
    (slurm_load_node_single returns zero records, errno 0);
  - POST for an unknown node: 500, errors [{"error_number": 2017, "error": "Invalid node name specified",
    "description": "Failure to update node <n>", "source": "_update_node"}];
  - state names outside update_node()'s accepted set (REBOOT_REQUESTED, REBOOT_ISSUED, ...): 500 with 2028
    "Invalid node state specified"; an unknown flag name: 400 (ESLURM_REST_FAIL_PARSING);
  - DRAIN adds the DRAIN flag and the reason; RESUME clears DRAIN/FAIL and the reason;
  - GET /nodes (op_handler_nodes -> _dump_nodes(ctxt, NULL)) lists every node with the same node objects;
  - GET /ping (diag.c op_handler_ping -> ping_all_controllers()) answers 200 even when every slurmctld is down:
    one entry per controller in `controllers` (hostname -> up), v0.0.41's fields only (hostname, pinged
    "UP"/"DOWN", latency in microseconds, mode "primary"/"backup"/"backupN"; "responding" and "primary" came in
    v0.0.42);
  - with no controller up, the node calls answer like CTLD_DOWN: 502 (slurm 24.11+, operations.c; 24.05 said
    500) with error 1800 "Unable to contact slurm controller (connect failure)".
Not modelled: job state, power saving, the query parameters (update_time, flags), other endpoints, the meta
block's exact content.

`script[verb]` ("get", "update", "nodes", "ping") answers the next calls of that verb with (status, json body or
text) first, after the token check. `seen` records (method, path, headers, body) of every request, authenticated
or not.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from email.message import Message
from typing import Any

from tests.providers.fakes.support import HttpFake

API = "v0.0.41"
PATH = re.compile(r"/slurm/(v0\.0\.\d+)/node/([^/]+)")
LIST = re.compile(r"/slurm/(v0\.0\.\d+)/(nodes|ping)/?")
UPDATABLE = {"DOWN", "DRAIN", "FAIL", "NOT_RESPONDING", "UNDRAIN", "RESUME", "REBOOT_CANCELED", "FUTURE", "IDLE",
             "POWER_DOWN", "POWER_UP", "POWER_DRAIN", "POWERED_DOWN"}
KNOWN_FLAGS = UPDATABLE | {"UNKNOWN", "ALLOCATED", "ERROR", "MIXED", "RESERVED", "CLOUD", "COMPLETING",
                           "POWERING_UP", "MAINTENANCE", "REBOOT_REQUESTED", "REBOOT_ISSUED", "POWERING_DOWN",
                           "DYNAMIC_FUTURE", "PLANNED", "INVALID_REG", "DYNAMIC_NORM", "INVALID"}
META = {"plugin": {"type": "openapi/slurmctld", "name": "Slurm OpenAPI slurmctld", "data_parser": f"data_parser/{API}",
                   "accounting_storage": ""}, "client": {"source": "[127.0.0.1]:0", "user": "slurm", "group": "slurm"},
        "command": [], "slurm": {"version": {"major": "24", "micro": "5", "minor": "05"}, "release": "24.05.5",
                                 "cluster": "gpu"}}


def no_val(number: int) -> dict[str, Any]:
    return {"set": True, "infinite": False, "number": number}


def slurm_error(status: int, number: int, error: str, description: str, source: str) -> tuple[int, dict[str, Any]]:
    return status, {"meta": META, "errors": [{"description": description, "error_number": number, "error": error,
                                              "source": source}], "warnings": []}


def ctld_down(description: str, source: str) -> tuple[int, dict[str, Any]]:
    return slurm_error(502, 1800, "Unable to contact slurm controller (connect failure)", description, source)


ACCESS_DENIED = slurm_error(500, 2010, "Invalid user id", "Failure to update node gpu001", "_update_node")
CTLD_DOWN = ctld_down("Failure to query node gpu001", "_dump_nodes")
RATE_LIMITED = (429, "Too Many Requests")
UNAVAILABLE = (503, "Service Unavailable")


class SlurmrestdFake(HttpFake):
    methods = ("GET", "POST", "DELETE")

    def __init__(self, token: str, nodes: tuple[str, ...] = ("gpu001", "gpu002")) -> None:
        self.token = token
        self.nodes: dict[str, dict[str, Any]] = {
            n: {"name": n, "hostname": n, "address": n, "architecture": "x86_64", "state": ["IDLE"],
                "partitions": ["gpu"], "boot_time": no_val(1704067200), "reason": "", "gres": "gpu:h100:8"}
            for n in nodes}
        self.controllers: dict[str, bool] = {"slurmctld-0": True}  # hostname -> answers pings (primary first)
        self.script: dict[str, list[tuple[int, Any]]] = {}
        self.seen: list[tuple[str, str, dict[str, str], Any]] = []
        self.serve("slurmrestd-fake", poll_interval=0.05)

    def respond(self, method: str, path: str, query: dict[str, str], headers: Message,
                raw: bytes) -> tuple[int, Any, dict[str, str]]:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        return (*self.handle(method, path, dict(headers.items()), body), {})

    def requests(self, method: str | None = None) -> list[tuple[str, str, dict[str, str], Any]]:
        return [r for r in self.seen if method is None or r[0] == method]

    # ---------------------------------------------------------------------------------------- dispatch
    def handle(self, method: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
        self.seen.append((method, path, headers, body))
        lower = {k.lower(): v for k, v in headers.items()}
        if lower.get("x-slurm-user-token") != self.token:
            return 401, "Authentication failure"
        listing = LIST.fullmatch(path)
        if listing is not None and listing[1] == API and method == "GET":
            return self._listing(listing[2])
        m = PATH.fullmatch(path)
        if m is None or m[1] != API or method not in ("GET", "POST"):
            return 404, "Unable find requested URL. Please view /openapi/v3 for API reference."
        name = urllib.parse.unquote(m[2])
        verb = "get" if method == "GET" else "update"
        queue = self.script.get(verb)
        if queue:
            return queue.pop(0)
        if not any(self.controllers.values()):
            return ctld_down(f"Failure to {'query' if method == 'GET' else 'update'} node {name}",
                             "_dump_nodes" if method == "GET" else "_update_node")
        if method == "GET":
            node = self.nodes.get(name)
            if node is None:
                return 200, {"nodes": [], "last_update": no_val(1704067200), "meta": META,
                             "errors": [{"description": f"Failure to query node {name}", "error_number": 0,
                                         "error": "No error", "source": "_dump_nodes"}], "warnings": []}
            return 200, {"nodes": [dict(node)], "last_update": no_val(1704067200), "meta": META, "errors": [],
                         "warnings": []}
        return self._update(name, body if isinstance(body, dict) else {})

    def _listing(self, what: str) -> tuple[int, Any]:
        queue = self.script.get(what)
        if queue:
            return queue.pop(0)
        if what == "ping":
            count = len(self.controllers)
            pings = [{"hostname": host, "pinged": "UP" if up else "DOWN", "latency": 812 if up else 10_000_000,
                      "mode": "primary" if i == 0 else "backup" if count == 2 else f"backup{i}"}
                     for i, (host, up) in enumerate(self.controllers.items())]
            return 200, {"pings": pings, "meta": META, "errors": [], "warnings": []}
        if not any(self.controllers.values()):
            return ctld_down("Failure to query nodes", "_dump_nodes")
        return 200, {"nodes": [dict(n) for n in self.nodes.values()], "last_update": no_val(1704067200),
                     "meta": META, "errors": [], "warnings": []}

    def _update(self, name: str, body: dict[str, Any]) -> tuple[int, Any]:
        states = body.get("state") or []
        if isinstance(states, str):
            states = [states]
        if any(s not in KNOWN_FLAGS for s in states):
            return slurm_error(400, 9001, "Failure during parsing", f"Unknown node state flag in {states}",
                               "_update_node")
        node = self.nodes.get(name)
        if node is None:
            return slurm_error(500, 2017, "Invalid node name specified", f"Failure to update node {name}",
                               "_update_node")
        if any(s not in UPDATABLE for s in states):
            return slurm_error(500, 2028, "Invalid node state specified", f"Failure to update node {name}",
                               "_update_node")
        if body.get("reason"):
            node["reason"] = str(body["reason"])
        if "DRAIN" in states and "DRAIN" not in node["state"]:
            node["state"] = [*node["state"], "DRAIN"]
        if "RESUME" in states:
            node["state"] = [s for s in node["state"] if s not in ("DRAIN", "FAIL")]
            node["reason"] = ""
        return 200, {"meta": META, "errors": [], "warnings": []}
