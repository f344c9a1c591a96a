"""The documents point where they say: every ``docs/protocol.md#section`` cited in the code,
the tests or a Markdown file names a heading that exists, and every relative link of a
document reaches a file of the repository.

Docstrings cite the protocol document rather than repeat it; a renamed heading must not
leave them pointing nowhere.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = ROOT / "docs" / "protocol.md"
DOCUMENTS = sorted(
    [
        *ROOT.glob("*.md"),
        *(ROOT / "docs").rglob("*.md"),
        ROOT / "bench" / "README.md",
        ROOT / "deploy" / "README.md",
    ]
)
#: Where a citation may be, this file aside (its patterns and examples are not citations).
CITING = sorted(
    path
    for path in [
        *(ROOT / "conveyor_driver").rglob("*.py"),
        *(ROOT / "tests").rglob("*.py"),
        *(ROOT / "examples").rglob("*.py"),
        *(ROOT / "bench").rglob("*.py"),
        *(ROOT / "tools").rglob("*.py"),
        *DOCUMENTS,
    ]
    if path != Path(__file__).resolve()
)
_CITATION = re.compile(r"docs/protocol\.md#([A-Za-z0-9_-]+)")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(document: Path) -> set[str]:
    text = _FENCE.sub("", document.read_text())
    return {anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def test_anchor_follows_github() -> None:
    assert anchor("Results: PipelineEvent and `driverresult`") == (
        "results-pipelineevent-and-driverresult"
    )
    assert anchor("Hand-backs") == "hand-backs"
    assert anchor("The durable pull consumer") == "the-durable-pull-consumer"


def test_the_code_cites_sections_of_the_protocol_that_exist() -> None:
    known = anchors(PROTOCOL)
    cited = {
        (path.relative_to(ROOT).as_posix(), name)
        for path in CITING
        for name in _CITATION.findall(path.read_text())
    }
    assert cited, "nothing cites docs/protocol.md"
    assert sorted(c for c in cited if c[1] not in known) == []


def test_no_citation_of_the_old_numbered_sections() -> None:
    old = [
        path.relative_to(ROOT).as_posix()
        for path in CITING
        if re.search(r"PROTOCOL\.md section|shared/conveyor/PROTOCOL", path.read_text())
    ]
    assert old == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_of_a_document_resolve(document: Path) -> None:
    text = _FENCE.sub("", document.read_text())
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        resolved = (document.parent / path).resolve() if path else document
        missing_section = bool(fragment) and resolved.suffix == ".md"
        if not resolved.exists() or (missing_section and fragment not in anchors(resolved)):
            broken.append(target)
    assert broken == []
