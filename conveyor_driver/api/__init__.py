"""The Conveyor API client handed to handlers as ``ctx.api``, its models and its auth."""

from .auth import CertificateAuth
from .client import APIUnavailable, ConveyorAPIError, ConveyorClient, NotFound
from .models import Pipeline, ResourceCreated, ResourceDefinition, Step

__all__ = [
    "APIUnavailable",
    "CertificateAuth",
    "ConveyorAPIError",
    "ConveyorClient",
    "NotFound",
    "Pipeline",
    "ResourceCreated",
    "ResourceDefinition",
    "Step",
]
