"""deploy/k8s: every service scales and rolls out on its own (rendered as `kubectl apply -k` renders it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = {"inference": 50051, "retrieval": 50052, "postprocess": 50053}


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (for its built-in kustomize) is not on PATH")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "deploy" / "k8s" / "base")], capture_output=True, text=True
    )
    assert rendered.returncode == 0, rendered.stderr  # no --load-restrictor: apply -k takes none
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}"
    return found[0]


def settings(objects: list[dict[str, Any]]) -> dict[str, str]:
    return dict(find(objects, "ConfigMap", "ragmesh-settings")["data"])


def test_preprocess_dials_headless_services_with_dns_targets(objects: list[dict[str, Any]]) -> None:
    config = settings(objects)
    for service, port in BACKENDS.items():
        target = config[f"RAGMESH_PREPROCESS_{service.upper()}_ADDR"]
        assert target == f"dns:///{service}-headless:{port}"
        headless = find(objects, "Service", f"{service}-headless")["spec"]
        assert headless["clusterIP"] == "None" and not headless.get("publishNotReadyAddresses")
        assert headless["selector"] == {"app.kubernetes.io/name": service}
        assert [p["port"] for p in headless["ports"]] == [port]
    assert config["RAGMESH_RETRIEVAL_PEERS"] == "dns:///retrieval-headless:50052"


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def test_the_grace_period_covers_prestop_and_the_drain(objects: list[dict[str, Any]]) -> None:
    config = settings(objects)
    checked = set()
    for workload in workloads(objects):
        pod = workload["spec"]["template"]["spec"]
        container = pod["containers"][0]
        sleep = container["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep[0] == "sleep"
        service = container["name"] if container["name"] != "nginx" else None
        drain = 0.0
        if service is not None:
            prefix = f"RAGMESH_{service.upper()}"
            # preprocess serves no gRPC, so it has no drain delay (only its HTTP shutdown grace).
            drain = float(config.get(f"{prefix}_DRAIN_DELAY", 0)) + float(config[f"{prefix}_SHUTDOWN_GRACE"])
        assert pod["terminationGracePeriodSeconds"] >= int(sleep[1]) + drain + 2, workload["metadata"]["name"]
        checked.add(workload["metadata"]["name"])
    assert {"inference", "retrieval", "postprocess", "preprocess", "preprocess-batch", "gateway"} <= checked


def test_rollouts_never_take_a_ready_replica_away_first(objects: list[dict[str, Any]]) -> None:
    for workload in workloads(objects):
        if workload["kind"] == "Deployment":
            rolling = workload["spec"]["strategy"]["rollingUpdate"]
            assert rolling == {"maxSurge": 1, "maxUnavailable": 0}, workload["metadata"]["name"]
    for service in BACKENDS:
        kind = "StatefulSet" if service == "retrieval" else "Deployment"
        assert find(objects, kind, service)["spec"]["replicas"] >= 2


def test_inference_is_scaled_by_keda_on_the_engines_waiting_requests(objects: list[dict[str, Any]]) -> None:
    scaled = find(objects, "ScaledObject", "inference")["spec"]
    assert scaled["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "inference"}
    assert scaled["minReplicaCount"] >= 2
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "prometheus" and "ragmesh:num_requests_waiting" in trigger["metadata"]["query"]
    # The other autoscalers are still there, one owner per workload.
    targets = [
        o["spec"]["scaleTargetRef"]["name"] for o in objects if o["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")
    ]
    assert sorted(targets) == sorted(set(targets)) and {"preprocess", "postprocess", "retrieval", "inference"} <= set(
        targets
    )


def test_only_preprocess_may_call_the_backends(objects: list[dict[str, Any]]) -> None:
    for service in BACKENDS:
        policy = find(objects, "NetworkPolicy", service)["spec"]
        assert policy["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": service}}
        assert policy["policyTypes"] == ["Ingress"]
        grpc_callers: set[str] = set()
        for rule in policy["ingress"]:
            ports = {p["port"] for p in rule["ports"]}
            if "grpc" in ports:
                for source in rule["from"]:
                    (expression,) = source["podSelector"]["matchExpressions"]
                    assert expression["key"] == "app.kubernetes.io/name" and expression["operator"] == "In"
                    grpc_callers |= set(expression["values"])
            else:
                assert ports == {"http"}  # health and metrics, from the monitoring namespace
        # retrieval replicas also call each other: an empty one copies the collections from a peer.
        expected = {"preprocess", "preprocess-batch"} | ({"retrieval"} if service == "retrieval" else set())
        assert grpc_callers == expected, service
