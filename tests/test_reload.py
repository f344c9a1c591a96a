"""``conveyor-driver run APP --reload``: the dev loop, against a real nats-server.

The app is copied to a directory of the test's own and edited while events flow: every
event gets exactly one result, a run going on during the edit finishes on the old code,
and the events emitted during and after the reload are run by the new code. A broken edit
is one line, the old code serving on, until the next save fixes it.
"""

from __future__ import annotations

import contextlib
import signal
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from _helpers import invoke, one_error_line, wait_until
from apps.harness import APPS, DriverProcess, driver_process, wait_settled
from nats.aio.client import Client

from conveyor_driver import Driver, Settings
from conveyor_driver.embedded import EmbeddedNats, free_port
from conveyor_driver.emit import ResultWatch, emit_event, watch_results
from conveyor_driver.errors import AppLoadError, ConfigurationError
from conveyor_driver.loader import load_driver
from conveyor_driver.models import Resource
from conveyor_driver.reload import describe_failure, is_app_file, watched_roots

TIMEOUT = 90.0


def _copy_app(directory: Path) -> Path:
    app = directory / "app.py"
    app.write_text((APPS / "reload_app.py").read_text())
    return app


@contextlib.asynccontextmanager
async def _reloading(
    directory: Path, nats_server: EmbeddedNats
) -> AsyncIterator[tuple[Path, DriverProcess]]:
    """A copy of the reload app in ``directory``, served with ``--reload`` and started."""
    app = _copy_app(directory)
    async with driver_process(f"{app}:driver", "--reload", "--nats-url", nats_server.url) as proc:
        await proc.started()
        yield app, proc


def _with_version(text: str, version: str) -> str:
    start = text.index('VERSION = "')
    end = text.index('"', start + len('VERSION = "'))
    return f'{text[:start]}VERSION = "{version}{text[end:]}'


def _set_version(app: Path, version: str) -> None:
    """One write: one change, one reload."""
    app.write_text(_with_version(app.read_text(), version))


def _count(proc: DriverProcess, event: str) -> int:
    return sum(1 for record in proc.records if record.get("event") == event)


async def _logged(proc: DriverProcess, event: str, times: int) -> None:
    """Wait until ``event`` has been logged ``times`` times (by any process of the tree)."""
    await wait_until(
        lambda: _count(proc, event) >= times, timeout=TIMEOUT, what=f"{times}x {event!r}"
    )


async def _emit(nc: Client, names: list[str], **spec: Any) -> list[str]:
    return [(await emit_event(nc, Resource(name, "job", spec=spec))).run_id for name in names]


def _only_result(watch: ResultWatch, run_id: str) -> dict[str, Any]:
    (event,) = watch.results(run_id)  # exactly one result
    assert event.driverresult.success, event
    data: dict[str, Any] = event.driverresult.data
    return data


@pytest.mark.nats
@pytest.mark.process
async def test_an_edit_mid_stream_reloads_and_every_event_gets_one_result(tmp_path: Path) -> None:
    app = _copy_app(tmp_path)
    port = free_port()
    args = (f"{app}:driver", "--reload", "--embedded", "--embedded-port", str(port))
    async with driver_process(*args) as proc:
        await proc.started()
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        try:
            async with watch_results(nc) as watch:
                before = await _emit(nc, [f"before-{i}" for i in range(3)])
                for run_id in before:
                    await watch.wait(run_id, timeout=TIMEOUT)
                # A run still going when the code changes: the reload waits for it.
                (slow,) = await _emit(nc, ["slow"], sleep=3)
                await proc.wait_for_log("handler started", TIMEOUT, run_id=slow)

                _set_version(app, "v2")
                await proc.wait_for_log("reloading", TIMEOUT, changed=[str(app)])
                await proc.wait_for_log("shutting down", TIMEOUT)  # the old worker: no pulls
                during = await _emit(nc, [f"during-{i}" for i in range(5)])
                await _logged(proc, "driver started", 2)
                after = await _emit(nc, [f"after-{i}" for i in range(5)])
                for run_id in [slow, *during, *after]:
                    await watch.wait(run_id, timeout=TIMEOUT)
                info = await wait_settled(nc, "reloading", lambda i: i.num_ack_pending == 0)
            proc.send(signal.SIGTERM)
            assert await proc.wait(TIMEOUT) == 0, proc.output
        finally:
            await nc.close()

    old = {_only_result(watch, run_id)["version"] for run_id in [*before, slow]}
    assert old == {"v1"}
    new = [_only_result(watch, run_id) for run_id in [*during, *after]]
    assert {data["version"] for data in new} == {"v2"}
    assert len({data["pid"] for data in new}) == 1  # the one new worker
    assert info.num_pending == 0 and info.num_redelivered == 0
    assert info.delivered.consumer_seq == 3 + 1 + 5 + 5
    # The embedded server was started once, by the supervisor: it outlived the reload.
    servers = [r for r in proc.records if r.get("event") == "embedded nats-server started"]
    assert len(servers) == 1 and "worker" not in servers[0]
    assert _count(proc, "worker stopped for a reload") == 1


