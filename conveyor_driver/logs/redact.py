"""Mask registered secrets, and the passwords of URLs, before a line reaches any sink.

CI logs leak credentials: a command echoes its token, a URL carries its password, a
library logs the header it sent. One processor in the chain (:meth:`Redactor.__call__`,
placed after exceptions are formatted and before the sinks) rewrites every string of the
event, at any depth, so the console, NATS and Loki all receive the masked text and no sink
has to remember to do it.

Why one compiled matcher: a log call is on the handler's path (``bench/README.md``), and a
loop over twenty secrets would cost twenty scans of every value. Every value is scanned
once by one regex holding every secret (each found by its least common character, see
:func:`_anchored`) and the URL-password pattern, rebuilt when the set changes. Only a
value it matches takes the slow path, which rewrites it with a second regex, a trie of
the secrets (the longest match at each position, overlaps merged). Strings seen clean are
remembered (bounded), so the run's bound keys (run id, resource name) are not scanned on
every line.

Secrets shorter than :data:`MIN_LENGTH` are refused: masking every ``abc`` would shred
the log while protecting nothing.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from structlog.typing import EventDict, WrappedLogger

MIN_LENGTH = 4
MASK = "***"

#: The userinfo of a URL with a password: ``://user:`` kept, the password up to the last
#: ``@`` of the authority masked (an unencoded ``@`` in a password does not end it).
_URL_PASSWORD = re.compile(r"(://[^\s/?#@:]*:)[^\s/?#]+@")
_URL_PASSWORD_PATTERN = r"://[^\s/?#@:]*:[^\s/?#]+@"
_SCALARS = frozenset({int, float, bool, type(None)})
#: Clean strings remembered at most (then forgotten at once: cheaper than an LRU).
_CLEAN_LIMIT = 4096
#: Strings longer than this are scanned every time rather than remembered.
_CLEAN_MAX_LEN = 1024
_MAX_DEPTH = 32
#: How far back from a cut :meth:`Redactor.safe_cut` looks for the start of a URL.
_URL_LOOKBACK = 256


class SecretTooShortError(ConfigurationError):
    """A secret below :data:`MIN_LENGTH` characters; the message never shows the value."""


class _Matchers:
    """One generation of the matchers, swapped as a whole when the secrets change.

    ``any`` finds a secret or a URL password (the scan of every value); ``secrets`` finds
    secrets at every start position (overlaps included), for the rewrite and the cut.
    ``clean`` remembers strings ``any`` found nothing in, for this generation only.
    """

    __slots__ = ("any", "clean", "longest", "secrets")

    def __init__(self, secrets: Iterable[str], urls: bool) -> None:
        words = sorted(set(secrets))
        trie = _trie_pattern(words)
        parts = _anchored(words) + ([_URL_PASSWORD_PATTERN] if urls else [])
        self.any: re.Pattern[str] | None = re.compile("|".join(parts)) if parts else None
        self.secrets: re.Pattern[str] | None = re.compile(f"(?=({trie}))") if trie else None
        self.longest = max((len(word) for word in words), default=0)
        self.clean: dict[str, None] = {}


class Redactor:
    """The driver's set of secrets and the structlog processor that masks them.

    Secrets added with :meth:`add` stay until :meth:`release` takes them back as many
    times (a run's own secrets, see ``Context.secret``). Safe to share between threads:
    the matchers are rebuilt under a lock and swapped in one assignment.
    """

    def __init__(self, secrets: Iterable[str] = (), *, urls: bool = True) -> None:
        self._urls = urls
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._m = _Matchers((), urls)
        self.add(*secrets)

    def __repr__(self) -> str:
        return f"<Redactor {len(self._counts)} secrets, urls={'on' if self._urls else 'off'}>"

    def __len__(self) -> int:
        return len(self._counts)

    @property
    def active(self) -> bool:
        """Whether anything is masked at all (else the processor returns at once)."""
        return self._m.any is not None

    def add(self, *secrets: str) -> None:
        """Mask each of ``secrets`` from now on; refuse one that is too short.

        A secret of several lines is also masked line by line (each line of at least
        :data:`MIN_LENGTH` characters), as command output reaches the log a line at a time.
        """
        words = [piece for secret in secrets for piece in _pieces(secret)]
        if not words:
            return
        with self._lock:
            for word in words:
                self._counts[word] = self._counts.get(word, 0) + 1
            self._rebuild()

    def release(self, secrets: Iterable[str]) -> None:
        """Take back one :meth:`add` of each of ``secrets``; unknown ones are ignored."""
        words = [piece for secret in secrets for piece in _pieces(secret)]
        with self._lock:
            changed = False
            for word in words:
                count = self._counts.get(word, 0)
                if count > 1:
                    self._counts[word] = count - 1
                elif count == 1:
                    del self._counts[word]
                    changed = True
            if changed:
                self._rebuild()

    def _rebuild(self) -> None:
        self._m = _Matchers(self._counts, self._urls)

    def mask(self, text: str) -> str:
        """``text`` with every secret and URL password replaced by :data:`MASK`."""
        matchers = self._m
        if matchers.any is None or not matchers.any.search(text):
            return text
        return _mask(text, matchers, self._urls)

    def safe_cut(self, text: str) -> int:
        """Where ``text`` may be cut when more of its line is still to come.

        ``ctx.run`` logs a very long line in pieces. A piece must not end inside a secret
        (or a URL with a password), else neither piece holds it whole and both leak a
        part. The text from the returned index on is to be carried to the next piece:
        it is at most the longest secret less one character, plus a secret (or a URL)
        that straddles the cut. 0 means: carry everything.
        """
        matchers = self._m
        keep = max(matchers.longest - 1, 0)
        cut = len(text) - keep
        if cut <= 0:
            return 0
        moved = matchers.secrets is not None
        while moved and cut > 0:
            # Moved before a straddling secret, the cut may now fall inside one overlapping it.
            moved = False
            assert matchers.secrets is not None
            for match in matchers.secrets.finditer(text, max(cut - matchers.longest, 0)):
                if match.start() >= cut:
                    break
                if match.end(1) > cut:
                    cut, moved = match.start(), True
                    break
        if self._urls:
            scheme = text.rfind("://", max(cut - _URL_LOOKBACK, 0), cut)
            if scheme >= 0 and not any(c.isspace() for c in text[scheme:cut]):
                cut = scheme
        return cut

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        """The processor: mask every string value of the event, at any depth.

        Keys of nested mappings are masked too; the event's own keys are the keyword
        names of the log call, identifiers written in the code, and are left as they are.
        """
        matchers = self._m
        scan = matchers.any
        if scan is None:
            return event_dict
        clean = matchers.clean
        changed: dict[str, Any] | None = None
        for key, value in event_dict.items():
            kind = type(value)
            if kind is str:
                if value in clean:
                    continue
                if scan.search(value) is None:
                    if len(value) <= _CLEAN_MAX_LEN:
                        if len(clean) >= _CLEAN_LIMIT:
                            clean.clear()
                        clean[value] = None
                    continue
                masked: Any = _mask(value, matchers, self._urls)
            elif kind in _SCALARS:
                continue
            else:
                masked = _deep(value, matchers, self._urls, 0)
                if masked is value:
                    continue
            if changed is None:
                changed = {}
            changed[key] = masked
        if changed:
            event_dict.update(changed)
        return event_dict


def check_secret(secret: object) -> str:
    """``secret`` if it can be masked; else :class:`SecretTooShortError` (or TypeError)."""
    if not isinstance(secret, str):
        raise TypeError(f"a secret is a str, not {type(secret).__name__}")
    if len(secret) < MIN_LENGTH:
        raise SecretTooShortError(
            f"a secret must be at least {MIN_LENGTH} characters (this one has {len(secret)}): "
            "masking a shorter one would shred the log, every occurrence of it in every line"
        )
    return secret


def _pieces(secret: str) -> list[str]:
    check_secret(secret)
    if "\n" not in secret:
        return [secret]
    lines = [line.strip() for line in secret.splitlines()]
    return [secret, *(line for line in lines if len(line) >= MIN_LENGTH)]


def _trie_pattern(words: list[str]) -> str:
    """One regex for ``words``: a trie, each branch trying the longer completion first."""
    root: dict[str, Any] = {}
    for word in words:
        node = root
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def build(node: dict[str, Any]) -> str:
        branches = [re.escape(char) + build(child) for char, child in node.items() if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        # An ending here is tried after every longer completion (greedy '?').
        return f"(?:{body})?" if "" in node else body

    return build(root) if words else ""


def _anchored(words: list[str]) -> list[str]:
    """Alternatives that find ``words`` by their rarest character, for the scan of values.

    The regex engine skips, in C, the positions whose character cannot start a match; the
    work is at the positions where it can. Started at each word's first character, that is
    a third of the positions of ordinary text; started at the character of each word least
    common in logs (checked behind with a fixed-width lookbehind), far fewer: the scan of
    a line is about three times faster (``bench/README.md``).
    """
    groups: dict[str, list[str]] = {}
    for word in words:
        at = max(range(len(word)), key=lambda i: (_RANK.get(word[i], len(_RANK)), -i))
        rest = re.escape(word[at + 1 :])
        behind = f"(?<={re.escape(word[: at + 1])})" if at else ""
        groups.setdefault(word[at], []).append(behind + rest)
    return [
        re.escape(char) + (tails[0] if len(tails) == 1 else "(?:" + "|".join(tails) + ")")
        for char, tails in groups.items()
    ]


#: Characters by how common they are in log lines, the most common first (the rest rarer).
_RANK = {char: rank for rank, char in enumerate(" etaoinsrhldcu0123456789mfpgwybvk.:/-=,_\"'xjqz")}


def _mask(text: str, matchers: _Matchers, urls: bool) -> str:
    """The slow path: every secret masked, overlapping ones as one span, then URL passwords."""
    if matchers.secrets is not None:
        spans: list[list[int]] = []
        for match in matchers.secrets.finditer(text):
            start, end = match.start(), match.end(1)
            if spans and start < spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end])
        if spans:
            parts: list[str] = []
            position = 0
            for start, end in spans:
                parts.append(text[position:start])
                parts.append(MASK)
                position = end
            parts.append(text[position:])
            text = "".join(parts)
    if urls:
        text = _URL_PASSWORD.sub(r"\1" + MASK + "@", text)
    return text


def _deep(value: Any, matchers: _Matchers, urls: bool, depth: int) -> Any:
    """``value`` with its strings masked: the same object when nothing changed."""
    kind = type(value)
    if kind is str:
        assert matchers.any is not None
        return _mask(value, matchers, urls) if matchers.any.search(value) else value
    if kind in _SCALARS:
        return value
    if depth < _MAX_DEPTH:
        if isinstance(value, dict):
            items = [
                (_deep(k, matchers, urls, depth + 1), _deep(v, matchers, urls, depth + 1))
                for k, v in value.items()
            ]
            if all(a is k and b is v for (a, b), (k, v) in zip(items, value.items(), strict=True)):
                return value
            return dict(items)
        if isinstance(value, list | tuple | set | frozenset):
            masked = [_deep(item, matchers, urls, depth + 1) for item in value]
            if all(a is b for a, b in zip(masked, value, strict=True)):
                return value
            return masked if isinstance(value, list | set | frozenset) else tuple(masked)
    # Anything else reaches a sink as its str(): mask that, keep the object if clean.
    try:
        text = str(value)
    except Exception:
        return value
    masked_text = _deep(text, matchers, urls, depth)
    return value if masked_text is text else masked_text
