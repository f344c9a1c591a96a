"""Every Python example in README.md runs, as written, with the settings the README gives.

See ``tests/_readme.py`` for how blocks become files. A failure here means the README shows
users code that does not work: fix the README (or the library), never this test's lists.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from _readme import README, parse, python_blocks, run_project, write_project

# Blocks the README leaves out, on purpose. Raising this number is a decision to show users
# code that nothing runs: give the block a `not-tested` reason a reader can judge.
NOT_TESTED = 1  # `make test`: the suite cannot run itself


@pytest.mark.process
def test_every_python_block_of_the_readme_runs_as_a_test(tmp_path: Path) -> None:
    blocks = parse(README.read_text())
    project = write_project(blocks, tmp_path)
    assert project.python_blocks == len(python_blocks(blocks)) > 0
    skipped = [f"README line {b.line}: {b.not_tested}" for b in project.not_tested]
    assert len(skipped) == NOT_TESTED, skipped

    outcome = run_project(sys.executable, project)

    assert outcome.not_passed == {}, outcome.output
    # Not only "nothing failed": every test function of the README ran, and passed (an async
    # test that pytest-asyncio does not pick up would be skipped, not failed).
    assert outcome.passed == project.expected_tests, outcome.output


@pytest.mark.parametrize("page", ["tutorial/first-driver.md", "how-to/testing.md"])
def test_the_docs_say_how_to_configure_pytest_for_async_tests(page: str) -> None:
    # The README's configuration block moved to the pages whose async tests need it.
    text = (README.parent / "docs" / page).read_text()
    config = [b for b in parse(text) if b.file == "pyproject.toml"]
    assert len(config) == 1
    assert 'asyncio_mode = "auto"' in config[0].code
    assert "conveyor-driver[testing]" in text or "conveyor-driver[embedded,testing]" in text


def test_blocks_are_written_to_their_files_and_skips_are_counted(tmp_path: Path) -> None:
    readme = "\n".join(
        [
            "<!-- file: app.py -->",
            "```python",
            "X = 1",
            "```",
            "```python",
            "from app import X",
            "",
            "def test_x() -> None:",
            "    assert X == 1",
            "```",
            "<!-- not-tested: needs a Conveyor API server -->",
            "```python",
            "raise SystemExit('never run')",
            "```",
            "```console",
            "$ not python",
            "```",
            "```python",
            "Y = 2",
            "```",
        ]
    )
    blocks = parse(readme)
    assert [(b.line, b.lang, b.file, b.not_tested) for b in blocks] == [
        (2, "python", "app.py", None),
        (5, "python", None, None),
        (12, "python", None, "needs a Conveyor API server"),
        (15, "console", None, None),
        (18, "python", None, None),
    ]
    project = write_project(blocks, tmp_path)
    assert project.python_blocks == 4
    assert [b.line for b in project.not_tested] == [12]
    assert (tmp_path / "app.py").read_text() == "X = 1\n"
    assert (tmp_path / "test_readme_example_2.py").exists()
    assert project.modules == ["app", "readme_example_4"]
    assert project.expected_tests == {
        "test_readme_example_2.test_x",
        "test_zz_readme_modules.test_module_imports_and_its_drivers_check[app]",
        "test_zz_readme_modules.test_module_imports_and_its_drivers_check[readme_example_4]",
    }


@pytest.mark.parametrize(
    ("readme", "error"),
    [
        ("<!-- not-tested:  -->\n```python\npass\n```\n", "needs a reason"),
        ("```python\npass\n", "never closed"),
        (
            "<!-- file: a.py -->\n```python\n```\n<!-- file: a.py -->\n```python\n```\n",
            "a second block for a.py",
        ),
        ("<!-- file: test_a.py -->\n```python\nX = 1\n```\n", "defines no test"),
    ],
)
def test_readme_mistakes_are_refused(tmp_path: Path, readme: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        write_project(parse(readme), tmp_path)
