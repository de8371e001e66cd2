"""The ImageBatchJob API: one set of pydantic models for local mode, the worker and the CRD schema.

Field names are camelCase on the wire (YAML, the Kubernetes API) and snake_case in Python.
Descriptions become `kubectl explain` text, so they are written for the user.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator
from pydantic.alias_generators import to_camel

from imagebatch import podschema
from imagebatch.podschema import reserved_env_error

# The words of the status are part of the API: one module of their own, re-exported here.
from imagebatch.reasons import ConditionType as ConditionType  # noqa: PLC0414 (re-exported)
from imagebatch.reasons import EventReason as EventReason  # noqa: PLC0414 (re-exported)
from imagebatch.reasons import Reason as Reason  # noqa: PLC0414 (re-exported)
from imagebatch.reasons import State as State  # noqa: PLC0414 (re-exported)

GROUP = "imagebatch.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ImageBatchJob"
SHARD_KIND = "ImageBatchShard"

BUILTIN_PREFIX = "builtin:"
# Bounds the API server enforces on what a tenant writes (the CRD carries them too): a string
# without a bound of its own, one prompt, and the inline prompt lists (etcd holds at most 1.5 MiB
# per object anyway; a larger job names a file in spec.promptsFrom).
MAX_STRING_LENGTH = 4096
MAX_PROMPT_LENGTH = 4096
MAX_INLINE_PROMPTS = 10_000
# Ids become object keys and label values: keep them to a safe, sortable alphabet.
MAX_ID_LENGTH = 128
ITEM_ID_RE = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_ID_LENGTH - 1}}}$")
MAX_BATCH_SIZE = 1024


# --- Rules the API server checks, written beside the fields they check ------------------------
# A rule exists only for what the structural schema cannot say (pydantic's ge/le/min_length/
# max_length become minimum/maximum/minLength/maxLength by themselves): a multiple of 8, an
# int-or-string's range, one-of, immutability. imagebatch/crd.py carries them over unchanged.

NEW_JOB = "create a new ImageBatchJob (with another name) for other settings"
IMMUTABLE = " Immutable after creation."


def cel(rule: str, message: str, *, field_path: str | None = None) -> dict[str, str]:
    """One CEL rule (x-kubernetes-validations); the message is what `kubectl apply` prints, so it
    names the field and says what to change."""
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


def rules(*checks: dict[str, str], **schema: Any) -> dict[str, Any]:
    """`json_schema_extra` of a field or model: its CEL rules and any schema keys pydantic has no
    constraint for (multipleOf, pattern, minItems on an optional list)."""
    return {**schema, "x-kubernetes-validations": list(checks)} if checks else schema


def immutable(path: str) -> dict[str, str]:
    return cel("self == oldSelf", f"{path} is immutable: it decides the images already made; {NEW_JOB}")


def _multiple_of_8(path: str) -> dict[str, str]:
    return cel("self % 8 == 0", f"{path} must be a multiple of 8 (e.g. 512, 768 or 1024)")


class Model(BaseModel):
    """Base: camelCase aliases, unknown fields rejected (a typo must not be silently ignored)."""

    # str_max_length mirrors the CRD's default bound on every string (imagebatch/crd.py).
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        str_max_length=MAX_STRING_LENGTH,
    )


class ModelCache(Model):
    claim_name: str = Field(
        min_length=1,
        description=(
            "PersistentVolumeClaim, in the job's namespace, mounted as the Hugging Face cache (HF_HOME). "
            "Workers mount it read-only and run with HF_HUB_OFFLINE=1, so they never reach the hub; "
            "it needs ReadWriteMany (or ReadOnlyMany after a first fill) to be shared by many nodes."
        ),
    )
    fetch: bool = Field(
        default=True,
        description=(
            "Fill the cache before the engine starts: an init container of each worker pod downloads "
            "what is missing (nothing, once the cache holds the model) with transient hub errors retried. "
            "false: the cache is filled by you."
        ),
    )


class TokenSecretRef(Model):
    name: str = Field(min_length=1, description="Secret name, in the job's namespace.")
    key: str = Field(
        default="HF_TOKEN", min_length=1, description="Key whose value is the Hugging Face token."
    )


class ModelSpec(Model):
    name: str = Field(
        min_length=1,
        description=(
            "The diffusion model: a Hugging Face repo id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5), "
            "a local directory that holds model_index.json, or builtin:tiny (a small random-weights "
            "pipeline built in-process, for demos and tests)."
        ),
    )
    revision: str | None = Field(
        default=None, description="Git revision (branch, tag or commit) of a Hugging Face model."
    )
    pipeline: str | None = Field(
        default=None,
        description="diffusers pipeline class name; by default taken from the model's model_index.json.",
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        default="auto", description="Weights and compute dtype. auto: float16 on CUDA, float32 on the CPU."
    )
    scheduler: str | None = Field(
        default=None,
        description="diffusers scheduler class name (e.g. EulerDiscreteScheduler); default: the model's own.",
    )
    variant: str | None = Field(
        default=None,
        description=(
            "Weights variant of a Hugging Face model, e.g. fp16: only those files are downloaded "
            "(an SDXL repo otherwise gives fp32 weights, twice the bytes)."
        ),
    )
    cache: ModelCache | None = Field(
        default=None, description="A volume that holds the model, fetched once for every worker pod."
    )
    token_secret_ref: TokenSecretRef | None = Field(
        default=None,
        description="Secret key with a Hugging Face token (HF_TOKEN), for gated or private models.",
    )


class Overrides(Model):
    """Per-prompt generation settings; unset fields take the job's `generation` values."""

    width: int | None = Field(
        default=None,
        ge=8,
        le=8192,
        description="Image width in pixels (multiple of 8).",
        json_schema_extra=rules(multipleOf=8),
    )
    height: int | None = Field(
        default=None,
        ge=8,
        le=8192,
        description="Image height in pixels (multiple of 8).",
        json_schema_extra=rules(multipleOf=8),
    )
    steps: int | None = Field(default=None, ge=1, le=1000, description="Denoising steps.")
    guidance_scale: float | None = Field(
        default=None, ge=0, le=100, description="Classifier-free guidance scale."
    )

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        if v is not None and v % 8:
            raise ValueError(f"must be a multiple of 8 (got {v}; try {max(8, v // 8 * 8)})")
        return v


