"""The Helm chart, rendered by Helm's own engine (helm-python-sdk binds Helm's Go SDK, no helm
binary), linted, validated against Kubernetes and KubeRay schemas, and compared with golden
manifests. Regenerate the goldens on purpose with PDSERVE_UPDATE_GOLDEN=1.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import shlex
from pathlib import Path

import pytest
import yaml

from pdserve.config import load_config

if os.environ.get("CI"):
    import helm_python as helm  # CI must have it: a missing package fails rather than skips
    import kubernetes_validate
else:
    helm = pytest.importorskip("helm_python", reason="pip install helm-python-sdk")
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
import jsonschema

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "pdserve"
GOLDEN = REPO / "tests" / "golden" / "helm"
K8S_SCHEMAS = REPO.parent / "shared" / "k8s-schemas"  # beside the repo in CI and on dev machines
RELEASE, NAMESPACE = "demo", "serving"
FULLNAME = "demo-pdserve"
KUBE_VERSION = "1.31.0"
UPDATE_GOLDEN = os.environ.get("PDSERVE_UPDATE_GOLDEN") == "1"


def _values_file(path: Path) -> dict:
    return helm.values_from_yaml(path.read_text())  # Helm's own parser, as `-f` uses


# Each variant is what a user passes with -f / --set; every test below runs on all of them.
VARIANTS = {
    "defaults": lambda: {},
    "scaled-pools": lambda: helm.parse_set_string(
        "prefill.replicas=3,prefill.maxReplicas=6,decode.replicas=2,decode.minReplicas=2"),
    "cpu": lambda: _values_file(CHART / "examples" / "values-cpu.yaml"),
    "metrics": lambda: helm.parse_set_string(
        "metrics.serviceMonitor.enabled=true,metrics.serviceMonitor.labels.release=kube-prometheus-stack"),
    "autoscaling": lambda: helm.parse_set_string(
        "autoscaling.enabled=true,prefill.maxReplicas=8,decode.minReplicas=2,decode.replicas=2,decode.maxReplicas=6"),
    "rdma-fp8": lambda: helm.parse_set_string(
        "kvTransfer.dtype=fp8,kvTransfer.ucx.tls=rc\\,cuda_copy\\,cuda_ipc,"
        "prefill.rdma.enabled=true,decode.rdma.enabled=true,prefill.gpus=4,decode.gpus=2"),
    # several workers per pod: eight 1-GPU prefill workers on each 8-GPU node, two decode workers per GPU (a values
    # file: Helm's --set turns 0.5 into a string, which the schema refuses)
    "dense-nodes": lambda: helm.values_from_yaml(
        "prefill: {workersPerPod: 8, replicas: 12, minReplicas: 8, maxReplicas: 24}\n"
        "decode: {workersPerPod: 2, gpus: 0.5, replicas: 3, maxReplicas: 6}\n"),
    # the router's TLS (with mTLS) and token from Secrets, Ray's token from the user's Secret
    "secured": lambda: helm.values_from_yaml(
        "router: {tls: {secretName: pdserve-tls, clientAuth: true}, auth: {tokenSecretName: pdserve-token},"
        " drainTimeoutS: 45}\n"
        "ray: {auth: {secretName: ray-token}}\n"),
}


@functools.lru_cache(maxsize=1)
def _chart():
    return helm.Chart.load(CHART)


def render(values: dict) -> dict[str, str]:
    return _chart().render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


@functools.lru_cache(maxsize=None)
def rendered(variant: str) -> dict[str, str]:
    return render(VARIANTS[variant]())


def objects(manifests: dict[str, str]) -> list[dict]:
    out = []
    for path in sorted(manifests):
        if path.endswith(".yaml"):
            out += [d for d in yaml.safe_load_all(manifests[path]) if d]
    return out


def one(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def group(cluster: dict, name: str) -> dict:
    (g,) = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == name]
    return g


def config_map(objs: list[dict]) -> dict:
    """The ConfigMap holding pdserve's config (the other one holds the Grafana dashboard)."""
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and "config.yaml" in o["data"]]
    return cm


