"""The pipeline config: one typed schema for YAML files, the CLI and (later) Prefect parameters.

Defaults follow the BTX paper (arXiv 2403.07816, section 4.1): AdamW, weight decay 0.1,
100 warm-up steps, cosine decay to 10 % of the peak learning rate. `load_config` validates
everything before any heavy work and reports every problem at once, each with its fix.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from btx_core.errors import ConfigError

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
BUILTIN_CORPORA = ("code", "math", "knowledge", "general")
# Keys that would put a secret into a config file (and so into manifests and the Prefect UI).
SECRET_KEYS = {"key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
               "aws_session_token", "session_token", "access_key", "secret_key"}


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class DataSource(StrictModel):
    """Where a corpus comes from: exactly one of `builtin`, `path` or `hub`."""

    builtin: Literal["code", "math", "knowledge", "general"] | None = None
    """A corpus shipped with btx (offline): `code` (Python stdlib source), `math` (generated
    worked problems), `knowledge` (CIA World Factbook prose), `general` (a mixture of the three)."""
    path: str | None = None
    """Local path, glob or `s3://` URI of text, json/jsonl or parquet files (a file or a directory)."""
    hub: str | None = None
    """A Hugging Face Hub dataset name (needs network access at run time)."""
    hub_config: str | None = None
    """The Hub dataset's configuration name, if it has several."""
    split: str = "train"
    """Dataset split to read (for `path` and `hub`)."""
    format: Literal["text", "json", "parquet"] | None = None
    """File format for `path`; inferred from the file extension when omitted."""
    text_column: str = "text"
    """Column holding the documents (json/parquet/hub)."""
    max_documents: int | None = Field(default=None, gt=0)
    """Use at most this many documents (the first ones, in source order)."""
    max_bytes: int | None = Field(default=None, gt=0)
    """Cap on the bytes of text used (documents that would pass the cap are skipped)."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """fsspec storage options for `path` (e.g. `{client_kwargs: {endpoint_url: ...}}`).
    Credentials are not allowed here: they come from the environment."""

    @model_validator(mode="after")
    def _exactly_one_source(self) -> DataSource:
        given = [k for k in ("builtin", "path", "hub") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of `builtin`, `path` or `hub` "
                             f"(got {', '.join(given) or 'none'})")
        return self

    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        found = sorted(k for k in _walk_keys(value) if k.lower() in SECRET_KEYS)
        if found:
            raise ValueError(f"credentials ({', '.join(found)}) must not be in a config file; "
                             "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment")
        return value


class DomainSpec(StrictModel):
    """One domain: the corpus one expert is trained on."""

    name: str = Field(pattern=NAME_PATTERN)
    """Domain name: lowercase letters, digits, `-` and `_` (it becomes part of store paths)."""
    data: DataSource
    """Where the domain's documents come from."""
    held_out_fraction: float = Field(default=0.05, gt=0, lt=1)
    """Fraction of documents kept out of training for evaluation. The split is by a hash of each
    document, the same in every stage; keep it <= the seed's `held_out_fraction` so that no
    held-out document of this domain was seen in the seed's pretraining."""