@pytest.mark.process
async def test_a_syntax_error_is_one_line_and_the_old_code_serves_until_the_fix(
    tmp_path: Path, nats_server: EmbeddedNats, nats_client: Client
) -> None:
    async with (
        _reloading(tmp_path, nats_server) as (app, proc),
        watch_results(nats_client) as watch,
    ):
        good = app.read_text()
        broken_line = len(good.splitlines()) + 1
        app.write_text(good + "def broken(:\n")
        failed = await proc.wait_for_log("reload failed", TIMEOUT)
        assert failed["error"].startswith(f"{app}:{broken_line}: SyntaxError: "), failed
        assert failed["changed"] == [str(app)]
        (meanwhile,) = await _emit(nats_client, ["meanwhile"])
        await watch.wait(meanwhile, timeout=TIMEOUT)
        assert _only_result(watch, meanwhile)["version"] == "v1"
        assert _count(proc, "worker started") == 1  # the broken code never started

        app.write_text(_with_version(good, "v3"))
        await proc.wait_for_log("reloading", TIMEOUT)
        await _logged(proc, "driver started", 2)
        (fixed,) = await _emit(nats_client, ["fixed"])
        await watch.wait(fixed, timeout=TIMEOUT)
        assert _only_result(watch, fixed)["version"] == "v3"
        proc.send(signal.SIGTERM)
        assert await proc.wait(TIMEOUT) == 0, proc.output
    assert _count(proc, "reload failed") == 1


def test_reload_refuses_more_than_one_worker() -> None:
    args = ("run", str(APPS / "reload_app.py:driver"), "--reload", "--workers", "2")
    line = one_error_line(invoke(*args))
    assert line == (
        "--reload runs one worker, restarted on each change: it does not combine with --workers 2"
    )


def test_driver_run_cannot_reload_itself() -> None:
    driver = Driver("single")
    driver.on("job")(lambda ctx: None)
    with pytest.raises(ConfigurationError, match=r"^--reload needs `conveyor-driver run APP"):
        driver.run(Settings.from_env({"CONVEYOR_RELOAD": "yes"}))


def test_what_is_watched(tmp_path: Path) -> None:
    root = tmp_path / "project"
    assert watched_roots(f"{root}/app.py:driver") == [root.resolve()]
    assert watched_roots(f"{root}/app.py") == [root.resolve()]
    # A module: its top-level package, loaded by the loader (here: the test apps).
    load_driver("apps.worker_app:driver")
    assert watched_roots("apps.worker_app:driver") == [APPS]
    roots = [root]
    for kept in ("app.py", "steps/build.py", "lib/x/y.py"):
        assert is_app_file(root / kept, roots), kept
    for ignored in (
        "notes.txt",
        "app.pyc",
        "__pycache__/app.py",
        ".venv/lib/site.py",
        "venv/lib/site.py",
        ".hidden/app.py",
        ".#app.py",
        "x/node_modules/y.py",
    ):
        assert not is_app_file(root / ignored, roots), ignored
    assert not is_app_file(tmp_path / "elsewhere.py", roots)


def _failure(path: Path, source: str) -> str:
    path.write_text(textwrap.dedent(source))
    with pytest.raises(AppLoadError) as caught:
        load_driver(f"{path}:driver")
    return describe_failure(caught.value)


def test_a_failed_import_says_where(tmp_path: Path) -> None:
    assert _failure(tmp_path / "syntax_app.py", "x = 1\nif x\n") == (
        f"{tmp_path / 'syntax_app.py'}:2: SyntaxError: expected ':'"
    )
    raising = """\
        from conveyor_driver import Driver
        driver = Driver("raising")
        raise RuntimeError("the settings file is missing")
    """
    assert _failure(tmp_path / "raising_app.py", raising) == (
        f"{tmp_path / 'raising_app.py'}:3: RuntimeError: the settings file is missing"
    )
    missing = "import no_such_module_here\n"
    assert _failure(tmp_path / "missing_app.py", missing) == (
        f"{tmp_path / 'missing_app.py'}:1: ModuleNotFoundError: "
        "No module named 'no_such_module_here'"
    )
    no_driver = "driver = 42\n"
    assert _failure(tmp_path / "not_app.py", no_driver) == (
        f"{tmp_path}/not_app.py:driver is a int, not a conveyor_driver.Driver"
    )


_REFUSING_HOOK = """

@driver.on_startup
def _refuse() -> None:
    raise RuntimeError("the cache is unreachable")
"""


@pytest.mark.process
async def test_new_code_that_dies_at_start_waits_for_the_next_change(
    tmp_path: Path, nats_server: EmbeddedNats, nats_client: Client
) -> None:
    """It imports (the check passes) but its start-up hook raises: no exit, no endless loop."""
    async with (
        _reloading(tmp_path, nats_server) as (app, proc),
        watch_results(nats_client) as watch,
    ):
        good = app.read_text()
        app.write_text(good + _REFUSING_HOOK)
        waiting = "worker keeps exiting at start; waiting for the next change"
        await proc.wait_for_log(waiting, TIMEOUT)
        started = _count(proc, "worker started")
        assert started >= 1 + 5  # the first worker, then five deaths at start
        assert proc.proc.returncode is None

        app.write_text(_with_version(good, "v4"))
        await _logged(proc, "driver started", 2)
        (run_id,) = await _emit(nats_client, ["after-fix"])
        await watch.wait(run_id, timeout=TIMEOUT)
        assert _only_result(watch, run_id)["version"] == "v4"
        assert _count(proc, "worker started") == started + 1
        proc.send(signal.SIGTERM)
        assert await proc.wait(TIMEOUT) == 0, proc.output
