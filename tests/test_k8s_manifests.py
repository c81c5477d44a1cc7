"""Every manifest in k8s/ is one the Kubernetes API server admits, and every command in it is one the project runs.

Custom resources are checked against the KubeRay CRDs the way the API server treats them on create:
null fields are pruned, fields the structural schema does not know are errors (the server would
silently prune them, so a typo would vanish), defaults are applied, then the object is validated.
Pod templates inside them, object metadata and built-in kinds are checked against the Kubernetes
schemas that the `kubernetes-validate` package ships, in their strict form (no unknown fields).

A RayJob's entrypoint is run the way KubeRay and Ray run it: pasted into the submitter pod's shell
after `ray job submit ... --`, re-quoted by Ray's CLI, and run by the job's shell on the head node;
`bash` plays both shells here, with `ray` and `python` replaced by stubs that record their arguments.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
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
CACHE_DIR = "/home/ray/.cache"  # writable ~/.cache of the read-only Ray containers (k8s/Dockerfile)
KUSTOMIZATION = K8S_DIR / "kustomization.yaml"  # kubectl's build file, not an API object
IMAGE = "llm-framework"  # the repository of every image in k8s/, renamed by the kustomization

pytestmark = pytest.mark.skipif(not CRD_DIR.is_dir(), reason=f"KubeRay CRDs not found at {CRD_DIR} (set KUBERAY_CRD_DIR)")


def load_manifests() -> List[Tuple[str, Dict]]:
    """(file:index, object) for every YAML document under k8s/."""
    found = []
    for path in sorted(p for p in K8S_DIR.glob("*.yaml") if p != KUSTOMIZATION):
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
    assert {p.name for p in K8S_DIR.glob("*.yaml")} - {KUSTOMIZATION.name} == {n.split(":")[0] for n in IDS}
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


def _groups(spec: Dict) -> List[Tuple[str, Dict]]:
    """(name, group) for the head and every worker group of a RayCluster spec."""
    return [("head", spec["headGroupSpec"]), *((g["groupName"], g) for g in spec.get("workerGroupSpecs", []))]


def _ray_container(group: Dict) -> Dict:
    return group["template"]["spec"]["containers"][0]


def _writable_mounts(container: Dict, volumes: Dict[str, Dict]) -> set:
    """Mount paths of the container that are emptyDirs: the only places it can write."""
    return {m["mountPath"] for m in container.get("volumeMounts", []) if "emptyDir" in volumes.get(m["name"], {})}


@each("RayCluster", "RayJob", "RayService")
def test_pods_run_unprivileged(name, obj):
    templates = list(pod_templates(obj["spec"], "spec"))
    assert templates, f"{name}: no pod templates"
    for where, template in templates:
        pod = template["spec"].get("securityContext", {})
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) != 0, f"{where}: pod may run as root"
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        for container in template["spec"]["containers"] + template["spec"].get("initContainers", []):
            ctx = container.get("securityContext", {})
            assert ctx.get("allowPrivilegeEscalation") is False, f"{where}/{container['name']}"
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"] and not ctx["capabilities"].get("add"), where
            assert not ctx.get("privileged") and ctx.get("runAsNonRoot", True) is True, where
            assert ctx.get("seccompProfile", pod["seccompProfile"])["type"] == "RuntimeDefault", where
            assert container["resources"]["requests"] and container["resources"]["limits"], f"{where}: no requests/limits"
            # Nothing writes to the image; Ray (and `ray job submit`, which zips the working
            # directory) writes /tmp, and Ray's processes their caches under ~/.cache.
            assert ctx.get("readOnlyRootFilesystem") is True, f"{where}/{container['name']}: writable root filesystem"
            writable = _writable_mounts(container, volumes)
            assert "/tmp" in writable, f"{where}/{container['name']}: no writable /tmp"
            if container["name"] in ("ray-head", "ray-worker"):
                assert CACHE_DIR in writable, f"{where}/{container['name']}: no writable {CACHE_DIR}"
    for spec in _cluster_specs(obj):
        autoscaling = spec.get("enableInTreeAutoscaling", False)
        if autoscaling:
            autoscaler = spec["autoscalerOptions"]
            ctx = autoscaler["securityContext"]
            assert ctx.get("allowPrivilegeEscalation") is False and ctx["capabilities"]["drop"] == ["ALL"], name
            assert ctx.get("readOnlyRootFilesystem") is True, f"{name}: the autoscaler's root filesystem is writable"
            head_volumes = {v["name"]: v for v in spec["headGroupSpec"]["template"]["spec"]["volumes"]}
            assert "/tmp" in _writable_mounts(autoscaler, head_volumes), f"{name}: the autoscaler has no writable /tmp"
        else:
            assert "autoscalerOptions" not in spec, f"{name}: autoscaler options without an autoscaler"
        # Only the autoscaler calls the Kubernetes API (to scale the cluster), from the head pod.
        for group_name, group in _groups(spec):
            token = group["template"]["spec"].get("automountServiceAccountToken")
            if group_name == "head" and autoscaling:
                assert token is not False, f"{name}: the autoscaler needs the head's service-account token"
            else:
                assert token is False, f"{name}/{group_name}: mounts a service-account token it never uses"
        # Ray's token auth is on, with the token in a Secret the operator reads.
        assert spec["authOptions"] == {"mode": "token", "secretName": "ray-auth-token"}, name
    submitter = obj["spec"].get("submitterPodTemplate")
    if submitter:
        assert submitter["spec"]["automountServiceAccountToken"] is False, name


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


def _secrets_of(container: Dict) -> set:
    """Names of the Secrets a container reads, by env entry or envFrom."""
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    return refs | {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}


@each("RayCluster", "RayJob", "RayService")
def test_secrets_reach_only_the_pods_that_use_them(name, obj):
    for spec in _cluster_specs(obj):
        for group_name, group in _groups(spec):
            secrets = _secrets_of(_ray_container(group))
            runs_work = group_name != "head" or spec["headGroupSpec"]["rayStartParams"].get("num-cpus") != "0"
            if obj["kind"] == "RayService":
                # Serve replicas read the model from the mounted volume (framework/serve/folder.py
                # takes local paths only), so no serving pod needs object-store credentials; the API
                # key goes where replicas can run.
                assert secrets == ({"llm-serve-api-key"} if runs_work else set()), f"{name}/{group_name}: {secrets}"
            else:
                # Drivers (on the head) and tasks write s3:// or gs:// storage when it is used.
                assert secrets == {"llm-object-store"}, f"{name}/{group_name}: {secrets}"
    submitter = obj["spec"].get("submitterPodTemplate")
    if submitter:
        [container] = submitter["spec"]["containers"]
        assert _secrets_of(container) == {"ray-auth-token"}, f"{name}: the submitter only talks to the Jobs API"


# ---------------------------------------------------------------------------------------------
# Images and how to name them

QUANTITY = re.compile(r"(\d+)(Ki|Mi|Gi|Ti)?")
UNITS = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
GiB = 2**30


def _bytes(quantity: str) -> int:
    match = QUANTITY.fullmatch(str(quantity))
    assert match, f"{quantity!r}: not a quantity these tests read"
    return int(match[1]) * UNITS[match[2]]


def _pyproject(key: str) -> str:
    [value] = re.findall(rf'(?m)^{re.escape(key)}\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text())
    return value


def _pinned(package: str) -> str:
    [version] = re.findall(rf"(?m)^{re.escape(package)}==(\S+)", (ROOT / "constraints.txt").read_text())
    return version


def _images(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c["image"] for c in value)
            else:
                yield from _images(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _images(value)


@each("RayCluster", "RayJob", "RayService")
def test_images_are_the_projects_for_the_variant_and_its_ray(name, obj):
    # One repository everywhere, so kustomization.yaml's `images` entry renames every one of them;
    # the tag is the project's version and the variant (a GPU pod on the CPU image has no CUDA).
    expected = f"{IMAGE}:{_pyproject('version')}-{_variant(name)}"
    images = list(_images(obj["spec"]))
    assert images and set(images) == {expected}, f"{name}: {sorted(set(images))}"
    # The Ray of the image (constraints.txt) is the Ray KubeRay configures the cluster for.
    assert {s["rayVersion"] for s in _cluster_specs(obj)} == {_pinned("ray")}, name


def test_kustomization_lists_every_manifest_and_renames_its_image():
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted({n.split(":")[0] for n in IDS})
    [entry] = kustomization["images"]
    # Tags stay per variant; only the repository (the registry) is the user's to set.
    assert entry["name"] == IMAGE and set(entry) <= {"name", "newName"}, entry
    # `kubectl apply -k k8s -l app.kubernetes.io/instance=<name>` applies exactly one of them.
    instances = [obj["metadata"]["labels"].get("app.kubernetes.io/instance") for _, obj in MANIFESTS]
    assert instances == [obj["metadata"]["name"] for _, obj in MANIFESTS], instances
    assert len(set(instances)) == len(instances)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for its built-in kustomize) is not installed")
def test_kustomize_renames_the_image_of_every_container(tmp_path):
    for path in K8S_DIR.glob("*.yaml"):
        shutil.copy(path, tmp_path / path.name)
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    kustomization["images"][0]["newName"] = "registry.example.com/ml/llm-framework"
    (tmp_path / KUSTOMIZATION.name).write_text(yaml.safe_dump(kustomization))
    built = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, check=True).stdout
    images = [image for doc in yaml.safe_load_all(built) if doc for image in _images(doc)]
    assert len(images) == sum(len(list(_images(obj))) for _, obj in MANIFESTS)
    assert all(image.startswith("registry.example.com/ml/llm-framework:0.1.0-") for image in images), images


def _dockerfile() -> List[Tuple[str, str]]:
    """(INSTRUCTION, arguments) of k8s/Dockerfile, continuation lines joined and comments dropped."""
    lines = [line for line in (K8S_DIR / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def test_dockerfile_builds_a_non_root_image_of_the_pinned_ray():
    instructions = _dockerfile()
    args = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)
    # The base image is the official Ray image of the version constraints.txt pins, for a Python
    # the project supports; every mention of a Ray image (the CPU build in the docs too) agrees.
    base = re.fullmatch(r"rayproject/ray:([\d.]+)-py(\d)(\d+)-gpu", args["BASE_IMAGE"])
    assert base and base[1] == _pinned("ray"), args["BASE_IMAGE"]
    minimum = tuple(map(int, re.fullmatch(r">=(\d+)\.(\d+)", _pyproject("requires-python")).groups()))
    assert (int(base[2]), int(base[3])) >= minimum
    for doc in (K8S_DIR / "Dockerfile", ROOT / "docs" / "cluster.md"):
        tags = set(re.findall(r"rayproject/ray:([\w.-]+)", doc.read_text()))
        assert tags and all(t.startswith(f"{base[1]}-py{base[2]}{base[3]}-") for t in tags), f"{doc.name}: {tags}"
    # Everything after FROM runs as the pods' user, numerically (runAsNonRoot can only check a number).
    [user] = [a for i, a in instructions if i == "USER"]
    assert re.fullmatch(r"\d+:\d+", user), f"USER {user}: expected uid:gid numbers"
    uid, gid = map(int, user.split(":"))
    kinds = of_kind("RayCluster", "RayJob", "RayService")
    pods = [t["spec"]["securityContext"] for _, obj in kinds for _, t in pod_templates(obj["spec"], "spec")]
    assert uid != 0 and {(p["runAsUser"], p["runAsGroup"]) for p in pods} == {(uid, gid)}
    assert [i for i, _ in instructions].index("USER") < [i for i, _ in instructions].index("RUN")
    # The project is installed with the same pins as everywhere else.
    [install] = [a for i, a in instructions if i == "RUN" and "pip install" in a]
    assert re.search(r"(-c|--constraint) constraints\.txt \.", install), install
    # Every file the image copies is let through the build context's ignore file.
    ignore = (K8S_DIR / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = {src.rstrip("/") for i, a in instructions if i == "COPY" for src in a.split()[:-1] if not src.startswith("--")}
    assert copied and copied <= allowed, copied - allowed
    assert [a for i, a in instructions if i == "WORKDIR"] == [PROJECT_DIR]


# ---------------------------------------------------------------------------------------------
# Cluster shapes


def _worker_groups(spec: Dict) -> List[Dict]:
    return spec.get("workerGroupSpecs", [])


def _is_gpu(name: str) -> bool:
    return "-gpu" in name


def _variant(name: str) -> str:
    return "gpu" if _is_gpu(name) else "cpu"


def _gpus(group: Dict) -> int:
    return int(_ray_container(group)["resources"]["limits"].get("nvidia.com/gpu", 0))


# What /dev/shm holds besides the object store: NCCL's buffers (GPU pods) and PyTorch's shared
# tensors (DataLoader workers, gloo) everywhere.
SHM_HEADROOM = {"gpu": 4 * GiB, "cpu": 1 * GiB}


@each("RayCluster", "RayJob", "RayService")
def test_shared_memory_holds_the_object_store_and_room_for_nccl(name, obj):
    for spec in _cluster_specs(obj):
        for group_name, group in _groups(spec):
            where = f"{name}/{group_name}"
            container = _ray_container(group)
            volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            shm = volumes[mounts["/dev/shm"]]["emptyDir"]
            assert shm["medium"] == "Memory", f"{where}: /dev/shm must be memory for the object store and NCCL"
            # Ray's default store is 30% of the memory limit capped at 95% of /dev/shm, which would
            # fill these /dev/shm sizes and leave NCCL next to nothing: every group sets its own.
            store = int(group["rayStartParams"]["object-store-memory"])
            headroom = SHM_HEADROOM["gpu" if _gpus(group) else "cpu"]
            assert _bytes(shm["sizeLimit"]) >= store + headroom, f"{where}: /dev/shm {shm['sizeLimit']} < store + headroom"
            # /dev/shm pages count against the container's memory limit: the processes keep at least half.
            limit = _bytes(container["resources"]["limits"]["memory"])
            assert _bytes(shm["sizeLimit"]) <= limit // 2, f"{where}: /dev/shm {shm['sizeLimit']} of a {limit // GiB}Gi limit"


@each("RayCluster", "RayJob", "RayService")
def test_clusters_autoscale_or_are_sized_to_their_run(name, obj):
    for spec in _cluster_specs(obj):
        head = _ray_container(spec["headGroupSpec"])
        assert "nvidia.com/gpu" not in head["resources"]["limits"], f"{name}: the head is CPU-only"
        for _, group in _groups(spec):
            volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in _ray_container(group)["volumeMounts"]}
            assert volumes[mounts[SHARED_MOUNT]]["persistentVolumeClaim"]["claimName"] == "llm-shared"
        groups = _worker_groups(spec)
        for group in groups:
            assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], name
        if obj["kind"] != "RayJob" or not _is_gpu(name):
            # Long-lived clusters grow and shrink with the work (Serve replicas, submitted jobs), and
            # so do the small CPU RayJobs.
            assert spec["enableInTreeAutoscaling"] is True, name
            assert any(g["maxReplicas"] > g["minReplicas"] for g in groups), f"{name}: nothing to autoscale"
        else:
            # A GPU run sizes itself to the GPUs present when it starts: its cluster is fixed
            # (test_fixed_clusters_hold_exactly_the_gpus_their_run_uses checks the size).
            assert spec["enableInTreeAutoscaling"] is False, name
            assert all(g["minReplicas"] == g["replicas"] == g["maxReplicas"] for g in groups), f"{name}: not fixed"
        gpus = [g for g in groups if _gpus(g)]
        assert bool(gpus) == _is_gpu(name), f"{name}: GPU worker groups only in the -gpu variants"
        for group in gpus:
            resources = _ray_container(group)["resources"]
            assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
            assert any(t.get("key") == "nvidia.com/gpu" for t in group["template"]["spec"].get("tolerations", []))


def test_cpu_and_gpu_variants_of_every_resource():
    names = {n.split(":")[0] for n, _ in of_kind("RayCluster", "RayJob", "RayService")}
    for stem in ("raycluster", "rayjob-train", "rayjob-tune", "rayservice"):
        assert {f"{stem}-cpu.yaml", f"{stem}-gpu.yaml"} <= names, stem


# ---------------------------------------------------------------------------------------------
# What the pods run: the entrypoint through KubeRay's submitter shell, Ray's CLI and the job's shell

HEAD_ADDRESS = "http://llm-head-svc.default.svc.cluster.local:8265"
SUBMISSION_ID = "llm-job-x7k2p"
RECORD_END = "\x1e"  # between the recorded calls; arguments are NUL-terminated

# A stand-in for `ray` and `python`: records its name and arguments, then exits with STUB_EXIT (0
# unless set). `ray job status` fails, as it does before KubeRay's first submission of a job.
STUB = r"""#!{bash}
printf '%s\0' "${{0##*/}}" "$@" >> "$CALLS"; printf '\036' >> "$CALLS"
[ "${{0##*/}} $1 $2" = "ray job status" ] && exit 1
exit "${{STUB_EXIT:-0}}"
"""


def kuberay_submitter_script(job: Dict) -> str:
    """The shell script KubeRay (v1.4 and later, K8sJobMode) runs in the submitter pod for `job`.

    As ray-operator/controllers/ray/common/job.go builds it: words joined by spaces, the runtime env
    quoted (Go's strconv.Quote, the same as JSON's for this ASCII), the entrypoint pasted in as it is.
    The wait for the dashboard that precedes it is left out: nothing of the job's is in it.
    """
    spec = job["spec"]
    runtime_env = json.dumps(json.dumps(yaml.safe_load(spec["runtimeEnvYAML"]), separators=(",", ":")))
    status = ["ray", "job", "status", "--address", HEAD_ADDRESS, SUBMISSION_ID, ">/dev/null", "2>&1"]
    submit = ["ray", "job", "submit", "--address", HEAD_ADDRESS, "--no-wait", "--runtime-env-json", runtime_env]
    submit += ["--submission-id", SUBMISSION_ID, "--", spec["entrypoint"].strip()]
    logs = ["ray", "job", "logs", "--address", HEAD_ADDRESS, "--follow", SUBMISSION_ID]
    return " ".join(["if", "!", *status, ";", "then", *submit, ";", "fi", ";", *logs])


def run_with_stubs(tmp_path: Path, argv: List[str], path: List[str], stub_exit: int = 0) -> Tuple[int, List[List[str]]]:
    """Run `argv` with `ray` and `python` stubbed first on PATH; its exit code and the stubs' calls."""
    bash = shutil.which("bash")
    stubs, calls = tmp_path / "stubs", tmp_path / "calls"
    stubs.mkdir(exist_ok=True)
    calls.write_bytes(b"")
    for command in ("ray", "python"):
        (stubs / command).write_text(STUB.format(bash=bash))
        (stubs / command).chmod(0o755)
    env = {"PATH": os.pathsep.join([str(stubs), *path]), "CALLS": str(calls), "STUB_EXIT": str(stub_exit)}
    # An empty working directory, so that nothing but the stubs could be run from it.
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=30)
    records = calls.read_text().split(RECORD_END)[:-1]
    return done.returncode, [record.split("\0")[:-1] for record in records]


