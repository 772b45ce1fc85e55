"""MkDocs hooks for offload's guide (named in mkdocs.yml; not a page).

offload's docstrings use Sphinx roles (``:class:`~offload.WorkerKilled```) and ``::``
before literal blocks, which Markdown renders as they are. This hook turns a role into
inline code showing the name as Sphinx would (``~`` keeps only the last part) and drops
the ``::`` markers, after mkdocstrings has rendered the page.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|exc|data|obj):<code>(~?)([^<]+)</code>")
_LITERAL_MARKER = re.compile(r"<p>::</p>\s*")
_TRAILING_MARKER = re.compile(r"::</p>")


def _role(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html: str, **kwargs: Any) -> str:
    html = _ROLE.sub(_role, html)
    html = _LITERAL_MARKER.sub("", html)
    return _TRAILING_MARKER.sub(":</p>", html)
