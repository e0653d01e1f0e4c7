"""MiX (BTX section 2.3): N dense experts branched from one seed become one Mixture-of-Experts.

In every layer expert i's FFN becomes expert i of the MoE layer; every other tensor (attention,
embeddings, norms, lm_head) is merged across experts (mean accumulated in fp64 by default,
written in the experts' dtype); each layer gets a new router. The output is the MoE
architecture's standard checkpoint (a transformers Mixtral for Llama/Mistral experts), written
the way `save_pretrained` writes it. Sparse upcycling is the same call on N copies of the seed.

Everything is validated before anything is written. Tensors are streamed a layer at a time, so
memory holds one layer's experts (plus small routing samples), never N models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from btx_core.errors import BTXError
from btx_core.model.card import write_model_card
from btx_core.model.config_fields import build_moe_config, translate
from btx_core.model.families import (
    TOKENIZER_FILES,
    DenseFamily,
    dense_family,
    quantized_problem,
    unsupported_message,
)
from btx_core.model.tensor_io import CheckpointReader, ShardedWriter, TensorMeta
from btx_core.moe.router_init import (
    ROUTER_INITS,
    LayerwiseProbe,
    RouterContext,
    RoutingSamples,
    in_memory_layer,
)
from btx_core.store.manifest import FileEntry

log = logging.getLogger(__name__)
SHARED_POLICIES = ("mean", "weighted", "copy")
MERGE_CHUNK = 1 << 21  # elements (16 MB in fp64)


class MixInputError(BTXError):
    """The experts or options cannot be mixed; `problems` lists every reason at once."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("cannot mix, nothing was written:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class Expert:
    """One dense model to mix: a local directory in Hugging Face layout."""

    name: str
    path: Path
    source: str = ""
    """Where it came from (a store location or directory), for the lineage."""
    manifest_hash: str | None = None
    seed_hash: str | None = None
    """The seed it was branched from (its manifest's `inputs.seed`), when known."""


@dataclass(frozen=True)
class MixOptions:
    top_k: int = 2
    shared_policy: str = "mean"
    weights: Mapping[str, float] | None = None
    """`weighted`: expert name -> weight."""
    copy_from: str | None = None
    """`copy`: the expert whose shared tensors are taken."""
    shared_exclude: tuple[str, ...] = ()
    """Experts whose shared tensors stay out of the merge (e.g. the seed as a generalist); with
    `weighted` or `copy`, an excluded expert may not also be given a weight or be `copy_from`."""
    router_init: str = "normal"
    router_seed: int = 0
    load_balancing_alpha: float = 0.01
    shard_size: int = 2 * 10**9
    dtype: torch.dtype | None = None
    """Output dtype; default: the experts' (the first expert's when they differ)."""


@dataclass
class MixResult:
    files: dict[str, FileEntry]
    """Every written file's size and sha256 (for the manifest)."""
    config: dict
    routing: dict = field(default_factory=dict)
    """Per-layer routing of held-out samples at init: entropy, load, by_domain_top1/topk."""
    shared_weights: dict[str, float] = field(default_factory=dict)
    """Expert name -> its weight in the merge of the shared tensors (summing to 1)."""


# --- validation ------------------------------------------------------------------------------------

@dataclass
class _Plan:
    family: DenseFamily
    experts: list[Expert]
    readers: list[CheckpointReader]
    configs: list[dict]
    """Each expert's config as transformers normalises it (AutoConfig(...).to_dict())."""
    carried: list[dict]
    """Each expert's fields as the MoE config takes them (model/config_fields.py)."""
    layers: int
    tied: bool
    dtype: torch.dtype
    shared_weights: list[float]
    outputs: list[tuple[str, TensorMeta]]


