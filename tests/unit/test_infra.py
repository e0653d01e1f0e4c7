"""infra/ checked without Docker or Kubernetes (issue 14, failures 4, 5, 6, 10; issue 23, parts
1, 3, 6, 7): the image's build context holds no secret, the compose file's images are pinned, the
pull step reads the code directory when a run starts, the schedule's state is read at deploy
time, the Kubernetes job templates take imagePullSecrets, the worker's RBAC, and the bucket step;
docs/deploy.md's Kubernetes walk-through in one namespace, the secrets it must create, cache_dir
on a volume, the Prefect Cloud API key kept out of Jobs, the grace period and preStop hook, and
the server's concurrency leases on a volume. What needs a real Docker or cluster (pulling the
quay.io images, a pod pulling from a private registry, a pod failing on a missing Secret) cannot
run here: the tags are ones MinIO published (quay.io, 2025-08/09) and the manifests are checked
by rendering them with prefect-kubernetes itself, down to the body its worker sends to the
Kubernetes API."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _ignore_rules(path: Path) -> list[tuple[bool, re.Pattern]]:
    """Docker's .dockerignore rules as (excludes, regex), in order (the last match wins)."""
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        # A pattern that matches a directory matches everything under it.
        rules.append((not negate, re.compile(f"^{regex}(?:/.*)?$")))
    return rules


def in_context(rules, relative: str) -> bool:
    excluded = False
    for excludes, regex in rules:
        if regex.match(relative):
            excluded = excludes
    return not excluded


def test_no_secret_enters_the_image_build_context():
    rules = _ignore_rules(REPO / "infra" / "Dockerfile.dockerignore")
    secrets = ["infra/.env", "infra/.env.production", ".env", "configs/.env", "infra/prod.env",
               "infra/kubernetes/store-secret.yaml", "infra/kubernetes/store-secret.example.yaml",
               "infra/tls/server.key", "infra/tls/server.pem", "flows/.aws/credentials",
               "infra/kubeconfig", "infra/kubeconfig.yaml", "btx_core/__pycache__/x.pyc"]
    leaked = [p for p in secrets if in_context(rules, p)]
    assert not leaked, leaked
    needed = ["pyproject.toml", "README.md", "btx_core/__init__.py", "btx_core/store/core.py",
              "flows/pipeline.py", "configs/demo.yaml", "infra/prefect.yaml", "infra/work-pools.sh",
              "infra/kubernetes/gpu-job-template.json"]
    missing = [p for p in needed if not in_context(rules, p)]
    assert not missing, missing
    # And every file this checkout would send (tracked or not): none named like a secret.
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    sent = [p for p in listed if in_context(rules, p)]
    assert "infra/Dockerfile" in sent and "tests/pico.py" not in sent
    suspicious = [p for p in sent if re.search(r"(^|/)\.env|secret|credential|\.pem$|\.key$", p)]
    assert not suspicious, suspicious


def test_the_rule_parser_follows_docker_semantics():
    """The parser above, on the cases that matter here: later rules win; a directory covers its files."""
    rules = [(True, re.compile(r"^[^/]*(?:/.*)?$"))]
    assert not in_context(rules, "infra/.env")
    rules = _ignore_rules(REPO / "infra" / "Dockerfile.dockerignore")
    assert in_context(rules, "infra/compose.yaml") and not in_context(rules, "tests/unit/test_infra.py")


def test_compose_pins_an_s3_server_that_exists_and_makes_the_bucket():
    compose = yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())
    services = compose["services"]
    for name in ("minio", "minio-init"):
        image = services[name]["image"]
        assert image.startswith("quay.io/minio/"), image  # Docker Hub's minio/* are gone
        assert re.search(r":RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ(@sha256:[0-9a-f]{64})?$", image), image
    assert "mc mb --ignore-existing store/btx" in " ".join(services["minio-init"]["entrypoint"])
    for name, service in services.items():
        image = service.get("image", "")
        assert not image.endswith(":latest") or image == "btx-worker:local", (name, image)


