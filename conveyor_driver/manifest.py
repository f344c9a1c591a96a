"""Kubernetes manifests for a Driver, with the values that must agree taken from the Driver.

Why generate rather than ship static YAML: a few numbers in a manifest are promises about
the process inside it. ``terminationGracePeriodSeconds`` must outlast the driver's own
shutdown (its ``grace_period``, then the hand-backs, the log flush and the NATS drain), or
the kubelet kills builds the driver was about to hand back; the probe port must be the one
the driver listens on; the autoscaler's target per pod is the driver's ``concurrency``; the
backlog query names the driver's consumer. Written by hand, each is a second copy that
drifts the day someone changes the Driver. So ``conveyor-driver manifest`` reads them off
the Driver, and ``deploy/k8s/`` is this module's output for the example driver (a test
keeps it so).

Two shapes, one per file of ``deploy/k8s/``:

- ``deployment``: a ConfigMap, a Deployment with its probes, a PodDisruptionBudget, and a
  KEDA ScaledObject on ``conveyor_driver_backlog``;
- ``scaled-job``: the ConfigMap, a KEDA ScaledJob whose pods each run one build
  (``--max-runs 1``), and a small ``lag`` Deployment that exports the backlog, since no
  driver pod runs (to be scraped) while nothing is queued.

Everything else (the ConfigMap's URLs, resources, replica bounds) is a starting point that
the platform team edits in the printed YAML.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import attrs

from . import _yaml
from .variables import DEFAULT_PROMETHEUS_URL, VARIABLES

if TYPE_CHECKING:
    from .app import Driver

#: Where the probes listen when neither ``--http-port`` nor CONVEYOR_HTTP_PORT says.
DEFAULT_HTTP_PORT = 9090
SHAPES = ("deployment", "scaled-job")
#: Seconds a stop takes after the grace period and ``kill_grace`` on top of both: the
#: hand-backs' ledger writes and naks (up to 15 s), the log sinks' flush (10 s) and the
#: NATS drain, with room to spare.
SHUTDOWN_TAIL = 30.0
#: A ScaledJob pod that finds nothing to do (another pod took the message) goes away.
JOB_IDLE_EXIT = 60
#: The image's user (deploy/Dockerfile): numeric, so that runAsNonRoot can check it.
RUN_AS = 10001
TLS_DIR = "/etc/conveyor/tls"

# The variables the manifests set, by their Settings key: the table spells their names.
_ENV = {variable.key: variable.name for variable in VARIABLES}
_K8S_NAME = re.compile(r"[^a-z0-9-]+")


@attrs.frozen
class ManifestOptions:
    """What the manifests cannot learn from the Driver."""

    #: The image built from deploy/Dockerfile (default: ``<name>:latest``).
    image: str | None = None
    http_port: int = DEFAULT_HTTP_PORT
    prometheus_url: str = DEFAULT_PROMETHEUS_URL
    shape: str = attrs.field(default="deployment", validator=attrs.validators.in_(SHAPES))
    #: Worker processes per pod (``--workers``): a pod then takes ``concurrency`` times this.
    workers: int = 1


def termination_grace(driver: Driver) -> int:
    """``terminationGracePeriodSeconds`` for ``driver``: its whole graceful stop, rounded up."""
    return math.ceil(driver.grace_period + driver.kill_grace + SHUTDOWN_TAIL)


def k8s_name(driver_name: str) -> str:
    """The driver's name as a Kubernetes object name (DNS-1123, room left for suffixes)."""
    name = _K8S_NAME.sub("-", driver_name.lower()).strip("-")[:52].rstrip("-")
    return name or "driver"


def backlog_query(driver: Driver) -> str:
    """PromQL for the driver's backlog: ``max``, since every pod reports the same number."""
    return f'max(conveyor_driver_backlog{{consumer="{driver.name}"}})'


def manifests(driver: Driver, options: ManifestOptions) -> list[dict[str, Any]]:
    """The objects of ``options.shape``, in the order ``kubectl apply`` should meet them."""
    parts = _Parts(driver, options)
    if options.shape == "deployment":
        return [parts.config_map(), parts.deployment(), parts.budget(), parts.scaled_object()]
    return [parts.config_map(), parts.lag_exporter(), parts.scaled_job()]


