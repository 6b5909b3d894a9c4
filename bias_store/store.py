"""The store's one API: `open_store(location, spec)` for a directory or `s3://BUCKET/PREFIX`, and the types.

    store = open_store("bias_sets", spec)                  # a directory: `BiasStore` (the embedded default)
    store = open_store("s3://team-bucket/bitfit", spec)    # S3-compatible object storage: `S3Store`

Both are a `Store` (`base.py`) with the same guarantees; see docs/store.md.
"""

from __future__ import annotations

import re
from pathlib import Path

from bitfit.spec import ServingSpec
from bias_store.backends.local import BiasStore
from bias_store.base import DEFAULT_MAX_BYTES, Store
from bias_store.errors import StoreMisconfigured
from bias_store.state import HISTORY_LIMIT, TaskInfo, VersionInfo, version_id

__all__ = ["BiasStore", "DEFAULT_MAX_BYTES", "HISTORY_LIMIT", "Store", "TaskInfo", "VersionInfo", "open_store",
           "parse_location", "version_id"]

SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(//)?(.*)", re.S)
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
SUPPORTED = "a directory path, file:///PATH, or s3://BUCKET/PREFIX"


def parse_location(location: str | Path) -> tuple[str, str, str]:
    """("dir", path, "") or ("s3", bucket, prefix); StoreMisconfigured for anything else."""
    if isinstance(location, Path):  # parsed as text too: Path("s3://b/p") is "s3:/b/p", which must not be a directory
        location = str(location)
    if not isinstance(location, str) or not location.strip():
        raise StoreMisconfigured(f"store location {location!r} is empty; give {SUPPORTED}")
    m = SCHEME_RE.fullmatch(location)
    if m is None or len(m.group(1)) == 1:  # a one-letter "scheme" is a Windows drive (C:\\...)
        return "dir", location, ""
    scheme, rest = m.group(1).lower(), m.group(3)
    if m.group(2) is None:  # "name:rest" is an ordinary file name, unless it is a URL missing its //
        if scheme in ("s3", "file"):
            raise StoreMisconfigured(f"store location {location!r} looks like a URL without '//'; "
                                     f"give {SUPPORTED}")
        return "dir", location, ""
    if scheme == "file":
        if not rest.startswith("/"):
            raise StoreMisconfigured(f"store location {location!r}: a file:// location takes an absolute path "
                                     "(file:///srv/bias_sets)")
        return "dir", rest, ""
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        if not BUCKET_RE.fullmatch(bucket) or ".." in bucket:
            raise StoreMisconfigured(f"store location {location!r}: {bucket!r} is not an S3 bucket name (3-63 "
                                     "lower-case letters, digits, '.' and '-'); write s3://BUCKET/PREFIX")
        return "s3", bucket, prefix.strip("/")
    raise StoreMisconfigured(f"store location {location!r} has the scheme {m.group(1)!r}, which the store does not "
                             f"support; give {SUPPORTED}")


def open_store(location: str | Path, spec: ServingSpec | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES,
               **options) -> Store:
    """The store at `location`: a directory (created if missing) or s3://BUCKET/PREFIX (the bucket must
    exist; endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_REGION or AWS_PROFILE). `options` go to the backend (`BiasStore` or `S3Store`).

    Raises StoreMisconfigured (bad location, missing bucket, refused credentials, a server without
    conditional writes) or StoreUnavailable (the endpoint does not answer), each naming endpoint and bucket.
    """
    kind, where, prefix = parse_location(location)
    if kind == "dir":
        return BiasStore(where, spec, max_bytes=max_bytes, **options)
    try:
        from bias_store.backends.s3 import S3Store
    except ImportError as e:
        raise StoreMisconfigured(f"store location {location!r} needs boto3 ({e}): "
                                 "pip install 'bitfit-serve[s3]'") from None
    return S3Store(where, prefix, spec, max_bytes=max_bytes, **options)
