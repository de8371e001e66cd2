"""Conditions: Complete/Failed/Suspended plus kstatus' Ready/Reconciling/Stalled."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagebatch.api import Condition
from imagebatch.operator.conditions import Outcome, compute_conditions, is_true
from imagebatch.reasons import ConditionType as Type
from imagebatch.reasons import EventReason, Reason

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operator.md"


def by_type(conds: list[Condition]) -> dict[str, Condition]:
    return {c.type: c for c in conds}


def test_running_job_is_reconciling() -> None:
    c = by_type(compute_conditions([], Outcome(progress_reason="Running", message="5/10"), 3, "T1"))
    assert set(c) == {t.value for t in Type}
    assert c["Reconciling"].status == "True" and c["Reconciling"].reason == "Running"
    assert c["Complete"].status == c["Failed"].status == c["Stalled"].status == c["Ready"].status == "False"
    assert all(x.observed_generation == 3 for x in c.values())


def test_complete_is_ready() -> None:
    c = by_type(compute_conditions([], Outcome(complete=True, message="10 images"), 1, "T1"))
    assert c["Complete"].status == "True" and c["Ready"].status == "True"
    assert c["Reconciling"].status == "False" and c["Stalled"].status == "False"


def test_failed_is_stalled_with_reason_and_message() -> None:
    c = by_type(
        compute_conditions([], Outcome(failed_reason="ModelLoadError", message="no such model"), 1, "T1")
    )
    assert c["Failed"].status == "True" and c["Failed"].reason == "ModelLoadError"
    assert c["Failed"].message == "no such model"
    assert c["Stalled"].status == "True" and c["Complete"].status == "False"


def test_suspended() -> None:
    c = by_type(compute_conditions([], Outcome(suspended=True), 2, "T1"))
    assert c["Suspended"].status == "True" and c["Reconciling"].status == "False"


def test_transition_time_moves_only_when_status_flips() -> None:
    first = compute_conditions([], Outcome(), 1, "T1")
    same = compute_conditions(first, Outcome(message="more done"), 2, "T2")
    assert all(c.last_transition_time == "T1" for c in same)
    assert by_type(same)["Reconciling"].observed_generation == 2
    done = by_type(compute_conditions(same, Outcome(complete=True), 2, "T3"))
    assert done["Complete"].last_transition_time == "T3"
    assert done["Failed"].last_transition_time == "T1"  # still False
    assert is_true(list(done.values()), "Complete") and not is_true(list(done.values()), "Failed")


@pytest.mark.parametrize("name", [*(t.value for t in Type), *(r.value for r in Reason)])
def test_every_condition_type_and_reason_is_documented(name: str) -> None:
    """docs/operator.md's Conditions section names every type and reason the operator writes."""
    text = DOCS.read_text()
    section = text[text.index("### Conditions") :]
    assert f"`{name}`" in section, f"docs/operator.md: document condition type or reason `{name}`"


def test_state_and_reason_follow_the_outcome() -> None:
    assert (Outcome(queued=True, progress_reason=Reason.QUEUED).state, Outcome().state) == (
        "Queued",
        "Running",
    )
    assert Outcome(failed_reason=Reason.SHARDS_FAILED).reason == "ShardsFailed"
    assert Outcome(suspended=True).state == "Suspended" and Outcome(complete=True).state == "Complete"


def test_waiting_is_not_reconciling() -> None:
    """Suspended and Queued jobs wait by decision (the user's, the queue's): Reconciling and
    Stalled False, Ready True, which kstatus reads as Current (tests/unit/test_gitops.py runs
    kstatus itself: a Ready False reads InProgress)."""
    for outcome in (Outcome(suspended=True), Outcome(queued=True, progress_reason=Reason.QUEUED)):
        c = by_type(compute_conditions([], outcome, 3, "T1"))
        assert (c["Reconciling"].status, c["Stalled"].status, c["Ready"].status) == ("False", "False", "True")
    running = by_type(compute_conditions([], Outcome(), 3, "T1"))
    assert running["Reconciling"].status == "True"


@pytest.mark.parametrize("name", [r.value for r in EventReason])
def test_every_event_reason_is_documented(name: str) -> None:
    """docs/operator.md's Events section names every Event reason the operator posts."""
    text = DOCS.read_text()
    section = text[text.index("## Events") : text.index("## Operator flags")]
    assert f"`{name}`" in section, f"docs/operator.md: document Event reason `{name}`"
