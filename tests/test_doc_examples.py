"""Every Python and console example of the documentation site runs, from the Markdown itself.

Each page of ``docs/`` (recursively) is a small project of its own: its Python blocks are
written out and run with pytest exactly as the README's are (``tests/_readme.py``), then its
console blocks are run in order in that directory and what they print is compared with what
the page shows (``tests/_console.py``). The README's console blocks run the same way (its
Python blocks run in ``tests/test_readme.py``). What a page's commands name is started here,
for real: a nats-server (TLS and client-verifying for a page with certificates), the Conveyor
API server of ``tests/_conveyor_api_server.py``, an OTLP receiver, a git repository; a
manifest the commands write is validated as Kubernetes and KEDA would. A failure here means a
page shows users an example that does not work: fix the page (or the library), never this
test's lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import kubernetes_validate
import nats
import pytest
from _certs import make_pki, tls_nats_server
from _console import Command, commands, output_matches, session
from _conveyor_api_server import ConveyorAPIServer
from _otel import OtlpReceiver, otlp_receiver
from _readme import CONSOLE, parse, python_blocks, run_project, write_project

from conveyor_driver import protocol
from conveyor_driver.embedded import EmbeddedNats, free_port

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
#: Blocks a page leaves out, on purpose, by page. Raising a number is a decision to show
#: users an example that nothing runs: give the block a `not-tested` reason a reader can judge.
NOT_TESTED: dict[str, int] = {
    "README.md": 1,
    "docs/how-to/kubernetes.md": 2,
}
_EXAMPLE_FENCE = re.compile(r"^\s*```\s*(python|py|console|shell-session)\b")


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _examples(page: Path) -> bool:
    return any(_EXAMPLE_FENCE.match(line) for line in page.read_text().splitlines())


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_example_fence_is_one_the_collector_reads(page: Path) -> None:
    # An indented fence (in a list, an admonition) or one with attributes would be skipped
    # without a word: refuse it, so that no example leaves the tests silently.
    blocks = parse(page.read_text(), _name(page))
    opened = {b.line for b in blocks}
    unread = [
        n
        for n, line in enumerate(page.read_text().splitlines(), start=1)
        if _EXAMPLE_FENCE.match(line) and n not in opened
    ]
    assert unread == [], f"{_name(page)}: example fences at lines {unread} are not top-level"


@pytest.mark.process
@pytest.mark.nats
@pytest.mark.parametrize("page", [p for p in PAGES if _examples(p)], ids=_name)
async def test_every_example_of_a_page_runs(page: Path, tmp_path: Path) -> None:
    await run_page(await asyncio.to_thread(page.read_text), _name(page), tmp_path)


@pytest.mark.process
@pytest.mark.nats
async def test_every_console_example_of_the_readme_runs(tmp_path: Path) -> None:
    # Its Python blocks run in tests/test_readme.py.
    text = await asyncio.to_thread((ROOT / "README.md").read_text)
    await run_page(text, "README.md", tmp_path, python=False)


async def run_page(text: str, source: str, root: Path, *, python: bool = True) -> None:
    """Run the Python blocks of a page with pytest, then its console blocks in order."""
    blocks = parse(text, source)
    project = write_project(blocks, root, source)
    skipped = [f"{source} line {b.line}: {b.not_tested}" for b in project.not_tested]
    assert len(skipped) == NOT_TESTED.get(source, 0), skipped

    if python and python_blocks(b for b in blocks if b.not_tested is None):
        outcome = await asyncio.to_thread(run_project, sys.executable, project)
        assert outcome.not_passed == {}, outcome.output
        assert outcome.passed == project.expected_tests, outcome.output

    steps = [
        command
        for block in blocks
        if block.lang in CONSOLE and block.not_tested is None
        for command in commands(block.code, block.line, in_repository=block.run_in is not None)
    ]
    if not steps:
        return
    said = "\n".join(c.text for c in steps)
    _stand_in_app(said, root)
    async with contextlib.AsyncExitStack() as peers:
        places, check = await _peers(peers, said, root)
        await asyncio.to_thread(_run, steps, root, places)
        check()


def _run(steps: list[Command], cwd: Path, places: dict[str, str]) -> None:
    shown = set(cwd.glob("*.yaml"))
    with session(cwd, places) as shell:
        for step in steps:
            shell.run(step)
        shell.finish()
    # A manifest the commands wrote is one the page tells readers to apply.
    for manifest in sorted(set(cwd.glob("*.yaml")) - shown):
        _kubernetes_would_take(manifest)


# --- what the reader has and the test stands in for (tests/_console.py's table) -----------

#: Ports a page's commands serve on or send to: free ones in the test.
_PORTS = ("9090", "9464", "3100")
_REPOSITORY = "https://github.com/octocat/Hello-World"
#: "Your app": a page that runs one without showing it gets this one (and its test).
_STAND_IN = {
    "app.py": """\
