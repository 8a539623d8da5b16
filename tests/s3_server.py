"""A local S3 server for tests and benchmarks: moto's S3 implementation, served over HTTP.

    with LocalS3() as s3:
        s3.create_bucket("mem")
        s3.storage_options   # what memory.storage_options needs to reach it

It is moto (``moto[server]``), a Python implementation of the S3 REST API, not AWS; it
honours conditional puts (``If-None-Match: *``), which Lance commits rely on.
"""
from __future__ import annotations

from typing import Any

ACCESS_KEY = "a4ps-test"
SECRET_KEY = "a4ps-test-secret"
REGION = "us-east-1"


class LocalS3:
    def __init__(self) -> None:
        self._server: Any = None
        self.endpoint: str | None = None

    def start(self) -> "LocalS3":
        from moto.server import ThreadedMotoServer
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self) -> Any:
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    @property
    def storage_options(self) -> dict[str, str]:
        return {"aws_endpoint": str(self.endpoint), "aws_region": REGION,
                "aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY,
                "allow_http": "true"}

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
