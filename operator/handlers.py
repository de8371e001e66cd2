"""kopf handlers: every trigger runs the same level-based reconcile (see reconcile.py).

Handlers only queue the job (resync.py: a per-job work queue, so a handler never waits for a
pass and no job waits for another); a resync loop queues every job each `--interval` seconds and
drives progress (leases, scaling, status); create/update/resume and a shard changing state make
the next pass come at once instead of on the next tick. No handler needs a finalizer, so deleting a job never waits for the operator; a
job's metric series go on its DELETED watch event (a raw-event handler, which needs no finalizer).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from imagebatch.api import GROUP, VERSION
from imagebatch.names import JOB_PLURAL
from imagebatch.operator import metrics
from imagebatch.operator.reconcile import Reconciler
from imagebatch.operator.resync import Resync

RESOURCE = (GROUP, VERSION, JOB_PLURAL)

log = logging.getLogger(__name__)


def configure_settings(settings: kopf.OperatorSettings) -> None:
    # Handler progress in our own annotations; no `status.kopf`, which the CRD schema would prune.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Events are posted by reconcile on real transitions; kopf's per-handler events would be noise.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 8
    # Retry a failed create/update pass soon: it is idempotent and the resync runs anyway.
    settings.batching.error_delays = [1, 2, 5, 10, 30]


def register(reconciler: Reconciler, resync: Resync, registry: kopf.OperatorRegistry) -> None:
    # A registry of our own has no login handler: authenticate as the `kubernetes` client does
    # (in-cluster ServiceAccount, else KUBECONFIG), the same identity as operator/kube.py.
    @kopf.on.login(id="login", registry=registry)
    def _login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(id="configure", registry=registry)
    def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_settings(settings)
        resync.start()

    @kopf.on.cleanup(id="stop-resync", registry=registry)
    def _cleanup(**_: Any) -> None:
        resync.stop()

    @kopf.on.create(*RESOURCE, id="reconcile-on-create", registry=registry)
    @kopf.on.update(*RESOURCE, id="reconcile-on-update", field="spec", registry=registry)
    @kopf.on.resume(*RESOURCE, id="reconcile-on-resume", registry=registry)
    def _on_change(body: kopf.Body, **_: Any) -> None:
        resync.enqueue(body)

    # Not kopf.on.delete: without a finalizer the job is gone at once, and kopf calls no delete
    # handler for an object that is already gone; the raw DELETED event always comes.
    @kopf.on.event(*RESOURCE, id="forget-metrics-on-delete", registry=registry)
    def _on_event(
        type: str | None, name: str | None, namespace: str | None, uid: str | None = None, **_: Any
    ) -> None:
        if type == "DELETED" and name and namespace:
            if uid:
                resync.forget(uid)
            metrics.forget_job(namespace, name)
            log.info("%s/%s deleted: its metric series are removed", namespace, name)