def plan_mix(experts: Sequence[Expert], options: MixOptions, *, samples: RoutingSamples | None = None) -> _Plan:
    """Check experts and options (architecture, every config field and tensor shape, tokenizer,
    lineage) and lay out the output; raises MixInputError with every problem found."""
    problems = _option_problems(experts, options, samples)
    opened = [_open_expert(e) for e in experts]
    # Copies of one directory (sparse upcycling) share their problems: say each once.
    problems += list(dict.fromkeys(p for _, _, _, issues in opened for p in issues))
    if problems or not experts:
        raise MixInputError(problems or ["no experts given"])
    configs, carried, readers = ([o[i] for o in opened] for i in range(3))
    family = dense_family(configs[0]["model_type"])
    first, layers = experts[0], configs[0]["num_hidden_layers"]
    tied = bool(configs[0].get("tie_word_embeddings", False))
    expected = set(family.shared_names(layers, tied, configs[0])) | {
        family.ffn_name(role, i) for role in family.ffn for i in range(layers)}
    for e, config, moe_keys, reader in zip(experts, configs, carried, readers):
        problems += _expert_problems(e, config, moe_keys, reader, family, expected, first, carried[0], readers[0])
    seeds = {e.seed_hash for e in experts if e.seed_hash}
    if len(seeds) > 1:
        problems.append("the experts were branched from different seeds (" + ", ".join(
            f"{e.name}: {e.seed_hash[:12]}" for e in experts if e.seed_hash) + "); BTX mixes experts of one seed")
    problems += _tokenizer_problems(experts)
    if problems:
        raise MixInputError(list(dict.fromkeys(problems)))
    dtype = options.dtype or readers[0].meta[family.embedding].dtype
    plan = _Plan(family, list(experts), readers, configs, carried, layers, tied, dtype,
                 _shared_weights(experts, options), [])
    plan.outputs = _output_layout(plan, readers[0])
    return plan


def _option_problems(experts: Sequence[Expert], o: MixOptions, samples: RoutingSamples | None) -> list[str]:
    names = [e.name for e in experts]
    problems = [f"expert name {n!r} is used twice: give each expert a unique name"
                for n in sorted({n for n in names if names.count(n) > 1})]
    if not 1 <= o.top_k <= max(len(names), 1):
        problems.append(f"top-k {o.top_k} must be between 1 and the number of experts ({len(names)})")
    if o.shared_policy not in SHARED_POLICIES:
        problems.append(f"shared policy {o.shared_policy!r} is unknown; use one of {', '.join(SHARED_POLICIES)}")
    if o.router_init not in ROUTER_INITS:
        problems.append(f"router init {o.router_init!r} is unknown; use one of {', '.join(ROUTER_INITS)}")
    elif ROUTER_INITS[o.router_init].needs_data and not (samples and samples.centroid):
        problems.append(f"router init {o.router_init!r} needs sample text for the experts' domains "
                        "(a config's domains, or --data per expert)")
    referenced = [*(o.weights or {}), *([o.copy_from] if o.copy_from else []), *o.shared_exclude]
    problems += [f"{n!r} is not an expert (experts: {', '.join(names)})" for n in referenced if n not in names]
    return problems + _merge_rule_problems(names, o)


def _merge_rule_problems(names: list[str], o: MixOptions) -> list[str]:
    """The shared-merge rule (docs/mix.md): an excluded expert stays out of the `mean`; a weight
    or a `copy_from` the user gave is used as given, never zeroed by an exclusion: the two
    together are refused, since one of them would have to be ignored."""
    excluded = [n for n in o.shared_exclude if n in names]
    if o.shared_policy == "weighted":
        weights = o.weights or {}
        if missing := [n for n in names if n not in weights]:
            return [f"shared policy 'weighted' needs a weight for every expert; missing: {', '.join(missing)} "
                    "(give 0 to leave an expert out of the merge)"]
        problems = [f"expert {n} has weight {weights[n]:g} in the shared merge and is also excluded from "
                    "it: drop the exclusion or set its weight to 0" for n in excluded if weights[n] > 0]
        if min(weights[n] for n in names) < 0 or sum(weights[n] for n in names) <= 0:
            problems.append("the weights of the shared-tensor merge must be >= 0 with a positive sum")
        return problems
    if o.shared_policy == "copy":
        if not o.copy_from:
            return ["shared policy 'copy' needs the expert to copy from"]
        return [f"expert {o.copy_from} is the one the shared tensors are copied from and is also excluded "
                "from the merge: drop one of the two"] if o.copy_from in excluded else []
    if len(set(excluded)) >= len(names) > 0:
        return ["every expert is excluded from the shared mean: keep at least one"]
    return []


