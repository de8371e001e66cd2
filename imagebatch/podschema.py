"""Bounded structural schemas for the Pod-spec pieces a job may set (`spec.workers`).

These fields are written by a tenant and read by the operator (and kopf's watch decoder) for every
other tenant too, so none of them may keep unknown fields: a value nested thousands of levels deep
once crashed the operator's watch for everyone. Every node here has a type, every string a
`maxLength`, every list a `maxItems`, every map a `maxProperties` (tests/unit/test_crd.py walks the
whole CRD for that). The public builders give the schema of one `spec.workers` field without its
description, which the field in imagebatch/api.py carries (`WithJsonSchema`). The volume sources are the ones a batch worker needs; anything else (a
`projected` token of another audience, a `hostPath` on a shared node) belongs in a Pod spec of the
user's own, which needs the right to create pods anyway.
"""

from __future__ import annotations

import copy
from typing import Any

Schema = dict[str, Any]

# Environment variables the operator sets or the worker reads: a job may not override them (the
# fence would hold, but the user would get a broken job instead of a clear refusal), nor point the
# worker's API client or S3 client elsewhere (KUBERNETES_*, KUBECONFIG, AWS_ENDPOINT_URL*).
RESERVED_ENV = ("POD_NAME", "NAMESPACE", "JOB_NAME", "JOB_UID", "HF_HUB_OFFLINE", "KUBECONFIG")
RESERVED_ENV_PREFIXES = ("IMAGEBATCH_", "KUBERNETES_", "AWS_ENDPOINT_URL")
# ... except the failpoints (worker/failpoints.py): they make the job's own worker raise, hang or
# exit on purpose, which is how the fault tests reach it, and reach nothing else.
OPEN_ENV = ("IMAGEBATCH_FAILPOINTS", "IMAGEBATCH_FAILPOINT_DIR")

NAME = 253  # an object name (DNS subdomain)
LABEL = 63  # a DNS label: volume and claim names
PATH = 1024
VALUE = 16_384


def _str(description: str, max_length: int = NAME, **extra: Any) -> Schema:
    return {"description": description, "type": "string", "maxLength": max_length, **extra}


def _bool(description: str) -> Schema:
    return {"description": description, "type": "boolean"}


def _obj(description: str | None, properties: dict[str, Schema], required: list[str] | None = None) -> Schema:
    out: Schema = {"description": description, "type": "object"} if description else {"type": "object"}
    if required:
        out["required"] = required
    out["properties"] = properties
    return out


def _list(description: str | None, items: Schema, max_items: int) -> Schema:
    out: Schema = {"description": description} if description else {}
    return {**out, "type": "array", "maxItems": max_items, "items": items}


def _map(description: str | None, value: Schema, max_properties: int) -> Schema:
    out: Schema = {"description": description} if description else {}
    return {**out, "type": "object", "maxProperties": max_properties, "additionalProperties": value}


def _one_of(description: str, names: list[str]) -> Schema:
    has = ", ".join(f"has(self.{n})" for n in names)
    return {
        "rule": f"[{has}].exists_one(x, x)",
        "message": f"{description}: set exactly one of {', '.join(names)}",
    }


def _key_to_path() -> Schema:
    return _list(
        "Keys to project, as in a Pod's configMap/secret volume items.",
        _obj(
            "A key and the file it becomes.",
            {
                "key": _str("The key.", PATH),
                "path": _str("The relative file path.", PATH),
                "mode": {"description": "File mode bits.", "type": "integer", "minimum": 0, "maximum": 511},
            },
            ["key", "path"],
        ),
        128,
    )


def _key_volume(what: str, name_field: str) -> Schema:
    """A configMap or secret volume source: the object's keys as files."""
    return _obj(
        f"A {what} in the job's namespace.",
        {
            name_field: _str(f"The {what}'s name."),
            "items": _key_to_path(),
            "defaultMode": {
                "description": "File mode bits.",
                "type": "integer",
                "minimum": 0,
                "maximum": 511,
            },
            "optional": _bool("May be missing."),
        },
    )


def _key_ref(what: str) -> Schema:
    return _obj(
        f"A key of a {what} in the job's namespace.",
        {
            "name": _str(f"The {what}'s name."),
            "key": _str("The key.", PATH),
            "optional": _bool("May be missing."),
        },
        ["key"],
    )


