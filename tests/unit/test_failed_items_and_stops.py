"""Issue 21, the operator's side: failed items decide Complete or Failed by retries.maxFailedItems,
and a claim lost by a pod we stopped costs no attempt while a crash, an OOM kill or a node loss
still does. Also the failpoints and job.json rules the e2e tests and retry-failed rely on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from test_reconcile import FakeKube, cond, job, passes

from imagebatch.api import Generation, PromptItem, Retries, allowed_failed_items
from imagebatch.api import ImageBatchJobSpec as Spec
from imagebatch.errors import ImageBatchError
from imagebatch.manifest import ERRORS, error_line
from imagebatch.names import ANNOTATION_MANIFEST_LINES
from imagebatch.operator.leases import ClaimClock, review
from imagebatch.operator.reconcile import Reconciler
from imagebatch.planning import expand_items
from imagebatch.storage import Storage
from imagebatch.worker import failpoints, jobrecord

JSON = dict[str, Any]


# -- retries.maxFailedItems -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("limit", "total", "allowed"),
    [
        (0, 24, 0),
        (3, 24, 3),
        ("1%", 24, 1),  # rounded up: one bad prompt never fails a job by default
        ("1%", 1_000_000, 10_000),
        ("1%", 100, 1),
        ("1%", 101, 2),
        ("0.5%", 1000, 5),
        ("0%", 1000, 0),
        ("100%", 7, 7),
        ("1%", 0, 0),
    ],
)
def test_allowed_failed_items(limit: int | str, total: int, allowed: int) -> None:
    assert allowed_failed_items(limit, total) == allowed


def test_max_failed_items_takes_a_count_or_a_percentage() -> None:
    assert Retries().max_failed_items == "1%"
    assert Retries.model_validate({"maxFailedItems": 0}).max_failed_items == 0
    assert Retries.model_validate({"maxFailedItems": "2.5%"}).max_failed_items == "2.5%"
    for bad in ("5", "-1%", "101%", "1 %", -1, "lots"):
        with pytest.raises(ValidationError, match="maxFailedItems|max_failed_items"):
            Retries.model_validate({"maxFailedItems": bad})


def finished(kube: FakeKube, body: JSON, failed: dict[str, list[str]]) -> JSON:
    """Every shard Done (with the given failed items) and the manifest joined: the last status."""
    passes(kube, body)
    for name, s in kube.shards.items():
        ids = failed.get(name, [])
        s["status"] = {
            "state": "Done",
            "attempt": 1,
            "leaseRenewTime": "2026-01-01T00:00:00Z",
            "itemsDone": 2 - len(ids),
            "itemsFailed": len(ids),
            **({"failedItems": ids} if ids else {}),
        }
    kube.shards["j-u-s00000"]["metadata"]["annotations"][ANNOTATION_MANIFEST_LINES] = "9"
    return passes(kube, body)


def test_one_failed_item_within_the_default_limit_completes_and_says_where_the_list_is() -> None:
    kube = FakeKube()
    status = finished(kube, job(), {"j-u-s00002": ["p0000005"]})
    complete = cond(status, "Complete")
    assert complete["status"] == "True", status["conditions"]
    assert "1 failed" in complete["message"] and "p0000005" in complete["message"]
    assert f"/out/{ERRORS}" in complete["message"]
    assert status["items"] == {"total": 10, "done": 9, "failed": 1}
    assert status["errors"] == f"/out/{ERRORS}" and status["progress"] == "9/10"
    assert status["shards"]["done"] == 5 and status["shards"]["failed"] == 0


def test_more_failed_items_than_allowed_fail_the_job_naming_them() -> None:
    kube = FakeKube()
    body = job(retries={"maxFailedItems": 0})
    status = finished(kube, body, {"j-u-s00002": ["p0000005"]})
    failed = cond(status, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "ItemsFailed"
    assert "1 of 10 items failed" in failed["message"] and "p0000005" in failed["message"]
    assert "retries.maxFailedItems=0" in failed["message"] and f"/out/{ERRORS}" in failed["message"]
    assert status["errors"] == f"/out/{ERRORS}"
    assert kube.job is not None and kube.job["spec"]["parallelism"] == 0


def test_ids_a_worker_wrote_are_echoed_only_if_they_are_ids() -> None:
    kube = FakeKube()
    status = finished(kube, job(retries={"maxFailedItems": 0}), {"j-u-s00001": ["p0000003", "<script> x"]})
    msg = cond(status, "Failed")["message"]
    assert "p0000003" in msg and "<script>" not in msg


# -- claims of stopped pods -------------------------------------------------------------------------
def claimed(holder: str = "pod-1", **more: Any) -> JSON:
    return {
        "metadata": {"name": "a", "resourceVersion": "7"},
        "spec": {"index": 0, "start": 0, "end": 10},
        "status": {"state": "Claimed", "holder": holder, "attempt": 1, "leaseRenewTime": "t", **more},
    }


def pod(
    name: str = "pod-1", *, deleting: bool = False, disruption: str | None = None, oom: bool = False
) -> JSON:
    status: JSON = {"phase": "Running"}
    if disruption:
        status["conditions"] = [{"type": "DisruptionTarget", "status": "True", "reason": disruption}]
    if oom:
        status["phase"] = "Failed"
        status["containerStatuses"] = [
            {"name": "worker", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}
        ]
    meta: JSON = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": status}


def lost_after(seen: list[JSON], now: list[JSON], suspended: str | None = None, max_attempts: int = 3) -> Any:
    """Pass 1 sees the claim and `seen` pods; pass 2 sees the same claim and `now` pods."""
    clock = ClaimClock()
    shards = [claimed()]
    clock.observe(shards, 0.0, gap=60)
    clock.observe_pods(seen)
    clock.observe(shards, 1.0, gap=60)
    clock.observe_pods(now)
    live = {p["metadata"]["name"] for p in now if p["status"]["phase"] not in ("Succeeded", "Failed")}
    (tr,) = review(shards, live, clock, 1.0, 120, 1800, max_attempts, suspended=suspended)
    return tr


@pytest.mark.parametrize(
    ("case", "seen", "now", "suspended"),
    [
        ("deleted (suspend, scale-in, Kueue), gone by the next pass", [pod(deleting=True)], [], None),
        (
            "SIGKILLed at the end of its grace period, still listed",
            [pod()],
            [{**pod(deleting=True), "status": {"phase": "Failed"}}],
            None,
        ),
        ("preempted by the scheduler", [pod(disruption="PreemptionByScheduler")], [], None),
        ("evicted (a drain)", [pod(disruption="EvictionByEvictionAPI")], [], None),
        ("never seen stopping, but its job is suspended", [pod()], [], "spec.suspend"),
    ],
)
def test_a_claim_lost_by_a_pod_we_stopped_costs_no_attempt(
    case: str, seen: list[JSON], now: list[JSON], suspended: str | None
) -> None:
    tr = lost_after(seen, now, suspended, max_attempts=1)
    assert tr.reason == "HolderStopped", case
    assert tr.status.state == "Pending" and tr.status.failures == 0 and tr.status.holder is None
    assert "pod-1 was stopped" in (tr.status.error or "")


@pytest.mark.parametrize(
    ("case", "seen", "now"),
    [
        ("crashed (no deletion)", [pod()], [{**pod(), "status": {"phase": "Failed"}}]),
        ("vanished without being seen stopping", [pod()], []),
        ("OOM-killed while being deleted", [pod(deleting=True, oom=True)], []),
        ("its node was lost (pod GC)", [pod(disruption="DeletionByPodGC")], []),
        (
            "its node became unreachable (taint manager)",
            [pod(disruption="DeletionByTaintManager", deleting=True)],
            [],
        ),
    ],
)
def test_a_crash_an_oom_kill_or_a_node_loss_is_still_a_failure(
    case: str, seen: list[JSON], now: list[JSON]
) -> None:
    tr = lost_after(seen, now)
    assert tr.reason == "HolderGone", case
    assert tr.status.failures == 1
    assert lost_after(seen, now, max_attempts=1).status.state == "Failed", case


def test_stopped_pods_are_forgotten_once_no_claim_names_them() -> None:
    clock = ClaimClock()
    clock.observe([claimed()], 0.0, gap=60)
    clock.observe_pods([pod(deleting=True), pod("idle", deleting=True)])
    assert set(clock.stopped) == {"pod-1", "idle"}
    clock.observe([], 1.0, gap=60)
    clock.observe_pods([])
    assert clock.stopped == {}


def test_the_operator_releases_a_stopped_pods_claim_with_a_normal_event() -> None:
    kube = FakeKube()
    r = Reconciler(kube)  # type: ignore[arg-type]  # one operator: it remembers the pods it saw

    def one_pass() -> JSON:
        r.reconcile({**job(), **({"status": kube.status} if kube.status else {})})
        assert kube.status is not None
        return kube.status

    one_pass()
    kube.shards["j-u-s00001"]["status"] = {
        "state": "Claimed",
        "attempt": 1,
        "holder": "w-1",
        "leaseRenewTime": "x",
    }
    kube.pods = [
        {
            "metadata": {"name": "w-1", "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": "Running"},
        }
    ]
    one_pass()
    assert kube.shards["j-u-s00001"]["status"]["state"] == "Claimed"  # still in its grace period
    kube.pods = []  # SIGKILLed and deleted before the next pass
    status = one_pass()
    st = kube.shards["j-u-s00001"]["status"]
    assert st["state"] == "Pending" and st.get("failures", 0) == 0
    assert status["shards"]["pending"] == 5
    assert [m for r, m in kube.events if r == "HolderStopped"] == [
        "shard j-u-s00001: worker pod w-1 was stopped (deleted: suspend, scale-in or preemption) before it "
        "released the claim; no attempt used"
    ]
    assert not [r for r, _ in kube.events if r == "HolderGone"]
    # A restarted operator has forgotten the pod: then a claim of a vanished pod is a failure.
    kube.shards["j-u-s00001"]["status"] = {
        "state": "Claimed",
        "attempt": 2,
        "holder": "w-2",
        "leaseRenewTime": "x",
    }
    passes(kube, job())
    assert kube.shards["j-u-s00001"]["status"]["failures"] == 1


# -- failpoints ---------------------------------------------------------------------------------------
def test_failpoint_specs() -> None:
    fps = failpoints.parse("batch:p0000013=raise;image-stored@2=block;shard-done=kill")
    assert fps["batch"] == failpoints.Failpoint("batch", 1, "raise", "p0000013")
    assert fps["image-stored"].action == "block" and fps["shard-done"].action == "kill"
    for bad in (
        "batch=raise",
        "batch:x@2=raise",
        "batch:x=hold",
        "image-stored=raise",
        "image-stored:x=hold",
    ):
        with pytest.raises(ValueError, match="cannot read"):
            failpoints.parse(bad)


SIGNAL_CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading, types
    from pathlib import Path
    from imagebatch.worker import cluster, failpoints
    out = Path(sys.argv[1])
    signal.signal(signal.SIGTERM, lambda *a: (out / "handler").write_text("ran"))
    class Fake:
        spec = types.SimpleNamespace(workers=types.SimpleNamespace(termination_grace_period_seconds=2))
        def release_now(self):
            (out / "released").write_text("yes")
    cluster.watch_signals(threading.Event(), lambda: Fake())
    (out / "ready").write_text("")
    if sys.argv[2] == "block":
        failpoints.block_natively()
    else:
        import time
        time.sleep(3600)
    """
)


