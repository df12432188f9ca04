"""Artifacts in S3-compatible object storage (AWS S3, MinIO, Ceph, GCS's S3 API, ...).

Objects are named ``<prefix>/models/<name>/<version>/<sha256>.onnx`` in the bucket of
``SCOREMESH_ARTIFACT_STORE=s3://<bucket>/<prefix>``; the endpoint, region and credentials
come from settings (``SCOREMESH_S3_*``), else from boto3's own chain (environment, shared
files, an instance or pod role). An object is written once: if its name exists already it
must hold the same bytes, and nothing here ever deletes one (keep versioning and lifecycle
rules on the bucket side). The caller verifies the sha256 of every object it reads.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from services.common.artifacts import ArtifactError, ArtifactRef, sha256_of
from services.common.settings import Settings

MISSING = ("NoSuchKey", "404", "NotFound")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if parsed.scheme != "s3" or not bucket:
        raise ArtifactError(f"{uri!r} is not s3://<bucket>/<key>")
    return bucket, key


@functools.lru_cache(maxsize=8)
def _client(
    endpoint_url: str | None,
    region: str | None,
    access_key_id: str | None,
    secret_access_key: str | None,
    path_style: bool,
) -> Any:
    import boto3  # type: ignore[import-untyped]
    from botocore.config import Config  # type: ignore[import-untyped]

    config = Config(
        connect_timeout=5,
        read_timeout=60,
        retries={"max_attempts": 3, "mode": "standard"},
        s3={"addressing_style": "path" if path_style else "auto"},
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=config,
    )


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


@dataclass(frozen=True)
class S3Store:
    """An S3 client configured from settings; buckets come from the URIs it is given."""

    client: Any

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Store:
        s3 = settings.s3
        secret = s3.secret_access_key
        client = _client(
            s3.endpoint_url,
            s3.region,
            s3.access_key_id,
            secret.get_secret_value() if secret is not None else None,
            s3.path_style,
        )
        return cls(client)

    async def put(self, target: str, data: bytes, model: str, version: str) -> ArtifactRef:
        """Store under ``target`` (``s3://<bucket>/<prefix>``), named by model, version and
        sha256."""
        bucket, prefix = parse_s3_uri(target + "/")
        digest = sha256_of(data)
        name = f"models/{model}/{version}/{digest}.onnx"
        key = f"{prefix.strip('/')}/{name}" if prefix.strip("/") else name
        uri = f"s3://{bucket}/{key}"
        await asyncio.to_thread(self._put, bucket, key, uri, data, digest)
        return ArtifactRef(uri=uri, sha256=digest, size=len(data))

    def _put(self, bucket: str, key: str, uri: str, data: bytes, digest: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) not in MISSING:
                raise ArtifactError(f"cannot check {uri}: {_error_code(exc) or exc}") from None
            head = None
        except BotoCoreError as exc:
            raise ArtifactError(f"cannot reach the artifact store for {uri}: {exc}") from None
        if head is not None:
            if int(head.get("ContentLength", -1)) == len(data):
                return  # written before (the name carries the sha256; loads verify it)
            raise ArtifactError(
                f"{uri} exists with {head.get('ContentLength')} bytes, not {len(data)}; "
                "scoremesh never overwrites an artifact: investigate the bucket"
            )
        try:
            self.client.put_object(
                Bucket=bucket,
                Key=key,
                Body=data,
                ContentType="application/octet-stream",
                Metadata={"sha256": digest},
            )
        except ClientError as exc:
            raise ArtifactError(f"cannot write {uri}: {_error_code(exc) or exc}") from None
        except BotoCoreError as exc:
            raise ArtifactError(f"cannot reach the artifact store for {uri}: {exc}") from None

    async def get(self, uri: str) -> bytes:
        return await asyncio.to_thread(self._get, uri)

    def _get(self, uri: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = parse_s3_uri(uri)
        try:
            response = self.client.get_object(Bucket=bucket, Key=key)
            return bytes(response["Body"].read())
        except ClientError as exc:
            code = _error_code(exc)
            if code in MISSING or code == "NoSuchBucket":
                raise ArtifactError(f"artifact {uri} is missing from the store ({code})") from None
            raise ArtifactError(f"cannot read {uri}: {code or exc}") from None
        except BotoCoreError as exc:
            raise ArtifactError(f"cannot reach the artifact store for {uri}: {exc}") from None
