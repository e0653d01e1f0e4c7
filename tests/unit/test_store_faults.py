"""The unit tests of tests/faults/test_store_faults.py, which holds their helpers and fixtures."""

from __future__ import annotations

from btx_core.config.execution import TransferPolicy
from btx_core.store.core import Store
from tests.faults.test_store_faults import OUTAGE_S, test_disk_full_partway_through_a_write_leaves_no_output  # noqa: F401 - tests that run here too
from tests.support.params import param_fixture

# the unit values of test_disk_full_partway_through_a_write_leaves_no_output's parameter
kind = param_fixture("kind", "local")


def test_s3_stores_retry_through_botocore_in_adaptive_mode():
    # Building the client makes no request: this checks the configuration botocore really got.
    store = Store("s3://btx-retry-config/run", storage_options={"skip_instance_cache": True})
    store.fs.connect()
    assert store.fs.s3.meta.config.retries == {"mode": "adaptive", "total_max_attempts": Store.transfer.attempts}
    few = Store("s3://btx-retry-config/run", transfer=TransferPolicy(attempts=2))
    assert few.fs.config_kwargs["retries"]["total_max_attempts"] == 2 and few.transfer.attempts == 2
    own = {"config_kwargs": {"retries": {"mode": "standard", "max_attempts": 4}}}
    assert Store("s3://btx-retry-config/run", storage_options=own).fs.config_kwargs == {
        **own["config_kwargs"],  # the caller's retries kept; the store's checksum settings added
        "request_checksum_calculation": "when_supported", "response_checksum_validation": "when_required"}
    assert store.fs.s3.meta.config.response_checksum_validation == "when_required"


def test_default_retries_outlast_the_outage():
    # botocore waits rand(0, 1) * min(2^i, 20) s before retry i. Even with every wait at its
    # lower quartile, the default tries wait longer than the outage in all...
    from botocore.retries.quota import RetryQuota
    from botocore.retries.standard import ExponentialBackoff, RetryQuotaChecker

    class Attempt:
        def __init__(self, n):
            self.attempt_number, self.request_context, self.caught_exception = n, {}, None
            self.http_response = self.parsed_response = None

        def get_error_code(self):
            return None

    policy, low = TransferPolicy(), ExponentialBackoff(random=lambda: 0.25)
    waits = [low.delay_amount(Attempt(n)) for n in range(1, policy.attempts)]
    assert sum(waits) > 2 * OUTAGE_S
    # ...and the client's retry quota lets every file of a batch use all of its tries.
    spent = policy.files_at_once * (policy.attempts - 1) * RetryQuotaChecker._RETRY_COST
    assert spent <= RetryQuota.INITIAL_CAPACITY