@pytest.mark.parametrize("how", ["block", "sleep"])
def test_sigterm_is_seen_while_the_main_thread_is_in_a_native_call(tmp_path: Path, how: str) -> None:
    """The `block` failpoint really keeps Python's handler from running (time.sleep does not:
    the handler runs when the signal interrupts it), and the wakeup-fd thread of the worker still
    releases the claim at once and ends the process with 143 after half the grace period."""
    proc = subprocess.Popen([sys.executable, "-c", SIGNAL_CHILD, str(tmp_path), how])
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "released").read_text() == "yes"
    if how == "block":
        assert rc == 143 and not (tmp_path / "handler").exists()
    else:
        assert (tmp_path / "handler").read_text() == "ran"


# -- job.json: who may write into an output ---------------------------------------------------------------
def spec(prompts: list[Any], **gen: Any) -> Spec:
    field = "promptItems" if prompts and isinstance(prompts[0], dict) else "prompts"
    return Spec.model_validate(
        {"model": {"name": "builtin:tiny"}, field: prompts, "output": {"uri": "/x"}, "generation": gen}
    )


def test_a_retry_of_failed_items_is_admitted_after_the_first_job(tmp_path: Path) -> None:
    st = Storage(str(tmp_path))
    first = spec([f"a prompt {i}" for i in range(10)], imagesPerPrompt=1, seed=4)
    items = expand_items([PromptItem(prompt=f"a prompt {i}") for i in range(10)], Generation(seed=4))
    assert jobrecord.admit(st, "first", first, items, shards=3) == jobrecord.Admission(0, 10)
    assert jobrecord.admit(st, "first", first, items, shards=3) == jobrecord.Admission(0, 10)  # a restart
    bad = items[6]
    retry = spec([{"id": bad.id, "prompt": bad.prompt, "seed": bad.seed, "negativePrompt": ""}])
    retry_items = expand_items(retry.prompt_items or [], retry.generation)
    with pytest.raises(ImageBatchError, match="not listed in errors.jsonl"):
        jobrecord.admit(st, "retry", retry, retry_items, shards=1)
    st.write_bytes(ERRORS, (json.dumps(error_line(bad, "s00002", "w", "ValueError", "x")) + "\n").encode())
    assert jobrecord.admit(st, "retry", retry, retry_items, shards=1) == jobrecord.Admission(3, 10)
    assert jobrecord.admit(st, "retry", retry, retry_items, shards=1) == jobrecord.Admission(3, 10)
    # Another prompt under the failed item's id, or other settings, are refused.
    other = spec([{"id": bad.id, "prompt": "something else", "seed": bad.seed, "negativePrompt": ""}])
    with pytest.raises(ImageBatchError, match="other settings than in errors.jsonl"):
        jobrecord.admit(st, "o", other, expand_items(other.prompt_items or [], other.generation), shards=1)
    png = Spec.model_validate({**retry.model_dump(by_alias=True), "output": {"uri": "/x", "format": "jpeg"}})
    with pytest.raises(ImageBatchError, match="format, quality or layout differ"):
        jobrecord.admit(st, "j", png, retry_items, shards=1)
    # Local mode still reads the record (job, fingerprint) as it always did.
    assert json.loads(st.read_bytes("job.json"))["job"] == "first"
