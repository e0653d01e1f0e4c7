"""Calls to the Prefect API that outlast an outage: a restarted server or database, a rolled
server pod, a load balancer that drops connections for a minute.

Prefect's client already retries a request a few times (about a minute in all with its defaults);
a parent flow run that waits hours on its children must not fail because the server was away for
five minutes while the children trained on. `patiently` retries what a running server would not
answer with (no connection, a timeout, 5xx, 429) with exponential backoff up to `give_up_s`, logs
each failure, and raises the last error after that. A 4xx other than 429 is an answer, not an
outage: it is raised at once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)
FIRST_WAIT_S, MAX_WAIT_S = 1.0, 30.0


def is_outage(exc: BaseException) -> bool:
    """Whether `exc` says the API is away (worth waiting for), not that it refused the request."""
    import httpx

    from prefect.exceptions import PrefectHTTPStatusError

    if isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, (httpx.HTTPStatusError, PrefectHTTPStatusError)):
        status = exc.response.status_code
        return status >= 500 or status == 429
    return False


def patiently(call: Callable[[], T], what: str, give_up_s: float, *, logger: logging.Logger | None = None,
              sleep: Callable[[float], None] | None = None) -> T:
    """`call()`, retried through an API outage of up to `give_up_s` seconds (see the module)."""
    logger = logger or log
    started, attempt = time.monotonic(), 0
    while True:
        try:
            return call()
        except Exception as exc:
            waited = time.monotonic() - started
            if not is_outage(exc) or waited >= give_up_s:
                raise
            wait_s = min(MAX_WAIT_S, FIRST_WAIT_S * 2 ** attempt) * random.uniform(0.8, 1.2)
            wait_s = min(wait_s, max(0.0, give_up_s - waited))
            logger.warning("%s: the Prefect API is unreachable (%s: %s); trying again in %.0f s "
                           "(%.0f s of orchestration.api_outage_s = %g s used)", what, type(exc).__name__,
                           exc, wait_s, waited, give_up_s)
            attempt += 1
            (sleep or time.sleep)(wait_s)
