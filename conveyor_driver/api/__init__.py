"""The Conveyor API client handed to handlers as ``ctx.api``, its models and its auth."""

from .auth import CertificateAuth
from .client import ConveyorClient
from .errors import (
    APIUnavailable,
    APIUnavailableError,
    ConveyorAPIError,
    NotFound,
    NotFoundError,
)
from .models import Pipeline, ResourceCreated, ResourceDefinition, Step

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
