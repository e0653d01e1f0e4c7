"""Create the store's bucket if it does not exist: the deploy manual's bucket step, for any
S3-compatible server (endpoint and credentials from the environment, as for every store access).

    .venv/bin/python -m btx_core.store.bucket s3://btx
"""

from __future__ import annotations

import sys

from btx_core.errors import StoreError


def ensure_bucket(uri: str) -> str:
    """Make the bucket of `uri` (`s3://bucket[/prefix]`) unless it exists; returns what it did."""
    import fsspec

    if not uri.startswith("s3://"):
        raise StoreError(f"{uri} is not an s3:// location: a local store needs no bucket")
    bucket = uri.removeprefix("s3://").split("/", 1)[0]
    if not 3 <= len(bucket) <= 63:
        raise StoreError(f"bucket name {bucket!r} must have 3-63 characters")
    fs = fsspec.filesystem("s3")
    try:
        if fs.exists(bucket):
            return f"bucket {bucket}: exists"
        fs.mkdir(bucket)
    except (OSError, ValueError) as exc:
        raise StoreError(f"could not create bucket {bucket}: {exc} (check AWS_ENDPOINT_URL_S3 and the "
                         "credentials in the environment)") from None
    fs.invalidate_cache()
    return f"bucket {bucket}: created"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    try:
        print(ensure_bucket(sys.argv[1]))
    except StoreError as exc:
        sys.exit(f"error: {exc}")