def env_schema() -> Schema:
    reserved = ", ".join(RESERVED_ENV) + ", " + ", ".join(p + "*" for p in RESERVED_ENV_PREFIXES)
    names = "[" + ", ".join(f"'{n}'" for n in RESERVED_ENV) + "]"
    prefixes = "[" + ", ".join(f"'{p}'" for p in RESERVED_ENV_PREFIXES) + "]"
    open_names = "[" + ", ".join(f"'{n}'" for n in OPEN_ENV) + "]"
    value_from = _obj(
        "Where the value comes from: exactly one source.",
        {
            "configMapKeyRef": _key_ref("ConfigMap"),
            "secretKeyRef": _key_ref("Secret"),
            "fieldRef": _obj(
                "A field of the pod.",
                {
                    "apiVersion": _str("Schema version of the field path.", LABEL),
                    "fieldPath": _str("The path.", PATH),
                },
                ["fieldPath"],
            ),
            "resourceFieldRef": _obj(
                "A resource of the container.",
                {
                    "containerName": _str("The container.", LABEL),
                    "resource": _str("The resource, e.g. limits.cpu.", LABEL),
                    "divisor": {
                        "description": "Output format of the resource.",
                        "anyOf": [{"type": "integer"}, {"type": "string"}],
                        "x-kubernetes-int-or-string": True,
                        "maxLength": LABEL,
                    },
                },
                ["resource"],
            ),
        },
    )
    value_from["x-kubernetes-validations"] = [
        _one_of(
            "spec.workers.env[].valueFrom",
            ["configMapKeyRef", "secretKeyRef", "fieldRef", "resourceFieldRef"],
        )
    ]
    item = _obj(
        "An environment variable, as in a container's env: name and value or valueFrom.",
        {
            "name": _str("The variable's name.", 256, minLength=1),
            "value": _str("The value.", VALUE),
            "valueFrom": value_from,
        },
        ["name"],
    )
    item["x-kubernetes-validations"] = [
        {
            "rule": (
                f"!(self.name in {names}) && "
                f"(self.name in {open_names} || !{prefixes}.exists(p, self.name.startsWith(p)))"
            ),
            "messageExpression": (
                "'spec.workers.env: ' + self.name + ' is set by the operator for the worker and may not be "
                f"overridden (reserved: {reserved}); remove it or use another name'"
            ),
            "reason": "FieldValueForbidden",
        },
        {
            "rule": "!(has(self.value) && has(self.valueFrom))",
            "messageExpression": "'spec.workers.env: ' + self.name + ' sets both value and valueFrom: keep one'",
        },
    ]
    return _list(None, item, 128)


def volume_mounts_schema() -> Schema:
    item = _obj(
        "A volume mount, as in a container: name, mountPath, readOnly, subPath.",
        {
            "name": _str("The volume's name (spec.workers.volumes).", LABEL),
            "mountPath": _str("Where it is mounted in the container.", PATH, minLength=1),
            "readOnly": _bool("Mounted read-only."),
            "subPath": _str("A path inside the volume to mount instead of its root.", PATH),
        },
        ["name", "mountPath"],
    )
    return _list(None, item, 64)