def render(driver: Driver, options: ManifestOptions) -> str:
    header = (
        f"Kubernetes manifests ({options.shape}) for the conveyor-driver {driver.name!r}.\n"
        "Printed by `conveyor-driver manifest`: the termination grace, the probe port, the\n"
        "scaling target and the backlog query come from the Driver; print them again after\n"
        "changing it. Needs KEDA; the TLS Secret is yours to create (deploy/README.md)."
    )
    return _yaml.dump_all(manifests(driver, options), header)


class _Parts:
    """The objects, each built from the same names and labels."""

    def __init__(self, driver: Driver, options: ManifestOptions) -> None:
        self.driver = driver
        self.options = options
        self.name = k8s_name(driver.name)
        self.image = options.image or f"{self.name}:latest"
        self.labels = {
            "app.kubernetes.io/name": self.name,
            "app.kubernetes.io/component": "driver",
            "app.kubernetes.io/part-of": "conveyor",
        }

    def _meta(self, name: str, **labels: str) -> dict[str, Any]:
        return {"name": name, "labels": {**self.labels, **labels}}

    def config_map(self) -> dict[str, Any]:
        """Where the driver connects and reports: the settings a team edits in place."""
        data = {
            _ENV["nats_urls"]: "nats://nats.conveyor.svc:4222",
            _ENV["api_url"]: "http://conveyor-api.conveyor.svc:8080",
            _ENV["log_format"]: "json",
            _ENV["log_level"]: "info",
            # Empty means off (an empty variable counts as unset): set the URL to ship.
            _ENV["loki_url"]: "",
            _ENV["loki_labels"]: "cluster=production",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "",
            "OTEL_SERVICE_NAME": self.driver.name,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
        }
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": self._meta(f"{self.name}-config"),
            "data": data,
        }

    def _container(
        self, args: list[str], *, lag: bool = False, readiness: bool = False
    ) -> dict[str, Any]:
        """The container; ``readiness`` where a Service or a rollout waits on /readyz."""
        port = self.options.http_port
        container: dict[str, Any] = {"name": "lag" if lag else "driver", "image": self.image}
        if lag:
            # The image's entrypoint is `conveyor-driver run`; the exporter is another command.
            container["command"] = ["tini", "--", "conveyor-driver", "lag"]
        if args:
            container["args"] = args
        container["ports"] = [{"name": "http", "containerPort": port}]
        container["envFrom"] = [{"configMapRef": {"name": f"{self.name}-config"}}]
        container["env"] = [
            # The probes below and the driver's listener read this one number.
            {"name": _ENV["http_port"], "value": str(port)},
            *(
                [{"name": _ENV["workers"], "value": str(self.options.workers)}]
                if self.options.workers > 1 and not lag
                else []
            ),
            {"name": _ENV["tls_cert"], "value": f"{TLS_DIR}/tls.crt"},
            {"name": _ENV["tls_key"], "value": f"{TLS_DIR}/tls.key"},
            {"name": _ENV["tls_ca"], "value": f"{TLS_DIR}/ca.crt"},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {
                "name": "POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
            {
                "name": "OTEL_RESOURCE_ATTRIBUTES",
                "value": "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)",
            },
            {
                "name": _ENV["loki_token"],
                "valueFrom": {
                    "secretKeyRef": {"name": f"{self.name}-loki", "key": "token", "optional": True}
                },
            },
        ]
        # Both serve /healthz (alive while the loop turns) and /readyz; the exporter is
        # ready once connected and watching the consumer.
        container["livenessProbe"] = _probe("/healthz", failures=3, delay=0 if lag else 10)
        if lag:
            container["readinessProbe"] = _probe("/readyz", period=10)
            container["resources"] = {
                "requests": {"cpu": "20m", "memory": "96Mi"},
                "limits": {"memory": "192Mi"},
            }
        else:
            if readiness:
                container["readinessProbe"] = _probe("/readyz", period=5, failures=2)
            # No CPU limit, on purpose: a throttled event loop misses its in-progress acks.
            container["resources"] = {
                "requests": {"cpu": "500m", "memory": "256Mi"},
                "limits": {"memory": "1Gi"},
            }
        container["securityContext"] = {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        container["volumeMounts"] = [
            {"name": "tls", "mountPath": TLS_DIR, "readOnly": True},
            {"name": "work", "mountPath": "/work"},
            {"name": "tmp", "mountPath": "/tmp"},
        ]
        return container

    def _pod(self, container: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {
            "metadata": {
                "labels": dict(self.labels),
                "annotations": {
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(self.options.http_port),
                    "prometheus.io/path": "/metrics",
                },
            },
            "spec": {
                **extra,
                "terminationGracePeriodSeconds": termination_grace(self.driver),
                "automountServiceAccountToken": False,
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": RUN_AS,
                    "runAsGroup": RUN_AS,
                    "fsGroup": RUN_AS,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [container],
                "volumes": [
                    {
                        "name": "tls",
                        # cert-manager's layout: tls.crt (the chain), tls.key, ca.crt.
                        "secret": {"secretName": f"{self.name}-tls", "defaultMode": 0o440},
                    },
                    {"name": "work", "emptyDir": {}},
                    {"name": "tmp", "emptyDir": {}},
                ],
            },
        }

    def deployment(self) -> dict[str, Any]:
        container = self._container([], readiness=True)
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": self._meta(self.name),
            # No `replicas`: the ScaledObject owns the count, and a re-apply must not reset it.
            "spec": {
                "selector": {"matchLabels": dict(self.labels)},
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
                },
                "template": self._pod(container),
            },
        }

    def budget(self) -> dict[str, Any]:
        return {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": self._meta(self.name),
            "spec": {
                # One pod at a time: a drain never stops every instance at once, and a
                # fleet of one can still be drained (its runs are handed back).
                "maxUnavailable": 1,
                "unhealthyPodEvictionPolicy": "AlwaysAllow",
                "selector": {"matchLabels": dict(self.labels)},
            },
        }

    def _trigger(self, threshold: int) -> list[dict[str, Any]]:
        return [
            {
                "type": "prometheus",
                "metadata": {
                    "serverAddress": self.options.prometheus_url,
                    "query": backlog_query(self.driver),
                    "threshold": str(threshold),
                },
            }
        ]

    def scaled_object(self) -> dict[str, Any]:
        return {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledObject",
            "metadata": self._meta(self.name),
            "spec": {
                "scaleTargetRef": {"name": self.name},
                # One pod stays: it is what exports the backlog that scales the rest.
                "minReplicaCount": 1,
                "maxReplicaCount": 10,
                "pollingInterval": 15,
                "cooldownPeriod": 300,
                "advanced": {
                    "horizontalPodAutoscalerConfig": {
                        "behavior": {
                            "scaleDown": {
                                "stabilizationWindowSeconds": 300,
                                "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                            }
                        }
                    }
                },
                # A pod takes `concurrency` runs at once per worker: its share of the backlog.
                "triggers": self._trigger(self.driver.concurrency * self.options.workers),
            },
        }

    def lag_exporter(self) -> dict[str, Any]:
        name = f"{self.name}-lag"
        labels = {**self.labels, "app.kubernetes.io/component": "lag-exporter"}
        pod = self._pod(self._container([], lag=True))
        pod["metadata"]["labels"] = labels
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "labels": labels},
            "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": pod},
        }

    def scaled_job(self) -> dict[str, Any]:
        args = ["--max-runs", "1", "--exit-when-idle", str(JOB_IDLE_EXIT)]
        pod = self._pod(self._container(args), restartPolicy="Never")
        return {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledJob",
            "metadata": self._meta(self.name),
            "spec": {
                "jobTargetRef": {
                    "parallelism": 1,
                    "completions": 1,
                    # A pod that dies leaves its run to JetStream's redelivery, not to a retry.
                    "backoffLimit": 0,
                    "template": pod,
                },
                "pollingInterval": 10,
                "maxReplicaCount": 20,
                "successfulJobsHistoryLimit": 5,
                "failedJobsHistoryLimit": 5,
                # The backlog counts runs in progress (ack pending), so the default strategy,
                # which subtracts running jobs, starts one job per waiting run.
                "scalingStrategy": {"strategy": "default"},
                "triggers": self._trigger(1),
            },
        }


def _probe(path: str, *, period: int = 10, failures: int = 0, delay: int = 0) -> dict[str, Any]:
    """An HTTP probe on the container's ``http`` port (Kubernetes' defaults where 0)."""
    probe: dict[str, Any] = {"httpGet": {"path": path, "port": "http"}}
    if delay:
        probe["initialDelaySeconds"] = delay
    probe["periodSeconds"] = period
    probe["timeoutSeconds"] = 5
    if failures:
        probe["failureThreshold"] = failures
    return probe