from conveyor_driver import Context, Driver, Result

driver = Driver("greeter")


@driver.on("greeting")
async def greet(ctx: Context) -> Result:
    return Result.ok(f"hello, {ctx.resource.name}")
""",
    "test_app.py": """\
import pytest
from app import driver

from conveyor_driver.testing import dispatch


@pytest.mark.asyncio
async def test_greet() -> None:
    report = await dispatch(driver, {"name": "world", "resource": "greeting"})
    assert report.result is not None and report.result.message == "hello, world"
""",
}
_APP = re.compile(r"(?<![\w/.-])([\w/.-]+?)(\.py)?:driver\b")


def _stand_in_app(said: str, root: Path) -> None:
    for path, _ in _APP.findall(said):
        app = root / f"{path}.py"
        if not app.exists():
            app.parent.mkdir(parents=True, exist_ok=True)
            app.write_text(_STAND_IN["app.py"])
            if app.parent == root:
                (root / f"test_{app.stem}.py").write_text(_STAND_IN["test_app.py"])


async def _peers(
    stack: contextlib.AsyncExitStack, said: str, root: Path
) -> tuple[dict[str, str], Callable[[], None]]:
    """Start what the page's commands name; the reader's texts mapped to the test's."""
    places = {port: str(free_port()) for port in _PORTS if re.search(rf"\b{port}\b", said)}
    checks: list[Callable[[], None]] = []
    pki = None
    if "/etc/conveyor/" in said:
        pki = make_pki(root / ".pki")
        places["/etc/conveyor/driver.crt"] = str(pki.client.cert)
        places["/etc/conveyor/driver.key"] = str(pki.client.key)
        places["/etc/conveyor/ca.pem"] = str(pki.ca_file)
    if "--embedded" in said:
        port = free_port()
    elif pki is not None:
        nats_dir = root / ".nats"
        nats_dir.mkdir()
        server = stack.enter_context(tls_nats_server(nats_dir, pki))
        await _create_streams(server.url, server.context())
        port = int(server.url.rsplit(":", 1)[1])
    else:
        port = (await stack.enter_async_context(EmbeddedNats())).port
    places["4222"] = str(port)
    places["conveyor:4222"] = f"127.0.0.1:{port}"
    for scheme in ("http", "https"):
        if f"{scheme}://conveyor:8080" in said:
            api = ConveyorAPIServer()
            if scheme == "https":
                assert pki is not None, "https://conveyor:8080 comes with /etc/conveyor/ files"
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(pki.server.cert, pki.server.key)
                api = ConveyorAPIServer(ssl_context=context, roots=[pki.ca.cert])
            await stack.enter_async_context(api)
            places[f"{scheme}://conveyor:8080"] = api.url
            checks.append(functools.partial(_api_kept_its_contract, api))
    if "otel-collector:4318" in said:
        receiver, endpoint = await stack.enter_async_context(otlp_receiver())
        places["http://otel-collector:4318"] = endpoint
        checks.append(functools.partial(_exports_arrived, receiver))
    if "/tmp/" in said:
        places["/tmp/"] = f"{root / '.tmp'}/"
    if _REPOSITORY in said:
        places[_REPOSITORY] = (await asyncio.to_thread(_git_repository, root / ".repo")).as_uri()

    def check() -> None:
        for each in checks:
            each()

    return places, check


