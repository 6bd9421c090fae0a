"""Bare-metal replace is a human: a record (journal, metric, notification) and the node stays cordoned."""

from __future__ import annotations

from aiohttp import web

from tests.providers.fakes.support import (
    FakeAlertmanager,
    alert,
    await_for,
    base_config,
    close_harness,
    make_harness,
    notification,
)


async def test_bare_metal_replace_opens_a_record(tmp_path, kube):
    received = []

    async def hook(request):
        received.append(await request.json())
        return web.json_response({}, status=201)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    kube.add_node("metal-1", provider_id="")
    kube.add_pod("kube-system", "ds", "metal-1", daemonset=True)
    raw = base_config(tmp_path, kube.url, providers={"human": {"notify_url": f"http://127.0.0.1:{port}/hook"}},
                      policy={"dry_run": False, "rules": [{"name": "r", "match_re": {"alertname": "GPU.*"},
                                                           "ladder": ["cordon", "drain", "replace"],
                                                           "requires_approval": []}]},
                      actions={"drain": {"poll_interval": "20ms", "timeout": "5s"}, "replace": {"using": "auto"}})
    h = await make_harness(raw, tmp_path, kube.url, FakeAlertmanager())
    try:
        await h.post(notification(alert("metal-1", remediation="replace")))
        await await_for(lambda: h.states().get("metal-1") == "NEEDS_HUMAN", what="needs human")
        assert received and received[0]["node"] == "metal-1" and received[0]["action"] == "replace"
        assert "metal-1" in kube.cordoned()
        assert h.metric("gpu_remediation_provider_events_total", provider="human", action="replace",
                        kind="human_handoff") == 1
    finally:
        await close_harness(h)
        await runner.cleanup()