def _open_expert(e: Expert) -> tuple[dict, dict, CheckpointReader | None, list[str]]:
    """(normalised config, the MoE's fields from it, tensor reader, problems) of one expert.
    Problems of the directory itself name the directory, so copies of one seed repeat them verbatim."""
    config_file = e.path / "config.json"
    if not config_file.is_file():
        return {}, {}, None, [quantized_problem(e.path, None, str(e.path)) or
                              f"{e.path} has no config.json (is it a Hugging Face model directory?)"]
    raw = json.loads(config_file.read_text())
    if (problem := quantized_problem(e.path, raw, str(e.path))) is not None:
        return raw, {}, None, [problem]
    family = dense_family(raw.get("model_type"))
    if family is None:
        return raw, {}, None, [unsupported_message(raw.get("model_type"), str(e.path))]
    from transformers import AutoConfig  # normalises transformers-4 files (rope_theta, rope_scaling)

    config = AutoConfig.from_pretrained(str(e.path)).to_dict()
    carried, issues = translate(config, family, str(e.path))
    try:
        reader = CheckpointReader(e.path)
    except BTXError as exc:
        return config, carried, None, [*issues, f"expert {e.name}: {exc}"]
    return config, carried, reader, issues


def _expert_problems(e: Expert, config: dict, carried: dict, reader: CheckpointReader, family: DenseFamily,
                     expected: set[str], first: Expert, first_carried: dict, first_reader) -> list[str]:
    if config.get("model_type") != family.model_type:
        return [f"expert {e.name} is a {config.get('model_type')!r} model, expert {first.name} a "
                f"{family.model_type!r} one: mix experts of one architecture"]
    problems = [f"expert {e.name}: config {k} is {carried.get(k)!r}, expert {first.name} has "
                f"{first_carried.get(k)!r}; the experts must share the seed's architecture"
                for k in sorted(set(carried) | set(first_carried)) if carried.get(k) != first_carried.get(k)]
    if problems:
        return problems  # shapes would only repeat the same story
    names = set(reader.keys())
    problems += [f"expert {e.name} lacks tensor {n}" for n in sorted(expected - names)]
    problems += [f"expert {e.name} has tensor {n}, which {family.architecture} -> {family.moe.architecture} "
                 "does not place (declare it in btx_core/model/families.py)" for n in sorted(names - expected)]
    for n in sorted(expected & names & set(first_reader.meta)):
        if reader.meta[n].shape != first_reader.meta[n].shape:
            problems.append(f"expert {e.name}: tensor {n} has shape {list(reader.meta[n].shape)}, expert "
                            f"{first.name} has {list(first_reader.meta[n].shape)}")
    return problems


