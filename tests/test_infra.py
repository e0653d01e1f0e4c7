"""infra/ checked without Docker or Kubernetes (issue 14, failures 4, 5, 6, 10): the image's
build context holds no secret, the compose file's images are pinned, the pull step reads the code
directory when a run starts, the schedule is shipped paused, the Kubernetes job templates take
imagePullSecrets, the worker's RBAC, and the bucket step. What needs a real Docker or cluster
(pulling the quay.io images, a pod pulling from a private registry) cannot run here: the tags
are ones MinIO published (quay.io, 2025-08/09) and the manifests are checked by rendering them
with prefect-kubernetes itself."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.unit


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
    assert in_context(rules, "infra/compose.yaml") and not in_context(rules, "tests/test_infra.py")


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


def test_schedules_ship_paused_and_pull_steps_resolve_at_run_time():
    data = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    for deployment in data["deployments"]:
        for schedule in deployment.get("schedules") or []:
            assert schedule["active"] is False, (deployment["name"], schedule)
    text = json.dumps(data["pull"])
    assert "$BTX_CODE_DIR" not in text.replace("${BTX_CODE_DIR", "")  # no deploy-time placeholder
    (shell, workdir) = data["pull"]
    step = shell["prefect.deployments.steps.run_shell_script"]
    assert workdir["prefect.deployments.steps.set_working_directory"]["directory"] == \
        "{{ " + step["id"] + ".stdout }}"
    # The script prints the worker's BTX_CODE_DIR, or the image's /opt/btx.
    import shlex

    out = subprocess.run(shlex.split(step["script"]), capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "BTX_CODE_DIR": "/somewhere"})
    assert out.stdout.strip() == "/somewhere"
    out = subprocess.run(shlex.split(step["script"]), capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "/opt/btx"


def _render(template: dict, values: dict) -> dict:
    from tests.test_flows_distributed import _render_kubernetes_job

    return _render_kubernetes_job(template, values)


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