async def _create_streams(url: str, context: ssl.SSLContext) -> None:
    """What the Conveyor server creates, on a NATS that is not an EmbeddedNats."""
    nc = await nats.connect(url, tls=context)
    try:
        for config in protocol.server_streams():
            await nc.jetstream().add_stream(config)
    finally:
        await nc.close()


def _api_kept_its_contract(api: ConveyorAPIServer) -> None:
    assert api.violations == [] and api.auth_failures == [], (api.violations, api.auth_failures)


def _exports_arrived(receiver: OtlpReceiver) -> None:
    assert receiver.metric_names, "the page names a collector, and no metrics reached it"


def _kubernetes_would_take(path: Path) -> None:
    """A manifest the page's commands wrote: valid for Kubernetes and KEDA, strictly."""
    from test_deploy import K8S_VERSIONS, _documents, _validate

    documents = _documents(path.read_text())
    assert documents, f"{path.name} holds no manifest"
    for document in documents:
        for version in K8S_VERSIONS:
            _validate(document, version)


def _git_repository(path: Path) -> Path:
    """A repository with one commit, where the page clones one from the network."""
    path.mkdir()
    (path / "README").write_text("Hello World!\n")
    for args in (
        ["init", "--quiet", "--initial-branch", "master"],
        ["add", "README"],
        ["-c", "user.name=docs", "-c", "user.email=docs@example.invalid", "commit", "-qm", "1"],
    ):
        subprocess.run(["git", *args], cwd=path, check=True, capture_output=True)
    return path


# --- the runner itself, on pages made here -----------------------------------------------

_DRIVER = """\
<!-- file: app.py -->
```python
from conveyor_driver import Context, Driver, Result

driver = Driver("greeter")


@driver.on("greeting")
async def greet(ctx: Context) -> Result:
    return Result.ok(f"hello {ctx.resource.name}")
```
"""


def test_console_blocks_split_into_commands_their_output_and_background_ones() -> None:
    code = "\n".join(
        [
            "$ conveyor-driver run app:driver \\",
            "    --embedded --embedded-port 4222",
            "# in another terminal:",
            "$ conveyor-driver emit greeting world --wait",
            '{"status": "ok"}',
            "$ python receiver.py --port 3100 &",
            "# stop the driver (Ctrl-C), then wait for `reloaded`:",
            "$ conveyor-driver run other:driver",
            "$ pip install 'conveyor-driver[embedded]'",
        ]
    )
    assert commands(code, 10) == [
        Command(11, "conveyor-driver run app:driver \\\n    --embedded --embedded-port 4222", True),
        Command(14, "conveyor-driver emit greeting world --wait", output='{"status": "ok"}\n'),
        Command(16, "python receiver.py --port 3100", True),
        Command(18, "conveyor-driver run other:driver", True, stop_first=True, wait_for="reloaded"),
        Command(19, "pip install 'conveyor-driver[embedded]'"),
    ]


@pytest.mark.parametrize(
    ("shown", "printed"),
    [
        ("4 passed\n", "4 passed\n"),
        ("....   [100%]\n4 passed in ...s\n", "....        [100%]\n4 passed in 0.31s\n"),
        ("...\nkind: Deployment\n...\n", "kind: ConfigMap\n---\nkind: Deployment\nspec: {}\n"),
        ('{"a": 1, "b": [true, "..."]}\n', '{\n  "b": [true, {"c": 2}],\n  "a": 1\n}\n'),
        ('emitted ...\n{"a": "..."}\n', 'emitted x run_id=1\n{"a": [1]}\n'),
        ('{"id": "run-..."}\n', '{"id": "run-42"}\n'),
    ],
)
def test_shown_output_matches_with_wildcards(shown: str, printed: str) -> None:
    assert output_matches(shown, printed)


