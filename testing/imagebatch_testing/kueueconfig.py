"""What the Kueue controller of the test cluster is started with, and what it is judged by: its
Configuration, its command line, its webhook configurations and CRDs as the local API server
reaches them (by URL, with a CA of the harness's own), and how to read its log. Pure; the
controller itself is imagebatch_testing.kueue."""

from __future__ import annotations

import base64
import copy
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JSON = dict[str, Any]
GROUP = "kueue.x-k8s.io"
API = f"{GROUP}/v1beta2"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
MUTATING_CONFIG = "kueue-mutating-webhook-configuration"
VALIDATING_CONFIG = "kueue-validating-webhook-configuration"
# The CRDs whose versions Kueue's /convert webhook converts (config/components/crd/kustomization.yaml).
CONVERTED_CRDS = ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")
# Webhooks of the API groups Kueue serves with only batch/job enabled; the others (pods,
# deployments, ...) answer with no-ops and would only make every pod creation depend on Kueue.
SERVED_GROUPS = {GROUP, "batch"}
# With internalCertManagement off, Kueue reads its metrics certificate from this fixed path
# (cmd/kueue/main.go); the controller sees it through an overlay of /etc in its own mount namespace.
METRICS_CERT_DIR = "etc/kueue/metrics/certs"
FIELD_MANAGER = "imagebatch-tests"


@dataclass(frozen=True)
class KueuePorts:
    webhook: int
    health: int
    metrics: int


def controller_config(ports: KueuePorts, webhook_cert_dir: Path) -> JSON:
    """Kueue's Configuration (config.kueue.x-k8s.io/v1beta2, the version v0.17 reads)."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": "kueue-system",
        # Only Jobs that name a LocalQueue: the other tests' worker Jobs are not Kueue's.
        "manageJobsWithoutQueueName": False,
        "internalCertManagement": {"enable": False},
        "leaderElection": {"leaderElect": False},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports.health}"},
        "metrics": {"bindAddress": f"127.0.0.1:{ports.metrics}"},
        "webhook": {"host": "127.0.0.1", "port": ports.webhook, "certDir": str(webhook_cert_dir)},
        "clientConnection": {"qps": 50, "burst": 100},
        "integrations": {"frameworks": ["batch/job"]},
        # The visibility API server wants an APIService and certificates of its own; no test uses it.
        "featureGates": {"VisibilityOnDemand": False},
    }


def launch_command(binary: Path, config: Path, etc_upper: Path, etc_work: Path) -> list[str]:
    """The controller in a user and mount namespace of its own, where /etc is an overlay that adds
    etc_upper (the metrics certificate) to the host's /etc, which stays untouched. The shell
    execs the controller, so the recorded pid is Kueue's."""
    script = 'mount -t overlay overlay -o "lowerdir=/etc,upperdir=$1,workdir=$2" /etc && shift 2 && exec "$@"'
    return [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "--",
        "/bin/sh",
        "-c",
        script,
        "kueue-etc-overlay",
        str(etc_upper),
        str(etc_work),
        str(binary),
        f"--config={config}",
        # V(2) logs say why a Job was stopped ("job with no matching workload, suspending").
        "--zap-log-level=2",
    ]


def webhook_configurations(manifests: list[JSON], port: int, ca_pem: bytes) -> list[JSON]:
    """Kueue's webhook configurations for a controller at https://127.0.0.1:<port>: only the
    webhooks of the groups it serves, each with a URL and the CA bundle, the Job webhooks only
    for Jobs that carry a queue-name label (so no other Job waits on Kueue)."""
    names = {
        "MutatingWebhookConfiguration": MUTATING_CONFIG,
        "ValidatingWebhookConfiguration": VALIDATING_CONFIG,
    }
    bundle = base64.b64encode(ca_pem).decode()
    result = []
    for original in manifests:
        doc = copy.deepcopy(original)
        doc["metadata"] = {"name": names[doc["kind"]]}
        hooks = []
        for hook in doc["webhooks"]:
            groups = {g for rule in hook["rules"] for g in rule["apiGroups"]}
            if not groups <= SERVED_GROUPS:
                continue
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": bundle}
            if groups == {"batch"}:
                hook["objectSelector"] = {"matchExpressions": [{"key": QUEUE_LABEL, "operator": "Exists"}]}
            hooks.append(hook)
        doc["webhooks"] = hooks
        result.append(doc)
    return result


def crd_for_controller(crd: JSON, port: int, ca_pem: bytes) -> JSON:
    """A CRD as Kueue's kustomization installs it: conversion by the controller's /convert."""
    crd = copy.deepcopy(crd)
    if crd["spec"]["names"]["plural"] in CONVERTED_CRDS:
        crd["spec"]["conversion"] = {
            "strategy": "Webhook",
            "webhook": {
                "clientConfig": {
                    "url": f"https://127.0.0.1:{port}/convert",
                    "caBundle": base64.b64encode(ca_pem).decode(),
                },
                "conversionReviewVersions": ["v1"],
            },
        }
    return crd


def probe_job() -> JSON:
    """A Job for a dry-run create: Kueue's webhook suspends a Job that names a queue."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"kueue-probe-{uuid.uuid4().hex[:6]}", "labels": {QUEUE_LABEL: "kueue-probe"}},
        "spec": {
            "suspend": False,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "probe", "image": "none"}],
                }
            },
        },
    }


# Kueue's log messages (pkg/controller/jobframework/reconciler.go) when it stops a Job because the
# Job no longer matches its admitted Workload (a changed pod count, say): an eviction that is not
# a preemption.
MISMATCH_MESSAGES = (
    "job with no matching workload, suspending",
    "Running job is not admitted by a cluster queue, suspending",
)


def log_records(text: str, namespace: str) -> list[JSON]:
    records = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("namespace") == namespace:
            records.append(record)
    return records
