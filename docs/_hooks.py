"""MkDocs hooks: the reference pages that are generated from the code, so they cannot drift.

A page asks for a generated section with an HTML comment alone on its line, expanded when
the site is built (``mkdocs.yml``'s ``hooks:``):

- ``<!-- cli -->``: the ``--help`` of the ``conveyor-driver`` command and of each of its
  subcommands, as click prints it;
- ``<!-- variables -->``: every ``CONVEYOR_*`` variable of :data:`conveyor_driver.variables.
  VARIABLES` and :data:`~conveyor_driver.variables.COMMAND_VARIABLES`, with its option, its
  default and its meaning, from the one table that ``Settings.from_env`` and the CLI read.

The Markdown also reads well on GitHub, where a page may link to a file of the repository
outside ``docs/`` (``../conveyor_driver/protocol.py``). The site has no such page, so such a
link becomes its text; a link to a file that does not exist is left alone, for the strict
build to refuse.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click

_MARKER = re.compile(r"^<!--\s*(cli|variables)\s*-->\s*$", re.MULTILINE)
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s#]+)(#[^)\s]*)?\)")
#: Wide enough for the help's two columns, narrow enough for the page; fixed so that the
#: page does not depend on the terminal that built it.
_WIDTH = 100


def cli_reference() -> str:
    """The help of ``conveyor-driver`` and of every subcommand, one section each."""
    from conveyor_driver.cli import main

    sections = [_help_section("conveyor-driver", main, None)]
    parent = click.Context(main, info_name="conveyor-driver", max_content_width=_WIDTH)
    for name in main.list_commands(parent):
        command = main.get_command(parent, name)
        if command is not None:
            sections.append(_help_section(f"conveyor-driver {name}", command, parent))
    return "\n".join(sections)


def _help_section(title: str, command: click.Command, parent: click.Context | None) -> str:
    name = title.rsplit(" ", 1)[-1]
    ctx = click.Context(command, info_name=name, parent=parent, max_content_width=_WIDTH)
    summary = command.get_short_help_str(limit=_WIDTH)
    return f"## `{title}`\n\n{summary}\n\n```text\n{ctx.get_help()}\n```\n"


def variables_reference() -> str:
    """A table of the variables every command reads, then one per command of its own."""
    from conveyor_driver.variables import COMMAND_VARIABLES, VARIABLES

    parts = [
        "## Every command, and `Driver.run()`\n",
        "Read by `Settings.from_env()`, so by `driver.run()` and by `conveyor-driver run`; "
        "the connection variables are read by `emit`, `status` and `logs` too.\n",
        _table(VARIABLES),
    ]
    for command, variables in COMMAND_VARIABLES.items():
        parts += [f"## `conveyor-driver {command}` only\n", _table(variables)]
    return "\n".join(parts)


def _table(variables: Iterable[Any]) -> str:
    rows = ["| Variable | Option | Default | Meaning |", "| --- | --- | --- | --- |"]
    for v in variables:
        default = f"`{v.default}`" if v.default is not None else ""
        if v.kind == "switch":
            option = f"`{v.option}` / `--no-{v.option.removeprefix('--')}`"
        else:
            option = f"`{v.option}`"
        meaning = _cell(v.help)
        if v.kind == "many":
            meaning += " Repeatable."
        rows.append(f"| `{v.name}` | {option} | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


_GENERATORS: dict[str, Callable[[], str]] = {
    "cli": cli_reference,
    "variables": variables_reference,
}


def unlink_outside(markdown: str, page: Path, docs: Path) -> str:
    """``markdown`` with each link to an existing file outside ``docs`` replaced by its text."""

    def replace(match: re.Match[str]) -> str:
        target = match[2]
        if re.match(r"[a-z]+:", target):
            return match[0]
        resolved = (page.parent / target).resolve()
        if resolved.is_relative_to(docs.resolve()) or not resolved.exists():
            return match[0]
        return match[1]

    return _LINK.sub(replace, markdown)


def on_page_markdown(markdown: str, *, page: Any, config: Any, **_: Any) -> str:
    """MkDocs' hook: expand each marker of the page; unlink files outside the site."""
    markdown = _MARKER.sub(lambda m: _GENERATORS[m[1]](), markdown)
    if page.file.abs_src_path is None:
        return markdown
    return unlink_outside(markdown, Path(page.file.abs_src_path), Path(config["docs_dir"]))
