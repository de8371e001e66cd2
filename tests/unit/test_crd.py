"""The CRDs under crds/ (and the chart's copy) are what the pydantic models give, and are sound."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from imagebatch import api, crd

REPO = Path(__file__).resolve().parents[2]


def schema_of(doc: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def walk(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path (`spec.generation.width`, `spec.prompts[]`)."""
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}" if path else name)
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    return {name: yaml.safe_load(text) for name, text in crd.rendered().items()}


@pytest.fixture(scope="module")
def job(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return docs["imagebatch.dev_imagebatchjobs.yaml"]


@pytest.fixture(scope="module")
def shard(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return docs["imagebatch.dev_imagebatchshards.yaml"]


def test_committed_crds_are_up_to_date() -> None:
    stale = crd.stale_files(REPO)
    assert not stale, f"stale CRD files {[str(p) for p in stale]}: run `python -m imagebatch.crd`"


def test_chart_copy_is_identical() -> None:
    for path in sorted((REPO / "crds").glob("*.yaml")):
        copy = REPO / "charts/imagebatch/crds" / path.name
        assert copy.read_bytes() == path.read_bytes(), f"{copy} differs from {path}"


def test_check_mode_reports_stale_and_write_fixes_it(tmp_path: Path) -> None:
    out: list[str] = []
    assert crd.main(["--check", "--root", str(tmp_path)], out=out.append) == 1
    assert any("stale" in line for line in out)
    assert crd.main(["--root", str(tmp_path)], out=out.append) == 0
    assert crd.main(["--check", "--root", str(tmp_path)], out=out.append) == 0
    # A hand edit and a leftover file are both stale.
    job_file = tmp_path / "crds/imagebatch.dev_imagebatchjobs.yaml"
    job_file.write_text(job_file.read_text().replace("shortNames", "shortnames"))
    (tmp_path / "charts/imagebatch/crds/old.yaml").write_text("{}\n")
    stale = {p.name for p in crd.stale_files(tmp_path)}
    assert stale == {"imagebatch.dev_imagebatchjobs.yaml", "old.yaml"}
    crd.write(tmp_path)
    assert crd.stale_files(tmp_path) == []


def test_names_scope_and_subresources(job: dict[str, Any], shard: dict[str, Any]) -> None:
    for doc, plural, short in ((job, "imagebatchjobs", "ibj"), (shard, "imagebatchshards", "ibs")):
        assert doc["apiVersion"] == "apiextensions.k8s.io/v1"
        assert doc["metadata"]["name"] == f"{plural}.imagebatch.dev"
        spec = doc["spec"]
        assert spec["group"] == api.GROUP and spec["scope"] == "Namespaced"
        assert spec["names"]["shortNames"] == [short]
        assert spec["names"]["categories"] == ["imagebatch"]
        (version,) = spec["versions"]
        assert version["name"] == api.VERSION and version["served"] and version["storage"]
        assert version["subresources"] == {"status": {}}


def test_printer_columns(job: dict[str, Any], shard: dict[str, Any]) -> None:
    cols = {c["name"]: c["jsonPath"] for c in job["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert cols == {
        "State": ".status.state",
        "Reason": ".status.reason",
        "Progress": ".status.progress",
        "Ready": ".status.ready",
        "Img/s": ".status.imagesPerSecond",
        "ETA": ".status.eta",
        "Age": ".metadata.creationTimestamp",
        "Message": '.status.conditions[?(@.type=="Ready")].message',
    }
    cols = {c["name"]: c["jsonPath"] for c in shard["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert list(cols) == ["Job", "State", "Attempt", "Failures", "Holder", "Age"]
    # Printer columns must point at fields the schema has.
    for doc in (job, shard):
        paths = {p for p, _ in walk(schema_of(doc), "")}
        for column in doc["spec"]["versions"][0]["additionalPrinterColumns"]:
            field = column["jsonPath"].lstrip(".").split("[", 1)[0]
            if not field.startswith("metadata."):
                assert field in paths, column


def test_structural(docs: dict[str, dict[str, Any]]) -> None:
    """Every node has a type (or is int-or-string / keeps unknown fields); no $ref, no anyOf with
    types, no additionalProperties: false, no nullable."""
    for doc in docs.values():
        text = yaml.safe_dump(doc)
        assert "$ref" not in text and "$defs" not in text and "title:" not in text
        for path, node in walk(schema_of(doc), ""):
            assert (
                "type" in node
                or node.get("x-kubernetes-int-or-string")
                or node.get("x-kubernetes-preserve-unknown-fields")
            ), f"{path} has no type"
            assert node.get("additionalProperties") is not False, path
            assert "nullable" not in node, path
            if "properties" in node and "additionalProperties" in node:
                pytest.fail(f"{path}: properties and additionalProperties are exclusive")
            for junctor in ("anyOf", "oneOf", "allOf"):
                for branch in node.get(junctor, []):
                    if junctor == "anyOf" and node.get("x-kubernetes-int-or-string"):
                        assert branch in ({"type": "integer"}, {"type": "string"}), path
                    else:
                        assert set(branch) <= {"required"}, f"{path}: {branch}"
            if node.get("type") == "integer" and "maximum" in node:
                assert node["maximum"] < 2**63, path
            assert not isinstance(node.get("exclusiveMaximum"), int | float) or isinstance(
                node.get("exclusiveMaximum"), bool
            ), f"{path}: OpenAPI v3.0 exclusiveMaximum is a boolean"


def test_descriptions_on_every_spec_field(job: dict[str, Any], shard: dict[str, Any]) -> None:
    for doc in (job, shard):
        root = schema_of(doc)
        assert root["description"]
        for path, node in walk(root["properties"]["spec"], "spec"):
            if path.endswith("{}"):  # map values (quantities)
                continue
            assert node.get("description"), f"{path} has no description (kubectl explain shows it)"
        for path, node in walk(root["properties"]["status"], "status"):
            assert node.get("description"), f"{path} has no description"


def test_every_model_field_is_in_the_schema(job: dict[str, Any]) -> None:
    spec = schema_of(job)["properties"]["spec"]["properties"]
    for name, field in api.ImageBatchJobSpec.model_fields.items():
        assert (field.alias or name) in spec
    workers = spec["workers"]["properties"]
    for name, field in api.Workers.model_fields.items():
        assert (field.alias or name) in workers
    status = schema_of(job)["properties"]["status"]["properties"]
    for name, field in api.ImageBatchJobStatus.model_fields.items():
        assert (field.alias or name) in status


def test_defaults_validate_with_the_models(job: dict[str, Any]) -> None:
    """The server fills in the schema's defaults; the result must equal the models' defaults."""
    spec = schema_of(job)["properties"]["spec"]
    minimal = {"model": {"name": "builtin:tiny"}, "prompts": ["a"], "output": {"uri": "out"}}
    filled = apply_defaults(spec, minimal)
    parsed = api.ImageBatchJobSpec.model_validate(minimal)
    assert api.ImageBatchJobSpec.model_validate(filled) == parsed
    assert filled["generation"]["width"] == 512 and filled["batching"]["batchSize"] == "auto"
    assert filled["workers"]["maxReplicas"] == parsed.workers.max_replicas


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it (objects only, which is all we need)."""
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    out = dict(value)
    for name, child in schema["properties"].items():
        if name not in out and "default" in child:
            out[name] = child["default"]
        if name in out:
            out[name] = apply_defaults(child, out[name])
    return out


def rules_at(doc: dict[str, Any], path: str) -> list[dict[str, Any]]:
    nodes = dict(walk(schema_of(doc), ""))
    rules: list[dict[str, Any]] = nodes[path].get("x-kubernetes-validations", [])
    return rules


def test_cel_rules(job: dict[str, Any], shard: dict[str, Any]) -> None:
    for name in ("width", "height"):
        (r,) = rules_at(job, f"spec.generation.{name}")
        assert r["rule"] == "self % 8 == 0" and f"spec.generation.{name}" in r["message"]
    assert any("minReplicas" in r["rule"] for r in rules_at(job, "spec.workers"))
    assert any(
        "has(self.uri) != has(self.configMapKeyRef)" in r["rule"] for r in rules_at(job, "spec.promptsFrom")
    )
    (batch,) = rules_at(job, "spec.batching.batchSize")
    assert "'auto'" in batch["rule"]
    assert any("self.end > self.start" in r["rule"] for r in rules_at(shard, "spec"))
    # Every message names a field (spec.x or status.x) and the rule compiles to something.
    for doc in (job, shard):
        for path, node in walk(schema_of(doc), ""):
            for r in node.get("x-kubernetes-validations", []):
                assert r["rule"].strip(), path
                message = r.get("message") or r["messageExpression"]
                assert "spec" in message or "status" in message, (path, r)


IMMUTABLE = [
    "spec.model",
    "spec.generation",
    "spec.promptsFrom",
    "spec.output.uri",
    "spec.output.format",
    "spec.output.quality",
    "spec.batching.shardSize",
]
MUTABLE = [
    "spec.suspend",
    "spec.workers",
    "spec.workers.maxReplicas",
    "spec.queueName",
    "spec.batching.batchSize",
    "spec.output.credentialsSecret",
    "spec.retries",
]


@pytest.mark.parametrize("path", IMMUTABLE)
def test_immutable_fields(job: dict[str, Any], path: str) -> None:
    rules = [r for r in rules_at(job, path) if "oldSelf" in r["rule"]]
    assert rules, f"{path} has no immutability rule"
    assert any(r["rule"] == "self == oldSelf" and f"{path} is immutable" in r["message"] for r in rules)
    assert any("create a new ImageBatchJob" in r["message"] for r in rules)


@pytest.mark.parametrize("path", MUTABLE)
def test_mutable_fields(job: dict[str, Any], path: str) -> None:
    assert not [r for r in rules_at(job, path) if "oldSelf" in r["rule"]]


def test_inline_prompts_are_typed_lists(job: dict[str, Any]) -> None:
    nodes = dict(walk(schema_of(job), ""))
    strings, objects = nodes["spec.prompts"], nodes["spec.promptItems"]
    assert strings["items"]["type"] == "string" and strings["items"]["maxLength"] == api.MAX_PROMPT_LENGTH
    assert strings["maxItems"] == objects["maxItems"] == api.MAX_INLINE_PROMPTS
    item = objects["items"]
    assert item["type"] == "object" and item["required"] == ["prompt"]
    assert item["properties"]["width"]["multipleOf"] == 8
    assert item["properties"]["id"]["pattern"] == api.ITEM_ID_RE.pattern
    assert set(item["properties"]) == {(f.alias or n) for n, f in api.PromptItem.model_fields.items()}
    spec = schema_of(job)["properties"]["spec"]
    assert "oneOf" not in spec, "CEL sees the typed lists: the prompt-source rules name the fields"
    rules = " ".join(r["rule"] for r in spec["x-kubernetes-validations"])
    assert "has(self.promptItems)" in rules and "has(self.promptsFrom)" in rules


def unbounded(node: dict[str, Any], path: str) -> Iterator[str]:
    """What a tenant could make as large or as deep as they like at this node."""
    for where, n in walk(node, path):
        if n.get("x-kubernetes-preserve-unknown-fields"):
            yield f"{where}: keeps unknown fields"
        kind = n.get("type")
        if kind is None and not n.get("x-kubernetes-int-or-string"):
            yield f"{where}: has no type"
        if (
            (kind == "string" or n.get("x-kubernetes-int-or-string"))
            and "maxLength" not in n
            and "enum" not in n
        ):
            yield f"{where}: string without maxLength"
        if kind == "array" and "maxItems" not in n:
            yield f"{where}: list without maxItems"
        if kind == "object" and "additionalProperties" in n and "maxProperties" not in n:
            yield f"{where}: map without maxProperties"


@pytest.mark.parametrize(
    "kind", ["imagebatch.dev_imagebatchjobs.yaml", "imagebatch.dev_imagebatchshards.yaml"]
)
def test_every_field_a_tenant_writes_is_typed_and_bounded(docs: dict[str, dict[str, Any]], kind: str) -> None:
    """The operator decodes every tenant's objects: nothing in a spec may be unbounded or untyped
    (a value nested 2,500 levels deep in an untyped prompt once crashed the operator's watch)."""
    spec = schema_of(docs[kind])["properties"]["spec"]
    assert list(unbounded(spec, "spec")) == []


def test_the_bound_walker_finds_an_unbounded_field() -> None:
    spec = {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"x-kubernetes-preserve-unknown-fields": True}},
    }
    assert list(unbounded(spec, "spec")) == [
        "spec.a: string without maxLength",
        "spec.b: keeps unknown fields",
        "spec.b: has no type",
    ]


def test_status_conditions_are_a_map_list(job: dict[str, Any]) -> None:
    conditions = dict(walk(schema_of(job), ""))["status.conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    status = schema_of(job)["properties"]["status"]
    assert all("default" not in node for _, node in walk(status, "status"))


def test_unconvertible_type_needs_an_override() -> None:
    node = {"anyOf": [{"type": "string"}, {"type": "object"}]}
    with pytest.raises(ValueError, match=r"spec\.x"):
        crd.to_structural(node, {}, defaults=True, path="spec.x")
    assert crd.to_structural(
        node, {}, defaults=True, path="spec.x", overrides={"spec.x": {"type": "string"}}
    ) == {"type": "string"}


# A CEL comparison of a field (or its size) with a number: `self >= 1`, `size(self.x) <= 10`, `3 < self`.
_FIELD = r"(?P<size>size\()?self(?P<path>(?:\.\w+)*)\)?"
COMPARISON = re.compile(
    rf"{_FIELD}\s*(?:<=|>=|<|>|==)\s*-?\d|-?\d[\d.]*\s*(?:<=|>=|<|>)\s*{_FIELD.replace('?P<', '?P<r')}"
)
SCHEMA_BOUNDS = {False: ("minimum", "maximum"), True: ("minLength", "maxLength", "minItems", "maxItems")}


def restated_bounds(node: dict[str, Any], path: str) -> Iterator[str]:
    """CEL rules that compare a field with a number the schema already bounds it by (its minimum,
    maximum, minLength, maxLength, minItems or maxItems): the bound is written twice, and the two
    drift. A rule is for what the structural schema cannot say (an int-or-string's range, say)."""
    for where, n in walk(node, path):
        for r in n.get("x-kubernetes-validations", []):
            for m in COMPARISON.finditer(r["rule"]):
                size = bool(m.group("size") or m.group("rsize"))
                target: dict[str, Any] | None = n
                for name in (m.group("path") or m.group("rpath") or "").split(".")[1:]:
                    target = (target or {}).get("properties", {}).get(name)
                held = [k for k in SCHEMA_BOUNDS[size] if target and k in target]
                if held:
                    yield f"{where}: rule {r['rule']!r} restates the schema's {'/'.join(held)}"


def test_no_bound_is_written_twice(docs: dict[str, dict[str, Any]]) -> None:
    for name, doc in docs.items():
        assert list(restated_bounds(schema_of(doc), "")) == [], name


def test_the_restated_bound_finder_finds_one() -> None:
    spec = {
        "type": "object",
        "x-kubernetes-validations": [{"rule": "self.n <= 10 && size(self.s) >= 1 && self.free > 0"}],
        "properties": {
            "n": {"type": "integer", "maximum": 10},
            "s": {"type": "string", "minLength": 1, "maxLength": 5},
            "free": {"type": "integer"},
            "auto": {
                "x-kubernetes-int-or-string": True,
                "x-kubernetes-validations": [{"rule": "type(self) == int ? self >= 1 : self == 'auto'"}],
            },
            "w": {"type": "integer", "minimum": 8, "x-kubernetes-validations": [{"rule": "8 <= self"}]},
        },
    }
    assert list(restated_bounds(spec, "spec")) == [
        "spec: rule 'self.n <= 10 && size(self.s) >= 1 && self.free > 0' restates the schema's maximum",
        "spec: rule 'self.n <= 10 && size(self.s) >= 1 && self.free > 0' restates the schema's minLength/maxLength",
        "spec.w: rule '8 <= self' restates the schema's minimum",
    ]


PYDANTIC_BOUNDS = {
    "Ge": ("minimum",),
    "Gt": ("minimum", "exclusiveMinimum"),
    "Le": ("maximum",),
    "Lt": ("maximum", "exclusiveMaximum"),
    "MinLen": ("minLength", "minItems"),
    "MaxLen": ("maxLength", "maxItems"),
}


def test_no_field_restates_a_pydantic_bound_in_its_schema_extra() -> None:
    """A bound that pydantic has (ge, le, min_length, max_length) comes out of its own schema; a
    copy in json_schema_extra would silently win over it in the CRD."""
    models = [m for m in vars(api).values() if isinstance(m, type) and issubclass(m, BaseModel)]
    for model in models:
        for name, field in model.model_fields.items():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            for bound in field.metadata:
                twice = set(PYDANTIC_BOUNDS.get(type(bound).__name__, ())) & set(extra)
                assert not twice, f"{model.__name__}.{name}: {sorted(twice)} is pydantic's bound already"
