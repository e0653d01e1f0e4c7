"""The pipeline config: one typed schema for YAML files, the CLI and (later) Prefect parameters.

Defaults follow the BTX paper (arXiv 2403.07816, section 4.1): AdamW, weight decay 0.1,
100 warm-up steps, cosine decay to 10 % of the peak learning rate. `load_config` validates
everything before any heavy work and reports every problem at once, each with its fix.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from btx_core.config import checks as checks
from btx_core.config.base import StrictModel
from btx_core.config.checks import GENERAL, HELD_OUT_FRACTION
from btx_core.config.execution import LeasePolicy, Orchestration, TransferPolicy
from btx_core.config.method import BranchSettings, CompareSettings, MixSettings
from btx_core.config.values import (
    SECRET_KEYS,
    no_credentials_in_url,
    parse_bytes,
    scheme,
    stable_hash,
    walk_keys,
    walk_values,
)
from btx_core.errors import ConfigError

__all__ = ["BTXConfig", "BranchSettings", "CompareSettings", "DataSource", "DomainSpec", "FinetuneSettings", "GENERAL", "MixSettings", "SeedSpec",
           "TinyModelSpec", "TrainSettings", "parse_bytes", "scheme", "stable_hash"]

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class DataSource(StrictModel):
    """Where a corpus comes from: exactly one of `builtin`, `path` or `hub`."""

    cross_check = checks.source_problems

    builtin: Literal["code", "math", "knowledge", "prose", "general"] | None = None
    """A corpus shipped with btx (offline): `code` (Python stdlib source), `math` (generated
    worked problems), `knowledge` (CIA World Factbook prose), `prose` (English prose from none of
    those: the demo seed's corpus), `general` (a mixture of code, math and knowledge)."""
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
    """Cap on the bytes of text used: reading stops at the first document that does not fit
    (one larger than the whole cap is skipped)."""
    max_tokens: int | None = Field(default=None, gt=0)
    """Cap on the tokens used, each document's BOS/EOS included, counted before the held-out
    split: reading stops at the first document that does not fit (as for `max_bytes`)."""
    streaming: bool = False
    """For `hub`: read the dataset as a stream instead of downloading it whole into `datasets`'
    cache first (files under `path` are always read as a stream)."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """fsspec storage options for `path` (e.g. `{client_kwargs: {endpoint_url: ...}}`).
    Credentials are not allowed here: they come from the environment."""

    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        found = sorted(k for k in walk_keys(value) if k.lower() in SECRET_KEYS)
        if found:
            raise ValueError(f"credentials ({', '.join(found)}) must not be in a config file; "
                             "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment")
        for v in walk_values(value):
            no_credentials_in_url(v)
        return value

    @field_validator("path")
    @classmethod
    def _no_secrets_in_path(cls, value: str | None) -> str | None:
        return no_credentials_in_url(value)


class DomainSpec(StrictModel):
    """One domain: the corpus one expert is trained on."""

    name: str = Field(pattern=NAME_PATTERN)
    """Domain name: lowercase letters, digits, `-` and `_` (it becomes part of store paths)."""
    data: DataSource
    """Where the domain's documents come from."""
    held_out_fraction: float = Field(default=HELD_OUT_FRACTION, gt=0, lt=1)
    """Fraction of documents kept out of training for evaluation. The split is by a hash of each
    document, the same in every stage; keep it <= the seed's `held_out_fraction` so that no
    held-out document of this domain was seen in the seed's pretraining."""


class TrainSettings(StrictModel):
    """One training stage (seed pretraining, expert training). Paper defaults where it has them."""

    cross_check = checks.budget_problems

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
    """Sequences per micro-batch per process; with `nproc_per_node` other than 1, the global
    micro-batch, split evenly over the branch's processes."""
    grad_accum: int = Field(default=1, gt=0)
    """Micro-batches accumulated per optimizer step."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """`bf16`: bf16 autocast over fp32 weights; `fp32`: full precision; `auto`: bf16 where the
    device computes it natively (CUDA GPUs from Ampere on, CPUs with AMX or AVX512-BF16, Arm CPUs
    with BF16), fp32 elsewhere. On a CPU without it (e.g. AVX2 only) bf16 is emulated and several
    times slower than fp32. The precision used is recorded in each stage's manifest."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` uses CUDA when available."""
    seed: int = 0
    """Random seed (model init where created, data order)."""
    checkpoint_every: int = Field(default=100, gt=0)
    """Write a resumable checkpoint to the store every this many steps."""
    keep_checkpoints: int = Field(default=2, ge=0)
    """Keep the newest this many checkpoints of a run; older ones are deleted. 0: the newest one
    until the stage's output is saved, then none. A finished stage's checkpoints only hold what
    resuming it needs (the optimizer's state makes one about 3x the model), and a rerun with
    another config deletes them anyway."""
    eval_blocks: int = Field(default=64, gt=0)
    """Held-out blocks used to measure the held-out loss at the end."""
    log_every: int = Field(default=10, gt=0)
    """Report progress every this many steps."""
    threads: int | None = Field(default=None, gt=0)
    """CPU threads for torch (default: torch's choice)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    nproc_per_node: int | Literal["auto"] = 1
    """Processes (one per GPU) an expert branch trains on: above 1, the branch relaunches itself
    under `torchrun`; `auto`: one per visible CUDA device (on a Kubernetes pool, the job variable
    `gpu_count`). Other than 1, `batch_size` is the global micro-batch and each process takes
    `batch_size / N` of it: the global batch and the data order, and so the result, do not
    depend on how many GPUs a node has (up to float rounding)."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """How several processes train one model: `ddp` keeps a whole replica per GPU and averages
    gradients; `fsdp` shards weights, gradients and optimizer state over the GPUs (PyTorch
    FSDP2), for models whose training state does not fit one GPU. Same result up to rounding."""

    # Fields that change how a run is observed, stored or scheduled, not what it computes.
    # nproc_per_node: the global batch stays `batch_size` whatever the number of processes.
    _not_hashed = ("checkpoint_every", "keep_checkpoints", "log_every", "threads",
                   "gradient_checkpointing", "nproc_per_node", "distributed")

    @field_validator("nproc_per_node", mode="before")
    @classmethod
    def _processes(cls, value: Any, info: ValidationInfo) -> Any:
        if not (value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)):
            raise ValueError(f"{value!r} is not a number of processes: use a whole number >= 1, "
                             "or `auto` (one per visible CUDA device)")
        batch = info.data.get("batch_size")  # absent if it failed its own check
        if isinstance(value, int) and batch and batch % value:
            raise ValueError(f"batch_size ({batch}) must be divisible by nproc_per_node ({value}): "
                             "each process takes an equal share of the global micro-batch")
        return value

    @property
    def splits_batch(self) -> bool:
        """Whether `batch_size` is the global micro-batch, split over the processes."""
        return self.nproc_per_node != 1

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step in one process (multiply by the world size under a torchrun
        of your own); with `nproc_per_node` other than 1, the tokens of the whole step."""
        return self.seq_len * self.batch_size * self.grad_accum

    def global_tokens_per_step(self, world_size: int = 1) -> int:
        """Tokens per optimizer step over all `world_size` processes."""
        return self.tokens_per_step * (1 if self.splits_batch else world_size)

    def total_steps(self, world_size: int = 1) -> int:
        if self.steps is not None:
            return self.steps
        return math.ceil(self.tokens / self.global_tokens_per_step(world_size))

    def result_hash(self) -> str:
        """Hash of the fields that change the trained weights."""
        data = self.model_dump(mode="json", exclude=set(self._not_hashed))
        return stable_hash(data)


class TinyModelSpec(StrictModel):
    """A small Llama created from scratch (demos, tests). The defaults put ~64 % of the
    parameters in the FFNs, as in Llama-2 7B: BTX keeps FFNs per expert and averages the rest,
    so a tiny model dominated by its embeddings would lose what its experts learned."""

    cross_check = checks.head_problems

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

    def llama_shape(self) -> dict[str, Any]:
        """The fields that shape the model, as model/dense.py's `create_tiny_llama` takes them."""
        return self.model_dump(exclude={"vocab_size", "tokenizer_max_bytes"})


class SeedSpec(StrictModel):
    """The seed LLM: an existing model (`model`) or a tiny one created and pretrained (`create`)."""

    cross_check = checks.seed_problems

    model: str | None = None
    """A local directory or store URI in Hugging Face layout, or a Hub model id (Llama/Mistral family)."""
    trust_remote_code: bool = False
    """Run code shipped with the model. Off: only transformers' own Llama/Mistral code runs."""
    create: TinyModelSpec | None = None
    """Create a tiny Llama with this shape and pretrain it on `pretrain_data`."""
    pretrain_data: DataSource = Field(default_factory=lambda: DataSource(builtin="prose"))
    """Corpus for the tokenizer and pretraining of a created seed, and the `general` part of the
    finetuning mixture. The default shares nothing with the built-in domains, as BTX assumes."""
    pretrain: TrainSettings | None = None
    """Pretraining of a created seed (required with `create`)."""
    held_out_fraction: float = Field(default=HELD_OUT_FRACTION, gt=0, lt=1)
    """Held-out fraction of the pretraining corpus."""


class FinetuneSettings(StrictModel):
    """MoE finetuning (BTX section 2.4): the mixed model trained on the mixture of every domain
    plus the general corpus, with the LM loss and the load-balancing loss. Sparse upcycling and
    the dense baseline train on the same mixture with the same settings (their own budgets)."""

    training: TrainSettings
    """The training run: the same loop, checkpoints and resume as expert training."""
    mixture: dict[str, float] | None = None
    """Source -> weight, over the domain names and `general` (the seed's pretraining corpus);
    normalised to sum 1. Default: uniform over all of them, as in the paper."""
    routing: Literal["top_k", "soft", "sample_top1"] = "top_k"
    """`top_k`: softmax over the top-k router logits (Mixtral, the paper's default). `soft`: every
    expert, weighted by the full softmax (k = number of experts). `sample_top1`: in training each
    token goes to one expert sampled from the router's softmax (Gumbel-max, straight-through
    Gumbel-softmax gradient at the annealed `gumbel_temperature`); saved as a stock top-1 model
    (argmax). Strategies live in a registry (btx_core/moe/routing.py)."""
    top_k: int | None = Field(default=None, ge=1)
    """Experts per token for `top_k` routing; default: `mix.top_k`. With `soft` routing the
    load-balancing loss counts each token's top `mix.top_k` experts."""
    gumbel_temperature: tuple[float, float] = (1.0, 0.1)
    """`sample_top1`: the Gumbel-softmax temperature at the first and at the last step, decayed
    exponentially in between."""
    load_balancing: bool = True
    """Add a load-balancing loss to the LM loss (false: the paper's "no load balancing" ablation)."""
    load_balancing_loss: Literal["paper", "transformers"] = "paper"
    """`paper`: alpha N sum_i u_i p_i per MoE layer from that layer's router logits (u_i: share of
    the layer's routed slots, a top-k token counting 1/k per expert), summed over layers; alpha
    per layer at perfect balance. `transformers`: the model's own aux loss at coefficient
    alpha x num_layers (a top-k token counted k times, u and p pooled over layers first)."""
    load_balancing_alpha: float | None = Field(default=None, ge=0)
    """The paper's alpha per layer (default: `mix.load_balancing_alpha`, 0.01)."""

    @field_validator("gumbel_temperature")
    @classmethod
    def _positive_temperatures(cls, value: tuple[float, float]) -> tuple[float, float]:
        if min(value) <= 0:
            raise ValueError(f"temperatures must be > 0, got {list(value)}: e.g. [1.0, 0.1]")
        return value
    freeze_experts: bool = False
    """Train only the routers and the shared (non-FFN) parameters; expert FFNs stay as mixed."""
    router_warmup_steps: int = Field(default=0, ge=0)
    """For the first this many steps only the routers train (experts and shared weights held
    as mixed, no weight decay on them); then everything `freeze_experts` allows. The learning-rate
    schedule runs over all steps, warm-up included."""
    router_lr: float | None = Field(default=None, gt=0)
    """Peak learning rate of the routers (default: `training.lr`, as in the paper). Router rows
    start near zero, so at the lr of a continued pretraining they hardly move in a short finetune;
    the schedule (warm-up, cosine decay) scales it like every other parameter's."""


class BTXConfig(StrictModel):
    """A whole BTX pipeline run."""

    cross_check = checks.config_problems

    run_name: str = Field(pattern=NAME_PATTERN)
    """Name of the run; outputs go to `<store>/<run_name>/...`."""
    store: str = "./store"
    """Object store root: a local path, `file://...` or `s3://bucket/prefix`. S3 endpoint and
    credentials come from the environment (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...)."""
    cache_dir: str | None = None
    """Local cache for checkpoints fetched from the store and tokenized data; unset: the
    environment's `BTX_CACHE_DIR` in the process that runs the stage (the Kubernetes job templates
    point it at a volume), else `~/.cache/btx`."""
    store_transfer: TransferPolicy = Field(default_factory=TransferPolicy)
    """Concurrency, part size and retries of the store's S3 transfers (no effect on local stores)."""
    store_lease: LeasePolicy = Field(default_factory=LeasePolicy)
    """The writer lease each stage holds on its prefix in the store: conditional writes, expiry."""
    seed: SeedSpec
    """The seed model."""
    domains: list[DomainSpec] = Field(min_length=1)
    """The domains, one expert each."""
    expert_training: TrainSettings
    """Continued pretraining of each expert on its domain (Branch + Train)."""
    branch: BranchSettings = Field(default_factory=BranchSettings)
    """What each expert trains: everything (the paper) or only its FFNs (shared weights frozen)."""
    mix: MixSettings = Field(default_factory=MixSettings)
    """How the experts are mixed into one MoE."""
    finetune: FinetuneSettings | None = None
    """MoE finetuning of the mixed model; null: the pipeline ends at MiX."""
    compare: CompareSettings = Field(default_factory=CompareSettings)
    """`btx compare` and evaluation: seeds, held-out set sizes, BTM variants."""
    orchestration: Orchestration = Field(default_factory=Orchestration)
    """How Prefect runs the stages (embedded or on work pools, retries, parallelism)."""

    @field_validator("store")
    @classmethod
    def _known_scheme(cls, store: str) -> str:
        no_credentials_in_url(store)
        kind = scheme(store)
        if kind not in ("file", "local", "s3"):
            raise ValueError(f"unknown scheme '{kind}://' in {store!r}; use a local path, "
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

    @field_validator("orchestration")
    @classmethod
    def _pools_of_known_domains(cls, orchestration: Orchestration, info: ValidationInfo) -> Orchestration:
        names = [d.name for d in info.data.get("domains") or []]  # absent if `domains` failed
        unknown = sorted(set(orchestration.domain_pools) - set(names))
        if names and unknown:
            raise ValueError(f"domain_pools names unknown domain(s) {', '.join(unknown)}; the "
                             f"domains are: {', '.join(names)}")
        return orchestration

    @property
    def run_root(self) -> str:
        """`<store>/<run_name>`: the folder every location of this run lies under (store/layout.py)."""
        return f"{self.store.rstrip('/')}/{self.run_name}"

    def domain(self, name: str) -> DomainSpec:
        for d in self.domains:
            if d.name == name:
                return d
        known = ", ".join(d.name for d in self.domains)
        raise ConfigError([f"domain {name!r} is not in `domains` (known: {known}): use one of them, "
                           f"e.g. --domain {self.domains[0].name}, or add it to `domains`"])
