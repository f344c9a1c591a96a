"""``ctx.workspace``: made lazily, one per run, removed at its end whatever the end, kept on
request when the run failed, the default ``cwd`` of ``ctx.run``, and swept after a kill -9."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from _helpers import wait_until
from apps.harness import app, clean_env, driver_process
from nats.aio.client import Client

from conveyor_driver import Context, Driver, Fail, Result
from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.emit import emit_event
from conveyor_driver.models import Resource
from conveyor_driver.testing import FakeContext, dispatch
from conveyor_driver.workspace import RunWorkspace, sweep

RESOURCE = {"name": "app", "resource": "job", "spec": {}}


def _read(path: Path) -> str:
    return path.read_text()


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


async def test_a_run_that_never_asks_for_its_workspace_makes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "workspaces"
    driver = Driver("lazy")

    @driver.on("job")
    async def build(ctx: Context) -> None:
        pass

    report = await dispatch(driver, RESOURCE, workspace_root=root)
    assert report.kind == "success"
    assert not root.exists()


async def test_each_run_gets_a_fresh_empty_directory_removed_when_it_succeeds(
    tmp_path: Path,
) -> None:
    seen: list[tuple[Path, list[str]]] = []
    driver = Driver("builder")

    @driver.on("job")
    def build(ctx: Context) -> None:  # sync: asked for from the handler's thread
        seen.append((ctx.workspace, sorted(os.listdir(ctx.workspace))))
        (ctx.workspace / "artifact").write_text("built")
        assert ctx.workspace == seen[-1][0]  # the same directory for the whole run

    for _ in range(2):
        assert (await dispatch(driver, RESOURCE, workspace_root=tmp_path)).kind == "success"
    (first, first_files), (second, second_files) = seen
    assert first != second
    assert first_files == second_files == []  # empty: `git clone URL .` works in it
    assert first.is_relative_to(tmp_path) and second.is_relative_to(tmp_path)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("ending", ["fail", "raise", "retry", "result"])
async def test_the_workspace_is_removed_when_the_run_fails(tmp_path: Path, ending: str) -> None:
    made: list[Path] = []
    driver = Driver("failing", max_attempts=3)

    @driver.on("job")
    async def build(ctx: Context) -> Result:
        made.append(ctx.workspace)
        if ending == "fail":
            raise Fail("tests failed")
        if ending == "raise":
            raise RuntimeError("boom")
        if ending == "retry":
            raise ConnectionError("registry down")  # attempt 1 of 3: a retry
        return Result.fail("tests failed")

    attempt = 1 if ending == "retry" else 3
    report = await dispatch(driver, RESOURCE, attempt=attempt, workspace_root=tmp_path)
    expected = {"retry": "retry", "raise": "gave_up"}.get(ending, "failure")
    assert report.kind == expected
    assert made and not made[0].exists()
    assert _leftovers(tmp_path) == []


async def test_a_failed_runs_workspace_is_kept_with_the_flag_and_its_log_says_where(
    tmp_path: Path,
) -> None:
    made: list[Path] = []
    driver = Driver("inspectable", max_attempts=1)

    @driver.on("job")
    async def build(ctx: Context) -> None:
        made.append(ctx.workspace)
        (ctx.workspace / "build.log").write_text("error: missing semicolon")
        if ctx.resource.name == "broken":
            raise Fail("compile error")

    report = await dispatch(
        driver, {**RESOURCE, "name": "broken"}, workspace_root=tmp_path, keep_failed_workspaces=True
    )
    assert report.kind == "failure"
    assert (made[0] / "build.log").read_text() == "error: missing semicolon"
    (kept,) = [e for e in report.logs if e["event"].startswith("workspace kept")]
    assert kept["workspace"] == str(made[0])
    assert kept["level"] == "warning"
    assert kept["resource_name"] == "broken"  # in the run's log, with its run id

    # A run that succeeds is removed all the same.
    report = await dispatch(driver, RESOURCE, workspace_root=tmp_path, keep_failed_workspaces=True)
    assert report.kind == "success"
    assert not made[1].exists()
    assert made[0].exists()


async def test_the_workspace_is_removed_when_an_async_handler_times_out(tmp_path: Path) -> None:
    made: list[Path] = []
    driver = Driver("slow", max_attempts=1)

    @driver.on("job", timeout=0.2)
    async def build(ctx: Context) -> None:
        made.append(ctx.workspace)
        await ctx.run("sleep 60")

    report = await dispatch(driver, RESOURCE, workspace_root=tmp_path)
    assert report.kind == "gave_up"
    assert report.result is not None and "timed out" in report.result.message
    assert made and not made[0].exists()


async def test_an_abandoned_sync_handlers_workspace_goes_when_its_thread_returns(
    tmp_path: Path,
) -> None:
    """Not under its feet: the thread still works in it after the deadline."""
    made: list[Path] = []
    release = threading.Event()
    wrote_after_deadline = threading.Event()
    driver = Driver("stubborn", max_attempts=1)

    @driver.on("job", timeout=0.2)
    def build(ctx: Context) -> None:
        made.append(ctx.workspace)
        release.wait(60)
        (ctx.workspace / "late.txt").write_text("still here")
        wrote_after_deadline.set()

    report = await dispatch(driver, RESOURCE, workspace_root=tmp_path)
    assert report.kind == "gave_up"
    assert made[0].exists()
    assert any(e["event"].startswith("workspace removed when") for e in report.logs)
    release.set()
    await asyncio.to_thread(wrote_after_deadline.wait, 60)
    await wait_until(lambda: _leftovers(tmp_path) == [], what="the workspace removed")


async def test_the_workspace_is_removed_when_the_run_is_cancelled(tmp_path: Path) -> None:
    made: list[Path] = []
    driver = Driver("cancelled")

    @driver.on("job")
    async def build(ctx: Context) -> None:
        made.append(ctx.workspace)
        await asyncio.sleep(60)

    task = asyncio.create_task(dispatch(driver, RESOURCE, workspace_root=tmp_path))
    await wait_until(lambda: bool(made), what="the workspace made")
    assert made[0].exists()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not made[0].exists()
    assert _leftovers(tmp_path) == []


async def test_ctx_run_works_in_the_workspace_once_it_exists(tmp_path: Path) -> None:
    cwds: list[str] = []
    driver = Driver("runner")

    @driver.on("job")
    async def build(ctx: Context) -> None:
        cwds.append((await ctx.run("pwd")).stdout.strip())  # no workspace yet: the driver's
        workspace = ctx.workspace
        cwds.append((await ctx.run("pwd")).stdout.strip())
        cwds.append((await ctx.run(["pwd"], cwd=tmp_path)).stdout.strip())  # given: it wins
        cwds.append(str(workspace))

    assert (await dispatch(driver, RESOURCE, workspace_root=tmp_path / "ws")).kind == "success"
    before, inside, given, workspace = cwds
    assert before == os.getcwd()
    assert inside == workspace
    assert given == str(tmp_path)


async def test_a_run_that_ended_has_no_workspace_to_make(tmp_path: Path) -> None:
    kept: list[Context] = []
    driver = Driver("leaky")

    @driver.on("job")
    async def build(ctx: Context) -> None:
        kept.append(ctx)

    await dispatch(driver, RESOURCE, workspace_root=tmp_path)
    with pytest.raises(RuntimeError, match="run has ended"):
        _ = kept[0].workspace
    assert _leftovers(tmp_path) == []


def test_a_relative_root_gives_an_absolute_workspace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    workspace = RunWorkspace(Path("builds"), "relative")
    made = workspace.path()
    assert made.is_absolute() and made.is_relative_to(tmp_path / "builds")
    workspace.remove()
    assert _leftovers(tmp_path / "builds") == []


def test_a_fake_context_has_a_workspace_too(tmp_path: Path) -> None:
    ctx = FakeContext(RESOURCE, workspace_root=tmp_path)
    (ctx.workspace / "file").write_text("x")
    made = ctx.workspace
    assert made.is_relative_to(tmp_path)
    del ctx
    gc.collect()
    assert not made.exists()


# --- the sweep at start-up -------------------------------------------------------------------


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _forge(root: Path, name: str, **owner: object) -> Path:
    """A workspace of driver ``name`` as another process would have left it."""
    workspace = RunWorkspace(root, name)
    top = workspace.path().parent
    (top / "owner.json").write_text(
        json.dumps({**json.loads((top / "owner.json").read_text()), **owner})
    )
    return top


def test_the_sweep_removes_only_this_drivers_workspaces_whose_process_is_gone(
    tmp_path: Path,
) -> None:
    dead = _forge(tmp_path, "builder", pid=_dead_pid())
    reused = _forge(tmp_path, "builder", started="1")  # this pid, but a process since gone
    live = _forge(tmp_path, "builder")  # this very process
    other_driver = _forge(tmp_path, "deployer", pid=_dead_pid())
    lookalike = _forge(tmp_path, "builder", driver="builder.x", pid=_dead_pid())
    unrelated = tmp_path / "conveyor-ws-builder-1-abc"
    unrelated.mkdir()  # no owner file, young: maybe being made right now
    (dead / "work" / "ro").mkdir()
    (dead / "work" / "ro" / "file").write_text("x")
    os.chmod(dead / "work" / "ro", 0o500)  # as Go leaves its module cache

    removed, failed = sweep(tmp_path, "builder")
    assert failed == []
    assert sorted(removed) == sorted([dead, reused])
    for path in (live, other_driver, lookalike, unrelated):
        assert path.exists(), path


def test_the_sweep_counts_a_zombie_as_gone_and_ignores_what_is_not_a_directory(
    tmp_path: Path,
) -> None:
    zombie = subprocess.Popen(["true"])  # exited, never reaped: what a PID 1 may leave
    try:
        stat_file = Path(f"/proc/{zombie.pid}/stat")
        deadline = time.monotonic() + 60
        while (fields := stat_file.read_text().rsplit(")", 1)[1].split())[0] != "Z":
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.01)
        # Its own start time: only its being a zombie tells that it is gone.
        left = _forge(tmp_path, "builder", pid=zombie.pid, started=fields[19])
        (tmp_path / "conveyor-ws-builder-1-file").write_text("not a workspace")
        (tmp_path / "conveyor-ws-builder-1-link").symlink_to(left)
        removed, failed = sweep(tmp_path, "builder")
    finally:
        zombie.wait()
    assert (removed, failed) == ([left], [])
    assert sorted(_leftovers(tmp_path)) == [
        "conveyor-ws-builder-1-file",
        "conveyor-ws-builder-1-link",
    ]


def test_the_sweep_judges_other_hosts_and_ownerless_ones_by_age(tmp_path: Path) -> None:
    elsewhere = _forge(tmp_path, "builder", host="another-pod")
    ownerless = tmp_path / "conveyor-ws-builder-1-abc"
    ownerless.mkdir()
    assert sweep(tmp_path, "builder") == ([], [])
    old = os.stat(elsewhere).st_mtime - 7 * 24 * 3600
    for path in (elsewhere, ownerless):
        os.utime(path, (old, old))
    removed, _ = sweep(tmp_path, "builder")
    assert sorted(removed) == sorted([elsewhere, ownerless])
    assert sweep(tmp_path / "missing", "builder") == ([], [])


@pytest.mark.process
async def test_a_killed_drivers_workspace_is_removed_by_the_next_start(
    nats_server: EmbeddedNats, nats_client: Client, tmp_path: Path
) -> None:
    root, report = tmp_path / "workspaces", tmp_path / "report"
    # Another process's, alive (this one): the sweep must leave it.
    live = RunWorkspace(root, "workspaced").path()
    args = (app("workspace_app.py:driver"), "--nats-url", nats_server.url)
    env = clean_env(CONVEYOR_WORKSPACE_ROOT=str(root), CONVEYOR_LOG_FORMAT="json")
    async with driver_process(*args, env=env) as proc:
        await proc.started()
        spec = {"report": str(report), "hang": True}
        await emit_event(nats_client, Resource("app", "job", spec=spec))
        await wait_until(lambda: report.exists() and report.read_text(), what="the workspace")
        workspace = Path(report.read_text())
        assert _read(workspace / "checkout.txt") == "sources\n"
        proc.send(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
    assert _leftovers(root) == sorted([live.parent.name, workspace.parent.name])  # SIGKILL...

    async with driver_process(*args, env=env) as proc:
        await proc.started()
        record = await proc.wait_for_log("stale workspaces removed")
        assert record["workspaces"] == [str(workspace.parent)]
        assert _leftovers(root) == [live.parent.name]  # ...but the next start cleans up
        assert live.exists()
        # And this process's own runs clean up after themselves.
        report.unlink()
        await emit_event(nats_client, Resource("again", "job", spec={"report": str(report)}))
        await wait_until(lambda: report.exists() and report.read_text(), what="the workspace")
        second = Path(report.read_text())
        assert second.parent.name != live.parent.name
        await wait_until(lambda: _leftovers(root) == [live.parent.name], what="removed")