VOLUME_SOURCES: dict[str, Schema] = {
    "persistentVolumeClaim": _obj(
        "A PersistentVolumeClaim in the job's namespace.",
        {"claimName": _str("The claim's name."), "readOnly": _bool("Read-only.")},
        ["claimName"],
    ),
    "configMap": _key_volume("ConfigMap", "name"),
    "secret": _key_volume("Secret", "secretName"),
    "emptyDir": _obj(
        "A scratch folder that lives as long as the pod.",
        {
            "medium": _str("Empty (the node's disk) or Memory.", 16, enum=["", "Memory"]),
            "sizeLimit": {
                "description": "Most space, e.g. 10Gi.",
                "anyOf": [{"type": "integer"}, {"type": "string"}],
                "x-kubernetes-int-or-string": True,
                "maxLength": LABEL,
            },
        },
    ),
    "csi": _obj(
        "A CSI volume; drivers other than the chart's admission.openCsiDrivers need the right to create pods.",
        {
            "driver": _str("The CSI driver's name.", LABEL, minLength=1),
            "readOnly": _bool("Read-only."),
            "fsType": _str("File system type.", LABEL),
            "volumeAttributes": _map("Driver-specific attributes.", _str("A value.", PATH), 64),
            "nodePublishSecretRef": _obj(
                "A Secret of the job's namespace for the driver.", {"name": _str("The Secret's name.")}
            ),
        },
        ["driver"],
    ),
    "nfs": _obj(
        "An NFS export.",
        {
            "server": _str("The server's host name or address."),
            "path": _str("The exported path.", PATH),
            "readOnly": _bool("Read-only."),
        },
        ["server", "path"],
    ),
    "hostPath": _obj(
        "A folder of the node (only where Pod Security allows it, e.g. a single-node test cluster).",
        {
            "path": _str("The folder on the node.", PATH),
            "type": _str(
                "What must be there.",
                32,
                enum=[
                    "",
                    "DirectoryOrCreate",
                    "Directory",
                    "FileOrCreate",
                    "File",
                    "Socket",
                    "CharDevice",
                    "BlockDevice",
                ],
            ),
        },
        ["path"],
    ),
}


def volumes_schema() -> Schema:
    sources = list(VOLUME_SOURCES)
    item = _obj(
        f"A volume, as in a Pod spec: name and one of {', '.join(sources)}.",
        {
            "name": _str("The volume's name (a DNS label).", LABEL, minLength=1),
            **copy.deepcopy(VOLUME_SOURCES),
        },
        ["name"],
    )
    item["x-kubernetes-validations"] = [
        {
            "rule": "[" + ", ".join(f"has(self.{s})" for s in sources) + "].exists_one(x, x)",
            "messageExpression": (
                f"'spec.workers.volumes[' + self.name + ']: set exactly one volume source ({', '.join(sources)})'"
            ),
        }
    ]
    return _list(None, item, 64)


QUANTITY: Schema = {
    "anyOf": [{"type": "integer"}, {"type": "string"}],
    "x-kubernetes-int-or-string": True,
    "maxLength": LABEL,
    "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
}


def resources_schema() -> Schema:
    return _obj(
        None,
        {
            "limits": _map(
                "Most compute resources allowed, e.g. {cpu: 4, memory: 16Gi, nvidia.com/gpu: 1}.",
                copy.deepcopy(QUANTITY),
                32,
            ),
            "requests": _map(
                "Compute resources asked for when scheduling, e.g. {cpu: 2, memory: 8Gi}.",
                copy.deepcopy(QUANTITY),
                32,
            ),
            "claims": _list(
                "Dynamic resource claims, as in a Pod's container resources.",
                _obj(
                    "A claim: name (of an entry in the Pod's resourceClaims) and request.",
                    {"name": _str("The claim's name.", LABEL), "request": _str("The request's name.", LABEL)},
                    ["name"],
                ),
                16,
            ),
        },
    )


def tolerations_schema() -> Schema:
    item = _obj(
        "A toleration, as in a Pod spec.",
        {
            "key": _str("Taint key; empty with operator Exists: all.", 317),
            "operator": _str("Exists or Equal (default).", 16, enum=["Exists", "Equal"]),
            "value": _str("Taint value (operator Equal).", LABEL),
            "effect": _str(
                "Taint effect to tolerate; empty: all.",
                32,
                enum=["NoSchedule", "PreferNoSchedule", "NoExecute"],
            ),
            "tolerationSeconds": {
                "description": "How long a NoExecute taint is tolerated.",
                "type": "integer",
                "format": "int64",
            },
        },
    )
    return _list(None, item, 64)


def node_selector_schema() -> Schema:
    return _map(None, _str("A label value.", LABEL), 64)


def reserved_env_error(names: list[str]) -> str | None:
    """The same refusal as the CRD's rule, for local validation (`imagebatch validate`)."""
    for n in names:
        if n in RESERVED_ENV or (n.startswith(RESERVED_ENV_PREFIXES) and n not in OPEN_ENV):
            return (
                f"spec.workers.env: {n} is set by the operator for the worker and may not be overridden; "
                "remove it or use another name"
            )
    return None