def config_of(objs: list[dict], tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text(config_map(objs)["data"]["config.yaml"])
    return load_config(path)


def ray_resources(g: dict) -> dict:
    """Undo KubeRay's quoting of rayStartParams.resources: a JSON object inside shell quotes."""
    quoted = g["rayStartParams"]["resources"]
    assert quoted[0] == quoted[-1] == '"'
    return json.loads(quoted[1:-1].replace('\\"', '"'))


variants = pytest.mark.parametrize("variant", sorted(VARIANTS))


# ---- lint, goldens, schemas ---------------------------------------------------------------

@variants
def test_lint_passes_strict(variant):
    report = helm.lint(CHART, VARIANTS[variant](), strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 1 is info
    assert not problems and not report["errors"], problems or report["errors"]


@variants
def test_render_matches_golden(variant):
    manifests = rendered(variant)
    text = "".join(f"# Source: {p}\n{manifests[p].strip()}\n---\n" for p in sorted(manifests)
                   if manifests[p].strip())
    golden = GOLDEN / f"{variant}.yaml"
    if UPDATE_GOLDEN:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"{golden} missing: run with PDSERVE_UPDATE_GOLDEN=1"
    assert text == golden.read_text(), (
        f"rendered chart differs from {golden.relative_to(REPO)}; if the template change is "
        "intended, regenerate with PDSERVE_UPDATE_GOLDEN=1 pytest tests/unit/test_helm.py and review the diff")


@variants
def test_core_objects_validate_against_kubernetes_schemas(variant):
    core = [o for o in objects(rendered(variant)) if o["kind"] not in ("RayCluster", "ServiceMonitor")]
    assert {o["kind"] for o in core} >= {"ConfigMap", "Service"}
    for obj in core:
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")


@variants
def test_ray_pod_templates_validate_as_core_pod_templates(variant):
    """The CRD embeds a copy of the pod schema; the core one is the authority."""
    cluster = one(objects(rendered(variant)), "RayCluster")
    templates = {"head": cluster["spec"]["headGroupSpec"]["template"]}
    templates.update((g["groupName"], g["template"]) for g in cluster["spec"]["workerGroupSpecs"])
    for name, template in templates.items():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
        try:
            kubernetes_validate.validate(wrapped, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name} pod template: {'.'.join(map(str, e.path))}: {e.message}")


def test_kubernetes_validation_catches_a_bad_object():
    service = copy.deepcopy(one(objects(rendered("defaults")), "Service"))
    service["spec"]["ports"][0]["prot"] = 50051
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBE_VERSION, strict=True)


def _strict(node):
    """Reject unknown fields, as the API server does with fieldValidation=Strict (it would
    otherwise prune them silently: a typo in the RayCluster would vanish without an error)."""
    if isinstance(node, dict):
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        for v in node.values():
            _strict(v)
    elif isinstance(node, list):
        for v in node:
            _strict(v)
    return node


@functools.lru_cache(maxsize=1)
def raycluster_validator():
    crd_file = K8S_SCHEMAS / "ray.io_rayclusters.yaml"
    if not crd_file.exists():
        pytest.skip(f"KubeRay CRD schema not found at {crd_file} (the shared/ folder beside the repo)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(crd_file.read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def crd_errors(obj: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in raycluster_validator().iter_errors(obj)]


@variants
def test_raycluster_validates_against_kuberay_crd(variant):
    cluster = one(objects(rendered(variant)), "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    assert crd_errors(cluster) == []


def test_crd_validation_catches_a_typo_and_a_wrong_type():
    cluster = copy.deepcopy(one(objects(rendered("defaults")), "RayCluster"))
    group(cluster, "prefill")["minReplica"] = 1
    group(cluster, "decode")["replicas"] = "2"
    errors = crd_errors(cluster)
    assert any("minReplica" in e for e in errors), errors
    assert any(e.startswith("spec.workerGroupSpecs.1.replicas") for e in errors), errors


# ---- what the objects say ---------------------------------------------------------------

@variants
def test_pools_get_their_replicas_gpus_and_pinning(variant, tmp_path):
    values = _chart().merge_values(VARIANTS[variant]())
    objs = objects(rendered(variant))
    cluster, config = one(objs, "RayCluster"), config_of(objs, tmp_path)
    assert [g["groupName"] for g in cluster["spec"]["workerGroupSpecs"]] == ["prefill", "decode"]
    for role in ("prefill", "decode"):
        g, want, pool = group(cluster, role), values[role], getattr(config, role)
        per = want["workersPerPod"]
        # pool sizes count workers, the group counts pods: workersPerPod workers a pod, rounded up
        assert (g["replicas"], g["minReplicas"], g["maxReplicas"]) == tuple(
            math.ceil(want[k] / per) for k in ("replicas", "minReplicas", "maxReplicas"))
        assert pool.replicas == want["replicas"]
        # each pod advertises workersPerPod units, each worker asks for one: that many workers per pod
        assert ray_resources(g) == {f"pdserve_{role}": per} and pool.resources == {f"pdserve_{role}": 1}
        (container,) = g["template"]["spec"]["containers"]
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu", 0)
        assert gpus == math.ceil(want["gpus"] * per) and pool.num_gpus == want["gpus"]
        assert pool.precision == want["precision"]
        assert g["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == role


def test_defaults_are_a_two_pool_blackwell_h200_deployment(tmp_path):
    objs = objects(rendered("defaults"))
    cluster, config = one(objs, "RayCluster"), config_of(objs, tmp_path)
    assert group(cluster, "prefill")["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-B200"}
    assert group(cluster, "decode")["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert (config.prefill.precision, config.decode.precision, config.kv_transfer.dtype) == ("nvfp4", "bf16", "bf16")
    assert config.kv_transfer.refresh_sink_tokens == 4  # nvfp4 prefill: decode recomputes the sinks
    assert config.ray.address == "auto" and config.router.host == "0.0.0.0"
    assert not config.autoscaling.enabled


def test_cpu_example_asks_for_no_gpu(tmp_path):
    objs = objects(rendered("cpu"))
    assert "nvidia.com/gpu" not in json.dumps(objs)
    config = config_of(objs, tmp_path)
    assert (config.engine.device, config.prefill.num_gpus, config.decode.num_gpus) == ("cpu", 0.0, 0.0)
    for role in ("prefill", "decode"):
        spec = group(one(objs, "RayCluster"), role)["template"]["spec"]
        assert "nodeSelector" not in spec and "tolerations" not in spec


def test_rdma_and_ucx_settings_reach_the_worker_pods(tmp_path):
    objs = objects(rendered("rdma-fp8"))
    assert config_of(objs, tmp_path).kv_transfer.dtype == "fp8"
    for role, gpus in (("prefill", 4), ("decode", 2)):
        spec = group(one(objs, "RayCluster"), role)["template"]["spec"]
        (c,) = spec["containers"]
        assert c["resources"]["limits"]["rdma/rdma_shared_device_a"] == 1
        assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert "IPC_LOCK" in c["securityContext"]["capabilities"]["add"]
        assert {"name": "UCX_TLS", "value": "rc,cuda_copy,cuda_ipc"} in c["env"]
        (shm,) = [v for v in spec["volumes"] if v["name"] == "dshm"]
        assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]


def test_autoscaling_switches_on_ray_autoscaler_and_the_policy(tmp_path):
    objs = objects(rendered("autoscaling"))
    cluster, config = one(objs, "RayCluster"), config_of(objs, tmp_path)
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert config.autoscaling.enabled
    for role in ("prefill", "decode"):
        g, bounds = group(cluster, role), getattr(config.autoscaling, role)
        assert (bounds.min_replicas, bounds.max_replicas) == (g["minReplicas"], g["maxReplicas"])
    assert not [o for o in objs if o["kind"] == "Job"], "the policy owns pool sizes; no scale hook"


def test_head_runs_the_router_with_grpc_health_probes():
    objs = objects(rendered("defaults"))
    cluster = one(objs, "RayCluster")
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    pod = cluster["spec"]["headGroupSpec"]["template"]
    (c,) = pod["spec"]["containers"]
    assert "exec pdserve serve --config /etc/pdserve/config.yaml --ray-address auto" in c["args"][0]
    assert {"name": "config", "mountPath": "/etc/pdserve", "readOnly": True} in c["volumeMounts"]
    (vol,) = [v for v in pod["spec"]["volumes"] if v["name"] == "config"]
    assert vol["configMap"]["name"] == config_map(objs)["metadata"]["name"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert (ports["grpc"], ports["http"], ports["http-metrics"]) == (50051, 8000, 9400)
    for probe in ("startupProbe", "readinessProbe"):
        assert c[probe]["grpc"] == {"port": 50051}  # grpc.health.v1 "": SERVING while every pool has a ready worker
    # an empty pool makes the router unready, never restarted: "liveness" is SERVING while the process runs
    assert c["livenessProbe"]["grpc"] == {"port": 50051, "service": "liveness"}


def test_service_selects_only_the_head_and_exposes_grpc_and_metrics():
    objs = objects(rendered("defaults"))
    service, cluster = one(objs, "Service"), one(objs, "RayCluster")
    selector = service["spec"]["selector"].items()
    assert selector <= cluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"].items()
    for g in cluster["spec"]["workerGroupSpecs"]:
        assert not selector <= g["template"]["metadata"]["labels"].items()
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {
        "grpc": "grpc", "http": "http", "http-metrics": "http-metrics"}


def test_service_monitor_scrapes_the_router_service():
    assert not [o for o in objects(rendered("defaults")) if o["kind"] == "ServiceMonitor"]
    objs = objects(rendered("metrics"))
    monitor, service = one(objs, "ServiceMonitor"), one(objs, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_metrics_off_removes_the_port_everywhere(tmp_path):
    objs = objects(render({"metrics": {"enabled": False}}))
    assert config_of(objs, tmp_path).router.metrics_port is None
    assert "http-metrics" not in json.dumps(objs) and "grafana_dashboard" not in json.dumps(objs)


def test_grafana_dashboard_configmap_charts_the_vllm_series(tmp_path):
    objs = objects(rendered("defaults"))
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and "pdserve.json" in o["data"]]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"  # what Grafana's sidecar looks for
    dash = json.loads(cm["data"]["pdserve.json"])
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
                 "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hits",
                 "prefix_cache_queries", "prompt_tokens", "generation_tokens", "request_success"):
        assert f"vllm:{name}" in exprs, name
    assert "pdserve_kv_transfer_bytes" in exprs
    assert config_of(objs, tmp_path).router.http_port == 8000
    off = objects(render({"metrics": {"grafanaDashboard": {"enabled": False}}}))
    assert not [o for o in off if o["kind"] == "ConfigMap" and "pdserve.json" in o["data"]]


def test_tracing_endpoint_reaches_the_config_and_is_off_by_default(tmp_path):
    assert config_of(objects(rendered("defaults")), tmp_path).tracing.otlp_endpoint is None
    objs = objects(render(helm.values_from_yaml(
        "tracing: {otlpEndpoint: 'http://otel-collector.observability:4317', sampleRatio: 0.1}\n")))
    tracing = config_of(objs, tmp_path).tracing
    assert (tracing.otlp_endpoint, tracing.service_name, tracing.sample_ratio) == (
        "http://otel-collector.observability:4317", "pdserve", 0.1)


@variants
def test_ray_token_auth_stays_on(variant):
    cluster = one(objects(rendered(variant)), "RayCluster")
    want = {"mode": "token", "secretName": "ray-token"} if variant == "secured" else {"mode": "token"}
    assert cluster["spec"]["authOptions"] == want


def test_router_tls_token_and_drain_come_from_secrets_and_values(tmp_path):
    objs = objects(rendered("secured"))
    config = config_of(objs, tmp_path).router
    pod = one(objs, "RayCluster")["spec"]["headGroupSpec"]["template"]
    (c,) = pod["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["spec"]["volumes"] if "secret" in v}
    assert secrets == {"router-tls": "pdserve-tls", "router-token": "pdserve-token"}
    tls_dir, auth_dir = mounts["router-tls"], mounts["router-token"]
    assert (config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file, config.auth_token_file) == (
        f"{tls_dir}/tls.crt", f"{tls_dir}/tls.key", f"{tls_dir}/ca.crt", f"{auth_dir}/token")
    # not inside the read-only ConfigMap mount, where kubelet cannot make mount points
    assert not any(p.startswith(mounts["config"] + "/") for p in (tls_dir, auth_dir))
    assert config.drain_timeout_s == 45 and pod["spec"]["terminationGracePeriodSeconds"] == 75
    # kubelet's gRPC probe speaks no TLS: the plain metrics port answers instead
    for probe, path in (("startupProbe", "/ready"), ("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        assert c[probe]["httpGet"] == {"port": "http-metrics", "path": path} and "grpc" not in c[probe]
    job = one(objs, "Job")["spec"]["template"]["spec"]
    assert {v["name"]: v["secret"]["secretName"] for v in job["volumes"]} == secrets
    from pdserve.cli import build_parser

    for container in job["containers"]:
        args = build_parser().parse_args(container["command"][1:])
        assert (args.ca_file, args.cert_file, args.key_file, args.token_file) == (
            f"{tls_dir}/ca.crt", f"{tls_dir}/tls.crt", f"{tls_dir}/tls.key", f"{auth_dir}/token")
        assert {m["mountPath"] for m in container["volumeMounts"]} == {tls_dir, auth_dir}
    plain = config_of(objects(rendered("defaults")), tmp_path).router
    assert (plain.tls_cert_file, plain.auth_token_file, plain.drain_timeout_s) == (None, None, 30)


# ---- scaling one pool touches only that pool ----------------------------------------------

def _flatten(node, path: str, out: dict) -> dict:
    if isinstance(node, dict):
        for k, v in node.items():
            _flatten(v, f"{path}.{k}", out)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            key = v.get("groupName") or v.get("name") if isinstance(v, dict) else None
            _flatten(v, f"{path}[{key or i}]", out)
    else:
        out[path] = node
    return out


def _leaves(values: dict) -> dict:
    out = {}
    for o in objects(render(values)):
        if o["kind"] == "ConfigMap" and "config.yaml" in o["data"]:  # compare the config itself, not its text
            o["data"]["config.yaml"] = yaml.safe_load(o["data"]["config.yaml"])
        _flatten(o, f"{o['kind']}/{o['metadata']['name']}", out)
    return out


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_setting_one_pools_replicas_changes_only_that_pool(role):
    base = _leaves({})
    scaled = _leaves(helm.parse_set_string(f"{role}.replicas=3"))
    changed = {k for k in base.keys() | scaled.keys() if base.get(k) != scaled.get(k)}
    assert changed == {
        f"RayCluster/{FULLNAME}.spec.workerGroupSpecs[{role}].replicas",
        f"ConfigMap/{FULLNAME}-config.data.config.yaml.{role}.replicas",
        f"Job/{FULLNAME}-scale.spec.template.spec.containers[scale-{role}].command[3]",
    }
    assert scaled[f"RayCluster/{FULLNAME}.spec.workerGroupSpecs[{role}].replicas"] == 3
    assert scaled[f"Job/{FULLNAME}-scale.spec.template.spec.containers[scale-{role}].command[3]"] == "3"


def test_config_checksum_ignores_pool_sizes_but_not_the_config():
    def checksum(set_string):
        cluster = one(objects(render(helm.parse_set_string(set_string) if set_string else {})), "RayCluster")
        return cluster["spec"]["headGroupSpec"]["template"]["metadata"]["annotations"]["checksum/config"]
    base = checksum("")
    assert checksum("prefill.replicas=3,prefill.maxReplicas=8,decode.minReplicas=0") == base
    assert checksum("kvTransfer.dtype=fp8") != base


def test_scale_hook_runs_pdserve_scale_after_upgrade_and_rollback():
    job = one(objects(rendered("scaled-pools")), "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-upgrade,post-rollback"
    commands = {c["name"]: c["command"] for c in job["spec"]["template"]["spec"]["containers"]}
    assert commands == {
        "scale-prefill": ["pdserve", "scale", "prefill", "3", "--server", f"{FULLNAME}:50051"],
        "scale-decode": ["pdserve", "scale", "decode", "2", "--server", f"{FULLNAME}:50051"],
    }


def _chart_commands() -> dict[str, list[str]]:
    objs = objects(rendered("defaults"))
    (head,) = one(objs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    job = one(objs, "Job")["spec"]["template"]["spec"]["containers"]
    return {"serve": shlex.split(head["args"][0].split("exec ", 1)[1]),
            "scale": job[0]["command"]}


@pytest.mark.parametrize("subcommand", ["serve", "scale"])
def test_the_commands_the_chart_runs_parse_with_the_cli(subcommand):
    from pdserve.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if subcommand not in sub.choices:
        pytest.skip(f"`pdserve {subcommand}` is not in the CLI yet")
    argv = _chart_commands()[subcommand]
    assert argv[:2] == ["pdserve", subcommand]
    parser.parse_args(argv[1:])  # argparse exits (fails the test) on an unknown flag


# ---- bad values fail at install with a clear message ----------------------------------------

@pytest.mark.parametrize("values_yaml, where, what", [
    ("prefill:\n  replica: 2\n", "/prefill", "additional properties 'replica' not allowed"),
    ("prefill:\n  replicas: two\n", "/prefill/replicas", "want integer"),
    ("decode:\n  gpus: -1\n", "/decode/gpus", "minimum: got -1, want 0"),
    ("decode:\n  workersPerPod: 0\n", "/decode/workersPerPod", "minimum: got 0, want 1"),
    ("kvTransfer:\n  dtype: fp4\n", "/kvTransfer/dtype", "'bf16', 'fp8'"),
    ("kvTransfer:\n  refreshSinkTokens: -1\n", "/kvTransfer/refreshSinkTokens", "minimum: got -1, want 0"),
    ("router:\n  port: 70000\n", "/router/port", "want 65,535"),
    ("metrics:\n  serviceMonitor:\n    enabled: yes please\n", "/metrics/serviceMonitor/enabled", "want boolean"),
    ("tracing:\n  otlpEndpoint: otel-collector:4317\n", "/tracing/otlpEndpoint", "does not match pattern"),
    ("modle:\n  path: /models/llama\n", "", "additional properties 'modle' not allowed"),
])
def test_schema_rejects_typos_and_wrong_types(values_yaml, where, what):
    values = helm.values_from_yaml(values_yaml)
    with pytest.raises(helm.HelmValuesError) as err:
        render(values)  # install/upgrade/template validate against values.schema.json first
    message = str(err.value)
    assert f"at '{where}'" in message and what in message, message
    report = helm.lint(CHART, values, namespace=NAMESPACE)
    assert any(what in m["error"] for m in report["messages"] if m["severity"] == 3), report


@pytest.mark.parametrize("set_string, message", [
    ("prefill.replicas=9", "prefill.replicas=9 must lie within prefill.minReplicas..prefill.maxReplicas (1..4)"),
    ("decode.minReplicas=3", "decode.replicas=1 must lie within decode.minReplicas..decode.maxReplicas (3..4)"),
    ("autoscaling.enabled=true,rayAutoscaler.enabled=false", "autoscaling.enabled needs rayAutoscaler.enabled"),
    ("metrics.enabled=false,metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.enabled needs metrics.enabled"),
    ("router.tls.secretName=x,metrics.enabled=false", "router.tls.secretName needs metrics.enabled"),
])
def test_inconsistent_values_fail_with_a_message(set_string, message):
    with pytest.raises(helm.HelmRenderError) as err:
        render(helm.parse_set_string(set_string))
    assert message in str(err.value)


# ---- the README documents every value ---------------------------------------------------

def _schema_paths(schema: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, sub in schema.get("properties", {}).items():
        path = f"{prefix}{key}"
        paths.append(path)
        if sub.get("additionalProperties") is False:
            paths += _schema_paths(sub, path + ".")
    return paths


def test_values_yaml_schema_and_readme_agree():
    schema = json.loads((CHART / "values.schema.json").read_text())
    readme = (CHART / "README.md").read_text()
    undocumented = [p for p in _schema_leaves(schema) if not _documented(p, readme)]
    assert not undocumented, f"values missing from the README table: {undocumented}"
    # every default in values.yaml is typed by the schema (additionalProperties: false everywhere)
    _chart().validate_schema(yaml.safe_load((CHART / "values.yaml").read_text()))


def _schema_leaves(schema: dict, prefix: str = "") -> list[str]:
    leaves = []
    for key, sub in schema.get("properties", {}).items():
        if sub.get("additionalProperties") is False:
            leaves += _schema_leaves(sub, f"{prefix}{key}.")
        else:
            leaves.append(prefix + key)
    return leaves


def _documented(path: str, readme: str) -> bool:
    """A leaf has its own row, or a nested section's row covers it (`prefill.engine`, `head.probes.startup`);
    a pool's row (`prefill.replicas`) is written once for both pools as `<pool>.replicas`."""
    parent = path.rpartition(".")[0]
    head, _, rest = path.partition(".")
    pooled = f"<pool>.{rest}" if head in ("prefill", "decode") else path
    pooled_parent = pooled.rpartition(".")[0]
    return any(f"`{p}`" in readme for p in (path, pooled) + ((parent, pooled_parent) if "." in parent else ()))
