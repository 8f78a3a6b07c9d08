"""The Grafana dashboard queries only metrics (and labels) the services export."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "ragmesh-dashboard.json"
METRIC_MODULES = (
    "ragmesh.grpc_server",
    "preprocess.metrics",
    "preprocess.keys",
    "preprocess.queue_depth",
    "preprocess.batches",
    "inference.engine",
    "inference.llamacpp_stream",
    "inference.router",
    "retrieval.search",
    "retrieval.embedder",
    "retrieval.ingestion",
    "postprocess.cache",
)
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exported() -> dict[str, set[str]]:
    """Sample name -> its label names, for every metric the services define."""
    for module in METRIC_MODULES:
        importlib.import_module(module)
    names: dict[str, set[str]] = {}
    for collector in list(REGISTRY._collector_to_names):  # the registry's own index of collectors
        if not isinstance(collector, MetricWrapperBase):
            continue  # process and platform collectors
        labels = set(collector._labelnames)
        for family in collector.describe():
            for suffix in SUFFIXES.get(family.type, ("",)):
                names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


def test_every_query_names_an_exported_metric_and_its_labels() -> None:
    known = exported()
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 14
    for expr in exprs:
        used = set(re.findall(r"\b(ragmesh[a-zA-Z0-9_:]*)", expr))
        assert used, expr
        for name in used:
            assert name in known, f"{name} (in {expr!r}) is not exported"
        # Labels grouped by or matched on must exist on every metric of the query.
        grouped = {label.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")}
        matched = set(re.findall(r"([a-z_]+)=~?\"", expr))
        for name in used:
            missing = (grouped | matched) - known[name]
            assert not missing, f"{name} has no labels {missing} (in {expr!r})"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "model", "key"} <= set(variables)
