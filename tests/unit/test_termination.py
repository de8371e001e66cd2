"""Every fatal error of a worker process leaves its message in the termination message file."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagebatch.cli import main
from imagebatch.errors import PromptFileError
from imagebatch.worker import termination


@pytest.fixture
def log_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "termination-log"
    monkeypatch.setenv(termination.ENV_VAR, str(path))
    return path


def test_a_user_error_is_written_as_it_is_and_raised_on(log_file: Path) -> None:
    err = PromptFileError("spec.promptsFrom.uri: /data/p.jsonl line 3: malformed JSON")

    def fail() -> int:
        raise err

    with pytest.raises(PromptFileError):
        termination.reporting(fail)
    assert log_file.read_text() == str(err)


def test_an_unexpected_error_is_its_type_and_message_and_exit_1(log_file: Path) -> None:
    def fail() -> int:
        raise KeyError("boom")

    assert termination.reporting(fail) == 1
    assert log_file.read_text() == "KeyError: 'boom'"


def test_a_clean_exit_writes_nothing(log_file: Path) -> None:
    assert termination.reporting(lambda: 0) == 0
    assert not log_file.exists()


def test_a_long_message_keeps_its_start_within_the_kubelets_limit(log_file: Path) -> None:
    termination.write("spec.output.uri: " + "é" * 5000)
    data = log_file.read_bytes()
    assert len(data) <= termination.MAX_BYTES
    assert data.decode().startswith("spec.output.uri: éé") and data.decode().endswith("(cut)")


def test_the_default_path_is_never_created_outside_a_pod(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(termination.ENV_VAR, raising=False)
    missing = tmp_path / "dev" / "termination-log"
    monkeypatch.setattr(termination, "DEFAULT_PATH", str(missing))
    termination.write("x")  # no error, no file
    assert not missing.exists()
    missing.parent.mkdir()
    missing.touch()  # the kubelet made it: written
    termination.write("spec.model.name: not found")
    assert missing.read_text() == "spec.model.name: not found"


def test_the_worker_command_records_an_unexpected_error(
    log_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No cluster to reach: the Kubernetes client refuses a kubeconfig that is not there.
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["worker", "--namespace", "ns", "--job", "j", "--pod", "p"]) == 1
    message = log_file.read_text()
    assert message.startswith("ConfigException: ") and "\n" not in message


def test_the_worker_command_records_a_user_error(log_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("NAMESPACE", "JOB_NAME", "POD_NAME"):
        monkeypatch.delenv(var, raising=False)
    assert main(["worker"]) == 2
    assert log_file.read_text().startswith("worker: set --namespace, --job, --pod")


def test_the_fetch_step_records_a_model_that_cannot_be_fetched(log_file: Path) -> None:
    # HF_HUB_OFFLINE=1 (tests/conftest.py): a hub model that is not in the cache cannot be fetched.
    assert main(["fetch-model", "--model", "nobody/no-such-model"]) == 3
    assert "nobody/no-such-model" in log_file.read_text()
