"""The object every handler receives: the event, the resource, a logger and the API."""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, overload

import attrs
from structlog.typing import FilteringBoundLogger
from typing_extensions import TypeVar

from .logs.redact import Redactor, check_secret
from .models import Resource
from .process import KILL_GRACE, CommandResult, run_command
from .upstream import Upstream, read_upstream
from .workspace import RunWorkspace

if TYPE_CHECKING:
    from .api import ConveyorClient

DataT = TypeVar("DataT")
#: The type of ``ctx.spec``: the handler's ``spec=`` class; ``Any`` (the JSON) without one,
#: so a bare ``Context`` annotation keeps meaning what it always did.
S = TypeVar("S", default=Any)


@attrs.define(frozen=True)
class Context(Generic[S]):
    """Everything a handler needs about one delivery, handed in rather than imported.

    Handlers take their logger and API client from here, never from globals, so a test
    can hand them a :class:`~conveyor_driver.testing.FakeContext` instead.

    ``Context[BuildSpec]`` is the context of a handler registered with ``spec=BuildSpec``:
    ``ctx.spec`` is the resource's spec structured into that class, and type checkers know
    it. A plain ``Context`` has ``ctx.spec`` as the JSON (``ctx.resource.spec``).
    """

    driver: str
    event: str
    run_id: str
    message_id: str
    subject: str
    attempt: int
    resource: Resource
    log: FilteringBoundLogger = attrs.field(repr=False)
    api: ConveyorClient = attrs.field(repr=False)
    #: When this attempt's time is up, on the ``time.monotonic()`` clock (which asyncio's
    #: loop uses: ``asyncio.timeout_at(ctx.deadline)`` works); None without a timeout.
    deadline: float | None = None
    #: Seconds a stopped ``ctx.run`` command gets between SIGTERM and SIGKILL.
    kill_grace: float = attrs.field(default=KILL_GRACE, repr=False)
    #: The resource's spec: an instance of the handler's ``spec=`` class, structured and
    #: checked before the handler was called; without ``spec=``, ``resource.spec`` as sent.
    spec: S = attrs.field(repr=False)

    @spec.default
    def _json_spec(self) -> Any:
        return self.resource.spec

    #: The driver's secrets, which mask its log lines; :meth:`secret` adds to them.
    redactor: Redactor | None = attrs.field(default=None, repr=False)
    _run_secrets: list[str] = attrs.field(factory=list, init=False, repr=False, eq=False)
    #: The run's directory, made on first use of :attr:`workspace` (:mod:`.workspace`).
    run_workspace: RunWorkspace = attrs.field(
        default=attrs.Factory(lambda self: RunWorkspace(None, self.driver), takes_self=True),
        repr=False,
    )

    @property
    def workspace(self) -> Path:
        """A fresh directory for this run, made on first use and removed when it ends.

        Under ``--workspace-root`` (default: the system's temporary directory). Kept when
        the run fails and ``--keep-failed-workspaces`` is given; the run's log says where.
        """
        return self.run_workspace.path()

    def remaining(self) -> float | None:
        """Seconds left before the deadline (never negative), or None without one.

        Pass it on to calls that take a timeout, so that they give up before the run is
        cut off, and with a clearer error than a cancellation.
        """
        if self.deadline is None:
            return None
        return max(self.deadline - time.monotonic(), 0.0)

    def secret(self, value: str) -> str:
        """Mask ``value`` as ``***`` in the log from now on, and return it.

        For a credential the handler comes by at run time (read from a vault, returned by
        an API): ``token = ctx.secret(vault.read(...))``. It is masked in every line of the
        driver until this run's context is gone (then released, so that a long-lived
        driver does not scan for every build's token forever). A value shorter than 4
        characters is refused with ``SecretTooShortError``: masking it would shred the log.
        """
        check_secret(value)
        redactor = self.redactor
        if redactor is not None:
            redactor.add(value)
            if not self._run_secrets:
                # Released when nothing holds the context any more: a sync handler's thread
                # abandoned at its deadline still logs, and holds it until it returns.
                weakref.finalize(self, redactor.release, self._run_secrets)
            self._run_secrets.append(value)
        return value

    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        check: bool = False,
    ) -> CommandResult:
        """Run a command, streaming each stdout/stderr line to ``ctx.log`` as it appears.

        ``cmd`` is a shell string or an argv list. Returns the exit code and a bounded tail
        of the output; with ``check``, a non-zero exit or a timeout raises ``Fail``. On a
        timeout, or when the handler is cancelled, the command's whole process group is
        killed. ``cwd`` defaults to :attr:`workspace` once the run has made it.
        """
        return await run_command(
            self.log,
            cmd,
            cwd=cwd if cwd is not None else self.run_workspace.created,
            env=env,
            timeout=timeout,
            check=check,
            kill_grace=self.kill_grace,
            redactor=self.redactor,
        )

    @overload
    async def upstream(self, driver: str, *, data: None = None) -> Upstream[Any]: ...

    @overload
    async def upstream(self, driver: str, *, data: type[DataT]) -> Upstream[DataT]: ...

    async def upstream(self, driver: str, *, data: type[Any] | None = None) -> Upstream[Any]:
        """The result an earlier step's ``driver`` reported for this resource.

        Read from the payload, where the pipeline engine stores it, or else from the API
        server; ``data=SomeClass`` structures its data. Raises ``NotFound`` when there is
        none (see :mod:`conveyor_driver.upstream`).
        """
        return await read_upstream(self.resource, driver, self.api, data)
