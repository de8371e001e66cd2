"""The pure parts of the Kueue harness (imagebatch_testing.kueueconfig, .kueuequeues): what the
controller is started with and how the API server reaches it. tests/cluster/test_kueue_controller.py
runs them for real; these pin what a real run would show only as a hang or a cluster whose every
pod creation waits on Kueue."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from imagebatch_testing.kueueconfig import (
    MUTATING_CONFIG,
    QUEUE_LABEL,
    VALIDATING_CONFIG,
    KueuePorts,
    controller_config,
    crd_for_controller,
    launch_command,
    log_records,
    webhook_configurations,
)
from imagebatch_testing.kueuequeues import cluster_queue, local_queue

CA = b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"


def hook(name: str, group: str, path: str) -> dict[str, Any]:
    return {
        "name": name,
        "admissionReviewVersions": ["v1"],
        "clientConfig": {"service": {"name": "webhook-service", "namespace": "system", "path": path}},
        "failurePolicy": "Fail",
        "rules": [
            {"apiGroups": [group], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["x"]}
        ],
        "sideEffects": "None",
    }


def test_webhooks_are_reached_by_url_and_only_those_kueue_serves_for_batch_jobs() -> None:
    manifests = [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "mutating-webhook-configuration"},
            "webhooks": [
                hook("mpod.kb.io", "", "/mutate--v1-pod"),
                hook("mjob.kb.io", "batch", "/mutate-batch-v1-job"),
                hook("mworkload.kb.io", "kueue.x-k8s.io", "/mutate-kueue-x-k8s-io-v1beta2-workload"),
            ],
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": "validating-webhook-configuration"},
            "webhooks": [hook("vdeployment.kb.io", "apps", "/validate-apps-v1-deployment")],
        },
    ]
    mutating, validating = webhook_configurations(manifests, 9443, CA)
    assert mutating["metadata"] == {"name": MUTATING_CONFIG}
    assert validating["metadata"] == {"name": VALIDATING_CONFIG} and validating["webhooks"] == []
    by_name = {h["name"]: h for h in mutating["webhooks"]}
    assert set(by_name) == {"mjob.kb.io", "mworkload.kb.io"}  # no pod creation waits on Kueue
    job = by_name["mjob.kb.io"]
    assert job["clientConfig"] == {
        "url": "https://127.0.0.1:9443/mutate-batch-v1-job",
        "caBundle": base64.b64encode(CA).decode(),
    }
    assert job["objectSelector"] == {"matchExpressions": [{"key": QUEUE_LABEL, "operator": "Exists"}]}
    assert "objectSelector" not in by_name["mworkload.kb.io"]
    assert manifests[0]["metadata"]["name"] == "mutating-webhook-configuration"  # input untouched


def test_crds_that_kueue_converts_name_its_convert_endpoint() -> None:
    def crd(plural: str) -> dict[str, Any]:
        return {"metadata": {"name": f"{plural}.kueue.x-k8s.io"}, "spec": {"names": {"plural": plural}}}

    workloads = crd_for_controller(crd("workloads"), 9443, CA)
    assert workloads["spec"]["conversion"]["strategy"] == "Webhook"
    assert (
        workloads["spec"]["conversion"]["webhook"]["clientConfig"]["url"] == "https://127.0.0.1:9443/convert"
    )
    assert "conversion" not in crd_for_controller(crd("resourceflavors"), 9443, CA)["spec"]


def test_controller_config_manages_only_labelled_jobs_on_free_ports() -> None:
    cfg = controller_config(KueuePorts(webhook=1, health=2, metrics=3), Path("/certs"))
    assert cfg["apiVersion"] == "config.kueue.x-k8s.io/v1beta2"
    assert cfg["manageJobsWithoutQueueName"] is False
    assert cfg["internalCertManagement"] == {"enable": False}
    assert cfg["leaderElection"] == {"leaderElect": False}
    assert cfg["integrations"] == {"frameworks": ["batch/job"]}
    assert cfg["webhook"] == {"host": "127.0.0.1", "port": 1, "certDir": "/certs"}
    assert cfg["health"]["healthProbeBindAddress"] == "127.0.0.1:2"
    assert cfg["metrics"]["bindAddress"] == "127.0.0.1:3"


def test_launch_command_overlays_etc_and_execs_the_controller() -> None:
    argv = launch_command(Path("/bin/kueue"), Path("/c.yaml"), Path("/up"), Path("/work"))
    assert argv[:5] == ["unshare", "--user", "--map-root-user", "--mount", "--"]
    script = argv[7]
    assert "lowerdir=/etc,upperdir=$1,workdir=$2" in script and script.endswith('exec "$@"')
    assert argv[9:13] == ["/up", "/work", "/bin/kueue", "--config=/c.yaml"]


def test_log_records_of_one_namespace() -> None:
    text = "\n".join(
        [
            "not json",
            json.dumps({"msg": "Job admitted, unsuspending", "namespace": "a"}),
            json.dumps({"msg": "other", "namespace": "b"}),
            "{broken",
        ]
    )
    assert [r["msg"] for r in log_records(text, "a")] == ["Job admitted, unsuspending"]


def test_cluster_queue_covers_exactly_its_quota() -> None:
    cq = cluster_queue("cq", "flavor", {"cpu": "500m"})
    group = cq["spec"]["resourceGroups"][0]
    assert group["coveredResources"] == ["cpu"]
    assert group["flavors"] == [{"name": "flavor", "resources": [{"name": "cpu", "nominalQuota": "500m"}]}]
    assert cq["spec"]["preemption"] == {"withinClusterQueue": "LowerPriority"}
    assert local_queue("ns", "queue", "cq")["spec"] == {"clusterQueue": "cq"}
