"""The two-step pipeline example: each step alone, then both on a real nats-server.

The end-to-end test plays the Conveyor server's pipeline engine: it starts the run on the
first step's subject, and forwards the first step's result to the second as the engine
does (``internal/engine/app.go``: store the result on the resource, publish a ``process``
event of the same run to the next step's driver).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from nats.aio.client import Client
from pipeline import CloneOutput, build, clone, git_clone, run_build

from conveyor_driver import NotFound, Resource, Result
from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.emit import emit_event, emit_next_step, watch_results
from conveyor_driver.testing import FakeContext, dispatch, running

# The nats-server fixtures, as a driver's own project enables them (usually in conftest.py).
pytest_plugins = ["conveyor_driver.testing.fixtures"]


def git(*args: str, cwd: Path) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository with one commit, whose build script writes a file and echoes a line."""
    origin = tmp_path / "origin"
    origin.mkdir()
    git("init", "--quiet", "--initial-branch=main", cwd=origin)
    (origin / "build.sh").write_text('echo "building $(cat VERSION)"\ntouch built\n')
    (origin / "VERSION").write_text("1.2.3\n")
    git("add", ".", cwd=origin)
    git("-c", "user.name=t", "-c", "user.email=t@e", "commit", "--quiet", "-m", "one", cwd=origin)
    return origin


@pytest.fixture
def checkouts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "checkouts"
    root.mkdir()
    monkeypatch.setenv("CHECKOUT_ROOT", str(root))
    return root


def project(repo: Path, **spec: str) -> dict[str, object]:
    return {
        "name": "app",
        "resource": "project",
        "pipeline": "ci",
        "spec": {"repo": str(repo), "build": "sh build.sh", **spec},
    }


async def test_git_clone_reports_the_checkout_and_its_commit(repo: Path, checkouts: Path) -> None:
    ctx = FakeContext(project(repo), run_id="run-1")
    result = await git_clone(ctx)
    commit = git("rev-parse", "HEAD", cwd=repo)
    assert result == Result.ok(
        f"cloned {commit[:12]}", data={"path": str(checkouts / "app-run-1"), "commit": commit}
    )
    assert (checkouts / "app-run-1" / "VERSION").read_text() == "1.2.3\n"


async def test_build_runs_in_the_checkout_git_clone_reported(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "build.sh").write_text("pwd\n")
    ctx = FakeContext(
        {"name": "app", "resource": "project", "spec": {"repo": "r", "build": "sh build.sh"}},
        event="process",
        upstream={"git-clone": Result.ok(data={"path": str(checkout), "commit": "c0ffee"})},
    )
    result = await run_build(ctx)
    assert result == Result.ok("built c0ffee", data={"commit": "c0ffee", "exit_code": 0})
    assert str(checkout) in [entry["event"] for entry in ctx.logs]
    assert not checkout.exists()  # the last step cleans up


async def test_build_without_a_clone_result_is_a_not_found() -> None:
    ctx = FakeContext({"name": "app", "resource": "project", "spec": {"repo": "r"}})
    with pytest.raises(NotFound, match="no result of 'git-clone' for project/app"):
        await run_build(ctx)


async def test_build_after_a_failed_clone_fails_at_once_naming_why() -> None:
    report = await dispatch(
        build,
        {"name": "app", "resource": "project", "spec": {"repo": "r"}},
        event="process",
        upstream={"git-clone": Result.fail("repository not found")},
    )
    assert report.kind == "failure" and report.action == "ack"
    assert report.result == Result.fail("'git-clone' failed for project/app: repository not found")


async def test_the_clone_output_class_reads_what_git_clone_reports(
    repo: Path, checkouts: Path
) -> None:
    ctx = FakeContext(
        project(repo), upstream={"git-clone": await git_clone(FakeContext(project(repo)))}
    )
    cloned = await ctx.upstream("git-clone", data=CloneOutput)
    assert (Path(cloned.data.path) / "VERSION").read_text() == "1.2.3\n"
    assert cloned.data.commit == git("rev-parse", "HEAD", cwd=repo)


@pytest.mark.nats
async def test_the_two_step_pipeline_end_to_end(
    nats_server: EmbeddedNats, nats_client: Client, repo: Path, checkouts: Path
) -> None:
    resource = Resource(
        name="app",
        type="project",
        pipeline="ci",
        metadata={"version": "1"},
        spec={"repo": str(repo), "build": "sh build.sh"},
    )
    commit = git("rev-parse", "HEAD", cwd=repo)
    async with (
        running(clone, nats_server.url),
        running(build, nats_server.url),
        watch_results(nats_client) as results,
    ):
        # The engine starts a pipeline run on its first step's subject, with the event
        # the resource was created with.
        started = await emit_event(nats_client, resource, event="create", driver="git-clone")
        cloned = await results.wait(started.run_id, timeout=60, driver="git-clone")
        assert cloned.driverresult.success, cloned.driverresult.message

        forwarded = await emit_next_step(nats_client, cloned, "build")
        built = await results.wait(started.run_id, timeout=60, driver="build")

    assert forwarded.event == "process" and forwarded.run_id == started.run_id
    assert forwarded.payload.metadata["driverresults.git-clone"].startswith('{"success":true')
    checkout = checkouts / f"app-{started.run_id}"
    assert cloned.driverresult.data == {"path": str(checkout), "commit": commit}
    assert built.driverresult.success, built.driverresult.message
    assert built.driverresult.data == {"commit": commit, "exit_code": 0}
    assert (
        built.resource.metadata["driverresults.git-clone"]
        == (forwarded.payload.metadata["driverresults.git-clone"])
    )
    assert not checkout.exists()