def submitted_entrypoint(job: Dict, tmp_path: Path) -> List[str]:
    """The argv after `--` of the one `ray job submit` the submitter pod's shell runs for `job`."""
    # failglob: a glob left unquoted would expand against the submitter pod's files; here it fails.
    script = "shopt -s failglob; " + kuberay_submitter_script(job)
    # Nothing else is on PATH: anything run besides `ray` (a stage after a bare `&&`) is recorded
    # by the python stub or fails as not found.
    code, calls = run_with_stubs(tmp_path, [shutil.which("bash"), "-c", script], path=[])
    assert code == 0, f"the submitter's shell failed ({code}) running {script}"
    submits = [c for c in calls if c[:3] == ["ray", "job", "submit"]]
    assert len(submits) == 1, f"{len(submits)} `ray job submit` in {calls}"
    others = [c for c in calls if c[:3] not in (["ray", "job", "status"], ["ray", "job", "submit"], ["ray", "job", "logs"])]
    assert others == [], f"run in the submitter pod, not on the cluster: {others}"
    [submit] = submits
    return submit[submit.index("--") + 1 :]


def run_on_cluster(argv: List[str], tmp_path: Path, stub_exit: int = 0) -> Tuple[int, List[List[str]]]:
    """Run a submitted entrypoint as the job does: Ray's CLI joins it (shlex.join), the job supervisor
    runs that with /bin/sh; gives the exit code and the `python` commands it ran, in order."""
    system = sorted({os.path.dirname(shutil.which(c)) for c in ("bash", "sh")})
    code, calls = run_with_stubs(tmp_path, ["/bin/sh", "-c", shlex.join(argv)], path=system, stub_exit=stub_exit)
    assert all(c[0] == "python" for c in calls), calls
    return code, [c[1:] for c in calls]


