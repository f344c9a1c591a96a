"""The Conveyor wire protocol: stream names, subjects and consumer settings.

This is the only module that spells a subject or a stream name. It follows the server
(open-ug/conveyor, ``internal/utils/nats.go`` and ``internal/engine``), not the official
runtimes, wherever the two disagree: see ``docs/protocol.md``, which also explains what the
framework adds (result de-duplication, the run ledger).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nats.js.api import ConsumerConfig, StreamConfig

MESSAGES_STREAM = "messages"
PIPELINE_STREAM = "pipeline-engine"
LOGS_STREAM = "logs-engine"

RESULT_SUBJECT = "pipelines.driver.result"
RESULT_EVENT = "driver.result"
#: The event of a pipeline step the engine forwards after the step before it succeeded.
PROCESS_EVENT = "process"

#: JetStream de-duplicates on this header within the stream's window, so re-publishing the
#: result of the same delivery (after a lost ack or a publish retry) is stored only once
#: (``docs/protocol.md#result-de-duplication``).
MSG_ID_HEADER = "Nats-Msg-Id"

_TOKEN = re.compile(r"^[^\s.*>]+$")


def is_subject_token(value: str) -> bool:
    """A single NATS subject token: non-empty, no whitespace, no ``.``, ``*`` or ``>``."""
    return bool(_TOKEN.match(value))


def resource_subject(resource_type: str) -> str:
    """Where the server announces a resource created outside a pipeline."""
    return f"resources.{resource_type}"


def driver_resource_subject(driver: str, resource_type: str) -> str:
    """Where the pipeline engine addresses a step to one driver."""
    return f"drivers.{driver}.resources.{resource_type}"


def filter_subjects(driver: str, resource_types: Iterable[str]) -> list[str]:
    """Both subjects for every handled type, in a stable order."""
    subjects: list[str] = []
    for resource_type in sorted(set(resource_types)):
        subjects.append(resource_subject(resource_type))
        subjects.append(driver_resource_subject(driver, resource_type))
    return subjects


def resource_type_from_subject(subject: str) -> str | None:
    """The resource type a subject names, or None when it is not a driver subject."""
    tokens = subject.split(".")
    if len(tokens) == 2 and tokens[0] == "resources":
        return tokens[1]
    if len(tokens) == 4 and tokens[0] == "drivers" and tokens[2] == "resources":
        return tokens[3]
    return None


def driver_result_key(driver: str) -> str:
    """The resource metadata key under which the server keeps ``driver``'s last result.

    The pipeline engine stores every result it receives there (``SaveDriverResult``)
    before it forwards the resource to the next step: it is how one step hands data on.
    """
    return f"driverresults.{driver}"


def is_addressed(subject: str) -> bool:
    """Whether a driver subject is a pipeline step addressed to one driver (not a broadcast).

    The difference decides what an event no handler takes becomes
    (``docs/protocol.md#skipped-and-unrouted-events``).
    """
    return subject.startswith("drivers.")


def log_subject(run_id: str) -> str:
    """JetStream subject the server's ``logs-engine`` consumer stores."""
    return f"logs.{run_id}"


def live_log_subject(run_id: str, driver: str) -> str:
    """Core NATS subject the server relays as Server-Sent Events."""
    return f"live.logs.{run_id}.{driver}"


def live_log_subjects(driver: str) -> str:
    """Every live log line of one driver, whatever the run (a wildcard subscription)."""
    return f"live.logs.*.{driver}"


def result_message_id(driver: str, stream_sequence: int) -> str:
    """The de-duplication id of the one result a delivered message may produce."""
    return f"{driver}:{MESSAGES_STREAM}:{stream_sequence}"


_BUCKET_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]")


def ledger_bucket(driver: str) -> str:
    """The run ledger's key-value bucket of ``driver`` (``docs/protocol.md#the-run-ledger``).

    Bucket names allow fewer characters than subject tokens, so other characters are
    replaced and a short hash keeps the name unique.
    """
    safe = _BUCKET_UNSAFE.sub("_", driver)
    if safe != driver:
        safe += "-" + hashlib.sha256(driver.encode()).hexdigest()[:8]
    return f"conveyor-runs-{safe}"


def ledger_subject(bucket: str, key: str) -> str:
    """The subject a key-value entry of ``bucket`` is written to (JetStream's KV layout)."""
    return f"$KV.{bucket}.{key}"


#: The body of a JetStream ack. Sent with a reply subject, the consumer answers once it
#: has applied the ack (after replicating it, on a cluster): a confirmed ack.
ACK = b"+ACK"

#: A write that must find the key at this revision (0: the key must not exist yet).
EXPECTED_LAST_SUBJECT_SEQUENCE_HEADER = "Nats-Expected-Last-Subject-Sequence"
#: JetStream's answers to a failed expectation of the last subject sequence.
WRONG_LAST_SEQUENCE = frozenset({10071, 10164})


def consumer_config(driver: str, resource_types: Iterable[str], ack_wait: float) -> ConsumerConfig:
    """The durable pull consumer (``docs/protocol.md#the-durable-pull-consumer``).

    No ``max_ack_pending`` of 1 (the Go runtime's choice): each instance limits itself by
    pulling only for free handler slots, so instances share the work instead of taking turns.
    No inactive threshold: the consumer must outlive the process, because the ``messages``
    stream has interest retention and drops what no consumer is interested in.
    """
    # Imported here: nats-py (and the aiohttp it loads) is most of `import conveyor_driver`,
    # which defining a driver, or testing its handlers, does not need.
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    return ConsumerConfig(
        name=driver,
        durable_name=driver,
        description=f"conveyor-driver {driver}",
        filter_subjects=filter_subjects(driver, resource_types),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait,
    )


def server_streams() -> list[StreamConfig]:
    """The three streams the Conveyor server creates at start.

    See ``docs/protocol.md#streams-and-retention``.
    """
    from nats.js.api import RetentionPolicy, StreamConfig

    return [
        StreamConfig(
            name=MESSAGES_STREAM,
            subjects=["resources.>", "events.>", "drivers.>"],
            retention=RetentionPolicy.INTEREST,
        ),
        StreamConfig(
            name=PIPELINE_STREAM,
            subjects=["pipelines.>"],
            retention=RetentionPolicy.WORK_QUEUE,
        ),
        StreamConfig(
            name=LOGS_STREAM,
            subjects=["logs.>"],
            retention=RetentionPolicy.WORK_QUEUE,
        ),
    ]


def parse_ack_subject(reply: str) -> tuple[int, int]:
    """Delivery count and stream sequence from a JetStream message's reply subject.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>``,
    or the newer form with a domain and an account hash after ``$JS.ACK``. Reading the two
    numbers directly avoids building the client library's whole metadata object per message.
    """
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[4]), int(tokens[5])
    if len(tokens) >= 11:
        return int(tokens[6]), int(tokens[7])
    raise ValueError(f"not a JetStream reply subject: {reply!r}")


#: The pull request protocol of a JetStream consumer ($JS.API.CONSUMER.MSG.NEXT).
def pull_request_subject(stream: str, consumer: str) -> str:
    return f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"


STATUS_HEADER = "Status"
DESCRIPTION_HEADER = "Description"
PENDING_MESSAGES_HEADER = "Nats-Pending-Messages"
STATUS_IDLE_HEARTBEAT = "100"
STATUS_NO_MESSAGES = "404"
STATUS_REQUEST_TIMEOUT = "408"
#: The answer to a request no subscriber took; for a JetStream publish, no stream (yet).
STATUS_NO_RESPONDERS = "503"
