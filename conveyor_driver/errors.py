"""Errors a user can cause, each with a one-line message the CLI prints as it is.

Why a family of its own: the CLI catches ``ConveyorDriverError`` and prints ``str(error)``
without a traceback, so every message here must read well on its own.
"""

from __future__ import annotations


class ConveyorDriverError(Exception):
    """Base class: a mistake in set-up or configuration, not a bug in the framework."""


class ConfigurationError(ConveyorDriverError, ValueError):
    """The driver or its settings are wrong (bad name, clashing handlers, no handler)."""


class AppLoadError(ConveyorDriverError):
    """``APP`` could not be imported or does not name a Driver."""


class NatsUnavailableError(ConveyorDriverError):
    """No NATS server answered at the configured URLs."""


class StreamMissingError(ConveyorDriverError):
    """The Conveyor streams do not exist: the server has not run against this NATS."""


class ConsumerSetupError(ConveyorDriverError):
    """JetStream refused or did not answer the consumer's creation."""


class EmbeddedServerError(ConveyorDriverError):
    """The embedded nats-server could not be found or started."""
