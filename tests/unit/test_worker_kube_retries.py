"""The worker's API calls: transient answers retried (honouring Retry-After), user errors raised at
once naming the field, and a write whose answer was lost recognised as ours."""

from __future__ import annotations

import email.utils
import json
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
import urllib3
from kubernetes.client.exceptions import ApiException
from tenacity import RetryCallState, Retrying

from imagebatch.errors import PromptFileError
from imagebatch.worker.kube import WaitRetryAfter, WorkerKube, is_transient, retry_after

JSON = dict[str, Any]


def api_error(status: int, retry: str | None = None) -> ApiException:
    e = ApiException(status=status, reason=f"reason {status}")
    e.headers = {"Retry-After": retry} if retry is not None else None
    return e


@pytest.mark.parametrize(
    ("err", "transient"),
    [
        (api_error(429), True),
        (api_error(500), True),
        (api_error(503), True),
        (api_error(504), True),
        (api_error(408), True),
        (api_error(403), False),
        (api_error(404), False),
        (api_error(409), False),
        (api_error(422), False),
        (ApiException(status=0, reason="SSLError: the handshake operation timed out"), True),
        (ApiException(status=0, reason="SSLError: [SSL: CERTIFICATE_VERIFY_FAILED]"), False),
        (urllib3.exceptions.ProtocolError("Connection aborted"), True),
        (urllib3.exceptions.ReadTimeoutError(None, "/", "Read timed out"), True),  # type: ignore[arg-type]
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (ValueError("not JSON"), False),
    ],
)
def test_what_is_transient(err: BaseException, transient: bool) -> None:
    assert is_transient(err) is transient


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert retry_after(api_error(429, "3")) == 3.0
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    got = retry_after(api_error(503, when))
    assert got is not None and 25 < got <= 30
    assert retry_after(api_error(429, "soon")) is None
    assert retry_after(api_error(429)) is None
    assert retry_after(None) is None


def test_the_wait_is_the_servers_retry_after_when_it_sent_one() -> None:
    wait = WaitRetryAfter(first=0.5, most=30)
    state = RetryCallState(Retrying(), None, (), {})
    state.attempt_number = 1
    state.set_exception((ApiException, api_error(429, "7"), None))
    assert 7 <= wait(state) <= 7.25
    state.set_exception((ApiException, api_error(503), None))
    assert 0 <= wait(state) <= 0.5  # no Retry-After: backoff


class FakeCore:
    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.calls = 0

    def read_namespaced_config_map(self, name: str, ns: str, **kw: Any) -> Any:
        self.calls += 1
        answer = self.answers.pop(0) if self.answers else self.answers_left()
        if isinstance(answer, BaseException):
            raise answer
        return SimpleNamespace(data=json.dumps({"data": answer}))

    def answers_left(self) -> Any:
        return api_error(429, "0")


def kube(core: Any = None, custom: Any = None, retry_seconds: float = 900) -> WorkerKube:
    k = WorkerKube.__new__(WorkerKube)
    k.ns, k.job, k.core, k.custom = "ns", "j", core, custom
    k.retry_seconds = retry_seconds
    return k


def test_a_config_map_read_outlives_429s_and_a_dropped_connection() -> None:
    core = FakeCore([api_error(429, "0"), urllib3.exceptions.ProtocolError("reset"), {"p.txt": "a\nb"}])
    assert kube(core).read_config_map("prompts", "p.txt") == "a\nb"
    assert core.calls == 3


@pytest.mark.parametrize("status", [403, 404])
def test_a_config_map_the_user_must_fix_fails_at_once_naming_the_field(status: int) -> None:
    core = FakeCore([api_error(status)])
    with pytest.raises(PromptFileError, match=rf"spec\.promptsFrom\.configMapKeyRef: .*prompts: {status}"):
        kube(core).read_config_map("prompts", "p.txt")
    assert core.calls == 1


def test_an_api_that_stays_away_is_not_blamed_on_the_config_map() -> None:
    core = FakeCore([])  # 429 for ever
    t0 = time.monotonic()
    with pytest.raises(ApiException) as raised:
        kube(core, retry_seconds=0.5).read_config_map("prompts", "p.txt")
    assert not isinstance(raised.value, PromptFileError) and raised.value.status == 429
    assert core.calls >= 2 and time.monotonic() - t0 < 60


SHARD: JSON = {
    "apiVersion": "imagebatch.dev/v1alpha1",
    "kind": "ImageBatchShard",
    "metadata": {"name": "j-s00000", "namespace": "ns", "resourceVersion": "5"},
    "spec": {"jobName": "j", "index": 0, "start": 0, "end": 10},
}


class FakeCustom:
    """A status replace that applies the write and then loses the answer (a timeout); urllib3's
    retry of it then meets a conflict, as it would against the API server."""

    def __init__(self, lose_answer: bool) -> None:
        self.stored: JSON = json.loads(json.dumps(SHARD))
        self.lose_answer = lose_answer
        self.gets = 0

    def replace_namespaced_custom_object_status(self, *args: Any, **kw: Any) -> Any:
        body = args[-1]
        if body["metadata"]["resourceVersion"] != self.stored["metadata"]["resourceVersion"]:
            raise api_error(409)
        self.stored = {**self.stored, "status": body["status"], "metadata": {**self.stored["metadata"]}}
        self.stored["metadata"]["resourceVersion"] = "6"
        if self.lose_answer:
            self.lose_answer = False
            raise urllib3.exceptions.ReadTimeoutError(None, "/", "Read timed out")  # type: ignore[arg-type]
        return SimpleNamespace(data=json.dumps(self.stored))

    def get_namespaced_custom_object(self, *args: Any, **kw: Any) -> Any:
        self.gets += 1
        return SimpleNamespace(data=json.dumps(self.stored))


def test_a_status_write_whose_answer_was_lost_is_ours() -> None:
    custom = FakeCustom(lose_answer=True)
    written = kube(custom=custom).replace_shard_status(SHARD, {"state": "Claimed", "holder": "pod-a"})
    assert written is not None and written["status"]["holder"] == "pod-a"
    assert custom.gets == 1


def test_a_plain_conflict_is_a_lost_race_and_costs_no_read() -> None:
    custom = FakeCustom(lose_answer=False)
    custom.stored["metadata"]["resourceVersion"] = "9"  # someone else wrote first
    assert kube(custom=custom).replace_shard_status(SHARD, {"state": "Claimed"}) is None
    assert custom.gets == 0
