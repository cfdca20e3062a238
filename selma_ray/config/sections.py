"""The config schema: one pydantic model per section, with checks that say what to fix.

Allowed names (merge methods, samplers, scorers, skills) come from the registries that
implement them."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from selma_ray.core.skills import SKILLS
from selma_ray.eval import LABELS as SCORER_LABELS
from selma_ray.images import SCHEDULER_NAMES
from selma_ray.lora import METHODS, Method

PAPER_SKILLS = list(SKILLS)  # the paper's five, in its order


class ConfigError(ValueError):
    """A config file or override is invalid; the message says what to fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # (low, high) settings where low must be at most high, checked for every section.
    ORDERED: ClassVar[tuple[tuple[str, str], ...]] = ()

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        for low, high in self.ORDERED:
            lo, hi = getattr(self, low), getattr(self, high)
            if lo > hi:
                raise ValueError(f"{low} ({lo}) must be <= {high} ({hi})")
        return self


class StorageSection(_Section):
    """How to reach object storage; credentials come from the AWS chain, never from here."""

    endpoint: str | None = Field(
        None,
        description="S3-compatible endpoint (http://host:port); null: AWS_ENDPOINT_URL_S3 or "
        "AWS_ENDPOINT_URL, else AWS itself.",
    )
    region: str | None = Field(None, description="Bucket region; null: the AWS default chain.")
    anonymous: bool = Field(False, description="Unsigned requests (public buckets only).")

    @field_validator("endpoint")
    @classmethod
    def _endpoint_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("use a URL such as http://127.0.0.1:9000 or https://s3.example.com")
        return v


class RunSection(_Section):
    name: str = "tiny"
    dir: str = Field(
        "runs/tiny",
        description="Run directory: a local path, or a URI such as s3://bucket/runs/x "
        "(anything pyarrow.fs.FileSystem.from_uri opens).",
    )
    seed: int = Field(0, ge=0)
    storage: StorageSection = Field(default_factory=StorageSection)


