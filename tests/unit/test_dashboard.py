"""The Grafana dashboard in the chart queries only metrics that exist.

Every PromQL expression of charts/imagebatch/dashboards/imagebatch.json (panel targets and the
label_values queries of its variables) is read by a small PromQL reader: label matchers, ranges,
grouping clauses, functions (which must be PromQL's), binary operators, numbers; what is left are
metric names. Each must be a series that operator/metrics.py or worker/cluster.py exposes (read from
prometheus_client's registry, with the _total/_bucket/_sum/_count names it serves), and each label
it matches on must be one of that metric's labels or a target label Prometheus adds. Renaming a
metric, or a label, without the dashboard fails here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

import imagebatch.worker.cluster as worker_metrics
from imagebatch.operator import metrics as operator_metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "charts/imagebatch/dashboards/imagebatch.json"

AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
FUNCTIONS = AGGREGATIONS | {
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp", "floor",
    "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile", "histogram_sum",
    "holt_winters", "hour", "idelta", "increase", "irate", "label_join", "label_replace", "ln",
    "log2", "log10", "minute", "month", "predict_linear", "rate", "resets", "round", "scalar", "sgn",
    "sort", "sort_desc", "sqrt", "time", "timestamp", "vector", "year", "avg_over_time",
    "min_over_time", "max_over_time", "sum_over_time", "count_over_time", "quantile_over_time",
    "stddev_over_time", "stdvar_over_time", "last_over_time", "present_over_time",
}  # fmt: skip
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2"}
# Labels Prometheus puts on every scraped series (the PodMonitor makes `job` the ImageBatchJob's
# name, the operator's ServiceMonitor keeps its metrics' own namespace and job labels).
TARGET_LABELS = {"namespace", "job", "pod", "instance", "container", "endpoint", "service"}

TOKEN = re.compile(
    r"""\s*(?:
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<var>\$\{[^}]+\}|\$\w+)
    | (?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?(?:ms|s|m|h|d|w|y)?)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<matchop>=~|!~|!=|==|<=|>=)
    | (?P<punct>[(){}\[\],=+\-*/%^<>@])
    )""",
    re.VERBOSE,
)


@dataclass
class Query:
    metrics: set[str] = field(default_factory=set)
    labels: set[tuple[str, str]] = field(default_factory=set)  # (metric, label) of its matchers


def tokens(expr: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        if expr[pos:].strip() == "":
            break
        m = TOKEN.match(expr, pos)
        assert m and m.end() > pos, f"cannot read PromQL at {expr[pos:]!r} in {expr!r}"
        kind = m.lastgroup
        assert kind is not None
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def closing(toks: list[tuple[str, str]], i: int, open_: str, close: str, expr: str) -> int:
    """Index of the token closing the bracket at i."""
    depth = 0
    for j in range(i, len(toks)):
        if toks[j] == ("punct", open_):
            depth += 1
        elif toks[j] == ("punct", close):
            depth -= 1
            if depth == 0:
                return j
    raise AssertionError(f"unbalanced {open_!r} in {expr!r}")


def read_promql(expr: str) -> Query:
    q = Query()
    toks = tokens(expr)
    assert toks, "empty expression"
    parens = 0
    last_metric: str | None = None
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else ("", "")
        if (kind, text) == ("punct", "{"):
            end = closing(toks, i, "{", "}", expr)
            inner = toks[i + 1 : end]
            # name op "value", comma-separated
            for k in range(0, len(inner), 4):
                label, op, value = inner[k : k + 3]
                assert label[0] == "ident" and op[1] in {"=", "!=", "=~", "!~"} and value[0] == "string", (
                    f"bad label matcher {inner[k : k + 3]} in {expr!r}"
                )
                assert last_metric is not None, f"a selector without a metric name in {expr!r}"
                q.labels.add((last_metric, label[1]))
            i = end + 1
            continue
        if (kind, text) == ("punct", "["):
            i = closing(toks, i, "[", "]", expr) + 1
            continue
        if kind == "punct" and text in "()":
            parens += 1 if text == "(" else -1
            assert parens >= 0, f"unbalanced ')' in {expr!r}"
        if kind == "ident":
            if text in GROUPING:
                if nxt == ("punct", "("):
                    i = closing(toks, i + 1, "(", ")", expr) + 1
                    continue
                assert text.startswith("group_"), f"{text} needs a label list in {expr!r}"
            elif text in KEYWORDS:
                pass
            elif nxt == ("punct", "("):
                assert text in FUNCTIONS, f"{text}() is not a PromQL function ({expr!r})"
            elif nxt[0] == "ident" and nxt[1] in {"by", "without"}:
                assert text in AGGREGATIONS, f"{text} is not a PromQL aggregation ({expr!r})"
            else:
                q.metrics.add(text)
                last_metric = text
        i += 1
    assert parens == 0, f"unbalanced '(' in {expr!r}"
    return q


def read_variable_query(query: str) -> Query:
    """Grafana's label_values(metric{...}, label) / label_values(label)."""
    m = re.fullmatch(r"\s*label_values\((?:(?P<expr>.+),)?\s*(?P<label>\w+)\s*\)\s*", query)
    assert m, f"not a label_values query: {query!r}"
    if m["expr"] is None:
        return Query()
    q = read_promql(m["expr"])
    q.labels |= {(metric, m["label"]) for metric in q.metrics}
    return q


