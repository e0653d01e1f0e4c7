"""How a run is carried out, never what it computes: Prefect orchestration, the store's transfers
and its writer leases.

Nothing here enters a stage's config hash: a run can change mode, pools, retries or transfer
settings and keep its outputs.
"""

from __future__ import annotations

import random
import re
from typing import Literal

from pydantic import Field, field_validator

from btx_core.config import checks
from btx_core.config.base import StrictModel

POOL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"  # a Prefect work pool (and deployment) name


class Orchestration(StrictModel):
    """How Prefect runs the pipeline (`flows/`). Nothing here changes what is computed, so none
    of it enters a stage's config hash: a run can move between modes and keep its outputs."""

    expert_runner: Literal["local", "deployments"] = "local"
    """`local`: expert branches run as concurrent tasks in the pipeline flow's process (embedded
    mode, `btx run`). `deployments`: each branch is a run of the `train-expert/<pool>` deployment
    on its own work pool, launched with `run_deployment`; the pipeline waits on the store."""
    expert_pool: str = Field(default="btx-experts", pattern=POOL_PATTERN)
    """Default work pool of the expert branches (`deployments` mode); the branch runs the
    deployment `train-expert/<pool>`."""
    domain_pools: dict[str, str] = Field(default_factory=dict)
    """Per-domain work pool overrides (domain name -> pool), e.g. one pool per hardware class."""
    # The other heavy stages: each `<stage>_pool` names the work pool whose `btx-stage/<pool>`
    # deployment runs that stage; null runs it in the pipeline flow's own process (embedded mode).
    # On a cluster set them all, so that the control pool only orchestrates.
    seed_pool: str | None = Field(default=None, pattern=POOL_PATTERN)
    """Work pool of the seed stage (import, or create and pretrain: a GPU pool)."""
    mix_pool: str | None = Field(default=None, pattern=POOL_PATTERN)
    """Work pool of the MiX stage (streams a layer at a time: memory and disk close to the store)."""
    finetune_pool: str | None = Field(default=None, pattern=POOL_PATTERN)
    """Work pool of the MoE-finetune stage (the whole MoE trains at once: the most GPU memory)."""
    evaluate_pool: str | None = Field(default=None, pattern=POOL_PATTERN)
    """Work pool of the evaluation stage (every model's forward passes: a GPU pool)."""
    retries: int = Field(default=3, ge=0)
    """Retries of a failed expert branch; each retry resumes from the branch's newest checkpoint.
    In `deployments` mode the pipeline also reschedules a crashed branch run (its process or
    node lost, so nothing inside it could retry) in place, up to this many times, with the same
    backoff."""
    retry_delay_s: float = Field(default=10.0, ge=0)
    """Exponential backoff base: retry r waits retry_delay_s x 2^r seconds, +-50 % jitter."""
    start_timeout_s: float | None = Field(default=1200.0, gt=0)
    """Deployment runs (branches, and stages on a pool): seconds a child flow run may
    stay Scheduled, Late or Pending (no worker polls its pool, an unschedulable GPU pod, an image
    that cannot be pulled) before the parent cancels it and fails with the reason; null waits
    forever. Counted again each time the parent reschedules a crashed child."""
    queue_timeout_s: float | None = Field(default=86400.0, gt=0)
    """The absolute cap on a child's wait to start, its start deadline included: time its work
    pool spends at its concurrency limit with other runs (the child is queued, not stuck) does
    not count against `start_timeout_s`, but counts against this; null waits while queued."""
    api_outage_s: float = Field(default=900.0, gt=0)
    """Seconds the pipeline rides out a Prefect API outage (a restarted server or database) while
    it waits on children or holds its run name's slot, retrying with backoff, before failing.
    The children train on meanwhile."""
    stall_timeout_s: float | None = Field(default=1800.0, gt=0)
    """A child that reports training steps (its progress artifact) but reports no new one for
    this long (a hung collective, a dead data loader) is cancelled, so its infrastructure is torn
    down, and rescheduled in place like a crashed one; null: never. Counted from its first step."""
    run_slot_lease_s: float = Field(default=120.0, ge=60)
    """The lease on the run name's slot (`on_overlap`), renewed every quarter of it: a run that
    dies without releasing the slot blocks the next run for at most about this long."""
    state_log_every_s: float = Field(default=60.0, gt=0)
    """While the parent waits for a child run to start, a line with its state this often."""
    on_overlap: Literal["queue", "cancel"] = "queue"
    """A pipeline run whose `run_name` is already running (an overrunning nightly, a second
    click): `queue` waits for the first to end (a Prefect global concurrency limit of 1 named
    `btx-run-<run_name>`), `cancel` ends the second at once as Cancelled."""
    max_parallel_branches: int | None = Field(default=None, gt=0)
    """`local` mode: expert branches trained at once (default: all). Each gets its share of the
    CPU cores as torch threads (cores // branches at once), unless `expert_training.threads` is set."""

    def retry_wait_s(self, retry: int) -> float:
        """Seconds before retry `retry` (0-based): `retry_delay_s` x 2^retry, up to +50 % jitter."""
        return self.retry_delay_s * 2 ** retry * random.uniform(1.0, 1.5)

    def stage_pool(self, stage: str) -> str | None:
        """The work pool of a heavy stage (`seed`, `mix`, `finetune`, `evaluate`); None: in process."""
        return getattr(self, f"{stage}_pool")

    @field_validator("domain_pools")
    @classmethod
    def _pool_names(cls, pools: dict[str, str]) -> dict[str, str]:
        bad = sorted(p for p in pools.values() if not re.fullmatch(POOL_PATTERN, p))
        if bad:
            raise ValueError(f"work pool name(s) {', '.join(map(repr, bad))} are not valid: use letters, "
                             "digits, '-', '_' and '.' (the pool names a deployment, `train-expert/<pool>`)")
        return pools


