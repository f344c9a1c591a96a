"""One ``/healthz``, ``/readyz`` and ``/metrics`` for all the workers of ``--workers N``.

An orchestrator probes one port per container, so the supervisor answers on
``--http-port`` for every worker: each worker serves its own probes on a loopback port the
supervisor picked when it started the worker, and the supervisor asks them all.

- ``/healthz`` fails when a worker says it is unhealthy (a stalled consumer, a blocked
  loop). A worker whose probe does not answer is starting (or being restarted by the
  supervisor), which is no reason to kill the whole pod.
- ``/readyz`` is ready only when every worker is.
- ``/metrics`` is every worker's exposition in one, each series labelled ``worker="i"``;
  sum the counters across workers, and take the max of the backlog gauges, which every
  worker reports alike.

Answers come from the probe server's own threads, so asking the workers with blocking
HTTP calls holds up nothing else.
"""

from __future__ import annotations

import http.client
import re
from collections.abc import Sequence

from .probes import Answer

#: A worker's probe answers at once (it is served from a thread); one that does not is busy
#: starting, or gone.
_ASK_TIMEOUT = 2.0
#: ``# HELP name ...`` / ``# TYPE name ...``: where a metric family starts.
_FAMILY = re.compile(r"^# (?:HELP|TYPE) (\S+)")


class FleetProbes:
    """The probes of the workers listening on ``ports`` (worker i on ``ports[i]``).

    The supervisor changes ``ports[i]`` when it starts worker i again.
    """

    def __init__(self, ports: list[int], host: str = "127.0.0.1") -> None:
        self.ports = ports
        self.host = host
        self.stopping = False

    def health(self) -> tuple[bool, str]:
        states: list[str] = []
        healthy = True
        for index, (status, reason) in enumerate(self._ask_all("/healthz")):
            if status is None:
                reason = "starting"
            elif status != 200:
                healthy = False
            states.append(f"worker {index}: {reason}")
        return healthy, "; ".join(states)

    def readiness(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "shutting down"
        answers = self._ask_all("/readyz")
        ready = all(status == 200 for status, _ in answers)
        states = [
            f"worker {index}: {reason if status is not None else 'not answering (starting)'}"
            for index, (status, reason) in enumerate(answers)
        ]
        return ready, "; ".join(states)

    def metrics(self) -> Answer:
        texts: list[tuple[int, str]] = []
        content_type = "text/plain; version=0.0.4; charset=utf-8"
        for index, port in enumerate(list(self.ports)):
            answer = self._get(port, "/metrics")
            if answer is None:
                continue  # a worker being restarted: its series are missing from this scrape
            status, kind, body = answer
            if status != 200:
                return status, kind, body  # the same for all (501: no SDK installed)
            content_type = kind
            texts.append((index, body.decode()))
        if not texts:
            return 503, "text/plain; charset=utf-8", b"no worker answered\n"
        return 200, content_type, merge_expositions(texts).encode()

    def _ask_all(self, path: str) -> list[tuple[int | None, str]]:
        answers: list[tuple[int | None, str]] = []
        for port in list(self.ports):
            answer = self._get(port, path)
            if answer is None:
                answers.append((None, "not answering"))
                continue
            status, _kind, body = answer
            answers.append((status, _reason(body)))
        return answers

    def _get(self, port: int, path: str) -> Answer | None:
        connection = http.client.HTTPConnection(self.host, port, timeout=_ASK_TIMEOUT)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.getheader("Content-Type", ""), response.read()
        except OSError:
            return None
        finally:
            connection.close()


def _reason(body: bytes) -> str:
    import orjson

    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode(errors="replace").strip()
    return str(value.get("status", "")) if isinstance(value, dict) else str(value)


def merge_expositions(texts: Sequence[tuple[int, str]]) -> str:
    """Prometheus text of several workers as one: each family once, each sample labelled.

    The text format wants all the samples of a family together, under one HELP and TYPE,
    so the workers' samples are gathered by family rather than concatenated.
    """
    families: dict[str, tuple[list[str], list[str]]] = {}
    for index, text in texts:
        family = ""
        for line in text.splitlines():
            if not line.strip():
                continue
            match = _FAMILY.match(line)
            if match is not None:
                family = match[1]
                headers, _samples = families.setdefault(family, ([], []))
                if line not in headers:
                    headers.append(line)
            elif line.startswith("#"):
                continue
            else:
                families.setdefault(family, ([], []))[1].append(_labelled(line, index))
    lines = [line for headers, samples in families.values() for line in (*headers, *samples)]
    return "\n".join(lines) + "\n"


def _labelled(sample: str, worker: int) -> str:
    """``name{a="b"} 1`` → ``name{worker="0",a="b"} 1``; ``name 1`` → ``name{worker="0"} 1``."""
    label = f'worker="{worker}"'
    ends = [i for i in (sample.find("{"), sample.find(" ")) if i >= 0]
    if not ends:
        return sample  # not a sample line: left as the worker wrote it
    name_end = min(ends)
    name, rest = sample[:name_end], sample[name_end:]
    if rest.startswith("{}"):
        return f"{name}{{{label}}}{rest[2:]}"
    if rest.startswith("{"):
        return f"{name}{{{label},{rest[1:]}"
    return f"{name}{{{label}}}{rest}"
