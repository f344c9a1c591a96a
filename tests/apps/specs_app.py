"""A driver with typed specs, for ``conveyor-driver schema`` and ``apply``."""

from __future__ import annotations

import attrs

from conveyor_driver import Context, Driver


@attrs.frozen
class BuildSpec:
    """What to build, and from where."""

    repo: str
    ref: str = "main"
    timeout_s: int = 600


driver = Driver("builder")


@driver.on("build", spec=BuildSpec)
async def build(ctx: Context[BuildSpec]) -> None:
    ctx.log.info("building", repo=ctx.spec.repo)


@driver.on("cleanup")
async def cleanup(ctx: Context) -> None:
    return None