@lru_cache(maxsize=None)
def _stages(name: str) -> Tuple[Tuple[str, Tuple[str, ...]], ...]:
    """(kind, overrides) of each `python launch/<kind>.py ...` the RayJob `name` runs on the cluster, in order."""
    import tempfile

    [job] = [obj for n, obj in MANIFESTS if n == name]
    with tempfile.TemporaryDirectory() as tmp:
        code, commands = run_on_cluster(submitted_entrypoint(job, Path(tmp)), Path(tmp))
    assert code == 0 and commands, f"{name}: ran {commands}, exit code {code}"
    stages = []
    for words in commands:
        assert re.fullmatch(r"launch/\w+\.py", words[0]), f"{name}: not a launch script: {words}"
        stages.append((Path(words[0]).stem, tuple(words[1:])))
    return tuple(stages)


def test_the_submitter_simulation_catches_a_stage_chained_in_its_shell(tmp_path):
    # What the RayJobs did before: with a bare `&&`, the second stage runs in the submitter pod.
    job = {"spec": {"runtimeEnvYAML": "working_dir: /x\n", "entrypoint": "python launch/prep.py && python launch/train.py"}}
    with pytest.raises(AssertionError, match="run in the submitter pod, not on the cluster"):
        submitted_entrypoint(job, tmp_path)
    job["spec"]["entrypoint"] = "python launch/train.py data.sources.0.path=corpus/*.jsonl"
    with pytest.raises(AssertionError, match="the submitter's shell failed"):
        submitted_entrypoint(job, tmp_path)


