"""The Kubernetes manifests (deploy/k8s), rendered with `kubectl kustomize` and checked against the
code they deploy: probes, images, settings names, CLI commands, selectors, resources."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import _DELEGATED, build_parser
from gateway.settings import load_settings
from tests.deploy.conftest import (
    K8S,
    ROOT,
    containers,
    find,
    gateway_env_names,
    load_yaml,
    one,
    pod_labels,
    pod_spec,
)

GATEWAY_LABELS = {"app.kubernetes.io/name": "gateway", "app.kubernetes.io/component": "api"}


def gateway_deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment", "gateway")


def gateway_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec = pod_spec(gateway_deployment(docs))
    return next(c for c in spec["containers"] if c["name"] == "gateway")


def gateway_containers(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    image = gateway_container(docs)["image"]
    return [(doc, c) for doc, c in containers(docs) if c["image"] == image]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def config_map_data(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    return one(docs, "ConfigMap", name).get("data", {})


def container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, Any]:
    """Names the container gets: `env` entries (value or valueFrom) and the keys of envFrom ConfigMaps."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"unexpected envFrom {source}"
        env.update(config_map_data(docs, source["configMapRef"]["name"]))
    for entry in container.get("env", []):
        env[entry["name"]] = entry.get("value", entry.get("valueFrom"))
    return env


def test_main_set_has_every_kind(main_docs: list[dict[str, Any]]) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in main_docs}
    for expected in [
        ("Namespace", "llm-gateway"),
        ("Deployment", "gateway"),
        ("Service", "gateway"),
        ("HorizontalPodAutoscaler", "gateway"),
        ("PodDisruptionBudget", "gateway"),
        ("CronJob", "gateway-nightly-eval"),
        ("CronJob", "gateway-db-maintain"),
        ("Job", "gateway-db-migrate"),
        ("PersistentVolumeClaim", "gateway-data"),
    ]:
        assert expected in kinds, f"{expected} missing from kubectl kustomize deploy/k8s"
    config_maps = [d["metadata"]["name"] for d in find(main_docs, "ConfigMap")]
    assert any(n.startswith("gateway-config-") for n in config_maps), config_maps  # hashed name
    assert any(n.startswith("gateway-env-") for n in config_maps), config_maps
    vllm = [d for d in find(main_docs, "Deployment") if d["metadata"]["labels"].get("app.kubernetes.io/name") == "vllm"]
    assert vllm, "no example vLLM Deployment in the main set"
    assert find(main_docs, "Service", vllm[0]["metadata"]["name"]), "the vLLM Deployment has no Service"
    # Everything lands in one namespace (the Namespace object itself has none).
    assert {d["metadata"].get("namespace") for d in main_docs if d["kind"] != "Namespace"} == {"llm-gateway"}


def test_probes_hit_readyz_and_healthz_on_the_container_port(docs: list[dict[str, Any]]) -> None:
    container = gateway_container(docs)
    ports = container["ports"]
    assert [p["containerPort"] for p in ports] == [8000, 9100]  # the API, and /metrics (GATEWAY_METRICS_PORT)
    names_and_numbers = {p["containerPort"] for p in ports} | {p["name"] for p in ports if "name" in p}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in names_and_numbers, probe
    # The port the gateway listens on is the probed port.
    args = build_parser().parse_args(container["args"][1:])
    assert args.command == "serve" and args.port == 8000 and args.host == "0.0.0.0"


def test_graceful_shutdown_budget(docs: list[dict[str, Any]]) -> None:
    deployment = gateway_deployment(docs)
    spec = pod_spec(deployment)
    container = gateway_container(docs)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    grace = spec["terminationGracePeriodSeconds"]
    assert 5 <= pre_stop <= 30, "long enough for endpoints to drop the pod, short against the grace period"
    assert grace >= pre_stop + 60, "after preStop, streams need time to drain and the audit log to flush"
    # A rollout never drops below the wanted replicas: a new pod is ready before an old one stops.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_same_image_wherever_the_gateway_runs(docs: list[dict[str, Any]]) -> None:
    image = gateway_container(docs)["image"]
    assert ":" in image.rsplit("/", 1)[-1], f"gateway image {image!r} has no tag"
    job = pod_spec(one(docs, "Job", "gateway-db-migrate"))["containers"]
    cron = pod_spec(one(docs, "CronJob", "gateway-nightly-eval"))["containers"]
    maintain = pod_spec(one(docs, "CronJob", "gateway-db-maintain"))["containers"]
    assert [c["image"] for c in job] == [image]
    assert [c["image"] for c in cron] == [image]
    assert [c["image"] for c in maintain] == [image]