class PromptItem(Overrides):
    """A prompt with, optionally, its own id, seed, negative prompt and generation overrides."""

    id: str | None = Field(
        default=None,
        description="Stable id of this prompt; its images are stored as images/<id>.<ext>. Default: p<index>.",
        json_schema_extra=rules(pattern=ITEM_ID_RE.pattern, maxLength=MAX_ID_LENGTH),
    )
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_LENGTH, description="The text prompt.")
    negative_prompt: str | None = Field(
        default=None, max_length=MAX_PROMPT_LENGTH, description="What the image should not show."
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        lt=2**63,
        description="Seed for this prompt; default: derived from job seed and id.",
    )

    @field_validator("id")
    @classmethod
    def _id_alphabet(cls, v: str | None) -> str | None:
        if v is not None and not ITEM_ID_RE.match(v):
            raise ValueError(
                f"id {v!r} must start with a letter or digit and hold only letters, digits, '.', '_' "
                f"and '-' (at most {MAX_ID_LENGTH} characters)"
            )
        return v


class ConfigMapKeyRef(Model):
    name: str = Field(min_length=1, description="ConfigMap name, in the job's namespace.")
    key: str = Field(min_length=1, description="Key whose value holds the prompts.")


class PromptsFrom(Model):
    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "has(self.uri) != has(self.configMapKeyRef)",
                "set exactly one of spec.promptsFrom.uri (a file) and spec.promptsFrom.configMapKeyRef",
            )
        )
    )
    uri: str | None = Field(
        default=None,
        description=(
            "A prompt file or data set: a local or volume path, or an s3:// URI. Plain text (one prompt "
            "per line), JSONL (one object per line with a prompt field, or a JSON string), CSV (RFC 4180, "
            "a header row), Parquet, any of the text formats gzip'd (.gz), or a folder written by a "
            "Hugging Face data set's save_to_disk. Read as a stream: a million rows never sit in memory whole."
        ),
    )
    config_map_key_ref: ConfigMapKeyRef | None = Field(
        default=None, description="Prompts stored in a ConfigMap key (cluster mode only; txt, jsonl or csv)."
    )
    format: Literal["txt", "jsonl", "csv", "parquet", "hf"] | None = Field(
        default=None,
        description=(
            "File format; default: from the extension (.txt, .jsonl, .csv, .parquet, each text one "
            "optionally .gz), or hf for a save_to_disk folder (one holding dataset_info.json)."
        ),
    )
    column: str | None = Field(
        default=None,
        description="The column (or JSONL field) that holds the prompt text; default: prompt (txt: each line).",
    )
    id_column: str | None = Field(
        default=None, description="Column that holds each prompt's id; default: the id column if any."
    )
    seed_column: str | None = Field(
        default=None, description="Column that holds each prompt's seed; default: the seed column if any."
    )
    negative_prompt_column: str | None = Field(
        default=None,
        description="Column that holds each prompt's negative prompt; default: negativePrompt or negative_prompt if any.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> PromptsFrom:
        if (self.uri is None) == (self.config_map_key_ref is None):
            raise ValueError("set exactly one of promptsFrom.uri and promptsFrom.configMapKeyRef")
        if self.config_map_key_ref is not None and self.format in ("parquet", "hf"):
            raise ValueError(
                f"promptsFrom.format {self.format} needs promptsFrom.uri; a ConfigMap holds txt, jsonl or csv"
            )
        return self


class Generation(Model):
    width: int = Field(
        default=512,
        ge=8,
        le=8192,
        description="Image width in pixels; a multiple of 8.",
        json_schema_extra=rules(_multiple_of_8("spec.generation.width")),
    )
    height: int = Field(
        default=512,
        ge=8,
        le=8192,
        description="Image height in pixels; a multiple of 8.",
        json_schema_extra=rules(_multiple_of_8("spec.generation.height")),
    )
    steps: int = Field(default=25, ge=1, le=1000, description="Denoising steps.")
    guidance_scale: float = Field(
        default=7.5, ge=0, le=100, description="Classifier-free guidance scale; 1 or less turns CFG off."
    )
    images_per_prompt: int = Field(default=1, ge=1, le=64, description="Images made from each prompt.")
    seed: int = Field(
        default=0, ge=0, lt=2**63, description="Job seed; each image's seed is derived from it and its id."
    )
    negative_prompt: str = Field(
        default="", max_length=MAX_PROMPT_LENGTH, description="Default negative prompt."
    )

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 (got {v}; try {max(8, v // 8 * 8)})")
        return v


class Batching(Model):
    batch_size: int | Literal["auto"] = Field(
        default="auto",
        description="Images per denoising batch, or auto: the largest that fits the device (8 on the CPU).",
        # int-or-string: the structural schema cannot bound the number, so CEL does.
        json_schema_extra=rules(
            cel(
                f"type(self) == int ? (self >= 1 && self <= {MAX_BATCH_SIZE}) : self == 'auto'",
                f"spec.batching.batchSize must be a number from 1 to {MAX_BATCH_SIZE}, or auto",
            )
        ),
    )
    shard_size: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description="Items per shard: the unit a worker claims and retries." + IMMUTABLE,
        json_schema_extra=rules(immutable("spec.batching.shardSize")),
    )

    @field_validator("batch_size")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= MAX_BATCH_SIZE:
            raise ValueError(f"must be between 1 and {MAX_BATCH_SIZE}, or auto (got {v})")
        return v


class EngineSpec(Model):
    """How the worker runs the model on a GPU. None of these changes what an image shows."""

    channels_last: bool = Field(
        default=True, description="Channels-last memory layout for the UNet and VAE (CUDA only)."
    )
    fuse_qkv: bool = Field(default=True, description="Fused QKV attention projections (CUDA only).")
    compile: bool = Field(
        default=False,
        description=(
            "torch.compile the UNet and VAE decoder for one fixed batch shape: faster batches after a "
            "first batch that compiles for minutes; set compileCacheDir so that restarts skip that."
        ),
    )
    compile_cache_dir: str | None = Field(
        default=None,
        description="Folder (on a volume in cluster mode) for the compile cache and the found batch size.",
    )


class SecretRef(Model):
    name: str = Field(min_length=1, description="Secret name, in the job's namespace.")


class Output(Model):
    uri: str = Field(
        min_length=1,
        description="Where images and manifest.jsonl go: a path (on a volume in cluster mode) or s3://bucket/prefix."
        + IMMUTABLE,
        json_schema_extra=rules(immutable("spec.output.uri")),
    )
    format: Literal["png", "webp", "jpeg"] = Field(
        default="png",
        description="Image file format; each image carries its prompt, seed and settings (PNG text, XMP and EXIF)."
        + IMMUTABLE,
        json_schema_extra=rules(immutable("spec.output.format")),
    )
    layout: Literal["files", "webdataset"] = Field(
        default="files",
        description=(
            "files: images/<id>.<ext>, one file each, with images/metadata.jsonl for Hugging Face "
            "imagefolder; webdataset: shards/<shard>.tar holding <id>.<ext> and <id>.json, one tar per "
            "shard (one write per shard, not per image). Both write manifest.jsonl and manifest.parquet."
        ),
    )
    quality: int = Field(
        default=90,
        ge=1,
        le=100,
        description="WebP/JPEG quality (ignored for PNG)." + IMMUTABLE,
        json_schema_extra=rules(immutable("spec.output.quality")),
    )
    credentials_secret: SecretRef | None = Field(
        default=None,
        description=(
            "Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and optionally AWS_ENDPOINT_URL, "
            "given to the workers as environment variables."
        ),
    )
    endpoint_url: str | None = Field(
        default=None, description="S3 endpoint for S3-compatible stores (MinIO, Ceph, R2)."
    )


# A count of items, or a percentage of the job's items ("1%", "0.5%").
FAILED_ITEMS_RE = re.compile(r"^(100|[0-9]{1,2})(\.[0-9]{1,3})?%$")
DEFAULT_MAX_FAILED_ITEMS = "1%"


def allowed_failed_items(limit: int | str, total: int) -> int:
    """How many failed items `retries.maxFailedItems` allows in a job of `total` items: a count as
    it is; a percentage of the items, rounded up, so "1%" lets any job lose at least one item."""
    if isinstance(limit, int):
        return limit
    milli = round(float(limit.removesuffix("%")) * 1000)  # thousandths of a percent
    return min(total, -(-milli * total // 100_000))  # rounded up


class Retries(Model):
    max_attempts: int = Field(
        default=3, ge=1, le=100, description="Attempts per shard before it is marked Failed."
    )
    max_failed_items: int | str = Field(
        default=DEFAULT_MAX_FAILED_ITEMS,
        description=(
            "Items that may fail (the engine raised for them alone; each is listed in errors.jsonl "
            "beside manifest.jsonl) while the job still ends Complete: a count (0: any failed item "
            "fails the job), or a percentage of the job's items rounded up (default 1%: at least "
            "one item in any job). More failed items end the job Failed, naming the first ones."
        ),
        # int-or-string: the same rule at the API server.
        json_schema_extra=rules(
            cel(
                "type(self) == int ? self >= 0 : (self.matches('^[0-9]+([.][0-9]+)?%$') "
                "&& double(self.replace('%', '')) <= 100.0)",
                "spec.retries.maxFailedItems must be a count of items (0 or more) or a "
                "percentage from 0% to 100% such as 1% or 0.5%",
            ),
            maxLength=16,
        ),
    )
    lease_seconds: int = Field(
        default=120, ge=10, le=86_400, description="A claim not renewed for this long goes back to pending."
    )

    @field_validator("max_failed_items")
    @classmethod
    def _count_or_percent(cls, v: int | str) -> int | str:
        if isinstance(v, int):
            if v < 0:
                raise ValueError(f"must be 0 or more, or a percentage such as 1% (got {v})")
            return v
        if not FAILED_ITEMS_RE.match(v) or float(v.removesuffix("%")) > 100:
            raise ValueError(
                "must be a count of items (0 or more) or a percentage from 0% to 100% such as 1% or 0.5%"
            )
        return v

    progress_deadline_seconds: int = Field(
        default=1800,
        ge=10,
        le=604_800,
        description=(
            "A claim whose itemsDone has not moved for this long goes back to pending (a failed "
            "attempt) even though its lease is renewed: a worker hung in CUDA, on a dead mount or on "
            "storage. Allow the slowest batch plus model compilation."
        ),
    )


# Pod-spec pieces: plain dicts here, bounded structural schemas at the API server (podschema.py).
PodResources = Annotated[dict[str, Any], WithJsonSchema(podschema.resources_schema())]
PodNodeSelector = Annotated[dict[str, str], WithJsonSchema(podschema.node_selector_schema())]
PodTolerations = Annotated[list[dict[str, Any]], WithJsonSchema(podschema.tolerations_schema())]
PodEnv = Annotated[list[dict[str, Any]], WithJsonSchema(podschema.env_schema())]
PodVolumes = Annotated[list[dict[str, Any]], WithJsonSchema(podschema.volumes_schema())]
PodVolumeMounts = Annotated[list[dict[str, Any]], WithJsonSchema(podschema.volume_mounts_schema())]


class Workers(Model):
    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "(has(self.minReplicas) ? self.minReplicas : 0) <= (has(self.maxReplicas) ? self.maxReplicas : 4)",
                "spec.workers.minReplicas must not exceed spec.workers.maxReplicas: lower minReplicas "
                "or raise maxReplicas",
                field_path=".minReplicas",
            )
        )
    )
    min_replicas: int = Field(default=0, ge=0, description="Fewest worker pods while there is work.")
    max_replicas: int = Field(default=4, ge=1, le=10_000, description="Most worker pods.")
    shards_per_replica: int = Field(
        default=2, ge=1, description="Claimable shards per worker pod when sizing from the backlog."
    )
    gpus_per_worker: int = Field(
        default=1,
        ge=0,
        le=16,
        description="nvidia.com/gpu per worker pod; a pod with more than one runs one engine process per GPU.",
    )
    termination_grace_period_seconds: int = Field(
        default=30,
        ge=1,
        le=86_400,
        description=(
            "Seconds a worker pod gets after SIGTERM: the running batch stops after its current "
            "denoising step and the claim is released; give at least one step plus a model-free exit."
        ),
    )
    image: str | None = Field(default=None, description="Worker image; default: the operator's.")
    resources: PodResources | None = Field(
        default=None, description="Worker container resources (requests/limits), as in a Pod spec."
    )
    node_selector: PodNodeSelector | None = Field(default=None, description="Worker pod nodeSelector.")
    tolerations: PodTolerations | None = Field(default=None, description="Worker pod tolerations.")
    priority_class_name: str | None = Field(default=None, description="Worker pod priorityClassName.")
    service_account_name: str | None = Field(
        default=None,
        description="Worker ServiceAccount; default: one the operator makes with least privilege.",
    )
    env: PodEnv | None = Field(
        default=None, description="Extra environment variables of the worker container, as in a Pod spec."
    )
    volumes: PodVolumes | None = Field(
        default=None,
        description="Worker pod volumes, as in a Pod spec (e.g. the PersistentVolumeClaim that spec.output.uri is on).",
    )
    volume_mounts: PodVolumeMounts | None = Field(
        default=None, description="Worker container volumeMounts, as in a Pod spec."
    )

    @field_validator("env")
    @classmethod
    def _no_reserved_env(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        error = reserved_env_error([str(e.get("name", "")) for e in v or []])
        if error:
            raise ValueError(error)
        return v

    @model_validator(mode="after")
    def _min_le_max(self) -> Workers:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"minReplicas ({self.min_replicas}) must not exceed maxReplicas ({self.max_replicas})"
            )
        return self


# Every shard is an object in etcd, listed and watched by the operator and the workers: a job of a
# million shards (shardSize 1) would swamp the API server. 20,000 shards of the default 256 items
# hold five million images.
MAX_SHARDS_PER_JOB = 20_000


def too_many_shards(n_items: int, shard_size: int) -> str | None:
    """The error for a plan of more shards than a job may have, naming what to change."""
    n = -(-n_items // shard_size)
    if n <= MAX_SHARDS_PER_JOB:
        return None
    least = -(-n_items // MAX_SHARDS_PER_JOB)
    return (
        f"spec.batching.shardSize: {n_items} images in shards of {shard_size} make {n} "
        f"ImageBatchShards, more than the {MAX_SHARDS_PER_JOB} a job may have; set "
        f"spec.batching.shardSize to {least} or more (or split the job)"
    )


PromptText = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_LENGTH, description="A text prompt.")]
# Both inline prompt lists: typed and bounded, and like promptsFrom immutable. minItems is the
# schema's alone: the model's validator refuses an empty job with its own message.
_INLINE = (
    " Inline prompts (prompts, promptItems) or promptsFrom, not both; for more than a few "
    "thousand prompts use promptsFrom." + IMMUTABLE
)


class ImageBatchJobSpec(Model):
    """What to generate, with which model, where to store it and on how many workers."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "has(self.prompts) || has(self.promptItems) || has(self.promptsFrom)",
                "set spec.prompts (strings) and/or spec.promptItems (objects), or spec.promptsFrom (a file or ConfigMap)",
            ),
            cel(
                "!((has(self.prompts) || has(self.promptItems)) && has(self.promptsFrom))",
                "set inline prompts (spec.prompts, spec.promptItems) or spec.promptsFrom, not both",
                field_path=".promptsFrom",
            ),
            cel(
                "has(self.prompts) == has(oldSelf.prompts) && has(self.promptItems) == has(oldSelf.promptItems)"
                " && has(self.promptsFrom) == has(oldSelf.promptsFrom)",
                "spec.prompts, spec.promptItems and spec.promptsFrom cannot be added or removed after creation: "
                f"they decide the images already made; {NEW_JOB}",
                field_path=".promptsFrom",
            ),
        )
    )
    model: ModelSpec = Field(
        description="The diffusion model to run." + IMMUTABLE,
        json_schema_extra=rules(immutable("spec.model")),
    )
    prompts: list[PromptText] | None = Field(
        default=None,
        max_length=MAX_INLINE_PROMPTS,
        description=(
            "Inline prompts, one string each (ids p0000000, p0000001, ... by position; promptItems "
            "come after them)." + _INLINE
        ),
        json_schema_extra=rules(immutable("spec.prompts"), minItems=1),
    )
    prompt_items: list[PromptItem] | None = Field(
        default=None,
        max_length=MAX_INLINE_PROMPTS,
        description=(
            "Inline prompts as objects: prompt and optionally id, negativePrompt, seed and per-prompt "
            "overrides (width, height, steps, guidanceScale); after spec.prompts, if both are set." + _INLINE
        ),
        json_schema_extra=rules(immutable("spec.promptItems"), minItems=1),
    )
    prompts_from: PromptsFrom | None = Field(
        default=None,
        description="Prompts from a file or ConfigMap (for large jobs: etcd holds only the reference)."
        + IMMUTABLE,
        json_schema_extra=rules(immutable("spec.promptsFrom")),
    )
    generation: Generation = Field(
        default_factory=Generation,
        description="Generation defaults." + IMMUTABLE,
        json_schema_extra=rules(immutable("spec.generation")),
    )
    batching: Batching = Field(default_factory=Batching, description="Batch and shard sizes.")
    output: Output = Field(description="Where images and the manifest are stored.")
    retries: Retries = Field(default_factory=Retries, description="Retry and lease settings per shard.")
    engine: EngineSpec = Field(
        default_factory=EngineSpec, description="GPU speed settings of the worker engine."
    )
    workers: Workers = Field(default_factory=Workers, description="Worker pods (cluster mode).")
    suspend: bool = Field(default=False, description="Stop all workers; set back to false to go on.")
    queue_name: str | None = Field(
        default=None, description="Kueue LocalQueue; set as the worker Job's kueue.x-k8s.io/queue-name label."
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        description="Fail the job if its workers run longer than this; time queued or suspended does not count.",
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the job this long after it finishes."
    )

    @field_validator("prompts", mode="before")
    @classmethod
    def _objects_go_to_items(cls, v: Any) -> Any:
        # An old manifest mixed strings and objects in one list; the API server now types the list
        # (so it can bound it), and the objects have a field of their own.
        if isinstance(v, list):
            for i, entry in enumerate(v):
                if isinstance(entry, dict):
                    raise ValueError(
                        f"entry {i} is an object: prompts with an id, seed or overrides go in "
                        "spec.promptItems (a list of objects); spec.prompts holds strings only"
                    )
        return v

    def inline_prompts(self) -> list[str | PromptItem] | None:
        """The inline prompts in order, the strings first; None for a prompt file or ConfigMap."""
        if self.prompts is None and self.prompt_items is None:
            return None
        return [*(self.prompts or []), *(self.prompt_items or [])]

    @model_validator(mode="after")
    def _one_prompt_source(self) -> ImageBatchJobSpec:
        inline = self.inline_prompts()
        if inline is None and self.prompts_from is None:
            raise ValueError(
                "set spec.prompts (strings) and/or spec.promptItems (objects), or spec.promptsFrom "
                "(a file or ConfigMap)"
            )
        if inline is not None and self.prompts_from is not None:
            raise ValueError(
                "set inline prompts (spec.prompts, spec.promptItems) or spec.promptsFrom, not both"
            )
        if inline is not None and not inline:
            raise ValueError("spec.prompts is empty: give at least one prompt")
        if inline is not None:
            # Refused before anything is made (the operator's InvalidSpec, `imagebatch validate`);
            # a prompt file's count is checked when it is planned (shardplan.check_shard_count).
            too_many = too_many_shards(
                len(inline) * self.generation.images_per_prompt, self.batching.shard_size
            )
            if too_many:
                raise ValueError(too_many)
        return self


class ObjectMeta(BaseModel):
    """The part of metadata local mode reads; everything else passes through."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    namespace: str | None = None


class ImageBatchJob(Model):
    api_version: Literal["imagebatch.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["ImageBatchJob"]
    metadata: ObjectMeta
    spec: ImageBatchJobSpec
    status: dict[str, Any] | None = None


# --- Status, written by the operator (one place) ------------------------------------------------


class Condition(Model):
    """A standard Kubernetes condition (metav1.Condition)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=False)
    type: str = Field(
        description="Complete, Failed, Suspended, Queued, WorkersHealthy, Ready, Reconciling or Stalled."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason for the last transition.")
    message: str = Field(default="", description="Human-readable detail.")
    last_transition_time: str = Field(description="RFC 3339 time of the last status change.")
    observed_generation: int | None = Field(default=None, description="The spec generation this reflects.")


class ItemCounts(Model):
    total: int = Field(default=0, description="Images the job makes in all.")
    done: int = Field(default=0, description="Images stored.")
    failed: int = Field(
        default=0,
        description=(
            "Images that were not made: items the engine failed on (listed in errors.jsonl) and the "
            "items of shards that failed all attempts."
        ),
    )


class ShardCounts(Model):
    total: int = Field(default=0, description="Shards planned.")
    pending: int = Field(default=0, description="Shards waiting for a worker.")
    claimed: int = Field(default=0, description="Shards a worker is on.")
    done: int = Field(default=0, description="Shards finished.")
    failed: int = Field(default=0, description="Shards that failed all attempts.")


class ImageBatchJobStatus(Model):
    """Progress and conditions, written by the operator."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=False)
    observed_generation: int | None = Field(default=None, description="The spec generation last acted on.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Complete, Failed, Suspended, Queued, WorkersHealthy, Ready, Reconciling, Stalled.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    state: str = Field(
        default="", description="Pending, Queued, Running, Suspended, Complete or Failed (the STATE column)."
    )
    reason: str = Field(default="", description="Why the job is in its state (the REASON column).")
    items: ItemCounts = Field(default_factory=ItemCounts, description="Image counts by state.")
    shards: ShardCounts = Field(default_factory=ShardCounts, description="Shard counts by state.")
    progress: str = Field(default="", description="done/total, for the printer column.")
    desired_replicas: int = Field(default=0, description="Worker pods wanted for the backlog.")
    active_replicas: int = Field(default=0, description="Worker pods running.")
    ready: str = Field(default="", description="Running/desired worker pods, e.g. 3/4 (the READY column).")
    active_seconds: float = Field(
        default=0.0,
        description="Seconds the workers were admitted and not suspended before runningSince (the deadline's clock).",
    )
    running_since: str | None = Field(
        default=None,
        description="When the workers were last admitted or resumed (RFC 3339); unset while queued.",
    )
    worker_job_restarts: int = Field(
        default=0, description="Worker Jobs replaced after they failed with work left (bounded)."
    )
    images_per_second: str = Field(default="", description="Recent throughput (a decimal string).")
    eta: str = Field(default="", description="Estimated time left, e.g. 5m30s.")
    start_time: str | None = Field(default=None, description="When work started (RFC 3339).")
    completion_time: str | None = Field(default=None, description="When the job finished (RFC 3339).")
    manifest: str | None = Field(default=None, description="URI of manifest.jsonl once complete.")
    errors: str | None = Field(
        default=None, description="URI of errors.jsonl (the failed items and why) when items failed."
    )
    fingerprint: str | None = Field(
        default=None, description="Digest of the settings that decide the images."
    )


# --- ImageBatchShard: the unit a worker claims ---------------------------------------------------


class ImageBatchShardSpec(Model):
    """The items of this shard, set by the operator when it plans the job."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "self.end > self.start",
                "spec.end must be greater than spec.start: a shard holds at least one item",
                field_path=".end",
            ),
            cel(
                "self == oldSelf",
                "spec of an ImageBatchShard is immutable: the operator plans shards once per job",
            ),
        )
    )
    job_name: str = Field(min_length=1, description="The ImageBatchJob this shard belongs to.")
    index: int = Field(ge=0, description="Shard number; its manifest part is manifest/s<index>.jsonl.")
    start: int = Field(ge=0, description="First item index (inclusive) of the job's planned items.")
    end: int = Field(ge=1, description="Last item index (exclusive).")


ShardState = Literal["Pending", "Claimed", "Done", "Failed"]


class ImageBatchShardStatus(Model):
    """Claim and progress, written by workers and the operator."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=False)
    state: ShardState = Field(default="Pending", description="Pending, Claimed, Done or Failed.")
    attempt: int = Field(
        default=0, ge=0, description="Claims so far; a completion must carry the current one."
    )
    failures: int = Field(
        default=0,
        ge=0,
        description=(
            "Failed attempts (errors, expired leases, progress deadlines); the shard is Failed at "
            "retries.maxAttempts. A release on SIGTERM (scale-in, suspend, preemption) counts none."
        ),
    )
    holder: str | None = Field(default=None, description="Worker pod holding the claim.")
    lease_renew_time: str | None = Field(default=None, description="Last lease renewal (RFC 3339).")
    items_done: int = Field(default=0, ge=0, description="Images stored by the current attempt.")
    seconds: float | None = Field(default=None, description="Time the completing attempt took.")
    items_failed: int = Field(
        default=0,
        ge=0,
        description="Items of a Done shard that the engine could not make (in errors/<shard>.jsonl).",
    )
    failed_items: list[Annotated[str, Field(description="An item id.")]] | None = Field(
        default=None, max_length=5, description="The first failed items' ids, for the job's message."
    )
    error: str | None = Field(default=None, description="Last error, if an attempt failed.")
