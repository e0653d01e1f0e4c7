"""Pytest plugin: btx deployed for real on 127.0.0.1 — PostgreSQL, a Prefect server on it, an S3
server (moto) as the store, the work pools of `infra/work-pools.sh`, the deployments of
`infra/prefect.yaml`, and one process worker per pool.

Enable with `pytest_plugins = ["tests.prefect_harness"]` in tests/conftest.py. Everything starts
on first use, once per session, and every process is stopped by the fixture that started it, by
PID: its whole process group, and the processes below it in sessions of their own (Prefect 3.9
starts each flow run of a process worker in a new session). Needs the Debian
package `postgresql` (`make system-deps` installs it). Under root, PostgreSQL runs as the
`postgres` user, since it refuses to run as root.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from flows.pod import descendants  # noqa: F401 - the tests' own use too
from tests.support import faults

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = "infra/prefect.yaml"
# The pools of infra/work-pools.sh that the tests serve with a worker each: the pipeline's, and
# two expert pools so that each branch of a two-domain pipeline runs on its own.
CONTROL_POOL = "btx-control"
EXPERT_POOLS = ("btx-experts", "btx-experts-2")
S3_BUCKET = "btx-cluster-store"
# Fake credentials, unique per session and recognisable, so that a test can search every log,
# artifact and stored file for them (tests/faults/test_credentials.py). moto accepts any key, and
# a Prefect server without PREFECT_SERVER_API_AUTH_STRING ignores the API key its clients send.
S3_KEY_ID = f"BTXKEY{secrets.token_hex(7).upper()}"
S3_SECRET = f"btx-secret-{secrets.token_hex(16)}"
PREFECT_API_KEY = f"btx-prefect-key-{secrets.token_hex(16)}"
START_TIMEOUT_S = 120.0
# Variables of the calling shell that would point a child process somewhere else.
_INHERITED_NOISE = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "PREFECT_PROFILE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5,
             alive: Callable[[], str | None] | None = None) -> Any:
    """Poll until `predicate()` is truthy; `alive()` returns a reason to give up early."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        reason = alive() if alive else None
        if reason:
            raise RuntimeError(f"gave up waiting for {what}: {reason}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _alive(pid: int) -> bool:
    from btx_core.store.lease import pid_alive

    if not pid_alive(pid):
        return False
    try:  # a zombie child counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_groups(procs: dict[str, subprocess.Popen], grace_s: float = 10.0) -> None:
    """Stop processes started with `start_new_session=True`, and everything in their groups, all
    at once: SIGTERM, a second SIGTERM (an idle Prefect worker ignores the first), then SIGKILL.
    Processes below them in sessions of their own (a worker's flow runs) are killed last: a
    worker killed under a flow run leaves it running until its next write to the worker's pipe."""
    below = [pid for p in procs.values() if p.poll() is None for pid in descendants(p.pid)]
    for sig, wait_s in ((signal.SIGTERM, grace_s / 2), (signal.SIGTERM, grace_s / 2),
                        (signal.SIGKILL, 5.0)):
        alive = [p for p in procs.values() if p.poll() is None]
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)  # started as a group leader: pgid == pid
        deadline = time.monotonic() + wait_s
        for proc in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    survivors = [name for name, p in procs.items() if p.poll() is None]
    if survivors:
        raise RuntimeError(f"{', '.join(survivors)} survived SIGKILL")
    for proc in procs.values():
        # Children that outlived their leader (a flow run mid-step) are still in the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    for pid in below:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    log: Path

    def died(self) -> str | None:
        if self.proc.poll() is None:
            return None
        return f"{self.name} exited with {self.proc.returncode}; its log ends:\n{_tail(self.log)}"


def _spawn(name: str, argv: list[str], env: dict[str, str], log_dir: Path,
           cwd: Path = REPO) -> Service:
    log = log_dir / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return Service(name, proc, log)


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def _pg_bindir() -> Path:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if not candidates:
        raise RuntimeError("PostgreSQL is not installed (no initdb): run `make system-deps`, "
                           "or `apt-get install postgresql`")
    return Path(candidates[-1]).parent


