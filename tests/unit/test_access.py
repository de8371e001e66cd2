"""Issue 18: a job's workers read and write only what the admin allows (imagebatch/access.py).

Local paths inside the job's own volume mounts (after resolving `..` and links), never the
worker's token or /proc; URI schemes, http hosts and S3 endpoints from the chart's allowlists;
the whole URI parsed before fsspec sees it. And the allowlist reaches the worker from the operator
only: a job's own env cannot widen it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import fsspec
import pytest
import yaml

from imagebatch.access import (
    ENV_VAR,
    AccessError,
    AccessPolicy,
    check_job,
    check_uri,
)
from imagebatch.api import ImageBatchJobSpec
from imagebatch.errors import ImageBatchError

TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
DEFAULT = AccessPolicy()


def job_spec(
    prompts: str | None = "/data/prompts.txt",
    output: str = "/data/out",
    mounts: list[dict[str, Any]] | None = None,
    **output_extra: Any,
) -> ImageBatchJobSpec:
    mounts = [{"name": "data", "mountPath": "/data"}] if mounts is None else mounts
    doc: dict[str, Any] = {
        "model": {"name": "builtin:tiny"},
        "output": {"uri": output, **output_extra},
        "workers": {
            "volumes": [{"name": m["name"], "emptyDir": {}} for m in mounts],
            "volumeMounts": mounts,
        },
    }
    if prompts is None:
        doc["prompts"] = ["a cat"]
    else:
        doc["promptsFrom"] = {"uri": prompts}
    return ImageBatchJobSpec.model_validate(doc)


def refusal(
    uri: str, spec: ImageBatchJobSpec | None = None, policy: AccessPolicy = DEFAULT, **kw: Any
) -> str:
    with pytest.raises(AccessError) as err:
        check_uri("spec.promptsFrom.uri", uri, spec or job_spec(), policy, **kw)
    return str(err.value)


# -- local paths ---------------------------------------------------------------------------------


def test_a_path_in_a_declared_volume_is_allowed() -> None:
    target = check_uri("spec.promptsFrom.uri", "/data/sub/prompts.txt", job_spec(), DEFAULT)
    assert target.scheme is None and target.local_path == "/data/sub/prompts.txt"
    assert (
        check_uri("spec.promptsFrom.uri", "file:///data/p.txt", job_spec(), DEFAULT).local_path
        == "/data/p.txt"
    )


def test_the_workers_token_is_never_a_prompt_source() -> None:
    msg = refusal(TOKEN)
    # (/var/run is a link to /run on most systems: the message says it judged the resolved path)
    assert re.match(
        rf"spec.promptsFrom.uri: {re.escape(repr(TOKEN))}( \(after .*\))? lies in the worker's own system folders",
        msg,
    )
    assert "nothing was read" in msg and "rule: " in msg
    # Not even when the job mounts a volume above it, nor when the admin allows any local path.
    above = job_spec(mounts=[{"name": "run", "mountPath": "/var/run"}])
    assert "system folders" in refusal(TOKEN, above)
    assert "system folders" in refusal(TOKEN, policy=AccessPolicy(local_paths="any"))
    for path in (
        "/proc/self/environ",
        "/proc/1/root/etc/passwd",
        "/sys/kernel/x",
        "/dev/mem",
        "/run/secrets/x",
    ):
        assert "system folders" in refusal(path, policy=AccessPolicy(local_paths="any")), path


def test_a_path_outside_the_jobs_volumes_is_refused_naming_the_rule() -> None:
    msg = refusal("/etc/passwd")
    assert msg == (
        "spec.promptsFrom.uri: '/etc/passwd' is not inside any of the job's volume mounts "
        "(spec.workers.volumeMounts: /data) (rule: workers read prompt files and write images only "
        "inside the job's own volumes; the chart value worker.access.localPaths); nothing was read; "
        "mount a volume that holds it, or point the field inside one"
    )
    assert "volumeMounts: none" in refusal("/data/p.txt", job_spec(mounts=[]))
    assert "relative path" in refusal("prompts.txt")
    # A mount whose path only starts like the file's is not its folder.
    assert "not inside" in refusal("/database/p.txt")


def test_dot_dot_cannot_leave_the_volume() -> None:
    msg = refusal("/data/../etc/passwd")
    assert "(after resolving '..' and symbolic links) is not inside" in msg
    assert "not inside" in refusal("/data/x/../../etc/passwd", resolve=False)  # the operator's lexical check


def test_a_symbolic_link_cannot_leave_the_volume(tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    (tmp_path / "secret.txt").write_text("not yours\n")
    (vol / "ok.txt").write_text("a cat\n")
    (vol / "out.txt").symlink_to(tmp_path / "secret.txt")
    (vol / "in.txt").symlink_to(vol / "ok.txt")
    (vol / "dir").symlink_to(tmp_path)
    spec = job_spec(mounts=[{"name": "data", "mountPath": str(vol)}], output=str(vol / "out"))
    assert check_uri("f", str(vol / "in.txt"), spec, DEFAULT).local_path == str(vol / "ok.txt")
    for path in (vol / "out.txt", vol / "dir" / "secret.txt"):
        msg = refusal(str(path), spec)
        assert "(after resolving '..' and symbolic links) is not inside any of the job's volume mounts" in msg
        assert str(tmp_path / "secret.txt") not in msg  # where the link leads is not told
    # The resolved path decides: a link into the volume from elsewhere is fine, and a volume
    # mounted at a link is judged where the link leads.
    (tmp_path / "link-to-vol").symlink_to(vol)
    linked = job_spec(mounts=[{"name": "data", "mountPath": str(tmp_path / "link-to-vol")}])
    assert check_uri("f", str(vol / "ok.txt"), linked, DEFAULT).local_path == str(vol / "ok.txt")


def test_a_mount_the_operator_adds_is_not_the_jobs() -> None:
    home = job_spec(mounts=[{"name": "home", "mountPath": "/home"}])
    assert check_uri("f", "/home/me/p.txt", home, DEFAULT).local_path == "/home/me/p.txt"
    assert "not inside" in refusal("/home/imagebatch/.cache/huggingface/token", home)
    assert "not inside" in refusal(
        "/var/cache/huggingface/x", job_spec(mounts=[{"name": "v", "mountPath": "/var"}])
    )
    # The operator adds no scratch volume where the job mounts its own: that one is the job's.
    tmp = job_spec(mounts=[{"name": "t", "mountPath": "/tmp"}])
    assert check_uri("f", "/tmp/p.txt", tmp, DEFAULT).local_path == "/tmp/p.txt"


def test_an_output_on_a_read_only_mount_is_refused() -> None:
    spec = job_spec(mounts=[{"name": "data", "mountPath": "/data", "readOnly": True}])
    with pytest.raises(AccessError, match="is on the volume mounted read-only at /data"):
        check_job(spec, DEFAULT)
    check_uri("spec.promptsFrom.uri", "/data/p.txt", spec, DEFAULT)  # reading it is fine


def test_check_job_judges_the_prompt_file_before_the_output() -> None:
    with pytest.raises(AccessError, match=r"^spec.promptsFrom.uri: "):
        check_job(job_spec(prompts=TOKEN, output="/elsewhere"), DEFAULT)
    with pytest.raises(AccessError, match=r"^spec.output.uri: '/elsewhere' is not inside"):
        check_job(job_spec(output="/elsewhere"), DEFAULT)
    check_job(job_spec(prompts=None), DEFAULT)


# -- URI schemes -----------------------------------------------------------------------------------


def test_http_is_refused_by_default_naming_the_chart_value() -> None:
    msg = refusal("http://169.254.169.254/latest/meta-data/iam/security-credentials/")
    assert msg == (
        "spec.promptsFrom.uri: the URI scheme http:// is not allowed on this cluster (rule: URI "
        "schemes are an allowlist; allowed: local paths in the job's volumes and s3://); nothing "
        "was read. A cluster admin allows more with the chart value worker.access.schemes"
    )
    assert "scheme https://" in refusal("https://example.com/p.txt")
    assert "scheme http://" in refusal("HTTP://example.com/p.txt")


@pytest.mark.parametrize(
    "uri",
    [
        "simplecache::http://10.0.0.1/p.txt",
        "zip://p.txt::http://10.0.0.1/a.zip",
        "s3://bucket/p.txt::http://10.0.0.1/x",
        "/data/p.txt::http://10.0.0.1/x",
        "filecache::s3://bucket/p.txt",
    ],
)
def test_chained_urls_are_refused(uri: str) -> None:
    everything = AccessPolicy(local_paths="any", schemes=frozenset({"*"}), http_hosts=frozenset({"*"}))
    assert "a chained URL ('::') is refused" in refusal(uri, policy=everything)


@pytest.mark.parametrize(
    ("uri", "scheme"),
    [
        ("data:text/plain;base64,YSBjYXQ=", "data"),
        ("memory://p.txt", "memory"),
        ("zip://p.txt", "zip"),
        ("github://org:repo@main/p.txt", "github"),
        ("hf://datasets/x/p.txt", "hf"),
        ("ftp://10.0.0.1/p.txt", "ftp"),
        ("sftp://10.0.0.1/p.txt", "sftp"),
        ("gs://bucket/p.txt", "gs"),
        ("local:///etc/passwd", "local"),
        ("blockcache://x", "blockcache"),
    ],
)
def test_other_fsspec_protocols_are_refused(uri: str, scheme: str) -> None:
    assert f"the URI scheme {scheme}:// is not allowed" in refusal(uri)


def test_file_uri_tricks_are_judged_as_the_path_they_name() -> None:
    assert "system folders" in refusal(f"file://{TOKEN}")
    assert "system folders" in refusal(f"FILE://{TOKEN}")
    assert "not inside" in refusal("file:///data/../etc/passwd")
    assert "file:///absolute/path" in refusal("file:/data/p.txt")
    assert "does not start with a URI scheme" in refusal(" http://x/p.txt")
    assert "control characters" in refusal("/data/p.txt\n")


def test_an_admin_may_allow_http_to_listed_hosts_only() -> None:
    policy = AccessPolicy.from_settings("volumes", ["s3", "https"], ["prompts.example.com"], [])
    check_uri("f", "https://prompts.example.com/p.txt", job_spec(), policy)
    msg = refusal("https://169.254.169.254/p.txt", policy=policy)
    assert "the host 169.254.169.254 is not an allowed http host" in msg
    assert "worker.access.httpHosts" in msg
    assert "http:// is not allowed" in refusal("http://prompts.example.com/p.txt", policy=policy)
    # A user part, a backslash or an IPv6 literal: refused, whatever host a parser would see.
    for uri in (
        "https://prompts.example.com@10.0.0.1/p",
        "https://prompts.example.com:443@10.0.0.1/p",
        "https://10.0.0.1\\@prompts.example.com/p",
        "https://[fd00:ec2:0:0:0:0:0:254]/p",
    ):
        assert "must name a plain host" in refusal(uri, policy=policy), uri
    check_uri("f", "https://prompts.example.com:443/p.txt#x@10.0.0.1", job_spec(), policy)


# -- S3 endpoints ------------------------------------------------------------------------------------


def test_an_s3_endpoint_must_be_listed() -> None:
    spec = job_spec(prompts="s3://b/p.txt", output="s3://b/out", endpointUrl="http://10.0.0.1:9000")
    with pytest.raises(AccessError) as err:
        check_job(spec, DEFAULT)
    assert str(err.value) == (
        "spec.output.endpointUrl: the S3 endpoint 'http://10.0.0.1:9000' is not allowed on this "
        "cluster (rule: S3 endpoints other than AWS's are an allowlist); nothing was read or "
        "written. A cluster admin allows endpoints with the chart value worker.access.s3Endpoints"
    )
    check_job(spec, AccessPolicy.from_settings("volumes", ["s3"], [], ["HTTP://10.0.0.1:9000/"]))
    check_job(spec, AccessPolicy.from_settings("volumes", ["s3"], [], ["*"]))
    check_job(job_spec(prompts="s3://b/p.txt", output="s3://b/out"), DEFAULT)  # AWS itself


def test_an_endpoint_from_the_credentials_secret_is_checked_but_never_quoted() -> None:
    spec = job_spec(prompts=None, output="s3://b/out", credentialsSecret={"name": "keys"})
    env = {"AWS_ENDPOINT_URL": "http://169.254.169.254/zq-secret-value"}
    with pytest.raises(AccessError) as err:
        check_job(spec, DEFAULT, environ=env)
    assert str(err.value).startswith(
        "spec.output.credentialsSecret: its AWS_ENDPOINT_URL: the S3 endpoint is not allowed"
    )
    assert "169.254" not in str(err.value) and "zq-secret" not in str(err.value)


# -- the policy travels from the chart to the worker, and the job cannot widen it -----------------


def test_the_policy_round_trips_through_the_env() -> None:
    policy = AccessPolicy.from_settings("any", ["s3", "HTTPS://"], ["a.example"], ["https://m:9000/"])
    assert AccessPolicy.from_env({ENV_VAR: policy.to_env()}) == policy
    assert policy.schemes == {"s3", "https"} and policy.s3_endpoints == {"https://m:9000"}
    # No env (a worker started by hand) or a broken one: the strictest rules.
    assert AccessPolicy.from_env({}) == DEFAULT
    assert AccessPolicy.from_env({ENV_VAR: "{not json"}) == DEFAULT
    assert AccessPolicy.from_env({ENV_VAR: '{"localPaths": "everywhere"}'}) == DEFAULT
    with pytest.raises(ValueError, match="not URI schemes: s3 x"):
        AccessPolicy.from_settings("volumes", ["s3 x"], [], [])


def test_the_worker_pod_gets_the_operators_policy_last() -> None:
    from imagebatch.operator.builders import WorkerSettings, worker_job

    # The API server (and the models) refuse this reserved name; should one get through anyway,
    # the operator's entry still comes last. model_copy(update=...) skips that validation.
    spec = job_spec()
    widen = [{"name": ENV_VAR, "value": '{"localPaths": "any", "schemes": ["*"]}'}]
    spec = spec.model_copy(update={"workers": spec.workers.model_copy(update={"env": widen})})
    job = {"metadata": {"name": "j", "namespace": "ns", "uid": "u-1"}}
    policy = AccessPolicy.from_settings("volumes", ["s3"], [], ["https://minio:9000"])
    built = worker_job(job, spec, 1, WorkerSettings(access=policy))
    env = built["spec"]["template"]["spec"]["containers"][0]["env"]
    ours = [e for e in env if e["name"] == ENV_VAR]
    # Of two entries with one name, the last counts (kubelet, and the test node agent): ours.
    assert env[-1] == {"name": ENV_VAR, "value": policy.to_env()} and len(ours) == 2
    final = {e["name"]: e.get("value") for e in env}
    assert AccessPolicy.from_env(final) == policy


def test_the_operator_flags_make_the_policy() -> None:
    from imagebatch.operator.__main__ import build_parser

    args = build_parser().parse_args([])
    assert (
        args.worker_local_paths,
        args.worker_uri_schemes,
        args.worker_http_hosts,
        args.worker_s3_endpoints,
    ) == (
        "volumes",
        ["s3"],
        [],
        [],
    )
    args = build_parser().parse_args(["--worker-uri-schemes=", "--worker-s3-endpoints=https://a:1, *"])
    assert args.worker_uri_schemes == [] and args.worker_s3_endpoints == ["https://a:1", "*"]


def test_the_charts_defaults_are_the_strictest_policy() -> None:
    from imagebatch.operator.__main__ import build_parser
    from imagebatch_testing.cluster import build_binaries

    helm = build_binaries() / "helm"
    chart = Path(__file__).resolve().parents[2] / "charts" / "imagebatch"

    def rendered(*values: str) -> AccessPolicy:
        out = subprocess.run(
            [str(helm), "template", "r", str(chart), *values], capture_output=True, text=True, check=True
        ).stdout
        (dep,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment"]
        args = build_parser().parse_args(dep["spec"]["template"]["spec"]["containers"][0]["args"])
        return AccessPolicy.from_settings(
            args.worker_local_paths, args.worker_uri_schemes, args.worker_http_hosts, args.worker_s3_endpoints
        )

    assert rendered() == DEFAULT
    wide = rendered(
        "--set",
        "worker.access.localPaths=any",
        "--set",
        "worker.access.schemes={s3,https}",
        "--set",
        "worker.access.httpHosts={prompts.example.com}",
        "--set",
        "worker.access.s3Endpoints={https://minio.storage:9000,*}",
    )
    assert wide == AccessPolicy(
        "any",
        frozenset({"s3", "https"}),
        frozenset({"prompts.example.com"}),
        frozenset({"https://minio.storage:9000", "*"}),
    )
    bad = subprocess.run(
        [str(helm), "template", "r", str(chart), "--set", "worker.access.localPaths=all"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode != 0 and "localPaths" in bad.stderr


# -- the worker refuses before anything is opened --------------------------------------------------


class FakeKube:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.job = {"metadata": {"name": "j", "namespace": "ns", "uid": "u-1"}, "spec": spec}

    def get_job(self) -> dict[str, Any]:
        return self.job

    def read_config_map(self, name: str, key: str) -> str:
        raise AssertionError("no ConfigMap here")


@pytest.mark.parametrize(
    "uri",
    [
        "http://169.254.169.254/latest/meta-data/",
        "simplecache::http://10.0.0.1/p.txt",
        TOKEN,
        "/etc/passwd",
        "/data/../etc/passwd",
    ],
)
def test_the_worker_refuses_before_anything_is_opened(monkeypatch: pytest.MonkeyPatch, uri: str) -> None:
    import threading

    from imagebatch.worker.cluster import Worker

    opened: list[str] = []

    def no_open(*args: Any, **kwargs: Any) -> Any:
        opened.append(str(args[0]) if args else "?")
        raise AssertionError("opened")

    monkeypatch.setattr(fsspec, "open", no_open)
    monkeypatch.setattr(fsspec.core, "url_to_fs", no_open)
    monkeypatch.delenv(ENV_VAR, raising=False)
    spec = job_spec(prompts=uri).model_dump(by_alias=True, exclude_none=True)
    with pytest.raises(AccessError) as err:
        Worker(FakeKube(spec), "pod-0", threading.Event())  # type: ignore[arg-type]
    assert isinstance(err.value, ImageBatchError)  # the worker exits with its user-error code
    assert str(err.value).startswith("spec.promptsFrom.uri: ") and "nothing was read" in str(err.value)
    assert opened == []


def test_the_worker_guards_every_file_of_a_data_set_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save_to_disk folder inside the volume whose data file is a link out of it."""
    import threading

    from imagebatch.worker.cluster import Worker

    vol, outside = tmp_path / "vol", tmp_path / "outside"
    (vol / "ds").mkdir(parents=True)
    outside.mkdir()
    (outside / "data.arrow").write_bytes(b"zq-canary")
    (vol / "ds" / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data.arrow"}]}))
    (vol / "ds" / "dataset_info.json").write_text("{}")
    os.symlink(outside / "data.arrow", vol / "ds" / "data.arrow")
    spec = job_spec(
        prompts=str(vol / "ds"), output=str(vol / "out"), mounts=[{"name": "v", "mountPath": str(vol)}]
    ).model_dump(by_alias=True, exclude_none=True)
    monkeypatch.delenv(ENV_VAR, raising=False)
    worker = Worker(FakeKube(spec), "pod-0", threading.Event())  # type: ignore[arg-type]
    with pytest.raises(
        AccessError, match=r"ds/data.arrow' \(after resolving '..' and symbolic links\) is not inside"
    ):
        worker.items()


def test_validate_cluster_refuses_early_and_reads_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from imagebatch.cli import main

    monkeypatch.delenv(ENV_VAR, raising=False)

    def manifest(prompts: str) -> str:
        doc = {
            "apiVersion": "imagebatch.dev/v1alpha1",
            "kind": "ImageBatchJob",
            "metadata": {"name": "j"},
            "spec": job_spec(prompts=prompts).model_dump(by_alias=True, exclude_none=True),
        }
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(doc))
        return str(path)

    assert main(["validate", "--cluster", manifest("http://169.254.169.254/x")]) == 2
    assert "error: spec.promptsFrom.uri: the URI scheme http:// is not allowed" in capsys.readouterr().err
    assert main(["validate", "--cluster", manifest(TOKEN)]) == 2
    assert "system folders" in capsys.readouterr().err
    # In a declared volume: valid, and the file (not on this machine) is not read.
    assert main(["validate", "--cluster", manifest("/data/prompts.txt")]) == 0
    assert "valid for a cluster's workers" in capsys.readouterr().out
    # Local mode is not confined: validate without --cluster reads the file wherever it is.
    local = tmp_path / "p.txt"
    local.write_text("a cat\n")
    assert main(["validate", manifest(str(local))]) == 0