class ModelsSection(_Section):
    llm: str = Field("smollm2-135m-instruct", description="Instruct LLM writing skill prompts.")
    generator: str = Field("tiny-sd", description="Diffusion model rendering training images.")
    base: str = Field("tiny-sd", description="Diffusion model that gets the experts and is served.")
    vae: str | None = Field(
        None,
        description="VAE the experts encode images with (training, validation, latent cache): "
        "a hub id or folder of an AutoencoderKL (or a pipeline folder: its vae/), run in the "
        "training dtype, so it must be fp16-safe under fp16 (e.g. madebyollin/sdxl-vae-fp16-fix). "
        "null = the base model's own VAE, kept in float32 whatever the training dtype.",
    )

    @field_validator("vae")
    @classmethod
    def _vae_named(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("give a hub id or folder of a VAE, or null for the base's own")
        return v


SKILL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
RESERVED_NAMES = {"base", "merged"}


class SkillSpec(_Section):
    """A user-defined skill, given inline in the config or in a YAML file."""

    name: str = Field(pattern=SKILL_NAME)
    description: str = Field(min_length=1)
    seeds: list[str] = Field(min_length=3, description="At least 3 example descriptions.")
    max_words: int = Field(30, ge=3)
    extra_rule: str = ""
    replaces_builtin: bool = Field(
        False, description="True to replace the built-in skill of the same name."
    )


class OpenAIBackend(_Section):
    """An OpenAI-compatible endpoint, called through the ``openai`` SDK's client."""

    base_url: str = Field("http://127.0.0.1:8001/v1", description="OpenAI-compatible API root.")
    api: Literal["chat", "completions"] = Field(
        "chat",
        description="chat = /chat/completions (chat models, vLLM servers); completions = "
        "/completions for completion-only models such as the paper's gpt-3.5-turbo-instruct.",
    )
    model: str | None = Field(None, description="Model name at the endpoint; null = models.llm.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Env var holding the key (not the key).")
    max_retries: int = Field(
        5,
        ge=0,
        description="Retries by the SDK: exponential backoff with jitter; a server's "
        "Retry-After is honoured.",
    )
    timeout_seconds: float = Field(60.0, gt=0.0)
    concurrency: int = Field(8, ge=1, description="Requests in flight per actor.")


class PromptsSection(_Section):
    skills: list[str] = Field(default_factory=lambda: list(PAPER_SKILLS), min_length=1)
    custom_skills: list[SkillSpec] = Field(default_factory=list)
    skill_files: list[str] = Field(default_factory=list, description="YAML files of skills.")
    per_skill: int = Field(1000, ge=1, description="Target number of new prompts per skill.")
    in_context_examples: int = Field(3, ge=1)
    new_per_request: int = Field(5, ge=1, description="Descriptions asked of the LLM per request.")
    requests_per_round: int = Field(64, ge=1, description="Most requests per skill per round.")
    max_rounds: int = Field(50, ge=1)
    rouge_threshold: float = Field(0.8, gt=0.0, le=1.0)
    semantic_threshold: float | None = Field(
        None, gt=0.0, le=1.0, description="Cosine cut-off for semantic dedup; null = off."
    )
    backend: Literal["vllm", "openai"] = "vllm"
    openai: OpenAIBackend = Field(default_factory=OpenAIBackend)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int | None = Field(
        None,
        ge=8,
        description="Answer length cap per request; null = sized per skill from its word limit "
        "and new_per_request (selma_ray.models.llm_data.answer_token_budget). A set value wins; "
        "an answer cut off by it loses its last, cut item (counted as 'truncated').",
    )
    max_count: dict[str, int] = Field(
        default_factory=lambda: {"counting": 3},
        description="skill -> the largest count its prompts may state (digits or number words, "
        "selma_ray.text.numbers); larger ones are rejected as 'count_rule'. The counting skill's "
        "instruction asks for at most 3.",
    )
    batch_size: int = Field(64, ge=1)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int = Field(2048, ge=256)
    gpu_memory_utilization: float = Field(
        0.85, gt=0.0, le=0.95, description="vLLM memory share; on CPU, the KV-cache share of RAM."
    )

    @field_validator("skills")
    @classmethod
    def _unique_skills(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"skills must be unique, got {v}")
        bad = [
            n
            for n in v
            if not re.match(SKILL_NAME, n) or n in RESERVED_NAMES or n.startswith("merged-")
        ]
        if bad:
            raise ValueError(
                f"invalid skill names {bad}: use letters, digits, '_' or '-', and neither "
                f"{sorted(RESERVED_NAMES)} nor a 'merged-' prefix (those name served adapters)"
            )
        return v

    def all_custom_skills(self) -> list[SkillSpec]:
        """Inline custom skills plus those read from ``skill_files``."""
        specs = list(self.custom_skills)
        for file in self.skill_files:
            specs.extend(read_skill_file(file))
        return specs

    @model_validator(mode="after")
    def _skills_exist(self) -> PromptsSection:
        from selma_ray.core.skills import SKILLS

        specs = self.all_custom_skills()
        custom = {s.name for s in specs}
        clash = sorted(s.name for s in specs if s.name in SKILLS and not s.replaces_builtin)
        if clash:
            raise ValueError(
                f"custom skills {clash} have the names of built-in skills; rename them, or set "
                "replaces_builtin: true on each to replace the built-in one"
            )
        unknown = [n for n in self.skills if n not in SKILLS and n not in custom]
        if unknown:
            raise ValueError(
                f"unknown skills {unknown}; built-in: {sorted(SKILLS)}; custom: {sorted(custom)} "
                "(add custom ones under prompts.custom_skills or prompts.skill_files)"
            )
        unknown = sorted(n for n in self.max_count if n not in SKILLS and n not in custom)
        if unknown:
            raise ValueError(
                f"max_count names unknown skills {unknown}; built-in: {sorted(SKILLS)}; "
                f"custom: {sorted(custom)}"
            )
        return self

    @field_validator("max_count")
    @classmethod
    def _counts_not_negative(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: n for k, n in v.items() if n < 0}
        if bad:
            raise ValueError(f"max_count values must be >= 0, got {bad}")
        return v


def _load_yaml(path: Path, error: type[Exception]) -> Any:
    """A YAML file's data (empty -> {}); a syntax error becomes ``error`` naming the file."""
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from e


def read_skill_file(path: str) -> list[SkillSpec]:
    """Skills from a YAML file: ``skills: [{name, description, seeds, ...}, ...]``."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"skill file {path!r} does not exist")
    data = _load_yaml(file, ValueError)
    items = data.get("skills") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ValueError(f"skill file {path!r} must hold a list under the key 'skills'")
    try:
        return [SkillSpec.model_validate(item) for item in items]
    except ValidationError as e:
        raise ValueError(f"skill file {path!r}: {_format_errors(e, SkillSpec)}") from None


# One registry each, in the code that implements them.
SchedulerName = Literal[SCHEDULER_NAMES]
ScorerName = Literal[tuple(SCORER_LABELS)]


def _named_groups(key: str, groups: dict[str, list[str]]) -> dict[str, list[str]]:
    """Named groups of skills (``experts.joint``, ``merge.subsets``): names usable as folder
    names, each group at least two distinct skills."""
    for name, members in groups.items():
        if not re.match(SKILL_NAME, name):
            raise ValueError(f"{key}: {name!r} is not a valid name ({SKILL_NAME})")
        if len(set(members)) != len(members) or len(members) < 2:
            raise ValueError(f"{key}.{name} must list at least two distinct skills, got {members}")
    return groups


class ImagesSection(_Section):
    steps: int = Field(50, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0.0)
    resolution: int | None = Field(None, description="Square size in pixels; null = native.")
    images_per_prompt: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    scheduler: SchedulerName = Field(
        "default",
        description="Sampler for rendering: default = the model's own, or one of the diffusers "
        "schedulers named in selma_ray.images (built from the model's config).",
    )
    real_data: dict[str, list[str]] = Field(
        default_factory=dict,
        description="skill -> image folders, Parquet or WebDataset tars used instead of "
        "rendering that skill (see selma_ray.images.real_data).",
    )
    real_data_use: Literal["pairs", "prompts"] = Field(
        "pairs",
        description="pairs: real_data's images and captions are the skill's training data; "
        "prompts: its captions are the skill's prompts (no LLM) and the generator renders them "
        "(the paper's 'ground-truth prompt + generated image').",
    )

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        if v is not None and (v < 8 or v % 8):
            raise ValueError(f"resolution must be a positive multiple of 8, got {v}")
        return v

    @field_validator("real_data")
    @classmethod
    def _real_data_valid(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        bad = [k for k in v if not re.match(SKILL_NAME, k)]
        if bad:
            raise ValueError(f"real_data keys must be skill names, got {bad}")
        empty = [k for k, sources in v.items() if not sources]
        if empty:
            raise ValueError(f"real_data skills {empty} list no sources; give paths or drop them")
        return v


class ExpertsSection(_Section):
    rank: int = Field(128, ge=1)
    alpha: float = Field(128.0, gt=0.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], min_length=1
    )
    learning_rate: float = Field(3e-4, gt=0.0)
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    batch_size: int = Field(64, ge=1)
    max_steps: int = Field(5000, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    max_grad_norm: float = Field(1.0, gt=0.0)
    resolution: int | None = Field(None, description="Training resolution; null = native.")
    checkpoint_every: int = Field(500, ge=1)
    lora_init: Literal["gaussian", "default"] = Field(
        "gaussian", description="peft init_lora_weights: gaussian A, or default (Kaiming A); B = 0."
    )
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    gradient_checkpointing: bool = False
    max_nonfinite_steps: int = Field(
        20,
        ge=1,
        description="A step whose loss or gradients are not finite is skipped (no LoRA or "
        "optimizer update, step count not advanced) and counted; this many in a row stop the "
        "expert with an error.",
    )
    shared_init: bool = Field(
        True,
        description="Every expert's LoRA starts from the same weights, drawn from run.seed "
        "alone, as the paper merge (mean of A's, mean of B's) assumes; false: seeded by run "
        "seed and skill (independent starts; prefer merge methods cat or svd then).",
    )
    snr_gamma: float | None = Field(None, gt=0.0, description="Min-SNR loss weighting (e.g. 5).")
    noise_offset: float = Field(0.0, ge=0.0, description="Offset noise strength (e.g. 0.05).")
    train_text_encoder: bool = Field(False, description="Also train (and export) a CLIP LoRA.")
    text_encoder_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"], min_length=1
    )
    crop: Literal["center", "random"] = Field("center", description="After the shorter-side fit.")
    random_flip: bool = False
    cache_latents: bool = Field(
        False, description="Encode images (VAE) and prompts (text encoder) once, in the run dir."
    )
    validation_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of each skill's images held out for selection."
    )
    validation_count: int | None = Field(
        None, ge=0, description="Held-out images per skill; overrides validation_fraction."
    )
    select: Literal["best", "last"] = Field(
        "best", description="Exported checkpoint: lowest validation loss, or the last one."
    )
    keep_checkpoints: int = Field(
        2, ge=1, description="Checkpoints kept per expert (best ones with select=best, plus last)."
    )
    sample_images: int = Field(
        0, ge=0, description="Validation prompts rendered at every checkpoint (0 = none)."
    )
    max_failures: int = Field(2, ge=0, description="Worker failures retried from a checkpoint.")
    feed: Literal["auto", "stream", "memory"] = Field(
        "auto",
        description="How a trainer reads its rows: stream (Ray Data from storage every epoch, "
        "a seeded shuffle buffer), memory (its shard read once into the worker, a full seeded "
        "shuffle every epoch), or auto (memory when the shard fits feed_memory_mb).",
    )
    feed_memory_mb: int = Field(
        512, ge=1, description="auto: largest decoded shard (uint8 / latents) held in a worker."
    )
    shuffle_buffer: int = Field(
        64, ge=1, description="stream: rows in the local shuffle buffer (seeded per epoch)."
    )
    feed_buffer_rows: int = Field(
        128,
        ge=1,
        description="Decoded rows a feed dataset may hold in the object store ahead of its "
        "trainer, whatever the data size. Ray Data gives a quarter of a dataset's budget to "
        "its finished outputs, so below four image shards (4 x 32 rows) the feed stalls.",
    )
    feed_prefetch_batches: int = Field(
        16,
        ge=0,
        description="Batches of decoded rows a thread in the worker reads ahead of the training "
        "step, so that the next epoch's read starts before this one ends. 0 = none.",
    )
    joint: dict[str, list[str]] = Field(
        default_factory=dict,
        description="name -> skills: one LoRA trained on the pooled images of those skills, "
        "with an expert's steps and batch, exported to experts/<name>/ beside the experts "
        "(the paper's multi-skill LoRA baseline).",
    )
    validation_batch_size: int = Field(
        8, ge=1, description="Held-out images VAE-encoded at once when validation is set up."
    )

    @field_validator("joint")
    @classmethod
    def _joint_valid(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        return _named_groups("experts.joint", v)

    @model_validator(mode="after")
    def _cache_compatible(self) -> ExpertsSection:
        if self.cache_latents and self.crop == "random":
            raise ValueError(
                "experts.cache_latents encodes each image once, so it cannot be combined with "
                "crop=random; use crop=center or cache_latents=false"
            )
        if self.cache_latents and self.train_text_encoder:
            raise ValueError(
                "experts.cache_latents caches text embeddings, which a trained text encoder "
                "changes; set train_text_encoder=false or cache_latents=false"
            )
        count = self.validation_count
        held_out = count > 0 if count is not None else self.validation_fraction > 0
        if self.select == "best" and not held_out:
            raise ValueError(
                "experts.select=best needs a validation split; set validation_fraction > 0 "
                "(or validation_count > 0), or select=last"
            )
        return self


class MergeSection(_Section):
    """How the experts are merged (rules in ``selma_ray.lora.methods``)."""

    methods: list[Method] = Field(
        default_factory=lambda: ["paper"],
        min_length=1,
        description="Merges to write to merges/<method>/; paper = mean of A's and of B's.",
    )
    default: Method = Field(
        "paper", description="The method served as 'merged' when select=default."
    )
    select: Literal["default", "validation"] = Field(
        "default",
        description="validation: 'merged' is the method with the lowest denoising loss on a "
        "fixed sample of the run's images.",
    )
    weights: dict[str, float] | None = Field(
        None, description="Per-skill weights; null = each method's default (1/N for paper)."
    )
    density: float = Field(0.5, gt=0.0, le=1.0, description="ties/dare: fraction of entries kept.")
    svd_rank: int | None = Field(None, ge=1, description="svd output rank; null = largest input.")
    seed: int = Field(0, ge=0, description="Seeds the DARE drop masks and the validation noise.")
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Stored dtype of merged adapters; maths always in float32 or more."
    )
    val_samples: int = Field(8, ge=1, description="Images scored per method (select=validation).")

    @model_validator(mode="before")
    @classmethod
    def _legacy_method(cls, data: Any) -> Any:
        # Runs written before ``methods`` existed have ``method: paper``; read them unchanged.
        if isinstance(data, dict) and "method" in data and "methods" not in data:
            data = dict(data)
            method = data.pop("method")
            data.update(methods=[method], default=method)
        return data

    @field_validator("weights")
    @classmethod
    def _weights_valid(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None and (
            not all(w >= 0 for w in v.values()) or sum(v.values()) <= 0  # also rejects NaN
        ):
            raise ValueError(f"weights must be >= 0 and not all zero, got {v}")
        return v

    subsets: dict[str, list[str]] = Field(
        default_factory=dict,
        description="name -> skills: a merge of only those experts with the default method, "
        "written to merges/<name>/ and served as merged-<name> (the paper's merge of 3 of 5).",
    )

    @field_validator("subsets")
    @classmethod
    def _subsets_valid(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        return _named_groups("merge.subsets", v)

    @model_validator(mode="after")
    def _default_is_a_method(self) -> MergeSection:
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be unique, got {self.methods}")
        taken = sorted(set(self.subsets) & set(METHODS))
        if taken:
            raise ValueError(f"merge.subsets names {taken} are merge methods; rename them")
        if self.default not in self.methods:
            raise ValueError(
                f"default ({self.default!r}) must be one of methods {self.methods}; "
                f"add it to merge.methods or pick another default"
            )
        return self


class ServeSection(_Section):
    deploy: bool = Field(True, description="Deploy Serve at the end of the pipeline job.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = Field(
        "EveryNode",
        description="Where Serve runs HTTP proxies: EveryNode (behind a load balancer; a lost "
        "node drops the connections its proxy held) or HeadOnly (one entry point that "
        "outlives worker nodes; what a port-forward to the head reaches).",
    )
    app_name: str = "selma"
    default_steps: int = Field(30, ge=1)
    max_steps: int = Field(100, ge=1)
    max_prompt_chars: int = Field(1000, ge=1)
    min_size: int = Field(8, ge=8, description="Smallest image side a request may ask for.")
    max_size: int = Field(1024, ge=8, description="Largest image side a request may ask for.")
    max_n: int = Field(4, ge=1, description="Most images one request may ask for.")
    max_batch_size: int = Field(8, ge=1, description="Requests micro-batched per replica.")
    batch_wait_timeout_s: float = Field(0.02, ge=0.0, description="Wait to fill a batch.")
    api_key_env: str = Field(
        "SELMA_API_KEY", description="If this env var is set on the replicas, requests need it."
    )
    request_timeout_s: float = Field(
        120.0,
        gt=0.0,
        description="A request no diffusion replica has answered by then (none alive, e.g. "
        "while Serve replaces one on a lost node) gets 503 with Retry-After, never a hang.",
    )
    retry_after_s: int = Field(
        5, ge=1, description="Retry-After of a 503 when a diffusion replica is lost or missing."
    )
    merge_cache_size: int = Field(
        4,
        ge=0,
        description="On-demand merges (a request's adapter {merge, experts, ...}) a replica "
        "keeps loaded, least recently used evicted first; 0 refuses them.",
    )
    max_runs_per_replica: int = Field(
        3,
        ge=1,
        description="Runs of the deployment's `runs` allowlist a diffusion replica keeps "
        "loaded beside its default run (Ray Serve model multiplexing, least recently used "
        "unloaded first).",
    )

    ORDERED = (("default_steps", "max_steps"), ("min_size", "max_size"))


class EvalSection(_Section):
    """The eval stage: held-out prompts rendered by every variant, then scored."""

    enabled: bool = Field(True, description="Run the eval stage in the pipeline job.")
    dsg_file: str | None = Field(
        None,
        description="DSG-1K annotation CSV (dsg-1k-anns.csv from github.com/j-min/DSG): its "
        "1,060 prompts with their questions and dependencies, scored by the DSG protocol. "
        "With dsg_file or tifa_file set, the eval prompts are those files' prompts and "
        "prompts_file is not used; builtin:NAME = a file in selma_ray/eval/benchmarks.",
    )
    tifa_file: str | None = Field(
        None,
        description="TIFA v1.0 question JSON (tifa_v1.0/tifa_v1.0_question_answers.json from "
        "github.com/Yushi-Hu/tifa): its prompts with multiple-choice questions, scored by "
        "the TIFA protocol (scorer tifa).",
    )
    prompts_file: str = Field(
        "builtin:tiny_eval.csv",
        description="Held-out prompts when neither dsg_file nor tifa_file is set (numbers then "
        "not comparable with the paper's): .txt (one a line), .csv (prompt/text, optional "
        "category/source/skill, id/item_id; a DSG-1K CSV brings its questions) or TIFA .json; "
        "builtin:NAME = a file in selma_ray/eval/benchmarks; "
        "generated = new prompts per skill from the LLM, filtered against the training prompts.",
    )
    generated_per_skill: int = Field(2, ge=1, description="Prompts per skill when generated.")
    questions: Literal["llm", "file", "none"] = Field(
        "llm", description="DSG questions: written by the LLM, read from questions_file, or none."
    )
    questions_file: str | None = Field(
        None, description="DSG-1K question CSV or TIFA JSON (questions=file); null = prompts_file."
    )
    max_prompts: int | None = Field(
        None, ge=1, description="Use the first N prompts (of each benchmark file); null = all."
    )
    max_questions: int = Field(12, ge=1, description="Most LLM-written questions per prompt.")
    on_overlap: Literal["drop", "error"] = Field(
        "drop", description="Eval prompts also in the training prompts: drop them, or fail."
    )
    variants: list[str] | None = Field(None, description="Adapters to evaluate; null = all.")
    seeds_per_prompt: int = Field(
        1, ge=1, description="Images per prompt (same seeds per variant)."
    )
    steps: int | None = Field(None, ge=1, description="Sampling steps; null = images.steps.")
    guidance_scale: float | None = Field(None, ge=0.0, description="null = images.guidance_scale.")
    batch_size: int = Field(8, ge=1)
    scorers: list[ScorerName] = Field(default_factory=lambda: ["clip", "pick", "dsg"])
    clip_model: str = "openai/clip-vit-large-patch14"
    pick_model: str = "yuvalkirstain/PickScore_v1"
    pick_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    vqa_model: str = Field(
        "Salesforce/blip-vqa-base",
        description="The VQA model answering DSG questions: a BLIP VQA model, a BLIP-2 model "
        "(Blip2ForConditionalGeneration) or any transformers image-text-to-text VLM, by id or "
        "path.",
    )
    tifa_vqa_model: str | None = Field(
        None, description="The VQA model answering TIFA questions; null = vqa_model."
    )
    vqa_mode: Literal["generate", "rank"] = Field(
        "rank",
        description="generate: the VQA model generates an answer, normalised and compared with "
        "'yes' (DSG) or mapped to the nearest choice (TIFA): the published protocols. rank: the "
        "choice the model finds most likely (BLIP VQA and image-text-to-text models only).",
    )
    dsg_average: Literal["question", "prompt"] = Field(
        "prompt",
        description="DSG headline: question = mean over all questions of all prompts (SELMA's "
        "DSG evaluation.py, the paper's numbers); prompt = mean of per-prompt scores. Both "
        "are reported.",
    )
    question_llm: str | None = Field(None, description="LLM writing questions; null = models.llm.")
    image_reward_model: str = "ImageReward-v1.0"
    hps_version: str = "v2.1"
    bootstrap: int = Field(1000, ge=100, description="Bootstrap resamples for the 95% CIs.")
    grid_prompts: int = Field(8, ge=0, description="Prompts shown as image grids in the report.")

    @field_validator("scorers")
    @classmethod
    def _unique_scorers(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"scorers must be unique, got {v}")
        return v

    @field_validator("dsg_file", "tifa_file")
    @classmethod
    def _benchmark_file(cls, v: str | None, info: Any) -> str | None:
        if v is None:
            return None
        if not v.strip():
            raise ValueError("give the file's path (or builtin:NAME), or null for none")
        suffix = {"dsg_file": ".csv", "tifa_file": ".json"}[info.field_name]
        what = {
            "dsg_file": "the DSG-1K annotation CSV, dsg-1k-anns.csv",
            "tifa_file": "the TIFA v1.0 question JSON, tifa_v1.0_question_answers.json",
        }[info.field_name]
        if not v.lower().endswith(suffix):
            raise ValueError(f"{info.field_name} must be {what} (a {suffix} file)")
        return v


def _check_custom(v: dict[str, float]) -> dict[str, float]:
    reserved = sorted(set(v) & {"CPU", "GPU", "memory", "object_store_memory"})
    if reserved:
        raise ValueError(f"{reserved} are not custom resources; use num_cpus/num_gpus")
    bad = {k: x for k, x in v.items() if x <= 0}
    if bad:
        raise ValueError(f"custom resource amounts must be > 0, got {bad}")
    return v


CustomResources = Annotated[
    dict[str, float],
    AfterValidator(_check_custom),
    Field(
        default_factory=dict,
        description="Custom Ray resources each task, actor or worker asks for, e.g. "
        "{node_a: 0.01} to place it on nodes started with --resources='{\"node_a\": 1}'.",
    ),
]


class TaskResources(_Section):
    num_gpus: float = Field(0.0, ge=0.0)
    num_cpus: float = Field(1.0, gt=0.0)
    custom: CustomResources


class ActorPool(TaskResources):
    min_size: int = Field(1, ge=1)
    max_size: int = Field(1, ge=1)

    ORDERED = (("min_size", "max_size"),)


class ExpertResources(_Section):
    workers_per_expert: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    custom: CustomResources
    max_concurrent: int = Field(5, ge=1, description="Experts training at once; the rest queue.")
    gpu_memory_gb: float | None = Field(
        None,
        gt=0.0,
        description="Memory of one training GPU in GiB (80 for an A100/H100 80GB); --plan "
        "warns when its per-GPU estimate exceeds it. null = not compared.",
    )


class ServeResources(TaskResources):
    ingress_custom: CustomResources = Field(
        default_factory=dict,
        description="Custom resources of the ingress replica (0 CPUs, it only validates and "
        "forwards), e.g. to keep it off nodes that may be lost with the diffusion replicas.",
    )
    min_replicas: int = Field(
        1,
        ge=0,
        description="0 = scale to zero when idle: no GPU held, and the first request after "
        "waits a cold start (a node if none is free, then the model and adapters).",
    )
    max_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(
        8, ge=1, description="Requests a replica holds at once; at least serve.max_batch_size."
    )
    upscale_delay_s: float = Field(30.0, ge=0.0, description="Load must last this long to add.")
    downscale_delay_s: float = Field(600.0, ge=0.0, description="Idle this long to remove one.")

    ORDERED = (("min_replicas", "max_replicas"),)


class ResourcesSection(_Section):
    prompts: ActorPool = Field(default_factory=ActorPool)
    images: ActorPool = Field(default_factory=ActorPool)
    experts: ExpertResources = Field(default_factory=ExpertResources)
    merge: TaskResources = Field(default_factory=TaskResources)
    serve: ServeResources = Field(default_factory=ServeResources)
    eval: ActorPool = Field(default_factory=ActorPool)


class SelmaConfig(_Section):
    run: RunSection = Field(default_factory=RunSection)
    models: ModelsSection = Field(default_factory=ModelsSection)
    prompts: PromptsSection = Field(default_factory=PromptsSection)
    images: ImagesSection = Field(default_factory=ImagesSection)
    experts: ExpertsSection = Field(default_factory=ExpertsSection)
    merge: MergeSection = Field(default_factory=MergeSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)

    @model_validator(mode="after")
    def _merge_weights_name_skills(self) -> SelmaConfig:
        weights = self.merge.weights
        if weights is not None and set(weights) != set(self.prompts.skills):
            raise ValueError(
                f"merge.weights must give one weight per skill in prompts.skills "
                f"{self.prompts.skills}; got {sorted(weights)}"
            )
        skills = set(self.prompts.skills)
        for key, groups in (
            ("experts.joint", self.experts.joint),
            ("merge.subsets", self.merge.subsets),
        ):
            for name, members in groups.items():
                unknown = sorted(set(members) - skills)
                if unknown:
                    raise ValueError(
                        f"{key}.{name} names skills {unknown} that are not in prompts.skills "
                        f"{self.prompts.skills}"
                    )
        clash = sorted(set(self.experts.joint) & skills)
        if clash:
            raise ValueError(
                f"experts.joint names {clash} are skills; give the joint LoRAs other names"
            )
        return self

    def expert_units(self) -> dict[str, list[str]]:
        """The experts stage's units, each with the skills whose images it trains on: one
        expert per skill, then each joint LoRA (``experts.joint``)."""
        return {**{s: [s] for s in self.prompts.skills}, **self.experts.joint}

    def fingerprint(self, *sections: str, extra: Any = None) -> str:
        """A stable hash of the named sections (and ``extra``), for stage manifests."""
        data = {name: getattr(self, name).model_dump(mode="json") for name in sections}
        data["__extra__"] = extra
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _allowed_keys(loc: tuple[Any, ...], root: type[BaseModel]) -> list[str]:
    model = root
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _format_errors(err: ValidationError, root: type[BaseModel] | None = None) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(e["loc"], root or SelmaConfig))
            lines.append(f"{loc}: unknown key; allowed here: {allowed}")
        else:
            got = e.get("input")
            shown = (
                "" if isinstance(got, dict | list) and len(repr(got)) > 80 else f" (got {got!r})"
            )
            lines.append(f"{loc}: {e['msg'].removeprefix('Value error, ')}{shown}")
    return "invalid config:\n  " + "\n  ".join(lines)