def test_main_image_is_the_registry_one(main_docs: list[dict[str, Any]]) -> None:
    assert gateway_container(main_docs)["image"] == "registry.example.com/llm-gateway:1.0.0"


def test_every_gateway_variable_is_a_setting(docs: list[dict[str, Any]]) -> None:
    known = gateway_env_names()
    used: set[str] = set()
    for doc, container in containers(docs):
        for name in container_env(docs, container):
            if name.startswith("GATEWAY_"):
                assert name in known, f"{doc['kind']}/{doc['metadata']['name']}: {name} is not a gateway setting"
                used.add(name)
    for config_map in find(docs, "ConfigMap"):
        for key in config_map.get("data", {}):
            if key.startswith("GATEWAY_"):
                assert key in known, f"ConfigMap {config_map['metadata']['name']}: {key} is not a gateway setting"
    # The ones the scale-out needs are really given to the serving pods.
    env = container_env(docs, gateway_container(docs))
    for name in ("GATEWAY_DATABASE", "GATEWAY_REDIS", "GATEWAY_SESSION_SECRET", "GATEWAY_BACKEND", "GATEWAY_CONFIG"):
        assert name in env, f"the gateway Deployment does not set {name}"
    for secret in ("GATEWAY_DATABASE", "GATEWAY_REDIS", "GATEWAY_SESSION_SECRET"):
        assert "secretKeyRef" in env[secret], f"{secret} must come from a Secret"


def test_every_container_requests_resources(docs: list[dict[str, Any]]) -> None:
    for doc, container in containers(docs):
        requests = container.get("resources", {}).get("requests", {})
        where = f"{doc['kind']}/{doc['metadata']['name']} container {container['name']}"
        assert "cpu" in requests and "memory" in requests, f"{where} has no cpu/memory requests"
        assert "memory" in container["resources"].get("limits", {}), f"{where} has no memory limit"