def test_quoted_hydra_overrides_reach_the_launch_script_as_typed_locally(tmp_path):
    # Locally: python launch/prep.py 'data.sources.0.path=corpus/*.jsonl' '+tags=["a b",c]'
    # In a RayJob, inside bash -c '...': double quotes where the shell would glob, '\'' for a single quote.
    pipeline = r"""python launch/prep.py "data.sources.0.path=corpus/*.jsonl" '\''+tags=["a b",c]'\''"""
    job = {"spec": {"runtimeEnvYAML": "working_dir: /x\n", "entrypoint": f"bash -c '{pipeline} && python launch/train.py'"}}
    code, commands = run_on_cluster(submitted_entrypoint(job, tmp_path), tmp_path)
    assert code == 0 and commands == [
        ["launch/prep.py", "data.sources.0.path=corpus/*.jsonl", '+tags=["a b",c]'],
        ["launch/train.py"],
    ], commands


@each("RayJob")
def test_rayjob_entrypoint_is_one_command_in_the_submitter_shell(name, obj, tmp_path):
    argv = submitted_entrypoint(obj, tmp_path)
    # The shell neither split, expanded nor globbed it: the argv is the entrypoint's words, unquoted.
    assert argv == shlex.split(obj["spec"]["entrypoint"]), argv
    # One program whose argument is the whole pipeline, run on the cluster.
    assert argv[:2] == ["bash", "-c"] and len(argv) == 3, argv


