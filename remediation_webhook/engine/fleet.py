"""The fleet cap from reality: at every pool refresh, each node we marked as held is read again.

A slot is held while the node carries our cordon (our annotations and `spec.unschedulable: true`, or our taint;
on Slurm our drain). A node that someone else uncordoned, that is gone, or that is another machine under the same
name frees its slot, journaled with who or what freed it. If the remediation that cordoned it is still unfinished
and had placed that cordon, a person undid our step: the remediation is overridden and never cordons the node
again for that alert. Inventories that cannot tell (static) keep their marks until the node goes away.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..errors import InventoryUnavailable, NodeNotFound
from ..journal import TERMINAL, clear_mark, load, marks

if TYPE_CHECKING:
    from .core import Engine

log = logging.getLogger("remediation_webhook.engine")


async def sweep(engine: Engine) -> None:
    journal = engine.journal
    for node, rid in (await journal.run(marks)).items():
        if engine.busy(node):
            continue  # its remediation is running and decides for itself
        rem = await journal.run(load, rid)
        try:
            now_node = await engine.inventory.resolve(node)
        except NodeNotFound:
            await _release(engine, node, "gone", "the node is gone")
            continue
        except InventoryUnavailable:
            return  # try again at the next refresh
        if rem is not None and rem.node_uid and now_node.uid != rem.node_uid:
            await _release(engine, node, "replaced", "another machine carries the node's name")
            continue
        if now_node.held_by is None or now_node.held_by:
            continue  # the inventory cannot tell, or the node carries a cordon of ours
        what = ("someone else uncordoned the node" if not now_node.unschedulable
                else "the node's cordon is no longer ours (someone else's annotations)")
        if rem is not None and rem.state not in TERMINAL and rem.hold_placed and not rem.dry_run:
            await engine.overridden(rem, f"{what} while the remediation was {rem.state}; it stops for good")
            continue
        await _release(engine, node, "uncordoned", what)


async def _release(engine: Engine, node: str, kind: str, reason: str) -> None:
    if await engine.journal.run(clear_mark, node, engine.clock(), reason):
        engine.metrics.slot_releases.labels(kind).inc()
        log.info("fleet-cap slot released", extra={"node": node, "reason": reason})
