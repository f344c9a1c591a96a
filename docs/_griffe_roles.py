"""A griffe extension for the API reference: Sphinx roles in docstrings as code.

The docstrings name other objects the Sphinx way (``:class:`Driver```, ``:meth:`~.x.run```),
which reads well in ``help()`` and an editor; mkdocstrings renders Markdown, where the role
would show as literal ``:class:`` text. The role becomes a code span of the name (its last
part when the name starts with ``~``, as Sphinx shows it).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|meth|func|data|attr|exc|mod|obj):`(~?)\.?([^`]+)`")


def plain(text: str) -> str:
    """``text`` with each Sphinx role replaced by a code span of the name it shows."""
    return _ROLE.sub(lambda m: f"`{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}`", text)


class SphinxRoles(griffe.Extension):
    """Rewrites the roles of every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **_: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain(obj.docstring.value)