@each("RayJob")
def test_rayjob_stages_run_in_order_on_the_cluster_and_stop_at_the_first_failure(name, obj, tmp_path):
    stages = _stages(name)
    kind = "train" if "train" in name else "tune"
    assert [k for k, _ in stages] == ["prep", kind], stages
    # A failed prep ends the job with its exit code: the job fails, and nothing trains on stale shards.
    code, commands = run_on_cluster(submitted_entrypoint(obj, tmp_path), tmp_path, stub_exit=3)
    assert code == 3 and [c[0] for c in commands] == ["launch/prep.py"], commands


@each("RayJob")
def test_rayjob_stages_compose_into_valid_configs(name, obj):
    from framework.submit import jobs

    for kind, overrides in _stages(name):
        if not (ROOT / "launch" / f"{kind}.py").is_file():
            pytest.skip(f"launch/{kind}.py does not exist yet; its overrides are checked once it does")
        cfg = jobs.compose_job(kind, list(overrides))  # the launch script's own config_name and check
        for key, path in jobs.shared_storage(kind, cfg).items():
            assert path.startswith(SHARED_MOUNT + "/") or "://" in path, f"{name} {kind}: {key}={path} is not shared storage"
    # Both stages read and write the same shards.
    [prep_dir, run_dir] = [jobs.compose_job(k, list(o), check=False).data.output_dir for k, o in _stages(name)]
    assert prep_dir == run_dir, name


