"""The Conveyor API client handed to handlers as ``ctx.api``."""

from .client import ConveyorAPIError, ConveyorClient, NotFound

__all__ = ["ConveyorAPIError", "ConveyorClient", "NotFound"]