def test_schedules_ship_paused_and_pull_steps_resolve_at_run_time(tmp_path):
    """A schedule's `active` is what its deployment's build step reads from the server at deploy
    time (a first deploy: `false`; tests/integration/test_schedules.py deploys twice for real), and that step
    runs the checkout's .venv python, else the image's python3."""
    import shlex

    data = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    scheduled = [d for d in data["deployments"] if d.get("schedules")]
    assert scheduled
    for deployment in scheduled:
        steps = {s["id"]: s for step in deployment["build"]
                 for s in [step["prefect.deployments.steps.run_shell_script"]]}
        for schedule in deployment["schedules"]:
            (step_id,) = re.fullmatch(r"\{\{ (\w+)\.stdout \}\}", schedule["active"]).groups()
            argv = shlex.split(steps[step_id]["script"])
            call = shlex.split(argv[-1])[-3:]  # sh -c '... exec "$py" SCRIPT DEPLOYMENT SLUG'
            assert call == ["infra/schedule_state.py", "btx-pipeline/" + deployment["name"], schedule["slug"]]
            # The interpreter: stand-ins that print which one ran.
            for where in (tmp_path / ".venv" / "bin", tmp_path / "bin"):
                where.mkdir(parents=True, exist_ok=True)
                name = "python" if ".venv" in str(where) else "python3"
                (where / name).write_text(f"#!/bin/sh\necho {where.parent.name} \"$@\"\n")
                (where / name).chmod(0o755)
            env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
            ran = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True).stdout
            assert ran.split() == [".venv", *call], ran
            (tmp_path / ".venv" / "bin" / "python").unlink()
            ran = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True).stdout
            assert ran.split() == [tmp_path.name, *call], ran
    text = json.dumps(data["pull"])
    assert "$BTX_CODE_DIR" not in text.replace("${BTX_CODE_DIR", "")  # no deploy-time placeholder
    (shell, workdir) = data["pull"]
    step = shell["prefect.deployments.steps.run_shell_script"]
    assert workdir["prefect.deployments.steps.set_working_directory"]["directory"] == \
        "{{ " + step["id"] + ".stdout }}"
    # The script prints the worker's BTX_CODE_DIR, or the image's /opt/btx.
    out = subprocess.run(shlex.split(step["script"]), capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "BTX_CODE_DIR": "/somewhere"})
    assert out.stdout.strip() == "/somewhere"
    out = subprocess.run(shlex.split(step["script"]), capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "/opt/btx"


def _render(template: dict, values: dict) -> dict:
    from tests.support.kubernetes import render_job

    return render_job(template, values)


@pytest.mark.parametrize("name", ["gpu-job-template.json", "control-job-template.json"])
def test_kubernetes_jobs_take_image_pull_secrets(name):
    template = json.loads((REPO / "infra" / "kubernetes" / name).read_text())
    pod = _render(template, {"image_pull_secrets": [{"name": "regcred"}]})["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    plain = _render(template, {})
    assert "{{" not in json.dumps(plain)
    assert plain["spec"]["template"]["spec"].get("imagePullSecrets", []) == []


def test_worker_rbac_covers_what_the_kubernetes_worker_does():
    docs = list(yaml.safe_load_all((REPO / "infra" / "kubernetes" / "worker-rbac.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ServiceAccount", "Role", "RoleBinding"}
    allowed = {(g, r, v) for rule in kinds["Role"]["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    for need in [("batch", "jobs", v) for v in ("create", "get", "list", "watch", "delete")] + \
                [("", "pods", v) for v in ("get", "list", "watch")] + [("", "pods/log", "get"), ("", "events", "list")]:
        assert need in allowed, need
    assert kinds["RoleBinding"]["subjects"][0]["name"] == kinds["ServiceAccount"]["metadata"]["name"]


def test_bucket_step_creates_the_store_bucket_once(s3_endpoint):
    import uuid

    from btx_core.store.bucket import ensure_bucket

    bucket = f"btx-{uuid.uuid4().hex[:10]}"
    assert ensure_bucket(f"s3://{bucket}/nightly") == f"bucket {bucket}: created"
    assert ensure_bucket(f"s3://{bucket}") == f"bucket {bucket}: exists"


def test_control_pool_only_orchestrates_the_nightly_run():
    """Failure 7: the nightly config sends every heavy stage off the CPU control pool, and every
    pool it names serves the deployment that the pipeline launches there."""
    from btx_core.config.schema import BTXConfig

    data = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    (pipeline,) = [d for d in data["deployments"] if d["entrypoint"] == "flows/pipeline.py:btx_pipeline"]
    config = BTXConfig.model_validate(pipeline["parameters"]["config"])
    control = pipeline["work_pool"]["name"]
    served = {(d["entrypoint"], d["work_pool"]["name"]) for d in data["deployments"]}
    o = config.orchestration
    assert o.expert_runner == "deployments" and config.finetune is not None
    for stage in ("seed", "mix", "finetune", "evaluate"):
        pool = o.stage_pool(stage)
        assert pool not in (None, control), (stage, pool)
        assert ("flows/stages.py:stage_flow", pool) in served, (stage, pool)
    for domain in config.domains:
        pool = o.domain_pools.get(domain.name, o.expert_pool)
        assert pool != control and ("flows/expert.py:train_expert_flow", pool) in served, (domain.name, pool)
    # A deployment's name is its pool's: the pipeline launches `<flow>/<pool>`.
    for deployment in data["deployments"]:
        if deployment is not pipeline:
            assert deployment["name"] == deployment["work_pool"]["name"], deployment["name"]


# ---------------------------------------------------------------------------------------------
# Kubernetes as docs/deploy.md section 4 sets it up (issue 23, part 6)

KUBE = REPO / "infra" / "kubernetes"
DEFAULT_POOLS = {"btx-control": "control-job-template.json", "btx-experts": "gpu-job-template.json",
                 "btx-experts-2": "gpu-job-template.json"}


def _pools_from_script(tmp_path: Path, **env: str) -> dict[str, dict]:
    """`infra/work-pools.sh kubernetes` with a stand-in for the `prefect` CLI: the base job
    template of every pool it creates, by name. The script's own editing of the templates runs
    for real."""
    import sys

    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "pools"
    out.mkdir()
    prefect = tmp_path / "prefect"
    prefect.write_text(f"""#!{sys.executable}
import shutil, sys
args = sys.argv[1:]
if args[1:3] == ["work-pool", "create"] and "--base-job-template" in args:
    shutil.copy(args[args.index("--base-job-template") + 1], {str(out)!r} + "/" + args[3] + ".json")
""")
    prefect.chmod(0o755)
    done = subprocess.run(["bash", "infra/work-pools.sh", "kubernetes"], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PREFECT": str(prefect),
                               "PREFECT_API_URL": "http://127.0.0.1:9/api", **env}, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    from prefect.server.schemas.actions import validate_base_job_template

    pools = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    for template in pools.values():  # what the server checks: every placeholder a declared variable
        validate_base_job_template(template)
    return pools


def _kubernetes_section() -> str:
    text = (REPO / "docs" / "deploy.md").read_text()
    return text[text.index("## 4. Kubernetes"):text.index("## What you see in the UI")]


def _shell_commands(markdown: str) -> list[str]:
    """Every command of the ```-blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```(?:sh|bash)?\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                commands.append(line)
    return commands


def _manifests(name: str, **placeholders: str) -> list[dict]:
    """The documents of infra/kubernetes/<name>, with its @PLACEHOLDER@s filled in as the docs' sed does."""
    text = (KUBE / name).read_text()
    for key, value in placeholders.items():
        text = text.replace(f"@{key}@", value)
    assert not re.search(r"@[A-Z]+@", text), name
    return [d for d in yaml.safe_load_all(text) if d]


def test_one_namespace_from_the_docs_to_the_jobs(tmp_path):
    """Every kubectl command of deploy.md section 4 works in $BTX_NAMESPACE, the manifests they
    apply name no namespace of their own, and the pools infra/work-pools.sh makes with that
    variable (as the section exports it) start their Jobs there."""
    section = _kubernetes_section()
    (namespace,) = set(re.findall(r"export BTX_NAMESPACE=(\S+)", section))
    kubectl = [part.strip() for cmd in _shell_commands(section)
               for part in re.split(r"&&|\||;|\bdo\b", cmd) if part.strip().startswith("kubectl")]
    assert any(c.startswith('kubectl create namespace "$BTX_NAMESPACE"') for c in kubectl), kubectl
    for command in kubectl:
        assert '-n "$BTX_NAMESPACE"' in command or command.startswith("kubectl create namespace"), command
    for name in ("worker-rbac.yaml", "worker.yaml", "prefect-server.yaml", "store-secret.example.yaml"):
        for doc in _manifests(name, POOL="p", IMAGE="i"):
            assert "namespace" not in doc["metadata"], (name, doc["metadata"])

    pools = _pools_from_script(tmp_path / "documented", BTX_NAMESPACE=namespace)
    assert set(pools) == set(DEFAULT_POOLS)
    for template in pools.values():
        assert _render(template, {})["metadata"]["namespace"] == namespace
    assert namespace == "btx"  # and the script's default, used when the variable is not set
    other = _pools_from_script(tmp_path / "other", BTX_NAMESPACE="btx-staging")
    assert {_render(t, {})["metadata"]["namespace"] for t in other.values()} == {"btx-staging"}


def test_secrets_the_pods_need_are_required_and_created_by_the_docs():
    """The store Secret is not optional (a pod without it fails to start, CreateContainerConfigError,
    instead of at its first S3 call), and every Secret a manifest or template reads is one that
    section 4 creates under that name."""
    created = {m.group(1) for cmd in _shell_commands(_kubernetes_section())
               for m in [re.search(r"create secret (?:generic|docker-registry) (\S+)", cmd)] if m}
    for name in set(DEFAULT_POOLS.values()):
        template = json.loads((KUBE / name).read_text())
        (env_from,) = _render(template, {})["spec"]["template"]["spec"]["containers"][0]["envFrom"]
        assert env_from == {"secretRef": {"name": "btx-store", "optional": False}}
    assert {"btx-store", "prefect-api", "prefect-db", "regcred"} <= created, created
    (example,) = _manifests("store-secret.example.yaml")
    assert example["metadata"]["name"] == "btx-store"
    refs = {(ref["name"], ref.get("optional", False)) for name in ("worker.yaml", "prefect-server.yaml")
            for doc in _manifests(name, POOL="p", IMAGE="i") if doc["kind"] == "Deployment"
            for env in doc["spec"]["template"]["spec"]["containers"][0]["env"]
            for ref in [env.get("valueFrom", {}).get("secretKeyRef")] if ref}
    assert {name for name, optional in refs if not optional} <= created, refs


def _quantity_gi(value: str) -> int:
    assert value.endswith("Gi"), value
    return int(value[:-2])


@pytest.mark.parametrize("claim", [None, "btx-cache"])
def test_cache_dir_is_on_a_volume(tmp_path, claim):
    """cache_dir (fetched checkpoints, tokenized data) lives on the `cache` volume, not in the
    container's writable layer: BTX_CACHE_DIR names its mount, which a config without `cache_dir`
    uses where the stage runs (btx_core.stages.common.cache_dir); a deployment's own `env` keeps it. By default an emptyDir with a sizeLimit, the node disk reserved for both
    emptyDirs (on the expert pools); with BTX_CACHE_CLAIM, that PersistentVolumeClaim, writable
    by the image's user."""
    from btx_core.config.schema import BTXConfig

    from btx_core.stages.common import cache_dir

    dockerfile = (REPO / "infra" / "Dockerfile").read_text()
    (uid,) = re.findall(r"useradd --create-home --uid (\d+) btx", dockerfile)
    config = BTXConfig.model_validate(yaml.safe_load((REPO / "configs" / "ci.yaml").read_text()) | {"cache_dir": None})
    pools = _pools_from_script(tmp_path, **({"BTX_CACHE_CLAIM": claim} if claim else {}))
    for pool, template in pools.items():
        job = _render(template, {"env": {"EXTRA": "1"}})
        assert "{{" not in json.dumps(job), pool
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["EXTRA"] == "1"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts[env["BTX_CACHE_DIR"]] == "cache", mounts
        with pytest.MonkeyPatch.context() as pod_env:  # the stage, in that pod, uses the volume
            pod_env.setenv("BTX_CACHE_DIR", env["BTX_CACHE_DIR"])
            assert str(cache_dir(config)) == env["BTX_CACHE_DIR"]
        for path in (env["BTX_CACHE_DIR"], "/scratch"):  # mount points the image's user owns
            assert path in dockerfile, path
        volumes = {v["name"]: v for v in pod["volumes"]}
        request = _quantity_gi(container["resources"]["requests"]["ephemeral-storage"])
        scratch = _quantity_gi(volumes["scratch"]["emptyDir"]["sizeLimit"])
        local = scratch  # what the pod may write to the node's disk
        if claim:
            assert volumes["cache"] == {"name": "cache", "persistentVolumeClaim": {"claimName": claim}}
            assert pod["securityContext"] == {"fsGroup": int(uid)}
        else:
            local += _quantity_gi(volumes["cache"]["emptyDir"]["sizeLimit"])
        # The expert pools reserve all of it; the control pool, which only orchestrates the
        # nightly config, a little (its description says when to raise it).
        assert request == local if DEFAULT_POOLS[pool] == "gpu-job-template.json" else request <= local, pool
        assert "ephemeral-storage" not in container["resources"].get("limits", {})  # opt-in
        assert _render(template, {"ephemeral_storage_limit": "500Gi"})["spec"]["template"]["spec"][
            "containers"][0]["resources"]["limits"]["ephemeral-storage"] == "500Gi"


def _submitted_job(monkeypatch, template: dict, api_key: str, worker_env: dict[str, str]) -> dict:
    """The Job body prefect-kubernetes' worker sends to the Kubernetes API (its `_create_job`, with
    the API client replaced) for a worker holding `api_key` and these environment variables."""
    import asyncio
    from types import SimpleNamespace

    from prefect.settings import PREFECT_API_KEY, temporary_settings
    from prefect_kubernetes import worker as k8s

    from tests.support.kubernetes import job_configuration

    sent = []

    class BatchV1Api:
        def __init__(self, client):
            pass

        async def create_namespaced_job(self, namespace, body):
            sent.append(body)
            return SimpleNamespace(metadata=SimpleNamespace(name="a-job", namespace=namespace))

    async def submit() -> None:
        with temporary_settings({PREFECT_API_KEY: api_key}):  # the worker's settings go into its jobs
            configuration = await job_configuration(template, {})
        await k8s.KubernetesWorker(work_pool_name="btx-experts")._create_job(configuration, client=object())

    with monkeypatch.context() as patch:
        patch.setattr(k8s, "BatchV1Api", BatchV1Api)
        for name, value in worker_env.items():
            patch.setenv(name, value)
        asyncio.run(submit())
    (body,) = sent
    return body


def test_the_prefect_api_key_reaches_jobs_only_as_a_secret_reference(monkeypatch):
    """A worker run as infra/kubernetes/worker.yaml runs it (Prefect Cloud: an API key) submits
    Jobs whose env references the key in the Secret `prefect-api` and never holds it; without the
    worker settings of that manifest, the key would be in the Job in plain text."""
    from uuid import uuid4

    (worker,) = _manifests("worker.yaml", POOL="btx-experts", IMAGE="registry.example.com/btx-worker:1")
    env = worker["spec"]["template"]["spec"]["containers"][0]["env"]
    settings = {e["name"]: e["value"] for e in env if "value" in e}
    (own_key,) = [e["valueFrom"]["secretKeyRef"] for e in env if e["name"] == "PREFECT_API_KEY"]
    key = f"pnu_{uuid4().hex}"
    template = json.loads((KUBE / "gpu-job-template.json").read_text())

    plain = _submitted_job(monkeypatch, template, key, {})
    assert key in json.dumps(plain)  # what the settings prevent
    body = _submitted_job(monkeypatch, template, key, settings)
    assert key not in json.dumps(body)
    (job_key,) = [e for e in body["spec"]["template"]["spec"]["containers"][0]["env"]
                  if e["name"] == "PREFECT_API_KEY"]
    assert job_key == {"name": "PREFECT_API_KEY", "valueFrom": {"secretKeyRef": {
        "name": own_key["name"], "key": own_key["key"]}}}
    assert worker["spec"]["template"]["spec"]["serviceAccountName"] == "btx-worker"  # worker-rbac.yaml's


def test_termination_grace_covers_one_checkpoint_write_of_a_7b_expert(tmp_path):
    """terminationGracePeriodSeconds of both job templates: at least 1.5 x the time to finish a
    step and write one training checkpoint of a 7B expert, with its bytes per parameter measured
    on btx's own checkpoint format (fp32 weights + AdamW's two moments)."""
    import torch

    from btx_core.training.state import TrainState, save_checkpoint

    model = torch.nn.Linear(512, 512)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 512)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(1, 1, 512, 1, [1.0]))
    params = sum(p.numel() for p in model.parameters())
    per_param = sum(f.stat().st_size for f in tmp_path.iterdir()) / params
    assert 11.9 < per_param < 12.5, per_param

    checkpoint = 7.24e9 * per_param  # Mistral-7B's parameters (Llama-2-7B: 6.74e9): ~87 GB
    step, local_write, sha256, upload = 60, checkpoint / 1e9, checkpoint / 1e9, checkpoint / 250e6
    needed = 1.5 * (step + local_write + sha256 + upload)
    for name in set(DEFAULT_POOLS.values()):
        template = json.loads((KUBE / name).read_text())
        grace = _render(template, {})["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert needed <= grace <= needed + 60, (name, grace, needed)
        assert f"{grace} s" in (REPO / "docs" / "deploy.md").read_text()
        longer = _render(template, {"termination_grace_seconds": 3600})
        assert longer["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 3600
        # The grace is the flow's to use only if the pod's first process hands the SIGTERM to it
        # (flows/pod.py; tests/faults/test_cluster_faults.py signals it as the kubelet would).
        (container,) = _render(template, {})["spec"]["template"]["spec"]["containers"]
        assert container["args"] == ["python", "-m", "flows.pod"], (name, container.get("args"))


@pytest.mark.parametrize("name", sorted(set(DEFAULT_POOLS.values())))
def test_the_pod_stops_only_after_a_checkpoint_being_written_reached_the_store(tmp_path, name):
    """The job's preStop hook (run by the kubelet before its SIGTERM, within the grace period)
    returns at once when no training checkpoint is being written, and waits while one is: while
    the staging directory the training loop writes it in (TMPDIR/btx-ckpt-*) exists."""
    import time

    (prefix,) = re.findall(r'TemporaryDirectory\(prefix="(btx-ckpt-)"\)',
                           (REPO / "btx_core" / "training" / "loop.py").read_text())
    template = json.loads((KUBE / name).read_text())
    (container,) = _render(template, {})["spec"]["template"]["spec"]["containers"]
    hook = container["lifecycle"]["preStop"]["exec"]["command"]
    env = {"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)}
    subprocess.run(hook, env=env, timeout=10, check=True)  # nothing being written: no wait
    staging = tmp_path / f"{prefix}x1y2"
    staging.mkdir()
    waiting = subprocess.Popen(hook, env=env)
    try:
        time.sleep(3)
        assert waiting.poll() is None  # still waiting for the upload
        staging.rmdir()  # the checkpoint is in the store
        assert waiting.wait(timeout=10) == 0
    finally:
        waiting.kill()


def test_the_server_keeps_concurrency_leases_on_a_volume(tmp_path):
    """Compose's and the Kubernetes manifest's Prefect server store concurrency leases with the
    filesystem lease storage under a PREFECT_HOME on a volume that outlives the container (a
    named volume; one replica's claim), and that storage hands a new instance, as after a server
    restart, the lease an earlier one wrote."""
    import asyncio
    import importlib
    from datetime import timedelta
    from uuid import uuid4

    from prefect.settings import PREFECT_HOME, temporary_settings

    module = "prefect.server.concurrency.lease_storage.filesystem"
    compose = yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())
    server = compose["services"]["prefect-server"]
    assert server["environment"]["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"] == module
    home = server["environment"]["PREFECT_HOME"]
    volumes = dict(v.split(":", 1)[::-1] for v in server["volumes"])
    assert volumes[home] in compose["volumes"]  # a named volume, not the container's layer
    assert home in (REPO / "infra" / "Dockerfile").read_text()  # created for the image's user

    (claim, deployment, _service) = _manifests("prefect-server.yaml", IMAGE="i")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"] == module
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == env["PREFECT_HOME"]]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]

    storage = importlib.import_module(module).ConcurrencyLeaseStorage
    resources = [uuid4()]
    with temporary_settings({PREFECT_HOME: tmp_path}):
        lease = asyncio.run(storage().create_lease(resources, ttl=timedelta(minutes=5)))
        restarted = asyncio.run(storage().read_lease(lease.id))
    assert restarted is not None and restarted.resource_ids == resources
    assert (tmp_path / "concurrency_leases").is_dir()

