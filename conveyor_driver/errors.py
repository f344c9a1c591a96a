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


class InvalidSettingError(ConfigurationError):
    """A settings value a validator refused, with the fields at fault.

    Why the fields travel with the error: the same value can come from a ``CONVEYOR_*``
    variable, a command-line option or Python, and the one line a user reads must name the
    place they wrote it. The reader (``Settings.from_env``) relabels the fields.
    """

    def __init__(self, problem: str, *fields: str) -> None:
        self.problem = problem
        self.fields = fields
        super().__init__(f"{' and '.join(fields)} {problem}")

    def naming(self, label: dict[str, str]) -> ConfigurationError:
        """The same error with each field named as ``label`` says (its variable or option)."""
        names = " and ".join(label.get(field, field) for field in self.fields)
        return ConfigurationError(f"{names} {self.problem}")
