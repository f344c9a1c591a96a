"""The garbage collector of a process that is a driver, set for serving once started.

CPython's cyclic collector runs after every 700 net allocations of container objects, and
each run walks every object still young. A run allocates a few hundred such objects (the
message and its model, the context, tasks and futures), nearly all freed at once by
reference counting, so the collector ran every few runs, found almost nothing, and cost
about a tenth of a run's CPU (``make bench``; bench/README.md has the figures). A process
that ``conveyor-driver run`` or ``Driver.run()`` owns therefore, just before it starts
consuming:

- collects once, then freezes what start-up built (modules, clients, settings, routes),
  so no later collection walks it again (``gc.freeze``, CPython's advice for long-lived
  servers);
- collects the youngest generation after 10,000 net allocations instead of 700. Cyclic
  garbage, rare on a run's way, waits a little longer to be freed.

``Driver.serve()`` inside an application's own event loop leaves the collector alone: the
process is the application's. Which case applies is a context variable that
``Driver.run()`` sets around its event loop (:func:`owned_by_driver`), so nothing of it
outlives the call.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
from collections.abc import Iterator

#: Net allocations between two collections of the youngest generation, once serving.
YOUNG_THRESHOLD = 10_000


_owned: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "conveyor_driver_owns_process", default=False
)


@contextlib.contextmanager
def owned_by_driver() -> Iterator[None]:
    """Within this block, the process is the driver's: serving settles its collector."""
    token = _owned.set(True)
    try:
        yield
    finally:
        _owned.reset(token)


def settle_for_serving() -> None:
    """In a process the driver owns, freeze the start-up heap and collect young objects
    less often (see the module); elsewhere, nothing.

    A collector switched off (threshold 0) or already set higher stays as it is.
    """
    if not _owned.get():
        return
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    if 0 < young < YOUNG_THRESHOLD:
        gc.set_threshold(YOUNG_THRESHOLD, middle, old)
