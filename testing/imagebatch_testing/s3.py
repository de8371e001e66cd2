"""A real S3 API on 127.0.0.1 for tests: moto's server in a subprocess (not an in-process mock)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# moto accepts any credentials; botocore still wants some to sign requests.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    pid: int

    def env(self) -> dict[str, str]:
        """Variables that point boto3, s3fs and the imagebatch CLI at this server."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT_URL_S3": self.endpoint}

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, **_boto_creds()).create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, **_boto_creds())
        out: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return sorted(out)

    def get(self, bucket: str, key: str) -> bytes:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, **_boto_creds())
        body: bytes = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        return body

    def enforce_auth(self) -> dict[str, str]:
        """From now on the server checks credentials, as real S3 does: returns the only key pair
        it accepts (an IAM user allowed s3:*); others are refused with InvalidAccessKeyId or
        SignatureDoesNotMatch. For the server's whole life: create buckets first (or with the
        returned credentials)."""
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, **_boto_creds())
        iam.create_user(UserName="imagebatch")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="imagebatch", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="imagebatch")["AccessKey"]
        # moto's switch: authenticate every request after the next 0 (POST /moto-api/reset-auth).
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "application/octet-stream"},  # not a form: moto reads the raw body
        )
        urllib.request.urlopen(request, timeout=30).close()
        return {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_DEFAULT_REGION": CREDENTIALS["AWS_DEFAULT_REGION"],
        }


def _boto_creds() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def s3_server(log_path: str | None = None) -> Iterator[S3Server]:
    port = _free_port()
    log = open(log_path or os.devnull, "wb")  # noqa: SIM115 - closed below, after the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto server did not start on {endpoint} (exit {proc.poll()})"
                    ) from None
                time.sleep(0.2)
        yield S3Server(endpoint, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