class TrainSettings(StrictModel):
    """One training stage (seed pretraining, expert training). Paper defaults where it has them."""

    steps: int | None = Field(default=None, gt=0)
    """Optimizer steps to train. Set exactly one of `steps` and `tokens`."""
    tokens: int | None = Field(default=None, gt=0)
    """Training-token budget; steps = ceil(tokens / tokens per step)."""
    lr: float = Field(default=1e-4, gt=0)
    """Peak learning rate (paper: 1e-4 at 7B; tiny models need more, e.g. 1e-3)."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """Cosine decay ends at this fraction of the peak (paper: 10 %)."""
    warmup_steps: int = Field(default=100, ge=0)
    """Linear warm-up steps (paper: 100)."""
    weight_decay: float = Field(default=0.1, ge=0)
    """AdamW weight decay (paper: 0.1)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (Llama 2's)."""
    eps: float = Field(default=1e-8, gt=0)
    """AdamW epsilon."""
    grad_clip: float | None = Field(default=1.0, gt=0)
    """Clip the gradient norm to this value; null turns clipping off."""
    seq_len: int = Field(default=1024, gt=1)
    """Tokens per training sequence (documents are packed into blocks of this length)."""
    batch_size: int = Field(default=8, gt=0)
    """Sequences per micro-batch per process."""
    grad_accum: int = Field(default=1, gt=0)
    """Micro-batches accumulated per optimizer step."""
    precision: Literal["fp32", "bf16"] = "bf16"
    """`bf16`: bf16 autocast over fp32 weights (CPU with AMX, CUDA); `fp32`: full precision."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` uses CUDA when available."""
    seed: int = 0
    """Random seed (model init where created, data order)."""
    checkpoint_every: int = Field(default=100, gt=0)
    """Write a resumable checkpoint to the store every this many steps."""
    keep_checkpoints: int = Field(default=2, gt=0)
    """Keep the newest this many checkpoints of a run; older ones are deleted."""
    eval_blocks: int = Field(default=64, gt=0)
    """Held-out blocks used to measure the held-out loss at the end."""
    log_every: int = Field(default=10, gt=0)
    """Report progress every this many steps."""
    threads: int | None = Field(default=None, gt=0)
    """CPU threads for torch (default: torch's choice)."""

    # Fields that change how a run is observed or stored, not what it computes.
    _not_hashed = ("checkpoint_every", "keep_checkpoints", "log_every", "threads")

    @model_validator(mode="after")
    def _budget(self) -> TrainSettings:
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("set exactly one of `steps` and `tokens` (the training budget)")
        return self

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step in one process (multiply by the world size under DDP)."""
        return self.seq_len * self.batch_size * self.grad_accum

    def total_steps(self, world_size: int = 1) -> int:
        if self.steps is not None:
            return self.steps
        return math.ceil(self.tokens / (self.tokens_per_step * world_size))

    def result_hash(self) -> str:
        """Hash of the fields that change the trained weights."""
        data = self.model_dump(mode="json", exclude=set(self._not_hashed))
        return stable_hash(data)


class TinyModelSpec(StrictModel):
    """A small Llama created from scratch (demos, tests). The defaults put ~64 % of the
    parameters in the FFNs, as in Llama-2 7B: BTX keeps FFNs per expert and averages the rest,
    so a tiny model dominated by its embeddings would lose what its experts learned."""

    vocab_size: int = Field(default=4096, ge=260)
    """Byte-level BPE vocabulary trained on the seed's pretraining corpus (>= 256 bytes + specials)."""
    hidden_size: int = Field(default=256, gt=0)
    """Model width."""
    intermediate_size: int = Field(default=1024, gt=0)
    """FFN width (4x hidden puts most parameters in the FFNs)."""
    num_layers: int = Field(default=6, gt=0)
    """Decoder layers."""
    num_heads: int = Field(default=4, gt=0)
    """Attention heads."""
    num_kv_heads: int = Field(default=2, gt=0)
    """Key/value heads (grouped-query attention when fewer than `num_heads`)."""
    tie_embeddings: bool = True
    """Share the input embedding and the LM head."""
    max_position_embeddings: int = Field(default=2048, gt=0)
    """Longest sequence the rotary embedding is set up for."""
    rope_theta: float = Field(default=10000.0, gt=0)
    """Rotary embedding base."""
    tokenizer_max_bytes: int = Field(default=8_000_000, gt=0)
    """Bytes of the pretraining corpus used to train the tokenizer."""

    @model_validator(mode="after")
    def _heads(self) -> TinyModelSpec:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                             f"({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads "
                             f"({self.num_kv_heads})")
        return self


class SeedSpec(StrictModel):
    """The seed LLM: an existing model (`model`) or a tiny one created and pretrained (`create`)."""

    model: str | None = None
    """A local directory or store URI in Hugging Face layout, or a Hub model id (Llama/Mistral family)."""
    trust_remote_code: bool = False
    """Run code shipped with the model. Off: only transformers' own Llama/Mistral code runs."""
    create: TinyModelSpec | None = None
    """Create a tiny Llama with this shape and pretrain it on `pretrain_data`."""
    pretrain_data: DataSource = DataSource(builtin="general")
    """Corpus for the tokenizer and pretraining of a created seed."""
    pretrain: TrainSettings | None = None
    """Pretraining of a created seed (required with `create`)."""
    held_out_fraction: float = Field(default=0.05, gt=0, lt=1)
    """Held-out fraction of the pretraining corpus."""

    @model_validator(mode="after")
    def _one_kind(self) -> SeedSpec:
        if (self.model is None) == (self.create is None):
            raise ValueError("set exactly one of `model` (an existing seed) and `create` (a tiny one)")
        if self.create is not None and self.pretrain is None:
            raise ValueError("`create` needs `pretrain` settings (at least `steps` or `tokens`)")
        if self.model is not None and self.pretrain is not None:
            raise ValueError("`pretrain` applies only to a created seed: remove it, or use `create`")
        return self


