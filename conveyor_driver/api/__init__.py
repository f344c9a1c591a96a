"""The Conveyor API client handed to handlers as ``ctx.api``, its models and its auth."""

from typing import TYPE_CHECKING, Any

from .client import ConveyorClient
from .errors import (
    APIUnavailable,
    APIUnavailableError,
    ConveyorAPIError,
    NotFound,
    NotFoundError,
)
from .models import Pipeline, ResourceCreated, ResourceDefinition, Step

if TYPE_CHECKING:
    from .auth import CertificateAuth

__all__ = [
    "APIUnavailable",
    "APIUnavailableError",
    "CertificateAuth",
    "ConveyorAPIError",
    "ConveyorClient",
    "NotFound",
    "NotFoundError",
    "Pipeline",
    "ResourceCreated",
    "ResourceDefinition",
    "Step",
]


def __getattr__(name: str) -> Any:
    # The auth loads `cryptography`, which a driver without a TLS identity never needs:
    # imported on first use, it stays out of every start-up that does not sign requests.
    if name == "CertificateAuth":
        from .auth import CertificateAuth

        return CertificateAuth
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
