"""Every manifest in k8s/ is one the Kubernetes API server admits, and every command in it is one the project runs.

Custom resources are checked against the KubeRay CRDs the way the API server treats them on create:
null fields are pruned, fields the structural schema does not know are errors (the server would
silently prune them, so a typo would vanish), defaults are applied, then the object is validated.
Pod templates inside them, object metadata and built-in kinds are checked against the Kubernetes
schemas that the `kubernetes-validate` package ships, in their strict form (no unknown fields).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = ROOT / "k8s"
CRD_DIR = Path(os.environ.get("KUBERAY_CRD_DIR", ROOT.parent / "shared" / "kuberay"))
K8S_VERSION = "1.33"
PROJECT_DIR = "/home/ray/project"  # WORKDIR of k8s/Dockerfile
SHARED_MOUNT = "/mnt/shared"  # where every Ray pod mounts the shared volume

pytestmark = pytest.mark.skipif(not CRD_DIR.is_dir(), reason=f"KubeRay CRDs not found at {CRD_DIR} (set KUBERAY_CRD_DIR)")


def load_manifests() -> List[Tuple[str, Dict]]:
    """(file:index, object) for every YAML document under k8s/."""
    found = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                found.append((f"{path.name}:{i}", doc))
    return found


MANIFESTS = load_manifests()
IDS = [name for name, _ in MANIFESTS]


def of_kind(*kinds: str) -> List[Tuple[str, Dict]]:
    return [(name, obj) for name, obj in MANIFESTS if obj.get("kind") in kinds]


def each(*kinds: str):
    """Parametrize a test over the manifests of these kinds, named by file."""
    found = of_kind(*kinds)
    return pytest.mark.parametrize("name,obj", found, ids=[name for name, _ in found])


# ---------------------------------------------------------------------------------------------
# The API server's treatment of a custom resource: prune nulls, reject unknown fields, default, validate

@lru_cache(maxsize=None)
def crd_schemas() -> Dict[Tuple[str, str], Dict]:
    """(apiVersion, kind) → openAPIV3Schema for every served version of the KubeRay CRDs."""
    schemas = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


def _nullable(schema: Dict) -> bool:
    return bool(schema.get("nullable"))


def _admit(value: Any, schema: Dict, path: str, errors: List[str]) -> Any:
    """Structural pruning (as errors), null pruning and defaulting of `value` under `schema`; gives the defaulted value."""
    for rule in schema.get("x-kubernetes-validations", []):
        # Transition rules compare with the old object and are skipped on create, as the server does.
        if rule["rule"].replace(" ", "") != "self==oldSelf":
            errors.append(f"{path}: CEL rule {rule['rule']!r} is not evaluated here; avoid the field or check it")
    if isinstance(value, dict) and (schema.get("type") == "object" or "properties" in schema):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        keep_unknown = schema.get("x-kubernetes-preserve-unknown-fields") or extra is True
        embedded = schema.get("x-kubernetes-embedded-resource")
        admitted = {}
        for key, item in value.items():
            child = properties.get(key, extra if isinstance(extra, dict) else None)
            if item is None and not (child and _nullable(child)):
                continue  # null pruned before defaulting
            if child is not None:
                admitted[key] = _admit(item, child, f"{path}.{key}", errors)
            elif keep_unknown or (embedded and key in ("apiVersion", "kind", "metadata")):
                admitted[key] = item
            else:
                errors.append(f"{path}.{key}: unknown field (the API server would silently drop it)")
        for key, child in properties.items():
            if key not in admitted and "default" in child:
                admitted[key] = _admit(copy.deepcopy(child["default"]), child, f"{path}.{key}", errors)
        return admitted
    if isinstance(value, list) and "items" in schema:
        items = [_admit(item, schema["items"], f"{path}[{i}]", errors) for i, item in enumerate(value)]
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "map":
            keys = [tuple(json.dumps(i.get(k), sort_keys=True) for k in schema["x-kubernetes-list-map-keys"]) for i in items]
            if len(set(keys)) != len(keys):
                errors.append(f"{path}: duplicate entries for keys {schema['x-kubernetes-list-map-keys']}")
        elif list_type == "set" and len({json.dumps(i, sort_keys=True) for i in items}) != len(items):
            errors.append(f"{path}: duplicate entries in a set")
        return items
    return value


def _json_schema(schema: Any) -> Any:
    """OpenAPI v3 (as CRDs use it) → JSON Schema: `nullable` becomes a null type, the rest carries over."""
    if isinstance(schema, dict):
        out = {k: _json_schema(v) for k, v in schema.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
        if schema.get("nullable") and "type" in out:
            out["type"] = [out["type"], "null"]
        return out
    if isinstance(schema, list):
        return [_json_schema(s) for s in schema]
    return schema


@lru_cache(maxsize=None)
def k8s_definitions() -> Dict:
    import kubernetes_validate.utils as kv

    version = [v for v in kv.all_versions() if kv.major_minor(v) == K8S_VERSION][0]
    return kv.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", K8S_VERSION)


def k8s_errors(obj: Any, definition: str, path: str) -> List[str]:
    """Errors of `obj` against a built-in Kubernetes type (strict: unknown fields rejected)."""
    from referencing import Registry, Resource

    definitions = k8s_definitions()
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    validator = jsonschema.Draft202012Validator({"$ref": f"{definitions['$id']}#/$defs/{definition}"}, registry=registry)
    return [f"{'.'.join([path, *map(str, e.absolute_path)])}: {e.message}" for e in validator.iter_errors(obj)]


def pod_templates(obj: Any, path: str = "") -> Iterator[Tuple[str, Dict]]:
    """Every pod template (a dict with spec.containers) inside a custom resource, with its path."""
    if isinstance(obj, dict):
        spec = obj.get("spec")
        if isinstance(spec, dict) and isinstance(spec.get("containers"), list) and path:
            yield path, obj
            return
        for key, value in obj.items():
            yield from pod_templates(value, f"{path}.{key}")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from pod_templates(value, f"{path}[{i}]")


def admit(obj: Dict) -> Tuple[Dict, List[str]]:
    """The object as the API server would store it, and the errors for which it would refuse it."""
    api = (obj.get("apiVersion"), obj.get("kind"))
    if api not in crd_schemas():
        import kubernetes_validate

        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            return obj, [f"{'.'.join(map(str, exc.absolute_path))}: {exc.message}"]
        except kubernetes_validate.SchemaNotFoundError:
            return obj, [f"{api[0]} {api[1]}: neither a built-in kind nor a KubeRay CRD"]
        return obj, []
    schema = crd_schemas()[api]
    errors: List[str] = []
    # The root's metadata is an ObjectMeta the server keeps whole (checked against ObjectMeta below).
    admitted = _admit({k: v for k, v in obj.items() if k != "metadata"}, schema, obj["kind"], errors)
    admitted["metadata"] = obj.get("metadata", {})
    validator = jsonschema.Draft7Validator(_json_schema(schema))
    errors += [f"{obj['kind']}.{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(admitted)]
    errors += k8s_errors(obj.get("metadata", {}), "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta", "metadata")
    for where, template in pod_templates(admitted.get("spec", {}), "spec"):
        errors += k8s_errors(template, "io.k8s.api.core.v1.PodTemplateSpec", where)
    return admitted, errors


# ---------------------------------------------------------------------------------------------
# Schemas


@pytest.mark.parametrize("name,obj", MANIFESTS, ids=IDS)
def test_manifest_is_admitted_by_the_api_server(name, obj):
    _, errors = admit(obj)
    assert errors == [], f"{name}:\n" + "\n".join(errors)


def test_every_file_holds_manifests():
    assert {p.name for p in K8S_DIR.glob("*.yaml")} == {n.split(":")[0] for n in IDS}
    kinds = sorted({obj["kind"] for _, obj in MANIFESTS})
    assert kinds == ["PersistentVolumeClaim", "RayCluster", "RayJob", "RayService"]


def _broken(mutate) -> List[str]:
    obj = copy.deepcopy(dict(of_kind("RayCluster")[0][1]))
    mutate(obj)
    return admit(obj)[1]


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda o: o["spec"]["workerGroupSpecs"][0].update(replica=3), "workerGroupSpecs[0].replica: unknown field"),
        (lambda o: o["spec"]["workerGroupSpecs"][0].update(minReplicas="one"), "'one' is not of type 'integer'"),
        (lambda o: o["spec"]["workerGroupSpecs"][0].pop("groupName"), "'groupName' is a required property"),
        (lambda o: o["spec"]["authOptions"].update(mode="password"), "'password' is not one of ['disabled', 'token']"),
        (
            lambda o: o["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(imagePullPolice="Always"),
            "containers[0].imagePullPolice: unknown field",
        ),
        (
            lambda o: o["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"].update(
                memory="6 GiB"
            ),
            "does not match",
        ),
        (lambda o: o["metadata"].update(labelz={"a": "b"}), "metadata: Additional properties are not allowed ('labelz'"),
        (
            lambda o: o["spec"]["headGroupSpec"]["template"]["spec"]["containers"].append(
                dict(o["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0])
            ),
            "containers: duplicate entries for keys ['name']",
        ),
    ],
    ids=["typo", "wrong-type", "missing-required", "bad-enum", "pod-typo", "bad-quantity", "meta-typo", "duplicate-container"],
)
def test_a_broken_manifest_is_rejected(mutate, expected):
    errors = _broken(mutate)
    assert any(expected in e for e in errors), errors


def test_defaults_are_applied_and_nulls_pruned_before_validation():
    cluster = copy.deepcopy(dict(of_kind("RayCluster")[0][1]))
    cluster["spec"]["suspend"] = None  # pruned, not a type error
    admitted, errors = admit(cluster)
    assert errors == []
    assert "suspend" not in admitted["spec"]
    assert admitted["spec"]["workerGroupSpecs"][0]["numOfHosts"] == 1  # CRD default

    job = copy.deepcopy(dict(of_kind("RayJob")[0][1]))
    admitted, errors = admit(job)
    assert errors == [] and admitted["spec"]["submissionMode"] == "K8sJobMode"
    assert admitted["spec"]["backoffLimit"] == 0


# ---------------------------------------------------------------------------------------------
# Least privilege and secrets


def _cluster_specs(obj: Dict) -> List[Dict]:
    spec = obj["spec"]
    return [s for s in (spec if obj["kind"] == "RayCluster" else None, spec.get("rayClusterSpec"), spec.get("rayClusterConfig")) if s]


@each("RayCluster", "RayJob", "RayService")
def test_pods_run_unprivileged(name, obj):
    templates = list(pod_templates(obj["spec"], "spec"))
    assert templates, f"{name}: no pod templates"
    for where, template in templates:
        pod = template["spec"].get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) != 0, f"{where}: pod may run as root"
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        for container in template["spec"]["containers"] + template["spec"].get("initContainers", []):
            ctx = container.get("securityContext", {})
            assert ctx.get("allowPrivilegeEscalation") is False, f"{where}/{container['name']}"
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"] and not ctx["capabilities"].get("add"), where
            assert not ctx.get("privileged") and ctx.get("runAsNonRoot", True) is True, where
            assert ctx.get("seccompProfile", pod["seccompProfile"])["type"] == "RuntimeDefault", where
            assert container["resources"]["requests"] and container["resources"]["limits"], f"{where}: no requests/limits"
    for spec in _cluster_specs(obj):
        autoscaler = spec.get("autoscalerOptions", {}).get("securityContext", {})
        if spec.get("enableInTreeAutoscaling"):
            assert autoscaler.get("allowPrivilegeEscalation") is False and autoscaler["capabilities"]["drop"] == ["ALL"]
        # Ray's token auth is on, with the token in a Secret the operator reads.
        assert spec["authOptions"] == {"mode": "token", "secretName": "ray-auth-token"}, name


SECRET_NAME = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL)", re.IGNORECASE)


def _env_entries(obj: Any) -> Iterator[Dict]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "env" and isinstance(value, list):
                yield from value
            else:
                yield from _env_entries(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _env_entries(value)


def test_secrets_come_from_kubernetes_secrets_never_from_manifests():
    assert not of_kind("Secret"), "a Secret's value would live in the repository; create it with kubectl instead"
    for name, obj in MANIFESTS:
        for entry in _env_entries(obj):
            if SECRET_NAME.search(entry["name"]):
                assert "value" not in entry and "secretKeyRef" in entry.get("valueFrom", {}), f"{name}: {entry}"
    for name, text in ((p.name, p.read_text()) for p in K8S_DIR.glob("*.yaml")):
        assert not re.search(r"AKIA[0-9A-Z]{12,}|BEGIN [A-Z ]*PRIVATE KEY|auth_token\s*:\s*\S", text), name


# ---------------------------------------------------------------------------------------------
# Cluster shapes


def _worker_groups(spec: Dict) -> List[Dict]:
    return spec.get("workerGroupSpecs", [])


def _is_gpu(name: str) -> bool:
    return "-gpu" in name


@each("RayCluster", "RayJob", "RayService")
def test_clusters_autoscale_and_size_shared_memory(name, obj):
    for spec in _cluster_specs(obj):
        assert spec["enableInTreeAutoscaling"] is True, name
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in head["resources"]["limits"], f"{name}: the head is CPU-only"
        for group in [spec["headGroupSpec"], *_worker_groups(spec)]:
            volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in group["template"]["spec"]["containers"][0]["volumeMounts"]}
            shm = volumes[mounts["/dev/shm"]]["emptyDir"]
            assert shm["medium"] == "Memory" and shm["sizeLimit"], f"{name}: /dev/shm for the object store and NCCL"
            assert volumes[mounts[SHARED_MOUNT]]["persistentVolumeClaim"]["claimName"] == "llm-shared"
        for group in _worker_groups(spec):
            assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], name
        assert any(g["maxReplicas"] > g["minReplicas"] for g in _worker_groups(spec)), f"{name}: nothing to autoscale"
        gpus = [g for g in _worker_groups(spec) if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
        assert bool(gpus) == _is_gpu(name), f"{name}: GPU worker groups only in the -gpu variants"
        for group in gpus:
            resources = group["template"]["spec"]["containers"][0]["resources"]
            assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
            assert any(t.get("key") == "nvidia.com/gpu" for t in group["template"]["spec"].get("tolerations", []))


def test_cpu_and_gpu_variants_of_every_resource():
    names = {n.split(":")[0] for n, _ in of_kind("RayCluster", "RayJob", "RayService")}
    for stem in ("raycluster", "rayjob-train", "rayjob-tune", "rayservice"):
        assert {f"{stem}-cpu.yaml", f"{stem}-gpu.yaml"} <= names, stem


# ---------------------------------------------------------------------------------------------
# What the pods run


def _launch_commands(entrypoint: str) -> List[Tuple[str, List[str]]]:
    """(kind, overrides) for each `python launch/<kind>.py ...` in a shell entrypoint."""
    commands = []
    for part in re.split(r"\s*&&\s*", entrypoint.strip()):
        words = shlex.split(part)
        assert words[0] == "python" and re.fullmatch(r"launch/\w+\.py", words[1]), f"not a launch script: {part}"
        commands.append((Path(words[1]).stem, words[2:]))
    return commands


RAYJOB_COMMANDS = [
    (f"{name}#{i}", kind, overrides)
    for name, obj in of_kind("RayJob")
    for i, (kind, overrides) in enumerate(_launch_commands(obj["spec"]["entrypoint"]))
]


@pytest.mark.parametrize("where,kind,overrides", RAYJOB_COMMANDS, ids=[w for w, _, _ in RAYJOB_COMMANDS])
def test_rayjob_entrypoints_compose_into_valid_configs(where, kind, overrides):
    from framework import submit

    if not (ROOT / "launch" / f"{kind}.py").is_file():
        pytest.skip(f"launch/{kind}.py does not exist yet; its overrides are checked once it does")
    cfg = submit.compose_job(kind, overrides)  # the launch script's own config_name and check
    for key, path in submit.shared_storage(kind, cfg).items():
        assert path.startswith(SHARED_MOUNT + "/") or "://" in path, f"{where}: {key}={path} is not shared storage"


@each("RayJob")
def test_rayjobs_run_the_project_and_shut_their_cluster_down(name, obj):
    from ray.runtime_env import RuntimeEnv

    spec = obj["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec.get("ttlSecondsAfterFinished", 0) >= 0
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    # launch/ paths are relative to the image's project folder (which does not exist on this machine).
    assert env.pop("working_dir") == PROJECT_DIR and f"WORKDIR {PROJECT_DIR}" in (K8S_DIR / "Dockerfile").read_text()
    RuntimeEnv(**env)  # the rest is a runtime env Ray accepts
    assert any(kind == ("train" if "train" in name else "tune") for kind, _ in _launch_commands(spec["entrypoint"]))


def _variant(name: str) -> str:
    return "gpu" if _is_gpu(name) else "cpu"


def _override(entrypoint: str, key: str) -> str:
    [value] = [o.split("=", 1)[1] for _, overrides in _launch_commands(entrypoint) for o in overrides if o.startswith(key + "=")]
    return value


@each("RayService")
def test_rayservice_serves_the_promoted_checkpoint_with_autoscaling(name, obj):
    from ray.serve.schema import ServeDeploySchema

    spec = obj["spec"]
    serve = ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    [app] = serve.applications
    assert app.import_path == "framework.serve.app:build_app"
    # It serves what the sweep of the same variant promotes.
    [sweep] = [o for n, o in of_kind("RayJob") if "tune" in n and _variant(n) == _variant(name)]
    assert app.args["model_path"] == _override(sweep["spec"]["entrypoint"], "tune.output_dir") + "/best.json"
    # Replacing the cluster (image, resources) brings a new one up before traffic moves to it.
    assert spec["upgradeStrategy"]["type"] == "NewCluster"
    for deployment in app.deployments:
        assert deployment.health_check_period_s and deployment.health_check_timeout_s, name
        # Zero downtime when the app changes: new replicas start before old ones stop and drain.
        assert deployment.max_surge_percent == 100 and deployment.graceful_shutdown_timeout_s, name


@each("RayService")
def test_rayservice_args_compose_into_a_valid_serve_config(name, obj):
    from ray.serve.deployment import Deployment

    from framework import submit
    from framework.config import compose

    if not (ROOT / "launch" / "serve.py").is_file():
        pytest.skip("launch/serve.py does not exist yet; the serve args are checked once it does")
    from framework.serve import app as serve_app
    from framework.serve.config import to_serve_config, validate_serve

    [app] = yaml.safe_load(obj["spec"]["serveConfigV2"])["applications"]
    args = dict(app["args"])
    # build_app's args are a conf/serve preset plus serve.* keys: the overrides launch/serve.py takes.
    overrides = [f"serve={args.pop('preset', 'default')}", *(f"serve.{k}={v}" for k, v in args.items())]
    cfg = compose(overrides, submit.load_entry("serve").config_name)
    # The model folder itself exists only on the cluster's volume, so the check stops short of it.
    serve_cfg = validate_serve(to_serve_config(cfg))
    assert 1 <= serve_cfg.min_replicas < serve_cfg.max_replicas, f"{name}: Serve autoscaling"
    assert serve_cfg.api_key_env and serve_cfg.num_gpus == (1 if _is_gpu(name) else 0)
    names = {d.name for d in vars(serve_app).values() if isinstance(d, Deployment)}
    assert {d["name"] for d in app.get("deployments", [])} <= names, f"{name}: deployments the app does not have"