class TransferPolicy(StrictModel):
    """How the store moves files to and from S3: the config's `store_transfer:`, and
    `Store.transfer` (btx_core/store/transfer.py). Only speed and patience change with it,
    never what is stored. BENCHMARKS.md "S3 transfer" measured the defaults."""

    files_at_once: int = Field(default=4, gt=0)
    """Files transferred concurrently (s3fs's `batch_size`; a local store copies one at a time)."""
    connections: int = Field(default=8, gt=0)
    """Requests in flight in all for files of two parts or more: the files in flight share them
    (s3fs's `max_concurrency` per file), so one large file gets all 8 for its parts, four get 2 each."""
    part_size_mib: int = Field(default=32, ge=5)
    """MiB per multipart-upload part and per ranged read (S3's minimum part is 5). A file
    under two parts goes in one request (and comes down as one stream): splitting it adds
    requests for little gain (BENCHMARKS.md, "S3 transfer"). s3fs buffers whole parts (and
    whole one-request uploads), so memory held is up to
    max(connections, 2 x files_at_once) parts: 256 MiB with the defaults."""
    attempts: int = Field(default=20, gt=0)
    """Tries of each request (botocore's `total_max_attempts`, adaptive retry mode) before a
    transient error (refused or dropped connection, timeout, 5xx, SlowDown) is final. botocore
    waits a uniformly random 0 to min(2^i, 20) s before retry i: 20 tries wait ~150 s on average
    and over 30 s with near certainty (an endpoint that restarts; tests/faults). botocore also
    stops retrying once a client's retry quota is spent: 500 units, 5 a retry (10 after a
    timeout), about 100 retries over all requests in flight, refilled by successes."""

    upload_checksums: Literal["when_supported", "when_required"] = "when_supported"
    """botocore's `request_checksum_calculation`. `when_supported` (botocore's default since 1.36)
    sends a CRC32 of every upload, which S3 checks before it stores the object, and over HTTPS
    spares the SHA-256 of the body that request signing would otherwise need. `when_required`
    sends none: for S3-compatible stores that refuse the checksum headers, or answer a ranged
    read with the whole object's CRC, which botocore's own check then rejects in every reader
    that keeps botocore's defaults (`rclone serve s3`; tests/integration/test_store_rclone.py).
    `AWS_REQUEST_CHECKSUM_CALCULATION` in the environment wins."""
    download_checksums: Literal["when_required", "when_supported"] = "when_required"
    """botocore's `response_checksum_validation`: `when_required` (btx's default) leaves the
    check of a download to the store, whose manifests hold every file's sha256 and whose every
    fetch checks it, and so reads objects whose stored CRC botocore would reject (above);
    `when_supported` adds botocore's CRC check. `AWS_RESPONSE_CHECKSUM_VALIDATION` wins."""

    prepared_data: Literal["ranged", "download"] = "ranged"
    """How training, MiX and evaluation read a prepared corpus (token shards) from an `s3://`
    store. `ranged`: each process reads only the blocks it uses, a ranged GET per run of
    consecutive blocks (`connections` in flight), the next micro-batch's while the current one
    trains; each block's CRC-32 is checked against its shard's `.crc32` file (fetched once, its
    sha256 checked against the manifest, kept in `cache_dir`: 4 bytes a block). Training starts at
    once and the corpus takes no local disk. `download`: the whole corpus into `cache_dir` first,
    every shard's sha256 checked, reused by later runs on that machine: for many epochs over a
    corpus that fits the local disk, or a store far from the GPUs. A local store is read in place
    either way."""

    @property
    def part_size(self) -> int:
        """`part_size_mib` in bytes."""
        return self.part_size_mib << 20


class LeasePolicy(StrictModel):
    """The writer lease every stage holds on its prefix in the store while it writes there
    (btx_core/store/lease.py): the config's `store_lease:`."""

    cross_check = checks.lease_problems

    conditional_writes: Literal["required", "unchecked"] = "required"
    """`required`: an `s3://` store must honour conditional writes (`If-None-Match`, `If-Match`),
    which make the lease exact: a store that ignores them is refused before any work, with a
    message. `unchecked`: for S3-compatible servers without them (`rclone serve s3`, older
    servers): the lease still refuses a second run that starts while the first one holds it, but
    two runs starting the same stage within milliseconds of each other could both write it.
    Choose it only where one run at a time writes each run name. Local stores ignore it."""
    ttl_s: float = Field(default=120.0, ge=5)
    """Seconds a lease lives without renewal, by the store's clock: a crashed writer's lease is
    taken over this long after its last renewal, and a holder that could not renew it for this
    long stops writing."""
    renew_s: float = Field(default=30.0, gt=0)
    """Seconds between renewals (at most a third of `ttl_s`); a failed one is retried sooner."""