@pytest.mark.parametrize(
    ("shown", "printed"),
    [
        ("4 passed\n", "5 passed\n"),
        ("created build\n", "created build\nupdated deploy\n"),
        ("...\nkind: Job\n...\n", "kind: ConfigMap\n---\nkind: Deployment\n"),
        ('{"a": 1}\n', '{"a": 1, "b": 2}\n'),
        ('{"a": 1}\n', '{"a": true}\n'),
        ('{"a": "..."}\n', "no JSON at all\n"),
        ('{"a": "..."}\n', 'emitted x\n{"a": 1}\n'),
    ],
)
def test_shown_output_that_differs_does_not_match(shown: str, printed: str) -> None:
    assert not output_matches(shown, printed)


@pytest.mark.process
@pytest.mark.nats
@pytest.mark.parametrize("embedded", [True, False], ids=["run-embedded", "test-nats"])
async def test_a_page_serving_a_driver_and_emitting_to_it_runs(
    tmp_path: Path, embedded: bool
) -> None:
    option = " --embedded --embedded-port 4222" if embedded else ""
    page = _DRIVER + (
        "```console\n"
        "$ pip install 'conveyor-driver[embedded]'\n"
        f"$ conveyor-driver run app:driver{option}\n"
        "# in another terminal:\n"
        "$ conveyor-driver emit greeting world --wait | grep 'hello world'\n"
        "```\n"
    )
    await run_page(page, "page.md", tmp_path)


#: The result of ``emit greeting world --wait``, shown with the wrong message.
_WRONG_RESULT = json.dumps(
    {
        "run_id": "...",
        "resource": "...",
        "driverresult": {"success": True, "message": "hello moon", "data": "...", "driver": "..."},
        "event": "driver.result",
    }
)


@pytest.mark.process
@pytest.mark.nats
@pytest.mark.parametrize(
    ("console", "error"),
    [
        ("$ conveyor-driver emit greeting world --wait | grep 'hello moon'", "exited 1"),
        ("$ pip install 'conveyor-driver[nope]'", "no such extra"),
        ("$ python -c 'pass'\n# in another terminal:\n$ true", "only `conveyor-driver run`"),
        (f"$ conveyor-driver emit greeting world --wait\n{_WRONG_RESULT}", "not show"),
        ("$ echo hello world\nhello moon", "printed what the page does not show"),
        ("$ conveyor-driver run app:driver --http-port 9090\nstarted", "does not show"),
    ],
)
async def test_a_page_whose_example_fails_fails(tmp_path: Path, console: str, error: str) -> None:
    page = _DRIVER + (
        f"```console\n$ conveyor-driver run app:driver\n# in another terminal:\n{console}\n```\n"
    )
    with pytest.raises(AssertionError, match=re.escape(error)):
        await run_page(page, "page.md", tmp_path)


async def test_a_skipped_console_block_is_counted(tmp_path: Path) -> None:
    page = "<!-- not-tested: needs a cluster -->\n```console\n$ kubectl apply -f x.yaml\n```\n"
    with pytest.raises(AssertionError, match="needs a cluster"):
        await run_page(page, "page.md", tmp_path)


@pytest.mark.process
@pytest.mark.nats
async def test_a_manifest_the_commands_write_must_be_one_kubernetes_takes(tmp_path: Path) -> None:
    bad = "apiVersion: v1\\nkind: ConfigMap\\nmetadata: {name: x}\\ndatta: {}\\n"
    page = f"```console\n$ printf '{bad}' > x.yaml\n```\n"
    with pytest.raises(kubernetes_validate.ValidationError, match="datta"):
        await run_page(page, "page.md", tmp_path)
