"""Small value helpers of the config: canonical hashing, URI schemes, byte sizes, and the
checks that keep credentials out of config files (and so out of manifests and the Prefect UI)."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

CREDENTIALS_IN_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/@\s]+@")
# Keys that would put a secret into a config file (and so into manifests and the Prefect UI).
SECRET_KEYS = {"key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
               "aws_session_token", "session_token", "access_key", "secret_key", "authorization"}


def stable_hash(data: Any) -> str:
    """sha256 of canonical JSON: the config hash recorded in manifests."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def no_credentials_in_url(value: Any) -> Any:
    if isinstance(value, str) and CREDENTIALS_IN_URL.match(value):
        raise ValueError("a URL with credentials (user:password@) must not be in a config file: "
                         "remove them and set them in the environment")
    return value


def walk_keys(value: Any):
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from walk_keys(v)


def walk_values(value: Any):
    if isinstance(value, dict):
        for v in value.values():
            yield from walk_values(v)
    else:
        yield value


def scheme(uri: str) -> str:
    """`s3`, `file`, ... or `local` for a plain path."""
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", uri)
    return match.group(1).lower() if match else "local"


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: str | int) -> int:
    """`2GB` -> 2_000_000_000 (decimal units, as transformers' max_shard_size; KiB/MiB/GiB binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).upper() not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{value!r} is not a size: write e.g. 2GB, 500MB or 1GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])
