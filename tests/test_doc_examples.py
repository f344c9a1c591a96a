"""Every Python and console example of the documentation site runs, from the Markdown itself.

Each page of ``docs/`` (recursively) is a small project of its own: its Python blocks are
written out and run with pytest exactly as the README's are (``tests/_readme.py``), then its
console blocks are run in order in that directory (``tests/_console.py``: the NATS they
need is a real nats-server of the test). A failure here means a page shows users an example
that does not work: fix the page (or the library), never this test's lists.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest
from _console import Command, commands, session
from _readme import CONSOLE, parse, python_blocks, run_project, write_project

from conveyor_driver.embedded import EmbeddedNats, free_port

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
#: Blocks a page leaves out, on purpose, by page. Raising a number is a decision to show
#: users an example that nothing runs: give the block a `not-tested` reason a reader can judge.
NOT_TESTED: dict[str, int] = {
    "docs/how-to/kubernetes.md": 1,
    "docs/how-to/loki.md": 1,
    "docs/how-to/scaling.md": 1,
    "docs/how-to/secured-server.md": 1,
    "docs/how-to/telemetry.md": 1,
    "docs/how-to/typed-specs.md": 1,
    "docs/how-to/upgrading.md": 1,
    "docs/tutorial/first-driver.md": 2,
    "docs/tutorial/pipeline-step.md": 1,
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


async def run_page(text: str, source: str, root: Path) -> None:
    """Run the Python blocks of a page with pytest, then its console blocks in order."""
    blocks = parse(text, source)
    project = write_project(blocks, root, source)
    skipped = [f"{source} line {b.line}: {b.not_tested}" for b in project.not_tested]
    assert len(skipped) == NOT_TESTED.get(source, 0), skipped

    if python_blocks(b for b in blocks if b.not_tested is None):
        outcome = await asyncio.to_thread(run_project, sys.executable, project)
        assert outcome.not_passed == {}, outcome.output
        assert outcome.passed == project.expected_tests, outcome.output

    steps = [
        command
        for block in blocks
        if block.lang in CONSOLE and block.not_tested is None
        for command in commands(block.code, block.line)
    ]
    if not steps:
        return
    if any("--embedded" in c.text for c in steps):
        await asyncio.to_thread(_run, steps, root, free_port())
        return
    async with EmbeddedNats() as nats:
        await asyncio.to_thread(_run, steps, root, nats.port)


def _run(steps: list[Command], cwd: Path, port: int) -> None:
    with session(cwd, port) as shell:
        for step in steps:
            shell.run(step)


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


def test_console_blocks_split_into_commands_and_background_ones() -> None:
    code = "\n".join(
        [
            "$ conveyor-driver run app:driver \\",
            "    --embedded --embedded-port 4222",
            "# in another terminal:",
            "$ conveyor-driver emit greeting world --wait",
            '{"status": "ok"}',
            "$ conveyor-driver run other:driver &",
            "$ pip install 'conveyor-driver[embedded]'",
        ]
    )
    assert commands(code, 10) == [
        Command(11, "conveyor-driver run app:driver \\\n    --embedded --embedded-port 4222", True),
        Command(14, "conveyor-driver emit greeting world --wait", False),
        Command(16, "conveyor-driver run other:driver", True),
        Command(17, "pip install 'conveyor-driver[embedded]'", False),
    ]


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


@pytest.mark.process
@pytest.mark.nats
@pytest.mark.parametrize(
    ("console", "error"),
    [
        ("$ conveyor-driver emit greeting world --wait | grep 'hello moon'", "exited 1"),
        ("$ pip install 'conveyor-driver[nope]'", "no such extra"),
        ("$ python -c 'pass'\n# in another terminal:\n$ true", "only `conveyor-driver run`"),
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