def dashboard_queries(node: Any, where: str = "") -> Iterator[tuple[str, Query]]:
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str):
            yield f"{where} {node['expr']!r}", read_promql(node["expr"])
        if node.get("type") == "query" and "query" in node:
            query = node["query"]
            text = query["query"] if isinstance(query, dict) else query
            yield f"variable {node.get('name')} {text!r}", read_variable_query(text)
        for key, value in node.items():
            yield from dashboard_queries(value, f"{where}/{node.get('title', key)}")
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_queries(item, where)


def exposed() -> dict[str, set[str]]:
    """Each series name the operator and the workers serve -> the labels of its metric."""
    ours = [
        m
        for module in (operator_metrics, worker_metrics)
        for m in vars(module).values()
        if isinstance(m, MetricWrapperBase)
    ]
    assert len(ours) >= 10
    names: dict[str, set[str]] = {}
    for name, collector in REGISTRY._names_to_collectors.items():
        metric = next((m for m in ours if m is collector), None)
        if metric is None:
            continue
        family = {f.name: f.type for f in metric.describe()}
        if family.get(name) in {"counter", "histogram", "summary"}:
            continue  # the family name, not a series: Prometheus has x_total, x_bucket, ...
        labels = set(metric._labelnames)
        if name.endswith("_bucket"):
            labels.add("le")
        names[name] = labels
    return names


def problems(dashboard: Any) -> list[str]:
    known = exposed()
    out = []
    for where, q in dashboard_queries(dashboard):
        assert q.metrics or where.startswith("variable"), f"no metric in {where}"
        for name in sorted(q.metrics - set(known)):
            out.append(f"{where}: {name} is not a metric of the operator or the workers")
        for metric, label in sorted(q.labels):
            if metric in known and label not in known[metric] | TARGET_LABELS:
                out.append(f"{where}: {metric} has no label {label}")
    return out


def load() -> Any:
    return json.loads(DASHBOARD.read_text())


def test_every_metric_the_dashboard_queries_exists() -> None:
    dashboard = load()
    queried = {name for _, q in dashboard_queries(dashboard) for name in q.metrics}
    assert problems(dashboard) == []
    # The panels the chart promises, each on the metric that carries it.
    assert {
        "imagebatch_job_images_per_second",
        "imagebatch_job_items",
        "imagebatch_job_desired_replicas",
        "imagebatch_job_active_replicas",
        "imagebatch_shard_retries_total",
        "imagebatch_reconciles_total",
        "imagebatch_worker_batch_seconds_bucket",
        "imagebatch_worker_claim_seconds_bucket",
    } <= queried


def test_every_panel_has_a_query_and_the_variables_exist() -> None:
    dashboard = load()
    for panel in dashboard["panels"]:
        assert panel.get("targets"), f"panel {panel['title']!r} queries nothing"
    names = {v["name"] for v in dashboard["templating"]["list"]}
    for where, _ in dashboard_queries(dashboard):
        for var in re.findall(r"\$(\w+)", where):
            assert var.startswith("__") or var in names, f"{where}: no variable ${var}"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("imagebatch_job_active_replicas", "imagebatch_job_running_replicas", "is not a metric"),
        ("imagebatch_worker_claim_seconds_bucket", "imagebatch_worker_claim_seconds", "is not a metric"),
        ('state="done"', 'phase="done"', "has no label phase"),
        ("histogram_quantile(0.5", "histogram_quantil(0.5", "not a PromQL function"),
        ("sum by (namespace, job) (rate(", "sum by (namespace, job) (rate((", "unbalanced"),
        ("[$__rate_interval]", "[$__rate_interval", "unbalanced"),
        ('state="done"', 'state=done"', "cannot read PromQL"),
    ],
)
def test_the_check_fails_on_a_broken_query(old: str, new: str, message: str) -> None:
    def edit(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: edit(v) for k, v in node.items()}
        if isinstance(node, list):
            return [edit(v) for v in node]
        return node.replace(old, new) if isinstance(node, str) else node

    broken = edit(load())
    assert broken != load(), f"{old!r} is not in the dashboard"
    try:
        found = problems(broken)
    except AssertionError as e:
        found = [str(e)]
    assert any(message in p for p in found), found