def test_hpa_targets_the_gateway_deployment(docs: list[dict[str, Any]]) -> None:
    hpa = one(docs, "HorizontalPodAutoscaler", "gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "gateway")
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # Utilization targets need a CPU request to be computed against.
    assert gateway_container(docs)["resources"]["requests"]["cpu"]


def test_pdb_and_service_select_exactly_the_gateway_pods(docs: list[dict[str, Any]]) -> None:
    workloads = [d for d in docs if d["kind"] in ("Deployment", "Job", "CronJob")]
    pod_label_sets = {f"{d['kind']}/{d['metadata']['name']}": pod_labels(d) for d in workloads}
    gateway_pods = pod_labels(gateway_deployment(docs))
    assert matches(gateway_deployment(docs)["spec"]["selector"]["matchLabels"], gateway_pods)
    pdb = one(docs, "PodDisruptionBudget", "gateway")
    service = one(docs, "Service", "gateway")
    for selector in (pdb["spec"]["selector"]["matchLabels"], service["spec"]["selector"]):
        selected = [name for name, labels in pod_label_sets.items() if matches(selector, labels)]
        assert selected == ["Deployment/gateway"], f"{selector} selects {selected}"
    assert service["spec"]["ports"][0]["targetPort"] in ("http", 8000)


def test_commands_are_real_gateway_commands(docs: list[dict[str, Any]]) -> None:
    parser = build_parser()
    job = pod_spec(one(docs, "Job", "gateway-db-migrate"))["containers"][0]
    args = parser.parse_args(job["args"][1:])
    assert job["args"][0] == "gateway" and (args.command, args.db_command) == ("db", "upgrade")
    serve = gateway_container(docs)["args"]
    assert serve[0] == "gateway" and parser.parse_args(serve[1:]).command == "serve"


def eval_invocations(script: str) -> list[list[str]]:
    """The `gateway eval ...` commands of a shell script (one per `;`-separated statement)."""
    found = []
    for statement in script.split(";"):
        words = shlex.split(statement)
        if words[:2] == ["gateway", "eval"]:
            found.append(words)
    return found


def test_cronjob_runs_real_eval_subcommands(docs: list[dict[str, Any]]) -> None:
    cron = one(docs, "CronJob", "gateway-nightly-eval")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0
    container = pod_spec(cron)["containers"][0]
    assert container["command"] == ["/bin/sh", "-c"]
    invocations = eval_invocations(container["args"][0])
    assert [words[2] for words in invocations] == ["run", "traffic"]
    for words in invocations:
        top = build_parser().parse_known_args(words[1:])[0]
        assert top.command == "eval" and top.eval_command == words[2]
        # The flags are the delegated command's own: parse them with its parser (as the CLI does).
        _prog, module_name, configure, _run = _DELEGATED[f"eval {words[2]}"]
        sub = argparse.ArgumentParser(prog=" ".join(words[:3]), exit_on_error=False)
        getattr(importlib.import_module(module_name), configure)(sub)
        parsed = sub.parse_args(words[3:])
        if words[2] == "run":
            dataset = Path(parsed.dataset)
            assert dataset.parts[:2] == ("/", "app"), "the image keeps the eval sets under /app"
            assert (ROOT / dataset.relative_to("/app")).is_file(), f"{dataset} is not in the repository"
    # `gateway eval run` takes the backend from GATEWAY_BACKEND only (not from the config file).
    assert "GATEWAY_BACKEND" in container_env(docs, container)
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/data", "/etc/gateway"} <= mounts


def gateway_argv(script: str, environ: dict[str, str]) -> list[str]:
    """The arguments a container's `/bin/sh -c` script passes to `gateway`, with `environ` set
    (a shell function stands in for the gateway and prints them, one a line)."""
    sh = shutil.which("sh")
    assert sh is not None
    stand_in = 'gateway() { printf "%s\\n" "$@"; }\n'
    result = subprocess.run([sh, "-c", stand_in + script], env={"PATH": os.environ["PATH"], **environ},
                            capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
    return result.stdout.splitlines()


def test_db_maintain_cronjob_runs_daily_with_the_retention_of_a_config_map(docs: list[dict[str, Any]]) -> None:
    cron = one(docs, "CronJob", "gateway-db-maintain")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"  # two runs never race on the same partitions
    minute, hour, *every = cron["spec"]["schedule"].split()
    assert every == ["*", "*", "*"] and minute.isdigit() and hour.isdigit(), "runs once a day"
    assert cron["spec"]["timeZone"] == "Etc/UTC"
    container = pod_spec(cron)["containers"][0]
    assert container["command"] == ["/bin/sh", "-c"]
    script, parser = container["args"][0], build_parser()
    env = container_env(docs, container)
    retention = env["AUDIT_RETENTION_DAYS"]["configMapKeyRef"]
    # As shipped: partitions three months ahead, nothing dropped.
    shipped = one(docs, "ConfigMap", retention["name"])["data"][retention["key"]]
    args = parser.parse_args(gateway_argv(script, {"AUDIT_RETENTION_DAYS": shipped}))
    assert (args.command, args.db_command, args.months_ahead, args.retention_days) == ("db", "maintain", 3, None)
    # With a retention set in the ConfigMap, old partitions go.
    args = parser.parse_args(gateway_argv(script, {"AUDIT_RETENTION_DAYS": "90"}))
    assert (args.db_command, args.months_ahead, args.retention_days) == ("maintain", 3, 90.0)
    # The database from the Secret, and the settings file it names, as the gateway itself gets them.
    assert "secretKeyRef" in env["GATEWAY_DATABASE"]
    assert env["GATEWAY_CONFIG"] == "/etc/gateway/gateway.toml"
    assert "/etc/gateway" in {m["mountPath"] for m in container["volumeMounts"]}
    for name in env:
        assert not name.startswith("GATEWAY_") or name in gateway_env_names(), f"{name} is not a gateway setting"


def test_cronjob_matches_the_readme_example(main_docs: list[dict[str, Any]]) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    cron = one(main_docs, "CronJob", "gateway-nightly-eval")
    assert f'schedule: "{cron["spec"]["schedule"]}"' in readme
    script = pod_spec(cron)["containers"][0]["args"][0]
    for words in eval_invocations(script):
        assert " ".join(words) in " ".join(readme.split()), f"{' '.join(words)!r} differs from the README's CronJob"


def test_config_files_load_as_the_gateway_loads_them(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    from guardrails import load_policy

    container = gateway_container(docs)
    env = container_env(docs, container)
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    volume = next(v for v in pod_spec(gateway_deployment(docs))["volumes"] if v["name"] == "config")
    files = config_map_data(docs, volume["configMap"]["name"])
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    config_path = Path(env["GATEWAY_CONFIG"])
    assert config_path.parent == Path(mount["mountPath"]) and config_path.name in files
    settings = load_settings(environ={"GATEWAY_CONFIG": str(tmp_path / config_path.name)})
    assert settings.policy is not None and settings.policy.parent == Path(mount["mountPath"])
    assert settings.policy.name in files
    load_policy(tmp_path / settings.policy.name)  # raises PolicyError on a bad policy
    # Settings with every variable the pods get (secret values replaced by examples).
    example = {"GATEWAY_DATABASE": "postgresql://u:p@db/gw", "GATEWAY_REDIS": "redis://r:6379/0",
               "GATEWAY_SESSION_SECRET": "x" * 32}  # fmt: skip
    environ = {k: (v if isinstance(v, str) else example[k]) for k, v in env.items() if k.startswith("GATEWAY_")}
    environ["GATEWAY_CONFIG"] = str(tmp_path / config_path.name)
    settings = load_settings(environ=environ)
    assert settings.backend and settings.redis and settings.database and settings.session_secret
    # One gateway process per pod: its memory limit is sized for one worker's models, and the
    # Deployment sets no CPU limit that "auto" could read (it would count the node's cores).
    assert settings.workers == 1


def test_backend_urls_point_at_vllm_services(docs: list[dict[str, Any]]) -> None:
    urls = container_env(docs, gateway_container(docs))["GATEWAY_BACKEND"].split()
    assert urls
    for url in urls:
        match = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", url)
        assert match, url
        service = one(docs, "Service", match.group(1))
        assert int(match.group(2)) in [p["port"] for p in service["spec"]["ports"]]
        backends = [d for d in find(docs, "Deployment") if matches(service["spec"]["selector"], pod_labels(d))]
        assert len(backends) == 1, f"Service {match.group(1)} selects {len(backends)} Deployments"
        vllm = pod_spec(backends[0])["containers"][0]
        assert "vllm" in vllm["image"]
        assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
        assert any(a.startswith("--served-model-name=") for a in vllm["args"]), "clients need a stable model name"


def test_main_vllm_is_one_gpu_with_a_weights_cache(main_docs: list[dict[str, Any]]) -> None:
    vllm = [d for d in find(main_docs, "Deployment") if pod_labels(d).get("app.kubernetes.io/name") == "vllm"]
    assert vllm
    for deployment in vllm:
        spec = pod_spec(deployment)
        container = spec["containers"][0]
        assert container["image"].startswith("vllm/vllm-openai:")
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
        cache = next(m for m in container["volumeMounts"] if m["name"] == "cache")
        assert cache["mountPath"] == "/root/.cache/huggingface"
        claim = next(v for v in spec["volumes"] if v["name"] == "cache")["persistentVolumeClaim"]["claimName"]
        assert find(main_docs, "PersistentVolumeClaim", claim)


def test_cpu_overlay_has_no_gpu_and_its_own_services(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["cpu"]
    assert "nvidia.com/gpu" not in str(docs)
    for name in ("postgres", "redis"):
        assert find(docs, "Deployment", name) and find(docs, "Service", name)
    secret = find(docs, "Secret")
    assert len(secret) == 1 and secret[0]["metadata"]["name"].startswith("gateway-secrets")


def test_referenced_secrets_are_documented(main_docs: list[dict[str, Any]]) -> None:
    example = load_yaml(K8S / "secret.example.yaml")
    keys = set(example["stringData"])
    for doc, container in containers(main_docs):
        for entry in container.get("env", []):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref and not ref.get("optional"):
                where = f"{doc['kind']}/{doc['metadata']['name']}"
                assert ref["name"] == example["metadata"]["name"], where
                assert ref["key"] in keys, f"{where}: key {ref['key']} is not in secret.example.yaml"


def test_shared_state_volume_is_shared(main_docs: list[dict[str, Any]]) -> None:
    claim = one(main_docs, "PersistentVolumeClaim", "gateway-data")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every replica mounts the same index versions"
    data_dir = container_env(main_docs, gateway_container(main_docs))["GATEWAY_DATA_DIR"]
    mounts = {m["name"]: m["mountPath"] for m in gateway_container(main_docs)["volumeMounts"]}
    assert mounts["data"] == data_dir


def test_gateway_runs_as_the_images_non_root_user(docs: list[dict[str, Any]]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    user = re.findall(r"^USER\s+(\d+)", dockerfile, re.M)[-1]
    for doc, _container in gateway_containers(docs):
        context = pod_spec(doc)["securityContext"]
        assert context["runAsNonRoot"] is True and str(context["runAsUser"]) == user, doc["metadata"]["name"]


def test_kustomize_toml_files_are_valid_toml() -> None:
    for path in (K8S / "base" / "config").glob("*.toml"):
        tomllib.loads(path.read_text(encoding="utf-8"))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_models_folder_renders_on_its_own() -> None:
    from tests.deploy.conftest import render

    for folder in sorted((K8S / "models").iterdir()):
        docs = render(folder)
        assert {d["kind"] for d in docs} == {"Deployment", "Service", "PersistentVolumeClaim"}


def _traffic_args(words: list[str]) -> argparse.Namespace:
    """`gateway eval traffic` flags parsed by the command's own parser, checked as the CLI checks them."""
    from evals import nightly

    assert words[:3] == ["gateway", "eval", "traffic"], words
    sub = argparse.ArgumentParser(prog="gateway eval traffic", exit_on_error=False)
    nightly.configure_traffic_parser(sub)
    parsed = sub.parse_args(words[3:])
    nightly._traffic_flags(parsed)
    return parsed


def test_traffic_shards_are_an_indexed_job_with_a_merge(docs: list[dict[str, Any]]) -> None:
    shards_cron = one(docs, "CronJob", "gateway-eval-traffic-shards")
    merge_cron = one(docs, "CronJob", "gateway-eval-traffic-merge")
    job = shards_cron["spec"]["jobTemplate"]["spec"]
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] >= 2
    n = job["completions"]
    # An example that is off until asked for: the two run together or not at all, never beside the
    # nightly's own unsharded traffic run by accident.
    assert shards_cron["spec"]["suspend"] is True and merge_cron["spec"]["suspend"] is True
    assert shards_cron["spec"]["schedule"] == merge_cron["spec"]["schedule"]

    shard = pod_spec(shards_cron)["containers"][0]
    env = {e["name"]: e for e in shard["env"]}
    index = env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert index == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert shard["command"] == ["gateway"] and "$(JOB_COMPLETION_INDEX)" in " ".join(shard["args"])
    # Every pod I of the Job gets `--shard I/N`, a valid shard of the N the merge waits for.
    parsed = [
        _traffic_args(["gateway", *(a.replace("$(JOB_COMPLETION_INDEX)", str(i)) for a in shard["args"])])
        for i in range(n)
    ]
    assert [p.shard for p in parsed] == [(i, n) for i in range(n)]
    merge = pod_spec(merge_cron)["containers"][0]
    merged = _traffic_args(["gateway", *merge["args"]])
    assert merged.merge == n and merged.shard is None
    # The same run: the merge's window, name and options are every shard's.
    same = ("since", "until", "limit", "labels_since", "include_eval", "name", "run_key", "concurrency")
    for p in parsed:
        assert {k: getattr(p, k) for k in same} == {k: getattr(merged, k) for k in same}
    assert "--until" in shard["args"], "pods started apart must be given one window end"
    # The merge waits for the shards, within its own deadline; a verdict is not retried.
    assert 0 < merged.wait < merge_cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    assert merge_cron["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0
    for container in (shard, merge):
        assert "secretKeyRef" in container_env(docs, container)["GATEWAY_DATABASE"]
        assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/data", "/etc/gateway"}
