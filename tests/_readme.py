"""The README's code blocks as a small project that pytest can run.

The README is the first code a new user copies, so its examples are executed rather than
trusted: every fenced block is read from README.md at test time (never copied into a test,
where it could drift), written out as the file it documents, and run with pytest in a
subprocess, exactly as a user would run it in their own project.

The README steers this with one HTML comment (invisible once rendered) on the line before a
fence:

- ``<!-- file: NAME -->`` writes the block to ``NAME`` (a block other examples import, a
  ``conftest.py``, a ``pyproject.toml``); any language may carry it;
- ``<!-- not-tested: REASON -->`` leaves a Python block out, for a stated reason, and the
  tests count such blocks, so that skipping one is a visible decision, never a silent one;
- ``<!-- run-in: repository -->`` runs a console block in the test-suite's own clone
  (``tests/_console.py``).

A Python block without a comment is written to ``readme_example_<n>.py``, or to
``test_readme_example_<n>.py`` when it defines test functions, so that pytest collects it.
Modules that are not tests are imported by a generated test, and every :class:`Driver`
they define must pass :meth:`Driver.check` (handlers registered without conflict).
"""

from __future__ import annotations

import ast
import re
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"

_FENCE = re.compile(r"^```(\S*)\s*$")
_DIRECTIVE = re.compile(r"^<!--\s*(file|not-tested|run-in):\s*(.*?)\s*-->\s*$")
_CHECKER = "test_zz_readme_modules.py"
#: The languages of console blocks: commands after ``$ ``, their output between them.
CONSOLE = ("console", "shell-session")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it starts, its language, its text and its directive."""

    line: int
    lang: str
    code: str
    file: str | None = None
    not_tested: str | None = None
    run_in: str | None = None


def parse(text: str, source: str = "README") -> list[Block]:
    """Every fenced block of a Markdown text, with the directive on the line before it.

    ``source`` names the document in errors (``docs/how-to/testing.md line 12: ...``).
    """
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{source} line {start + 1}: code block never closed")
        i += 1
        file = not_tested = run_in = None
        directive = _DIRECTIVE.match(lines[start - 1]) if start else None
        if directive and directive[1] == "file":
            file = directive[2]
        elif directive and directive[1] == "run-in":
            run_in = directive[2]
            if run_in != "repository" or opening[1] not in CONSOLE:
                raise ValueError(f"{source} line {start}: run-in: repository, on a console block")
        elif directive:
            not_tested = directive[2]
            if not not_tested:
                raise ValueError(f"{source} line {start}: not-tested needs a reason")
        code = "\n".join(body) + "\n"
        blocks.append(Block(start + 1, opening[1], code, file, not_tested, run_in))
    return blocks


def test_functions(code: str) -> list[str]:
    """The module-level test functions pytest would collect from ``code``."""
    return [
        node.name
        for node in ast.parse(code).body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")
    ]


@dataclass(frozen=True)
class Project:
    """The README written out as files, and the pytest test ids it must pass."""

    root: Path
    python_blocks: int
    not_tested: list[Block]
    modules: list[str]
    expected_tests: set[str]


def python_blocks(blocks: Iterable[Block]) -> list[Block]:
    return [b for b in blocks if b.lang in ("python", "py")]


def write_project(blocks: list[Block], root: Path, source: str = "README") -> Project:
    """Write each tested block to its file under ``root``; name the tests it must pass.

    A console block may carry ``not-tested`` too (``tests/_console.py`` runs the others);
    it is counted with the Python ones.
    """
    files: dict[str, Block] = {}
    not_tested: list[Block] = []
    n = 0
    for block in blocks:
        is_python = block.lang in ("python", "py")
        if is_python:
            n += 1
        if block.not_tested is not None:
            if not is_python and block.lang not in CONSOLE:
                raise ValueError(
                    f"{source} line {block.line}: not-tested marks Python and console blocks only"
                )
            not_tested.append(block)
            continue
        if block.file is None and not is_python:
            continue
        name = block.file
        if name is None:
            name = f"{'test_' if test_functions(block.code) else ''}readme_example_{n}.py"
        if name in files or name == _CHECKER:
            raise ValueError(f"{source} line {block.line}: a second block for {name}")
        files[name] = block
    expected: set[str] = set()
    modules: list[str] = []
    for name, block in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.code)
        if not name.endswith(".py"):
            continue
        stem = Path(name).stem
        if stem.startswith("test"):
            tests = test_functions(block.code)
            if not tests:
                raise ValueError(f"{source} line {block.line}: {name} defines no test")
            expected |= {f"{stem}.{test}" for test in tests}
        elif stem != "conftest":
            modules.append(stem)
    (root / _CHECKER).write_text(_checker_source(modules))
    expected |= {
        f"{Path(_CHECKER).stem}.test_module_imports_and_its_drivers_check[{m}]" for m in modules
    }
    return Project(root, n, not_tested, modules, expected)


def _checker_source(modules: list[str]) -> str:
    return f'''"""Generated by tests/_readme.py: each README module imports; its drivers check."""
import importlib

import pytest

from conveyor_driver import Driver


@pytest.mark.parametrize("name", {modules!r})
def test_module_imports_and_its_drivers_check(name: str) -> None:
    module = importlib.import_module(name)
    for value in vars(module).values():
        if isinstance(value, Driver):
            value.check()
'''


@dataclass(frozen=True)
class Outcome:
    """What pytest did with the README project: test ids by how they ended, and its output."""

    passed: set[str]
    not_passed: dict[str, str]
    output: str


def run_project(python: str | Path, project: Project, timeout: float = 150) -> Outcome:
    """Run pytest on the project with ``python``, in its own directory, as a user would.

    The project's own ``pyproject.toml`` (from the README) is the pytest configuration, so
    the settings the README tells users to make are the ones the examples run under.
    """
    junit = project.root / ".junit.xml"
    done = subprocess.run(
        [str(python), "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={junit}", "-q"],
        cwd=project.root,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = done.stdout + done.stderr
    passed: set[str] = set()
    not_passed: dict[str, str] = {}
    if junit.exists():
        for case in ET.parse(junit).iter("testcase"):
            test_id = f"{case.get('classname')}.{case.get('name')}"
            problems = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
            if problems:
                not_passed[test_id] = ", ".join(problems)
            else:
                passed.add(test_id)
    return Outcome(passed, not_passed, output)