FIXED = [(n, o) for n, o in of_kind("RayJob") if not o["spec"]["rayClusterSpec"].get("enableInTreeAutoscaling")]


@pytest.mark.parametrize("name,obj", FIXED, ids=[n for n, _ in FIXED])
def test_fixed_clusters_hold_exactly_the_gpus_their_run_uses(name, obj):
    from omegaconf import OmegaConf

    from framework.submit import jobs

    spec = obj["spec"]["rayClusterSpec"]
    kind, overrides = _stages(name)[-1]
    cfg = jobs.compose_job(kind, list(overrides), check=False)
    trials = OmegaConf.select(cfg, "tune.max_concurrent_trials", default=1)
    wanted = trials * cfg.run.num_workers * cfg.run.gpus_per_worker
    present = sum(g["replicas"] * _gpus(g) for g in _worker_groups(spec))
    # Fewer and the run refuses to start; more and they idle for the whole run.
    assert present == wanted, f"{name}: {present} GPUs for {trials} × {cfg.run.num_workers} workers × {cfg.run.gpus_per_worker}"


@each("RayJob")
def test_rayjobs_run_the_project_and_shut_their_cluster_down(name, obj):
    from ray.runtime_env import RuntimeEnv

    spec = obj["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec.get("ttlSecondsAfterFinished", 0) >= 0
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    # launch/ paths are relative to the image's project folder (which does not exist on this machine).
    assert env.pop("working_dir") == PROJECT_DIR and f"WORKDIR {PROJECT_DIR}" in (K8S_DIR / "Dockerfile").read_text()
    RuntimeEnv(**env)  # the rest is a runtime env Ray accepts


def _override(name: str, key: str) -> str:
    [value] = [o.split("=", 1)[1] for _, overrides in _stages(name) for o in overrides if o.startswith(key + "=")]
    return value


@each("RayService")
def test_rayservice_serves_the_promoted_checkpoint_with_autoscaling(name, obj):
    from ray.serve.schema import ServeDeploySchema

    spec = obj["spec"]
    serve = ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    [app] = serve.applications
    assert app.import_path == "framework.serve.app:build_app"
    # It serves what the sweep of the same variant promotes.
    [sweep] = [n for n, _ in of_kind("RayJob") if "tune" in n and _variant(n) == _variant(name)]
    assert app.args["model_path"] == _override(sweep, "tune.output_dir") + "/best.json"
    # A stamp to bump when a model is promoted again to the same path (docs/cluster.md).
    assert app.runtime_env["env_vars"]["MODEL_REVISION"], name
    # Replacing the cluster (image, resources) brings a new one up before traffic moves to it.
    assert spec["upgradeStrategy"]["type"] == "NewCluster"
    for deployment in app.deployments:
        assert deployment.health_check_period_s and deployment.health_check_timeout_s, name
        # Zero downtime when the app changes: new replicas start before old ones stop and drain.
        assert deployment.max_surge_percent == 100 and deployment.graceful_shutdown_timeout_s, name


@each("RayService")
def test_rayservice_args_compose_into_a_valid_serve_config(name, obj):
    from framework.submit import jobs

    if not (ROOT / "launch" / "serve.py").is_file():
        pytest.skip("launch/serve.py does not exist yet; the serve args are checked once it does")
    from framework.serve.config import to_serve_config, validate_serve

    [app] = yaml.safe_load(obj["spec"]["serveConfigV2"])["applications"]
    args = dict(app["args"])
    # build_app's args are a conf/serve preset plus serve.* keys: the overrides launch/serve.py takes.
    overrides = [f"serve={args.pop('preset', 'default')}", *(f"serve.{k}={v}" for k, v in args.items())]
    cfg = jobs.load_entry("serve").job.compose(overrides)
    # The model folder itself exists only on the cluster's volume, so the check stops short of it.
    serve_cfg = validate_serve(to_serve_config(cfg))
    assert 1 <= serve_cfg.min_replicas < serve_cfg.max_replicas, f"{name}: Serve autoscaling"
    assert serve_cfg.api_key_env and serve_cfg.num_gpus == (1 if _is_gpu(name) else 0)
    from framework.serve.llm import ENGINE_DEPLOYMENT

    # The app's one deployment (framework/serve/app.py: build), named as Ray Serve LLM names its engine's.
    assert {d["name"] for d in app.get("deployments", [])} <= {f"LLMServer:{ENGINE_DEPLOYMENT}"}, f"{name}: deployments the app does not have"


def _rayservice_serve_config(obj: Dict):  # noqa: ANN202 - (the app's serveConfigV2 entry, its ServeConfig)
    """The RayService's one application and the serve config its args compose into (model folder unchecked)."""
    from framework.serve.config import compose_serve_config

    [app] = yaml.safe_load(obj["spec"]["serveConfigV2"])["applications"]
    return app, compose_serve_config(app["args"])


@each("RayService")
def test_rayservice_exposes_the_metrics_port_of_every_ray_pod(name, obj):
    """Ray exports its own, Serve's and the framework's serving metrics (ray_llm_*) on this port of each node."""
    for spec in _cluster_specs(obj):
        for group_name, group in _groups(spec):
            port = int(group["rayStartParams"]["metrics-export-port"])
            ports = {p["name"]: p["containerPort"] for p in _ray_container(group)["ports"]}
            assert ports.get("metrics") == port, f"{name}/{group_name}: metrics port not exposed"


@each("RayService")
def test_rayservice_proxies_check_the_key_and_size_the_app_configures(name, obj):
    """Every pod's Serve proxy applies the ingress checks (framework/serve/ingress.py) with the app's own values."""
    from framework.serve.ingress import ingress_environment

    app, cfg = _rayservice_serve_config(obj)
    expected = ingress_environment(cfg.api_key_env, app["route_prefix"], cfg.max_request_bytes)
    for spec in _cluster_specs(obj):
        for group_name, group in _groups(spec):
            env = {e["name"]: e.get("value") for e in _ray_container(group).get("env", [])}
            assert {k: env.get(k) for k in expected} == expected, f"{name}/{group_name}"