class BTXConfig(StrictModel):
    """A whole BTX pipeline run."""

    run_name: str = Field(pattern=NAME_PATTERN)
    """Name of the run; outputs go to `<store>/<run_name>/...`."""
    store: str = "./store"
    """Object store root: a local path, `file://...` or `s3://bucket/prefix`. S3 endpoint and
    credentials come from the environment (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...)."""
    cache_dir: str = "~/.cache/btx"
    """Local cache for checkpoints fetched from the store."""
    seed: SeedSpec
    """The seed model."""
    domains: list[DomainSpec] = Field(min_length=1)
    """The domains, one expert each."""
    expert_training: TrainSettings
    """Continued pretraining of each expert on its domain (Branch + Train)."""

    @field_validator("store")
    @classmethod
    def _known_scheme(cls, store: str) -> str:
        scheme = _scheme(store)
        if scheme not in ("file", "local", "s3"):
            raise ValueError(f"unknown scheme '{scheme}://' in {store!r}; use a local path, "
                             "file:///abs/path or s3://bucket/prefix")
        return store

    @field_validator("domains")
    @classmethod
    def _unique_domains(cls, domains: list[DomainSpec]) -> list[DomainSpec]:
        names = [d.name for d in domains]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate domain name(s) {', '.join(dupes)}: give each domain a unique name")
        return domains

    def domain(self, name: str) -> DomainSpec:
        for d in self.domains:
            if d.name == name:
                return d
        known = ", ".join(d.name for d in self.domains)
        raise ConfigError([f"domain {name!r} is not in `domains` (known: {known})"])


# ---------------------------------------------------------------------------------------------
# Loading and validation


def load_config(path: str | Path, *, check_environment: bool = True) -> BTXConfig:
    """Read and validate a YAML config. Raises ConfigError listing every problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"config file {path} does not exist: check the path"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], source=str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError(["the file must hold a mapping of fields (run_name, store, seed, ...)"],
                          source=str(path))
    config = parse_config(raw, source=str(path), base_dir=Path.cwd())
    if check_environment:
        problems = environment_problems(config)
        if problems:
            raise ConfigError(problems, source=str(path))
    return config


def parse_config(raw: dict[str, Any], source: str | None = None,
                 base_dir: Path | None = None) -> BTXConfig:
    """Validate a mapping. Relative local paths are made absolute against `base_dir` (the
    current directory for files, as with any CLI), so they stay valid on a worker elsewhere."""
    try:
        config = BTXConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([_explain(err) for err in exc.errors()], source=source) from None
    return _resolve_paths(config, base_dir) if base_dir is not None else config


def environment_problems(config: BTXConfig) -> list[str]:
    """Cheap checks against the world (paths, schemes, the seed's architecture); no heavy work."""
    from btx_core.seed import seed_architecture_problem  # model-family knowledge lives there

    problems = []
    sources = [("seed.pretrain_data", config.seed.pretrain_data)] if config.seed.create else []
    sources += [(f"domains[{i}].data", d.data) for i, d in enumerate(config.domains)]
    for field, source in sources:
        if source.path is not None and _scheme(source.path) in ("file", "local"):
            if not _local_matches(source.path):
                problems.append(f"{field}.path: {source.path!r} does not exist: fix the path, or "
                                "use `builtin:` for a shipped corpus")
    if config.seed.model is not None:
        problem = seed_architecture_problem(config.seed.model)
        if problem:
            problems.append(f"seed.model: {problem}")
    return problems


def stable_hash(data: Any) -> str:
    """sha256 of canonical JSON: the config hash recorded in manifests."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _explain(err: dict[str, Any]) -> str:
    field = _field_path(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        name = str(err["loc"][-1])
        parent = _model_at(err["loc"][:-1])
        close = difflib.get_close_matches(name, list(parent.model_fields) if parent else [], n=1)
        hint = f"did you mean `{close[0]}`?" if close else "remove it"
        return f"{field}: unknown field; {hint}"
    if kind == "missing":
        return f"{field}: required field is missing; add it"
    message = err["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{field}: {message} (got {err.get('input')!r}); change the value"
    if kind == "literal_error":
        return f"{field}: {message} (got {err.get('input')!r})"
    if kind == "string_pattern_mismatch":
        return (f"{field}: {err.get('input')!r} is not a valid name; use lowercase letters, digits, "
                "'-' and '_' (it becomes part of store paths)")
    return f"{field or 'config'}: {message}"


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class at a location of the config (for field-name suggestions)."""
    model: type[BaseModel] | None = BTXConfig
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        model = _model_in(field.annotation)
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found:
            return found
    return None


def _walk_keys(value: Any):
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _walk_keys(v)


def _scheme(uri: str) -> str:
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", uri)
    return match.group(1).lower() if match else "local"


def _local_matches(path: str) -> bool:
    return bool(glob.glob(os.path.expanduser(path.removeprefix("file://"))))


def _resolve_paths(config: BTXConfig, base_dir: Path) -> BTXConfig:

    def fix(path: str | None) -> str | None:
        if path is None or _scheme(path) != "local" or Path(path).expanduser().is_absolute():
            return path
        return str((base_dir / path).resolve())

    def fix_source(src: DataSource) -> DataSource:
        return src.model_copy(update={"path": fix(src.path)})

    seed = config.seed.model_copy(update={"pretrain_data": fix_source(config.seed.pretrain_data)})
    if seed.model is not None and (Path(base_dir) / seed.model).exists():
        seed = seed.model_copy(update={"model": fix(seed.model)})
    domains = [d.model_copy(update={"data": fix_source(d.data)}) for d in config.domains]
    return config.model_copy(update={"store": fix(config.store), "seed": seed, "domains": domains})
