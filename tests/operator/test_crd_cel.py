"""The CRD's x-kubernetes-validations rules, compiled and evaluated as the API server would
(issue 24), with cel-python (PyPI `cel-python`, a CEL implementation; the API server uses
cel-go).

What the API server does, and what this file reproduces of it:
- it compiles every rule when the CRD is created; a rule that does not compile makes the CRD
  invalid. cel-python parses and checks each rule here. cel-go also type-checks the rule
  against the schema (`self.minReplica` is a compile error there). cel-python does not know the
  schema, so `schema_fields` below checks every `self.<field>` chain against the schema;
- before validating it applies the schema's defaults (structural defaulting), so a rule sees
  e.g. scaling.minReplicas = 1 when the user left it out;
- it evaluates each rule with `self` bound to the value at the rule's node, wherever that value
  is present; at the root, `self.metadata` holds only name and generateName; `oldSelf` only
  on updates (transition rules). An evaluation error (e.g. a missing field read without has())
  rejects the object like a false rule.
Not reproduced: the API server's cost estimation (a rule whose estimated cost is too high is
refused too). The rules use only standard CEL (has, size, matches, comparisons); the functions
that only Kubernetes' CEL environment has are listed in KUBERNETES_ONLY, and
test_rules_use_only_functions_cel_python_has fails if a rule starts to use one, so that it gets
a test of its own rather than a silent pass. cel-python's `matches` uses Python's `re`, not
RE2; the patterns here mean the same in both.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((ROOT / "crds/llmservice.yaml").read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

# Functions that Kubernetes adds to CEL (k8s.io/apiserver/pkg/cel/library and cel-go's
# extensions it enables), which cel-python lacks.
KUBERNETES_ONLY = {
    "isSorted", "sum", "min", "max", "indexOf", "lastIndexOf",  # lists
    "find", "findAll",  # regex
    "url", "isURL", "getScheme", "getHost", "getHostname", "getPort", "getEscapedPath", "getQuery",
    "quantity", "isQuantity", "compareTo", "isGreaterThan", "isLessThan", "asInteger",
    "asApproximateFloat", "sign", "add", "sub",
    "ip", "isIP", "cidr", "isCIDR", "containsIP", "containsCIDR", "family", "isCanonical",
    "prefixLength", "masked", "isLoopback", "isUnspecified",
    "format", "validate", "named", "authorizer", "serviceAccount",
    "lowerAscii", "upperAscii", "replace", "split", "join", "trim", "substring", "charAt",
    "quote", "reverse", "strings", "base64", "sets", "setsContains", "setsEquivalent",
    "setsIntersects",
}
STANDARD = {"has", "size", "matches", "contains", "startsWith", "endsWith", "all", "exists",
            "exists_one", "map", "filter", "int", "uint", "double", "string", "bool", "type",
            "duration", "timestamp", "dyn", "bytes"}


@dataclasses.dataclass(frozen=True)
class Rule:
    path: str  # where `self` is bound, e.g. "spec.scaling" ("" is the root)
    rule: str
    message: str
    schema: dict


def rules_of(schema: dict, path: str = "") -> list[Rule]:
    out = [Rule(path, r["rule"], r.get("message", ""), schema)
           for r in schema.get("x-kubernetes-validations") or []]
    for name, sub in (schema.get("properties") or {}).items():
        out += rules_of(sub, f"{path}.{name}".lstrip("."))
    if "items" in schema:
        out += rules_of(schema["items"], f"{path}[]")
    return out


RULES = rules_of(SCHEMA)


def default(schema: dict, value: Any) -> Any:
    """Structural defaulting, as the API server applies it before validation: a missing
    property with a `default` gets it, then defaulting goes on inside it."""
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for name, sub in props.items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = default(sub, value[name])
    elif isinstance(value, list) and "items" in schema:
        value[:] = [default(schema["items"], v) for v in value]
    return value


def compile_rule(text: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(text))


def evaluate(rule: Rule, value: Any, old: Any = None) -> bool:
    """One rule on the value at its node: True passes; False or an evaluation error fails."""
    if rule.path == "":  # the root's self.metadata: only name and generateName
        value = {**value, "metadata": {k: v for k, v in (value.get("metadata") or {}).items()
                                       if k in ("name", "generateName")}}
    activation = {"self": celpy.json_to_cel(value)}
    if "oldSelf" in rule.rule:
        if old is None:
            return True  # transition rules apply to updates only
        activation["oldSelf"] = celpy.json_to_cel(old)
    try:
        result = compile_rule(rule.rule).evaluate(activation)
    except celpy.CELEvalError:
        return False
    if isinstance(result, celpy.CELEvalError):
        return False
    assert isinstance(result, celpy.celtypes.BoolType), f"{rule.rule!r} gave {result!r}, not a bool"
    return bool(result)


def values_at(obj: Any, path: str) -> list[Any]:
    """The values a rule at `path` sees (none where the value is absent)."""
    values = [obj]
    for part in filter(None, path.split(".")):
        many = part.endswith("[]")
        key = part.removesuffix("[]")
        values = [v[key] for v in values if isinstance(v, dict) and key in v]
        if many:
            values = [item for v in values if isinstance(v, list) for item in v]
    return values


def validate(obj: dict, old: dict | None = None) -> list[str]:
    """The messages of every rule the object breaks, after defaulting, as the API server
    would answer a create (or, with `old`, an update)."""
    obj = default(SCHEMA, copy.deepcopy(obj))
    old = default(SCHEMA, copy.deepcopy(old)) if old is not None else None
    broken = []
    for rule in RULES:
        olds = values_at(old, rule.path) if old is not None else []
        for i, value in enumerate(values_at(obj, rule.path)):
            if not evaluate(rule, value, olds[i] if i < len(olds) else None):
                broken.append(f"{rule.path or '<root>'}: {rule.message}")
    return broken


def service(name: str = "chat", **spec: Any) -> dict:
    return {"apiVersion": "llamafleet.io/v1alpha1", "kind": "LLMService",
            "metadata": {"name": name, "namespace": "team-a"},
            "spec": {"model": {"source": {"embedded": {"name": "smollm2-135m-instruct"}}}, **spec}}


def by_message(fragment: str) -> str:
    (rule,) = [r for r in RULES if fragment in r.message]
    return f"{rule.path or '<root>'}: {rule.message}"


NAME = by_message("the name becomes the Service names")
REPLICAS = by_message("the autoscaler owns replicas")
MIN_MAX = by_message("minReplicas must not be above maxReplicas")
HPA_ZERO = by_message("mode hpa cannot scale to zero")
TENANTS_SECRET = by_message("secretName must be a Secret's name")
ADAPTER_UNIQUE = by_message("each adapter name must be unique")
ADAPTER_NAME = by_message("an adapter name is 1 to 128")
ADAPTER_SOURCE = by_message("exactly one of source.pvc or source.url")
DRAFT_NEEDS_MODEL = by_message("mode draft needs draftModel.source")
DRAFT_MODEL_NEEDS_MODE = by_message("draftModel is only used with mode draft")


def adapter(name: str, **source: Any) -> dict:
    return {"name": name, "source": source or {"pvc": {"claimName": "loras", "path": f"{name}.gguf"}}}


URL = {"url": "https://hf.example/a.gguf", "sha256": "a" * 64}

# (object, the rules it must break; empty: it must pass every rule)
CASES = {
    "minimal": (service(), []),
    "name 58 characters": (service("a" * 58), []),
    "name 59 characters": (service("a" * 59), [NAME]),
    "name with a dot": (service("chat.v2"), [NAME]),
    "name starting with a digit": (service("7b-chat"), [NAME]),
    "name ending with a dash": (service("chat-"), [NAME]),
    "name with capitals": (service("Chat"), [NAME]),
    "fixed fleet": (service(replicas=3), []),
    "scaling, replicas left out": (service(scaling={"maxReplicas": 4}), []),
    "scaling, replicas inside": (service(replicas=2, scaling={"minReplicas": 1, "maxReplicas": 4}), []),
    "scaling, replicas on the bounds": (service(replicas=4, scaling={"minReplicas": 4,
                                                                     "maxReplicas": 4}), []),
    "scaling, replicas above max": (service(replicas=5, scaling={"maxReplicas": 4}), [REPLICAS]),
    # minReplicas defaults to 1: replicas 0 is below it.
    "scaling, replicas below the defaulted min": (service(replicas=0, scaling={"maxReplicas": 4}),
                                                  [REPLICAS]),
    "scaling, replicas below min": (service(replicas=1, scaling={"minReplicas": 2, "maxReplicas": 4}),
                                    [REPLICAS]),
    "min above max": (service(scaling={"minReplicas": 5, "maxReplicas": 4}), [MIN_MAX]),
    # The defaulted minReplicas (1) is above maxReplicas 0 (the schema's minimum: 1 refuses it too).
    "defaulted min above max": (service(scaling={"maxReplicas": 0}), [MIN_MAX]),
    "scale to zero, builtin": (service(scaling={"mode": "builtin", "minReplicas": 0, "maxReplicas": 4}), []),
    "scale to zero, keda": (service(scaling={"mode": "keda", "minReplicas": 0, "maxReplicas": 4}), []),
    "hpa from one": (service(scaling={"mode": "hpa", "minReplicas": 1, "maxReplicas": 4}), []),
    "hpa with the defaulted min": (service(scaling={"mode": "hpa", "maxReplicas": 4}), []),
    "hpa to zero": (service(scaling={"mode": "hpa", "minReplicas": 0, "maxReplicas": 4}), [HPA_ZERO]),
    "tenants Secret": (service(tenants={"secretName": "team-a.tenants"}), []),
    "tenants Secret with capitals": (service(tenants={"secretName": "Tenants"}), [TENANTS_SECRET]),
    "tenants Secret with a slash": (service(tenants={"secretName": "a/b"}), [TENANTS_SECRET]),
    "adapters": (service(adapters=[adapter("sql"), adapter("org/chat-v1.2:q4", url=URL)]), []),
    "no adapters": (service(adapters=[]), []),
    "adapter names repeated": (service(adapters=[adapter("sql"), adapter("sql", url=URL)]),
                               [ADAPTER_UNIQUE]),
    "adapter name with a space": (service(adapters=[adapter("my sql")]), [ADAPTER_NAME]),
    "adapter name starting with a dash": (service(adapters=[adapter("-sql")]), [ADAPTER_NAME]),
    "adapter name of 129 characters": (service(adapters=[adapter("a" * 129)]), [ADAPTER_NAME]),
    "adapter name of 128 characters": (service(adapters=[adapter("a" * 128)]), []),
    "adapter with two sources": (service(adapters=[adapter(
        "sql", url=URL, pvc={"claimName": "loras", "path": "a.gguf"})]), [ADAPTER_SOURCE]),
    "adapter without a source": (service(adapters=[{"name": "sql", "source": {}}]),
                                 [ADAPTER_SOURCE]),
    "draft model": (service(speculative={"mode": "draft", "draftModel": {"source": {"url": URL}}}),
                    []),
    "mode draft without a draft model": (service(speculative={"mode": "draft"}), [DRAFT_NEEDS_MODEL]),
    "a draft model with mode ngram": (service(speculative={
        "mode": "ngram", "draftModel": {"source": {"url": URL}}}), [DRAFT_MODEL_NEEDS_MODE]),
    # The mode defaults to none: a draft model alone is not used either.
    "a draft model without a mode": (service(speculative={"draftModel": {"source": {"url": URL}}}),
                                     [DRAFT_MODEL_NEEDS_MODE]),
    "two rules at once": (service("x" * 70, replicas=9, scaling={"mode": "hpa", "minReplicas": 0,
                                                                 "maxReplicas": 4}),
                          [NAME, REPLICAS, HPA_ZERO]),
}


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.path or 'root'}:{r.rule[:40]}")
def test_every_rule_compiles(rule: Rule) -> None:
    compile_rule(rule.rule)  # raises celpy.CELParseError on a syntax error


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.path or 'root'}:{r.rule[:40]}")
def test_every_rule_reads_fields_the_schema_has(rule: Rule) -> None:
    # cel-go types `self` from the schema and refuses unknown fields; cel-python does not.
    for chain in re.findall(r"\b(?:self|oldSelf)((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", rule.rule):
        node = rule.schema
        for field in chain.strip(".").split("."):
            if field in ("matches", "size", "startsWith", "endsWith", "contains", "all",
                         "exists", "exists_one", "map", "filter"):
                break  # a method call or a macro, not a field
            if rule.path == "" and node is SCHEMA and field == "metadata":
                node = {"properties": {"name": {"type": "string"},
                                       "generateName": {"type": "string"}}}
                continue
            props = node.get("properties") or {}
            assert field in props, f"{rule.rule!r}: no field {field!r} at {rule.path or 'the root'}"
            node = props[field]


def test_rules_use_only_functions_cel_python_has() -> None:
    for rule in RULES:
        called = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(", rule.rule))
        assert not called & KUBERNETES_ONLY, (
            f"{rule.rule!r} calls {called & KUBERNETES_ONLY}: Kubernetes-only CEL that cel-python "
            "lacks; test that rule another way (e.g. against a real API server in tests/e2e)")
        assert called <= STANDARD, f"{rule.rule!r} calls {called - STANDARD}: classify them above"


def test_every_rule_has_an_object_that_breaks_it_alone() -> None:
    alone = {tuple(broken) for _, broken in CASES.values() if len(broken) == 1}
    for rule in RULES:
        assert (f"{rule.path or '<root>'}: {rule.message}",) in alone, f"no failing sample for {rule.rule!r}"


@pytest.mark.parametrize("case", CASES)
def test_samples_pass_and_fail_as_they_must(case: str) -> None:
    obj, broken = CASES[case]
    assert sorted(validate(obj)) == sorted(broken)


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("llmservice-*.yaml")),
                         ids=lambda p: p.name)
def test_the_shipped_examples_pass(path: Path) -> None:
    for obj in yaml.safe_load_all(path.read_text()):
        if obj and obj.get("kind") == "LLMService":
            assert validate(obj) == []


def test_an_evaluation_error_rejects_like_a_false_rule() -> None:
    # As in the API server: reading an absent field without has() is an error, not a pass.
    rule = Rule("spec", "self.replicas >= 0", "m", SCHEMA["properties"]["spec"])
    assert evaluate(rule, {"replicas": 1}) and not evaluate(rule, {})
