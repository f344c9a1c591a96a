"""Attributes of every shape ``conveyor-driver run`` and ``routes`` may be pointed at."""

from __future__ import annotations

from conveyor_driver import Context, Driver

not_a_driver = {"name": "worker"}

# A valid Driver that never registered a handler: it must refuse to start.
empty = Driver("empty")

routed = Driver("router")


@routed.on("pipeline", "build")
async def build(ctx: Context) -> None:
    return None


@routed.on("deployment", events=["update", "create"])
def deploy(ctx: Context) -> None:
    return None
