"""The few S3 requests the store makes, through boto3, with every failure turned into a store error.

Endpoint, credentials and region come from the standard places (boto3's own chain): `AWS_ENDPOINT_URL` (or
`AWS_ENDPOINT_URL_S3`), `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (/ `AWS_SESSION_TOKEN`), `AWS_REGION` (or
`AWS_DEFAULT_REGION`), `AWS_PROFILE` and the shared config and credentials files. Nothing here knows what
the objects mean; `s3.py` does.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import boto3  # the s3 extra: pip install 'bitfit-serve[s3]' (`open_store` says so when it is missing)
import botocore.loaders
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from bias_store.errors import StoreMisconfigured, StoreUnavailable

FAILURES = (BotoCoreError, ClientError)  # everything a request can fail with (connection, timeout, HTTP error)

NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
PRECONDITION_FAILED = {"PreconditionFailed", "412"}
REFUSED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "ExpiredToken", "InvalidToken"}
NO_BUCKET = {"NoSuchBucket"}


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 2.0  # a store that does not answer quickly is down: the server answers 503 at once
    read_s: float = 10.0
    attempts: int = 3  # boto3's own retries ("standard" mode, jittered backoff), first try included


def make_client(*, endpoint_url: str | None = None, region: str | None = None, profile: str | None = None,
                timeouts: Timeouts = Timeouts()):
    """A boto3 S3 client from the arguments, else the standard environment variables and files."""
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = region or os.environ.get("AWS_REGION") or None
    core = botocore.session.Session()
    core.register_component("data_loader", _loader())  # parsed API models shared: a client in ~70 ms, not ~500
    try:
        session = boto3.session.Session(botocore_session=core, profile_name=profile, region_name=region)
    except BotoCoreError as e:  # ProfileNotFound and friends
        raise StoreMisconfigured(f"cannot set up S3 credentials: {e}") from None
    config = Config(
        connect_timeout=timeouts.connect_s, read_timeout=timeouts.read_s,
        retries={"max_attempts": timeouts.attempts, "mode": "standard"},
        # path-style URLs on a custom endpoint (SeaweedFS, MinIO, Ceph): no DNS name per bucket needed
        s3={"addressing_style": "path"} if endpoint_url else {},
    )
    try:
        return session.client("s3", endpoint_url=endpoint_url, config=config)
    except (BotoCoreError, ValueError) as e:  # ValueError: an endpoint that is not a URL
        raise StoreMisconfigured(f"cannot make an S3 client for endpoint {endpoint_url or '(AWS default)'}: {e}; "
                                 "check AWS_ENDPOINT_URL and AWS_REGION") from None


@functools.lru_cache(maxsize=1)
def _loader():
    return botocore.loaders.create_loader()


class Objects:
    """Objects under one bucket and key prefix; keys given to the methods are relative to the prefix."""

    def __init__(self, client, bucket: str, prefix: str):
        self.client, self.bucket = client, bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint = client.meta.endpoint_url
        self.where = f"s3://{bucket}/{self.prefix.rstrip('/')}".rstrip("/") + f" at {self.endpoint}"

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()
        except FAILURES as e:
            if _code(e) in NOT_FOUND:
                return None
            raise self.error(e, f"reading {key}") from None

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Write an object; with `if_absent` only when none exists yet (If-None-Match: *): False if one did."""
        extra = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data, **extra)
            return True
        except FAILURES as e:
            if if_absent and _code(e) in PRECONDITION_FAILED | {"ConditionalRequestConflict", "409"}:
                return False  # 409: AWS's answer while a concurrent conditional write to the key is in flight
            raise self.error(e, f"writing {key}") from None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)
        except FAILURES as e:
            if _code(e) not in NOT_FOUND:
                raise self.error(e, f"deleting {key}") from None

    def list(self, under: str, start_after: str | None = None) -> list[tuple[str, float]]:
        """(key, last-modified epoch seconds) of every object whose key starts with `under`, in key order,
        after `start_after` if given."""
        out, kw = [], {"Bucket": self.bucket, "Prefix": self.prefix + under}
        if start_after:
            kw["StartAfter"] = self.prefix + start_after
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**kw):
                out += [(o["Key"][len(self.prefix):], o["LastModified"].timestamp()) for o in page.get("Contents", ())]
        except FAILURES as e:
            raise self.error(e, f"listing {under}") from None
        return out

    def first(self, under: str, start_after: str | None = None, n: int = 1000) -> list[str]:
        """The first `n` keys under `under` (after `start_after`), one request."""
        kw = {"Bucket": self.bucket, "Prefix": self.prefix + under, "MaxKeys": n}
        if start_after:
            kw["StartAfter"] = self.prefix + start_after
        try:
            page = self.client.list_objects_v2(**kw)
        except FAILURES as e:
            raise self.error(e, f"listing {under}") from None
        return [o["Key"][len(self.prefix):] for o in page.get("Contents", ())]

    def check_bucket(self) -> None:
        """Raise StoreMisconfigured / StoreUnavailable, naming endpoint and bucket, unless the bucket answers."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except FAILURES as e:
            code = _code(e)
            if code in NOT_FOUND | NO_BUCKET:
                raise StoreMisconfigured(f"bucket {self.bucket!r} does not exist at the S3 endpoint {self.endpoint}; "
                                         "create it, or correct the store location or AWS_ENDPOINT_URL") from None
            if code in REFUSED or _no_credentials(e):
                raise StoreMisconfigured(f"the S3 endpoint {self.endpoint} refused access to bucket {self.bucket!r} "
                                         f"({_why(e)}); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                                         "(or AWS_PROFILE)") from None
            raise self.error(e, "opening the store") from None

    def error(self, e: Exception, doing: str) -> StoreUnavailable:
        """The store error for a failed request: the store is unavailable, and the message says why."""
        code = _code(e)
        if code in REFUSED or _no_credentials(e):
            why = f"the endpoint refused the credentials ({_why(e)}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        elif code in NO_BUCKET:
            why = f"bucket {self.bucket!r} does not exist (any more)"
        elif code is None:
            why = f"the endpoint did not answer ({_why(e)})"
        else:
            why = f"the endpoint answered {_why(e)}"
        err = StoreUnavailable(f"the store {self.where} is unavailable while {doing}: {why}")
        err.code = code  # the S3 error code (None: no answer), for callers that tell causes apart
        return err


def _code(e: Exception) -> str | None:
    response = getattr(e, "response", None)
    if not isinstance(response, dict):
        return None
    code = response.get("Error", {}).get("Code")
    return str(code) if code is not None else str(response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def _why(e: Exception) -> str:
    code = _code(e)
    text = str(e).split(": ", 1)[-1] if code else str(e)
    return f"{code}: {text}" if code else f"{type(e).__name__}: {text}"


def _no_credentials(e: Exception) -> bool:
    return type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")