def _tokenizer_problems(experts: Sequence[Expert]) -> list[str]:
    def digest(e: Expert, f: str) -> str | None:
        p = e.path / f
        return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None

    first = experts[0]
    if not any((first.path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        return [f"expert {first.name}: {first.path} has no tokenizer (tokenizer.json or tokenizer.model); the "
                "MoE ships its experts' tokenizer: save it with tokenizer.save_pretrained(dir)"]
    return [f"expert {e.name}: {f} differs from expert {first.name}'s; the experts must share the seed's "
            "tokenizer" for e in experts[1:] for f in ("tokenizer.json", "tokenizer.model")
            if None not in (digest(e, f), digest(first, f)) and digest(e, f) != digest(first, f)]


def _shared_weights(experts: Sequence[Expert], o: MixOptions) -> list[float]:
    """Each expert's weight in the shared merge (summing to 1); `_merge_rule_problems` has
    refused every combination that would leave none or ignore a weight the user gave."""
    if o.shared_policy == "copy":
        raw = [float(e.name == o.copy_from) for e in experts]
    elif o.shared_policy == "weighted":
        raw = [float(o.weights[e.name]) for e in experts]
    else:  # the plain mean, over the experts not excluded from it
        raw = [0.0 if e.name in o.shared_exclude else 1.0 for e in experts]
    return [w / sum(raw) for w in raw]


def _output_layout(plan: _Plan, reader: CheckpointReader) -> list[tuple[str, TensorMeta]]:
    """Every output tensor in write order: embeddings, then per layer its shared tensors, router
    and experts, then the final norm and lm_head."""
    fam, n, dtype = plan.family, len(plan.experts), plan.dtype

    def same_shape(name: str, source: str | None = None) -> tuple[str, TensorMeta]:
        return name, TensorMeta(dtype, reader.meta[source or name].shape)

    hidden = reader.meta[fam.embedding].shape[1]
    out = [same_shape(fam.embedding)]
    for layer in range(plan.layers):
        out += [same_shape(name) for name in fam.layer_shared([layer], plan.configs[0])]
        out.append((fam.moe.router.format(layer=layer), TensorMeta(dtype, (n, hidden))))
        out += [same_shape(fam.moe.expert_name(role, layer, e), fam.ffn_name(role, layer))
                for e in range(n) for role in fam.ffn]
        out += [(name, TensorMeta(dtype, shape)) for name, shape in fam.moe.fixed_layer_tensors(layer, hidden).items()]
    return out + [same_shape(name) for name in fam.final_shared(plan.tied)]


# --- mixing --------------------------------------------------------------------------------------

def moe_config(plan: _Plan, options: MixOptions):
    """The MoE's config (a transformers config object): the seed's fields as config_fields.py
    carries them, the MoE keys and the load-balancing scale. The paper adds alpha * N *
    sum_i(u_i p_i) per layer (alpha = 0.01), summed over layers; transformers computes that loss
    once from statistics averaged over layers and scales it by router_aux_loss_coef, so the
    coefficient that gives the paper's sum is alpha x num_layers."""
    return build_moe_config(plan.carried[0], plan.family, num_experts=len(plan.experts), top_k=options.top_k,
                            aux_loss_coef=options.load_balancing_alpha * plan.layers, dtype=plan.dtype,
                            expert_names=[e.name for e in plan.experts])


def mix(experts: Sequence[Expert], options: MixOptions, out_dir: Path, *,
        samples: RoutingSamples | None = None, card: Mapping | None = None) -> MixResult:
    """Mix `experts` into the (empty) directory `out_dir`; see the module docstring."""
    plan = plan_mix(experts, options, samples=samples)
    config = moe_config(plan, options)
    probe = None
    if samples is not None and (samples.centroid or samples.heldout):
        probe = LayerwiseProbe(config, plan.family, samples, [e.name for e in experts])
    writer = ShardedWriter(out_dir, plan.outputs, options.shard_size)
    try:
        routing = _stream(plan, options, writer, probe, config)
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    _write_metadata(plan, config, out_dir, options, routing, card or {})
    return MixResult(files=files, config=config.to_dict(), routing=routing,
                     shared_weights={e.name: w for e, w in zip(plan.experts, plan.shared_weights)})


def _stream(plan: _Plan, options: MixOptions, writer: ShardedWriter, probe: LayerwiseProbe | None,
            config: dict) -> dict:
    fam, readers = plan.family, plan.readers
    hidden = readers[0].meta[fam.embedding].shape[1]
    init = ROUTER_INITS[options.router_init]
    merged = _merge(plan, fam.embedding)
    writer.write(fam.embedding, merged)
    if probe is not None:
        probe.embed(merged)
    del merged
    for layer in range(plan.layers):
        prefix = fam.layer_prefix.format(layer=layer)
        layer_shared = {name: _merge(plan, name) for name in fam.layer_shared([layer], plan.configs[0])}
        fixed = {name: torch.zeros(shape, dtype=plan.dtype)
                 for name, shape in fam.moe.fixed_layer_tensors(layer, hidden).items()}
        ffns = [{role: r.get(fam.ffn_name(role, layer)).to(plan.dtype) for role in fam.ffn} for r in readers]
        ctx = RouterContext(layer, len(plan.experts), hidden, config.initializer_range,
                            torch.Generator().manual_seed(options.router_seed * 100_003 + layer))
        if probe is not None:
            relative = {name.removeprefix(prefix): t for name, t in {**layer_shared, **fixed}.items()}
            placeholder = torch.zeros(len(plan.experts), hidden)
            inputs = probe.router_inputs(layer, in_memory_layer(relative, ffns, placeholder))
            if init.needs_data:
                ctx.inputs = probe.centroid_inputs(inputs)
        router = init(ctx).to(plan.dtype)
        if probe is not None:
            probe.advance(router, inputs)
        for name, tensor in layer_shared.items():
            writer.write(name, tensor)
        writer.write(fam.moe.router.format(layer=layer), router)
        for e, ffn in enumerate(ffns):
            for role in fam.ffn:
                writer.write(fam.moe.expert_name(role, layer, e), ffn[role])
        for name, tensor in fixed.items():
            writer.write(name, tensor)
        del layer_shared, ffns
    for name in fam.final_shared(plan.tied):
        writer.write(name, _merge(plan, name))
    if probe is None or not probe.report["entropy"]:
        return {}
    return {"experts": [e.name for e in plan.experts], "init": options.router_init,
            "top_k": options.top_k, **probe.report}


def _merge(plan: _Plan, name: str) -> torch.Tensor:
    """The (weighted) mean over experts, accumulated in fp64, a chunk at a time: memory holds the
    output tensor and two fp64 chunks, not a copy per expert (embeddings are large). fp64 because
    then the mean of identical fp32 tensors is exactly that tensor (in fp32, (a + a + a) / 3 can be
    off by an ulp): shared weights that every branch kept frozen stay the seed's, bit for bit."""
    sources = [(r.get(name), w) for r, w in zip(plan.readers, plan.shared_weights) if w > 0]
    if len(sources) == 1:
        return sources[0][0].to(plan.dtype)
    equal = all(w == sources[0][1] for _, w in sources)
    out = torch.empty(sources[0][0].shape, dtype=plan.dtype)
    flat, views = out.view(-1), [(t.reshape(-1), w) for t, w in sources]  # views of the files' mappings
    for start in range(0, flat.numel(), MERGE_CHUNK):
        end = start + MERGE_CHUNK
        total = views[0][0][start:end].to(torch.float64, copy=True)
        if not equal:
            total.mul_(views[0][1])
        for t, w in views[1:]:
            total.add_(t[start:end].double(), alpha=1.0 if equal else w)
        if equal:  # the plain mean: one division of the fp64 sum
            total.div_(len(views))
        flat[start:end] = total
    return out


def _write_metadata(plan: _Plan, config, out_dir: Path, options: MixOptions, routing: dict,
                    card: Mapping) -> None:
    """config.json through the config class, generation_config.json, the tokenizer, README.md."""
    from transformers import GenerationConfig

    config.save_pretrained(out_dir)
    source = plan.experts[0].path
    if (source / "generation_config.json").is_file():
        shutil.copy2(source / "generation_config.json", out_dir / "generation_config.json")
    else:
        GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    for f in (*TOKENIZER_FILES, "chat_template.jinja"):
        if (source / f).is_file():
            shutil.copy2(source / f, out_dir / f)
    write_model_card(out_dir, config=config.to_dict(), experts=plan.experts, options=options, routing=routing,
                     shared_weights=plan.shared_weights, extra=card)
