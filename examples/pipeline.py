"""A two-step pipeline: ``git-clone`` checks a repository out, ``build`` builds the checkout.

Each step is a driver of its own, and the second reads what the first reported with
``ctx.upstream``. The Conveyor server hands the result on: it stores it on the resource
(``metadata["driverresults.git-clone"]``) and forwards the resource to the next step.

Run each step against a Conveyor server (its NATS and API; the defaults are local)::

    conveyor-driver run examples/pipeline.py:clone --nats-url nats://conveyor:4222
    conveyor-driver run examples/pipeline.py:build --nats-url nats://conveyor:4222

then define the pipeline (``POST /pipelines``) and create a resource of type ``project``
in it (``POST /resources/``)::

    {"name": "ci", "resource": "project",
     "steps": [{"id": "1", "name": "clone", "driver": "git-clone"},
               {"id": "2", "name": "build", "driver": "build"}]}

    {"name": "my-app", "resource": "project", "pipeline": "ci",
     "spec": {"repo": "https://github.com/open-ug/conveyor", "ref": "main", "build": "make"}}

Without a Conveyor server (``--embedded``) nothing hands the first step's result on:
``test_pipeline.py`` plays the engine's part with ``conveyor_driver.emit.emit_next_step``.

The checkout is a directory on the machine ``git-clone`` runs on (under ``$CHECKOUT_ROOT``,
or the system's temporary directory), so both drivers must share it. ``build``, the last
step, removes it once the build command has run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import attrs

from conveyor_driver import Context, Driver, Fail, Result

clone = Driver("git-clone")
build = Driver("build")


@attrs.frozen
class CloneOutput:
    """What ``git-clone`` reports, and ``build`` reads back with ``data=CloneOutput``."""

    path: str
    commit: str


def _spec(ctx: Context) -> dict[str, Any]:
    spec = ctx.resource.spec
    if not isinstance(spec, dict) or not isinstance(spec.get("repo"), str):
        raise Fail("spec.repo is missing: nothing to clone")
    return spec


@clone.on("project")
async def git_clone(ctx: Context) -> Result:
    spec = _spec(ctx)
    root = Path(os.environ.get("CHECKOUT_ROOT") or tempfile.gettempdir())
    checkout = root / f"{ctx.resource.name}-{ctx.run_id}"
    # What a failed earlier attempt left; in a thread, as a big tree takes a while.
    await asyncio.to_thread(shutil.rmtree, checkout, ignore_errors=True)
    branch = ["--branch", spec["ref"]] if spec.get("ref") else []
    await ctx.run(["git", "clone", "--quiet", *branch, spec["repo"], str(checkout)], check=True)
    head = await ctx.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], check=True)
    output = CloneOutput(path=str(checkout), commit=head.stdout.strip())
    return Result.ok(f"cloned {output.commit[:12]}", data=attrs.asdict(output))


@build.on("project", events=["process"])
async def run_build(ctx: Context) -> Result:
    # A failed, missing or malformed clone result fails this step at once, naming why.
    cloned = await ctx.upstream("git-clone", data=CloneOutput)
    checkout = Path(cloned.data.path)
    if not await asyncio.to_thread(checkout.is_dir):
        raise Fail(f"checkout {checkout} is not on this machine: run build beside git-clone")
    command = _spec(ctx).get("build", "make")
    done = await ctx.run(command, cwd=checkout)
    # Kept when the attempt ended in an exception: a retry builds it again.
    await asyncio.to_thread(shutil.rmtree, checkout, ignore_errors=True)
    data = {"commit": cloned.data.commit, "exit_code": done.exit_code}
    if not done.ok:
        raise Fail(f"build of {cloned.data.commit[:12]} failed", data=data)
    return Result.ok(f"built {cloned.data.commit[:12]}", data=data)