class Postgres:
    """A throw-away PostgreSQL cluster on 127.0.0.1 with one database, password-protected."""

    user = "btx"
    database = "prefect"

    def __init__(self) -> None:
        self.bindir = _pg_bindir()
        self.port = free_port()
        self.password = secrets.token_hex(16)
        # Not under pytest's tmp dir: that is private to root, and postgres must traverse it.
        self.root = Path(tempfile.mkdtemp(prefix="btx-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.pid: int | None = None
        self._run_as: list[str] = []
        if os.geteuid() == 0:  # postgres refuses to run as root
            self._run_as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *argv: str, env: dict[str, str] | None = None) -> None:
        result = subprocess.run([*self._run_as, *argv], capture_output=True, text=True,
                                env=env, timeout=120, cwd=self.root)
        if result.returncode:
            raise RuntimeError(f"{Path(argv[0]).name} failed ({result.returncode}):\n"
                               f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")

    def start(self, initialise: bool = True) -> None:
        if initialise:
            self._initdb()
        # A test database: durability off, loopback only, its socket in its own directory.
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   "-c max_connections=200")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                  "-o", options, "-w", "-t", "60", "start")
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        if initialise:
            env = {**os.environ, "PGPASSWORD": self.password}
            subprocess.run([str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                            "-U", self.user, self.database], env=env, check=True, timeout=60,
                           capture_output=True)

    def _initdb(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if self._run_as:
            shutil.chown(pwfile, "postgres", "postgres")
        try:
            self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user,
                      f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8", "--no-sync")
        finally:
            pwfile.unlink()

    @property
    def url(self) -> str:
        """SQLAlchemy URL for Prefect (holds the password: never log it)."""
        return (f"postgresql+asyncpg://{self.user}:{self.password}@127.0.0.1:{self.port}/"
                f"{self.database}")

    def stop(self, keep_data: bool = False) -> None:
        if self.pid is not None:
            # SIGINT is PostgreSQL's "fast" shutdown; SIGQUIT its immediate one.
            for sig, wait_s in ((signal.SIGINT, 20.0), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
                if not _alive(self.pid):
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, sig)
                with contextlib.suppress(TimeoutError):
                    wait_for(lambda: not _alive(self.pid), wait_s, "postgres to stop", 0.2)
            self.pid = None
        if not keep_data:
            shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The cluster


@dataclass
class Cluster:
    """A Prefect server on PostgreSQL with an S3 store, all on 127.0.0.1, plus helpers to drive it."""

    root: Path
    api_url: str
    s3_endpoint: str
    services: dict[str, Service] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds each phase of the set-up took (shown by the pipeline test)."""
    credentials: dict[str, str] = field(default_factory=dict)
    """Every credential the cluster's processes hold, by name: none may show in a log, artifact
    or stored file."""
    postgres: Postgres | None = None

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of every child process: this server, this store, no telemetry."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PREFECT_") and k not in _INHERITED_NOISE}
        env.update({
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": str(self.root / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_WORKER_PREFETCH_SECONDS": "2",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": S3_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "PREFECT_API_KEY": PREFECT_API_KEY,
            # the pull step of infra/prefect.yaml runs flows from this checkout
            "BTX_CODE_DIR": str(REPO),
            "TMPDIR": str(self.root / "tmp"),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(extra)
        return env

    def prefect(self, *args: str, timeout: float = 180, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess:
        """Run the `prefect` CLI against this server, from the repository root; raise on failure."""
        result = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO,
                                env=env or self.env(), capture_output=True, text=True,
                                timeout=timeout)
        if result.returncode:
            raise RuntimeError(f"`prefect {' '.join(args)}` failed ({result.returncode}):\n"
                               f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def client(self):
        """A synchronous Prefect API client bound to this server (use as a context manager)."""
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)

    def start_worker(self, pool: str, **extra_env: str) -> Service:
        """A process worker for `pool`, in its own process group (its flow runs join it)."""
        name = f"worker-{pool}"
        svc = _spawn(name, [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool,
                            "--type", "process", "--name", name],
                     self.env(**extra_env), self.logs)
        self.services[name] = svc
        return svc

    def wait_workers_online(self, pools: list[str], timeout: float = START_TIMEOUT_S) -> None:
        def online() -> bool:
            with self.client() as c:
                for pool in pools:
                    if not any(w.status == "ONLINE" for w in c.read_workers_for_work_pool(pool)):
                        return False
            return True

        wait_for(online, timeout, f"workers of {', '.join(pools)} to come online", 1.0, self.death)

    def wait_flow_run(self, flow_run_id, timeout: float):
        """Wait until a flow run is final; return it."""
        def final():
            with self.client() as c:
                run = c.read_flow_run(flow_run_id)
            return run if run.state and run.state.is_final() else None

        return wait_for(final, timeout, f"flow run {flow_run_id}", 1.0, self.death)

    def restart_server(self, down_s: float = 10.0) -> float:
        """Stop `prefect server start` (as a rolled server pod is), keep it down `down_s`, start it
        again on the same port and database; returns the seconds the API was unreachable."""
        stopped = time.monotonic()
        stop_groups({"prefect-server": self.services.pop("prefect-server").proc})
        time.sleep(down_s)
        self.services["prefect-server"] = _start_prefect_server(self, self.postgres.url)
        return time.monotonic() - stopped

    def restart_postgres(self, down_s: float = 10.0) -> float:
        """Stop PostgreSQL under the running server (fast shutdown: connections cut), keep it down
        `down_s`, start it again; returns the seconds it was down."""
        stopped = time.monotonic()
        self.postgres.stop(keep_data=True)
        time.sleep(down_s)
        self.postgres.start(initialise=False)
        return time.monotonic() - stopped

    def death(self) -> str | None:
        """Why a service of the cluster is gone, if one is."""
        return next((why for s in self.services.values() if (why := s.died())), None)

    def diagnostics(self) -> str:
        """The end of every service log, for a failing assertion's message."""
        return "\n".join(f"--- {s.name} ({s.log}) ---\n{_tail(s.log, 60)}"
                         for s in self.services.values())


def _start_s3(cluster: Cluster) -> tuple[Service, str]:
    port = free_port()
    env = {k: v for k, v in cluster.env().items() if not k.startswith("AWS_")}
    svc = _spawn("moto-s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], env, cluster.logs)
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        return False

    wait_for(up, START_TIMEOUT_S, "the S3 server", 0.3, svc.died)
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY_ID,
                 aws_secret_access_key=S3_SECRET).create_bucket(Bucket=S3_BUCKET)
    return svc, endpoint


def _start_prefect_server(cluster: Cluster, db_url: str) -> Service:
    port = int(cluster.api_url.split(":")[-1].split("/")[0])
    env = cluster.env(
        PREFECT_SERVER_DATABASE_CONNECTION_URL=db_url,
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_UI_API_URL=cluster.api_url,
        # Schedule runs of new deployments within seconds, not at the next 60 s loop.
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
        PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS="2",
    )
    svc = _spawn("prefect-server", [sys.executable, "-m", "prefect", "server", "start",
                                    "--host", "127.0.0.1", "--port", str(port)], env, cluster.logs)
    import httpx

    def healthy() -> bool:
        try:
            return httpx.get(f"{cluster.api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, START_TIMEOUT_S, "the Prefect server", 0.5, svc.died)
    return svc


@pytest.fixture(scope="session")
def prefect_cluster() -> Iterator[Cluster]:
    """PostgreSQL + `prefect server start` + an S3 server, on 127.0.0.1; no pools yet."""
    root = Path(tempfile.mkdtemp(prefix="btx-cluster-"))
    for sub in ("logs", "tmp", "prefect-home"):
        (root / sub).mkdir()
    cluster = Cluster(root=root, api_url=f"http://127.0.0.1:{free_port()}/api", s3_endpoint="")
    postgres = cluster.postgres = Postgres()
    cluster.credentials.update({"AWS_SECRET_ACCESS_KEY": S3_SECRET, "PREFECT_API_KEY": PREFECT_API_KEY,
                                "the PostgreSQL password": postgres.password})
    try:
        started = time.monotonic()
        postgres.start()
        cluster.timings["postgres"] = time.monotonic() - started
        s3, cluster.s3_endpoint = _start_s3(cluster)
        cluster.services["moto-s3"] = s3
        started = time.monotonic()
        cluster.services["prefect-server"] = _start_prefect_server(cluster, postgres.url)
        cluster.timings["prefect server"] = time.monotonic() - started
        yield cluster
    finally:
        errors = []
        # What is left (workers stop with their own fixture): the servers, then the database.
        try:
            stop_groups({s.name: s.proc for s in cluster.services.values()})
        except Exception as exc:  # stop the database all the same
            errors.append(exc)
        postgres.stop()
        if os.environ.get("BTX_KEEP_CLUSTER_LOGS"):
            print(f"cluster logs kept in {root / 'logs'}")
        else:
            shutil.rmtree(root, ignore_errors=True)
        if errors:
            raise errors[0]


@dataclass
class Deployed:
    """The cluster with btx's work pools and deployments, and a worker per served pool."""

    cluster: Cluster
    fault_marker: Path
    """The fault hook's marker (tests/support/faults.py): the `btx-experts-2` worker fails a
    branch once, until it exists."""
    deployments: dict[str, Any]
    """Deployment objects by `flow/deployment` name."""

    def add_expert_pool(self, pool: str, *, limit: int | None = None, job_variables: dict | None = None) -> Any:
        """A process pool `pool` like `btx-experts` (with concurrency `limit`), and
        `train-expert/<pool>` on it (a copy of `train-expert/btx-experts`, with `job_variables`):
        for tests that kill its worker without touching the others. Returns the deployment; start
        a worker with `cluster.start_worker(pool)`."""
        from prefect.client.schemas.actions import WorkPoolCreate

        template = self.deployments[f"train-expert/{EXPERT_POOLS[0]}"]
        with self.cluster.client() as client:
            client.create_work_pool(WorkPoolCreate(
                name=pool, type="process", concurrency_limit=limit,
                base_job_template=client.read_work_pool(EXPERT_POOLS[0]).base_job_template),
                overwrite=True)
            deployment_id = client.create_deployment(
                flow_id=template.flow_id, name=pool, work_pool_name=pool,
                entrypoint=template.entrypoint, pull_steps=template.pull_steps,
                parameter_openapi_schema=template.parameter_openapi_schema,
                enforce_parameter_schema=template.enforce_parameter_schema,
                job_variables=job_variables or {}, tags=[*template.tags, "test"])
            deployment = client.read_deployment(deployment_id)
        self.deployments[f"train-expert/{pool}"] = deployment
        return deployment


@pytest.fixture(scope="session")
def btx_deployed(prefect_cluster: Cluster) -> Iterator[Deployed]:
    """`infra/work-pools.sh process`, `prefect deploy --all` from infra/prefect.yaml, a worker
    per pool (stopped here, at the end of the session)."""
    cluster = prefect_cluster
    started = time.monotonic()
    result = subprocess.run(["bash", "infra/work-pools.sh", "process"], cwd=REPO,
                            env=cluster.env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"),
                            capture_output=True, text=True, timeout=300)
    if result.returncode:
        raise RuntimeError(f"infra/work-pools.sh failed:\n{result.stdout}\n{result.stderr}")
    cluster.prefect("--no-prompt", "deploy", "--all", "--prefect-file", PREFECT_FILE, timeout=300)
    # Crashed pipeline runs rescheduled after 10 s (production: 30 s): the fault tests wait less.
    done = subprocess.run([sys.executable, "-m", "flows.automations", "--within", "300", "--settle", "20"], cwd=REPO,
                          env=cluster.env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f"python -m flows.automations failed:\n{done.stdout}\n{done.stderr}")
    cluster.timings["pools and deployments"] = time.monotonic() - started
    fault_marker = cluster.root / "fault-injected"
    workers: list[Service] = []
    try:
        started = time.monotonic()
        workers.append(cluster.start_worker(CONTROL_POOL))
        workers.append(cluster.start_worker(EXPERT_POOLS[0]))
        workers.append(cluster.start_worker(EXPERT_POOLS[1], **faults.process_env(fault_marker)))
        cluster.wait_workers_online([CONTROL_POOL, *EXPERT_POOLS])
        cluster.timings["workers online"] = time.monotonic() - started
        with cluster.client() as c:
            deployments = {f"{c.read_flow(d.flow_id).name}/{d.name}": d for d in c.read_deployments()}
        yield Deployed(cluster, fault_marker, deployments)
    finally:
        stop_groups({w.name: w.proc for w in workers})
        for worker in workers:
            cluster.services.pop(worker.name, None)


def jsonable(value: Any) -> Any:
    """Round-trip through JSON, as parameters do on their way through the API."""
    return json.loads(json.dumps(value))


# ---------------------------------------------------------------------------------------------
# One real pipeline run, shared by the tests that inspect it

PIPELINE_TIMEOUT_S = 600.0
# Each branch on its own pool; the `btx-experts-2` worker carries the fault hook.
DOMAIN_POOLS = {"math": EXPERT_POOLS[0], "code": EXPERT_POOLS[1]}
# The other heavy stages, each a `btx-stage/<pool>` run: the control pool only orchestrates.
HEAVY_STAGES = ("seed", "mix", "finetune", "evaluate")
STAGE_POOL = EXPERT_POOLS[0]


def distributed_config(cluster: Cluster) -> dict[str, Any]:
    """configs/ci.yaml on the cluster: two domains, each branch a deployment run on its own pool,
    the seed, MiX, finetune and evaluation deployment runs on an expert pool, the store in S3,
    quick retries."""
    import yaml

    from btx_core.config.schema import BTXConfig

    config = yaml.safe_load((REPO / "configs" / "ci.yaml").read_text())
    config.update(
        run_name=f"dist-{secrets.token_hex(3)}",
        store=f"s3://{S3_BUCKET}/pipelines",
        cache_dir=str(cluster.root / "cache"),
        domains=[d for d in config["domains"] if d["name"] in DOMAIN_POOLS],
        orchestration={"expert_runner": "deployments", "expert_pool": EXPERT_POOLS[0],
                       "domain_pools": DOMAIN_POOLS, "retries": 2, "retry_delay_s": 1.0,
                       **{f"{stage}_pool": STAGE_POOL for stage in HEAVY_STAGES}},
    )
    # Report problems here, not as a failed run on the server.
    return BTXConfig.model_validate(config).model_dump(mode="json")


@dataclass
class PipelineRun:
    deployed: Deployed
    config: dict[str, Any]
    flow_run: Any
    """The `btx-pipeline/btx` flow run, read after it reached a final state."""
    wall_s: float


@pytest.fixture(scope="session")
def btx_pipeline_run(btx_deployed: Deployed) -> PipelineRun:
    """One run of the `btx-pipeline/btx` deployment, started through the API and waited on."""
    cluster = btx_deployed.cluster
    config = distributed_config(cluster)
    started = time.monotonic()
    with cluster.client() as client:
        deployment = client.read_deployment_by_name("btx-pipeline/btx")
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"config": config})
    try:
        final = cluster.wait_flow_run(run.id, PIPELINE_TIMEOUT_S)
    except (TimeoutError, RuntimeError) as exc:
        raise RuntimeError(f"{exc}\n{cluster.diagnostics()}") from None
    cluster.timings["pipeline run"] = time.monotonic() - started
    return PipelineRun(btx_deployed, config, final, time.monotonic() - started)
