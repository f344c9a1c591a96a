"""``--embedded-port`` already taken: one clear line, nothing left behind, no foreign server used.

The embedded nats-server exits at once when its port is taken, but what holds the port
still accepts connections, so these run the real CLI against a plain listener and against
another nats-server, each with a private TMPDIR to see what the driver leaves in it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from apps.harness import app, clean_env, run_cli
from nats.js.api import StreamConfig

from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.errors import EmbeddedServerError

pytestmark = pytest.mark.nats

WORKER = app("worker_app.py:driver")
#: The driver fails in about a second; before the fix it never ended. Bounded either way.
QUICKLY = 30.0


@pytest.fixture
def private_tmp(tmp_path: Path) -> Path:
    path = tmp_path / "tmp"
    path.mkdir()
    return path


@pytest.fixture
def plain_listener() -> Iterator[int]:
    """A TCP listener that accepts (the kernel does) and never says a word, like a web app."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _left_in(path: Path) -> list[str]:
    return sorted(entry.name for entry in path.iterdir())


async def _run_embedded(port: int, tmpdir: Path) -> tuple[int, list[str]]:
    done = await run_cli(
        "run",
        "--embedded",
        "--embedded-port",
        str(port),
        WORKER,
        env=clean_env(TMPDIR=str(tmpdir)),
        timeout=QUICKLY,
    )
    return done.returncode, done.stderr_lines


@pytest.mark.process
async def test_a_port_held_by_a_plain_listener_is_one_clear_line(
    plain_listener: int, private_tmp: Path
) -> None:
    code, lines = await _run_embedded(plain_listener, private_tmp)

    assert code != 0
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith("Error: ")
    assert f"port {plain_listener}" in line
    assert "already in use by another program" in line
    assert "address already in use" in line  # nats-server's own words
    assert _left_in(private_tmp) == []


@pytest.mark.process
async def test_a_port_held_by_another_nats_server_is_refused_and_its_streams_untouched(
    private_tmp: Path,
) -> None:
    async with EmbeddedNats(create_streams=False) as other:
        nc = await nats.connect(other.url)
        try:
            js = nc.jetstream()
            await js.add_stream(StreamConfig(name="theirs", subjects=["theirs.>"]))
            before = await js.streams_info()

            code, lines = await _run_embedded(other.port, private_tmp)

            after = await js.streams_info()
        finally:
            await nc.close()

    assert code != 0
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith("Error: ")
    assert f"port {other.port}" in line
    assert f"already in use by another nats-server, {other.server_name!r}" in line
    assert [s.config.name for s in after] == [s.config.name for s in before] == ["theirs"]
    assert after[0].state.messages == before[0].state.messages == 0
    assert _left_in(private_tmp) == []


async def test_streams_are_never_created_on_a_server_that_is_not_the_child(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The port changing hands between the readiness check and the stream creation."""
    async with EmbeddedNats(create_streams=False) as other:

        async def seems_ready(*_args: object) -> None:
            return None

        monkeypatch.setattr(EmbeddedNats, "_wait_until_ready", seems_ready)
        server = EmbeddedNats(port=other.port, store_dir=tmp_path / "store")
        with pytest.raises(EmbeddedServerError, match=f"port {other.port} was taken"):
            async with asyncio.timeout(QUICKLY), server:
                pass
        nc = await nats.connect(other.url)
        try:
            assert await nc.jetstream().streams_info() == []
        finally:
            await nc.close()


async def test_a_failed_start_removes_its_temporary_directory(plain_listener: int) -> None:
    server = EmbeddedNats(port=plain_listener)
    store = server.store_dir
    with pytest.raises(EmbeddedServerError, match=f"port {plain_listener}"):
        async with asyncio.timeout(QUICKLY), server:
            pass
    assert not store.exists()


async def test_pid_names_the_running_nats_server_and_none_once_stopped() -> None:
    server = EmbeddedNats()
    assert server.pid is None
    async with server:
        assert server.pid is not None
        comm = await asyncio.to_thread(Path(f"/proc/{server.pid}/comm").read_text)
        assert comm.strip() == "nats-server"
    assert server.pid is None
