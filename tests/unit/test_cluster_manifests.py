"""cluster/ manifests against the KubeRay CRD schemas (tests/data/kuberay, copied from ray-project/kuberay),
strictly: an unknown field fails, as the Kubernetes API server's strict field validation rejects it."""

import copy
import functools
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[2]
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def strict(schema):
    """The CRD's OpenAPI schema with unknown fields forbidden wherever Kubernetes would prune or reject them."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("x-kubernetes-int-or-string"):
                node.pop("type", None)
                node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


@functools.cache
def validator(kind):
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2 MB of YAML
    crd = yaml.load((ROOT / "tests/data/kuberay" / CRDS[kind]).read_text(), Loader=loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def errors(doc):
    return sorted(validator(doc["kind"]).iter_errors(doc), key=lambda e: list(e.absolute_path))


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_manifests_validate_against_the_crds(name):
    doc = yaml.safe_load((ROOT / "cluster" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    problems = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors(doc)]
    assert not problems, problems


def _gpu_group(doc):
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def test_the_job_runs_rdistill_on_gpu_workers_and_shuts_down():
    job = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())
    assert job["spec"]["entrypoint"].startswith("python -m rdistill.pds --config configs/")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    config = job["spec"]["entrypoint"].split("--config ")[1].split()[0]
    assert (ROOT / config).exists()
    for name in ("raycluster.yaml", "rayjob.yaml"):
        res = _gpu_group(yaml.safe_load((ROOT / "cluster" / name).read_text()))["resources"]
        assert res["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize(
    "path,typo",
    [
        (("spec",), "shutdownAfterJobFinish"),  # a typo'd top-level field
        (("spec", "rayClusterSpec", "headGroupSpec"), "rayStartParam"),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0), "replica"),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0), "imagee"),
    ],
)
def test_a_typo_fails_validation(path, typo):
    doc = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())
    node = doc
    for p in path:
        node = node[p]
    node[typo] = node.get(typo.rstrip("e"), 1)
    assert any(typo in e.message for e in errors(doc)), typo


def test_a_wrong_type_fails_validation():
    doc = yaml.safe_load((ROOT / "cluster" / "raycluster.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert errors(doc)
