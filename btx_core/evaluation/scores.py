"""Held-out evaluation: per-token log-probabilities of any causal LM (dense or MoE) on two
held-out sets, the losses they give, where an MoE routes each domain's tokens, and the
Branch-Train-Merge ensemble of dense experts computed from the experts' own log-probabilities.

- Single-domain set: `eval_blocks` of each domain's held-out blocks, drawn at random without
  replacement from all of them. Held-out blocks are packed in corpus order, so a prefix is the
  first few documents: in the built-in `code` corpus, mostly two generated character-map tables.
- Mixed-domain set: blocks spliced from 2-3 domains' held-out text (a segment of a random block of
  each), every token labelled with its domain. There, token-level routing (BTX) and a
  sequence-level ensemble (BTM), whose domain posterior lags behind each switch, really differ.

Both are fixed by one seed (`compare.eval_seed`): every model and every random seed of a
comparison is scored on the same blocks, and `EvalSets.describe` records which.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from btx_core.training.distributed import resolve_precision

EVAL_SEED = 20240311  # the default of `compare.eval_seed`


@dataclass(frozen=True)
class MixedSegment:
    """Tokens [start, end) of a spliced block: tokens [offset, offset + end - start) of held-out
    block `block` of domain `domain`."""

    domain: str
    block: int
    offset: int
    start: int
    end: int


@dataclass(frozen=True)
class EvalSets:
    domains: list[str]
    single: dict[str, np.ndarray]
    """Domain -> held-out blocks [n, T]."""
    mixed: np.ndarray
    """Spliced blocks [m, T]."""
    mixed_labels: np.ndarray
    """Domain index of every token of `mixed` [m, T]."""
    single_blocks: dict[str, list[int]] = field(default_factory=dict)
    """Domain -> the index of each block of `single` among that domain's held-out blocks."""
    mixed_sources: list[list[MixedSegment]] = field(default_factory=list)
    """Per spliced block, where each of its segments comes from."""
    seed: int = EVAL_SEED
    heldout_blocks: dict[str, int] = field(default_factory=dict)
    """Domain -> how many held-out blocks the sample was drawn from."""
    data: dict[str, str] = field(default_factory=dict)
    """Domain -> content id of the prepared data the blocks index (when known)."""

    def describe(self) -> dict:
        """Sizes, the seed, and which held-out blocks make up each set (for results files)."""
        return {"single_blocks": {d: len(b) for d, b in self.single.items()},
                "mixed_blocks": len(self.mixed), "seq_len": int(self.mixed.shape[1]) if len(self.mixed) else 0,
                "seed": self.seed, "heldout_blocks": dict(self.heldout_blocks), "data": dict(self.data),
                "single_block_indices": {d: list(ix) for d, ix in self.single_blocks.items()},
                "mixed_sources": [[[s.domain, s.block, s.offset, s.start, s.end] for s in row]
                                  for row in self.mixed_sources]}


def sample_blocks(available: int, wanted: int, seed: int, domain: str) -> np.ndarray:
    """`wanted` distinct block indices out of `available` (all of them if fewer), drawn uniformly
    with a generator keyed on the seed and the domain's name (adding a domain changes no other
    domain's sample), in increasing order."""
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode())])
    return np.sort(rng.choice(available, size=min(wanted, available), replace=False))


def build_eval_sets(heldout: dict, *, eval_blocks: int, mixed_blocks: int, seed: int = EVAL_SEED) -> EvalSets:
    """Both held-out sets from each domain's held-out blocks [n, T] (arrays or lazy shards: only
    the sampled blocks are read)."""
    domains = list(heldout)
    picks = {d: sample_blocks(len(b), eval_blocks, seed, d) for d, b in heldout.items()}
    single = {d: np.asarray(b[picks[d]]) for d, b in heldout.items()}
    seq_len = next(iter(heldout.values())).shape[1]
    rng = np.random.default_rng([seed, len(domains)])
    mixed = np.zeros((mixed_blocks if len(domains) > 1 else 0, seq_len), dtype=np.int64)
    labels = np.zeros_like(mixed)
    sources = []
    for row in range(len(mixed)):
        parts = rng.choice(len(domains), size=min(len(domains), int(rng.integers(2, 4))), replace=False)
        # Cut points at least a quarter block from each other, so every segment has context.
        cuts = np.sort(rng.choice(np.arange(1, 4), size=len(parts) - 1, replace=False)) * seq_len // 4
        bounds = [0, *cuts.tolist(), seq_len]
        segments = []
        for part, start, end in zip(parts, bounds, bounds[1:]):
            source = heldout[domains[part]]
            index = int(rng.integers(len(source)))  # any held-out block of the domain
            offset = int(rng.integers(0, seq_len - (end - start) + 1))
            mixed[row, start:end] = np.asarray(source[index])[offset:offset + end - start]
            labels[row, start:end] = part
            segments.append(MixedSegment(domains[part], index, offset, start, end))
        sources.append(segments)
    return EvalSets(domains, single, mixed, labels, {d: p.tolist() for d, p in picks.items()}, sources, seed,
                    {d: len(b) for d, b in heldout.items()})


# --- one model ------------------------------------------------------------------------------------

class RoutingCounts:
    """Per layer and per domain label: top-1 and top-k choices, router probabilities, entropy."""

    def __init__(self, layers: int, experts: int, labels: int):
        self.top1 = np.zeros((labels, layers, experts))
        self.topk = np.zeros((labels, layers, experts))
        self.prob = np.zeros((labels, layers, experts))
        self.entropy = np.zeros((labels, layers))
        self.tokens = np.zeros(labels)

    def add(self, router_logits: tuple[torch.Tensor, ...], labels: torch.Tensor, top_k: int) -> None:
        flat = labels.reshape(-1)
        for label in flat.unique().tolist():
            rows = flat == label
            self.tokens[label] += int(rows.sum())
            for layer, logits in enumerate(router_logits):
                probs = torch.softmax(logits[rows].float(), dim=-1)
                chosen = probs.topk(top_k, dim=-1).indices
                experts = probs.shape[-1]
                self.top1[label, layer] += torch.bincount(chosen[:, 0], minlength=experts).numpy()
                self.topk[label, layer] += torch.bincount(chosen.reshape(-1), minlength=experts).numpy()
                self.prob[label, layer] += probs.sum(0).numpy()
                self.entropy[label, layer] += float(-(probs * probs.clamp_min(1e-12).log()).sum())

    def report(self, names: list[str], experts: list[str], top_k: int) -> dict:
        """Fractions of each domain's tokens per layer and expert, plus load and entropy over all."""
        n = self.tokens[:, None, None].clip(min=1)
        every = self.tokens.sum() or 1
        return {
            "experts": experts, "top_k": top_k,
            "by_domain_top1": {d: (self.top1[i] / n[i]).tolist() for i, d in enumerate(names)},
            "by_domain_topk": {d: (self.topk[i] / (n[i] * top_k)).tolist() for i, d in enumerate(names)},
            "load": (self.topk.sum(0) / (every * top_k)).tolist(),
            "entropy": (self.entropy.sum(0) / every).tolist(),
            "entropy_by_domain": {d: (self.entropy[i] / n[i, 0]).tolist() for i, d in enumerate(names)},
        }


@torch.no_grad()
def token_logprobs(model, blocks: np.ndarray, *, batch_size: int, precision: str = "auto",
                   labels: np.ndarray | None = None, routing: RoutingCounts | None = None) -> np.ndarray:
    """log p(x_{t+1} | x_<=t) of every next token [n, T-1] (float32). With `routing`, an MoE's
    router choices are counted per token label (the label of the token being routed)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.zeros((len(blocks), max(blocks.shape[1] - 1, 0)), dtype=np.float32)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                if resolve_precision(precision, device) == "bf16"
                else contextlib.nullcontext())
    moe = getattr(model.config, "num_experts", None) is not None  # every MoE config maps this name
    try:
        for start in range(0, len(blocks), batch_size):
            ids = torch.from_numpy(np.asarray(blocks[start:start + batch_size], dtype=np.int64)).to(device)
            with autocast:
                result = model(input_ids=ids, output_router_logits=routing is not None) if moe else model(input_ids=ids)
            logp = torch.log_softmax(result.logits[:, :-1].float(), dim=-1)
            out[start:start + len(ids)] = logp.gather(-1, ids[:, 1:, None]).squeeze(-1).cpu().numpy()
            if routing is not None and moe:
                rows = np.zeros(ids.shape, dtype=np.int64) if labels is None else labels[start:start + len(ids)]
                routing.add(tuple(r.cpu() for r in result.router_logits), torch.from_numpy(np.asarray(rows)),
                            model.config.num_experts_per_tok)
    finally:
        model.train(was_training)
    return out


@dataclass
class ModelScores:
    """One model's per-token log-probs on both sets (kept for ensembling), and its losses."""

    single: dict[str, np.ndarray]
    mixed: np.ndarray
    mixed_labels: np.ndarray | None = None
    """Domain index of each predicted token of `mixed` [m, T-1]."""
    routing: dict | None = None

    def losses(self) -> dict:
        per_domain = {d: float(-lp.mean()) for d, lp in self.single.items()}
        result = {"single": per_domain, "average": float(np.mean(list(per_domain.values())))}
        if self.mixed.size:
            result["mixed"] = float(-self.mixed.mean())
            if self.mixed_labels is not None:  # each domain's segments of the spliced blocks
                result["mixed_by_domain"] = {d: float(-self.mixed[self.mixed_labels == i].mean())
                                             for i, d in enumerate(self.single)
                                             if (self.mixed_labels == i).any()}
        return result


def score_model(model, sets: EvalSets, *, batch_size: int, precision: str = "auto") -> ModelScores:
    """Per-token log-probs on both sets; for an MoE also the routing of every domain's tokens
    (single-domain set) and of each segment's domain in the mixed set."""
    config = model.config
    moe = getattr(config, "num_experts", None)
    names = getattr(config, "btx_expert_names", None) or [f"expert{i}" for i in range(moe or 0)]
    counts = {kind: RoutingCounts(config.num_hidden_layers, moe, len(sets.domains)) if moe else None
              for kind in ("single", "mixed")}
    single = {}
    for i, (domain, blocks) in enumerate(sets.single.items()):
        single[domain] = token_logprobs(model, blocks, batch_size=batch_size, precision=precision,
                                        labels=np.full(blocks.shape, i), routing=counts["single"])
    mixed = token_logprobs(model, sets.mixed, batch_size=batch_size, precision=precision,
                           labels=sets.mixed_labels, routing=counts["mixed"])
    routing = None
    if moe:
        k = config.num_experts_per_tok
        routing = {kind: c.report(sets.domains, names, k) for kind, c in counts.items()}
    return ModelScores(single, mixed, sets.mixed_labels[:, 1:], routing)


# --- Branch-Train-Merge ---------------------------------------------------------------------------

def btm_logprobs(expert_logprobs: np.ndarray, top_k: int) -> np.ndarray:
    """The BTM ensemble's log-prob of every next token, from the experts' [E, n, T-1].

    Token t+1 is predicted by mixing the experts' next-token distributions with the domain posterior
    given the prefix x_<=t: P(e | x_<=t) proportional to P(x_2..x_t | e) under a uniform prior (Bayes'
    rule, as in BTM), restricted to the top-k experts by posterior and renormalised. Only the
    actual next token's probability matters for the loss, so mixing those probabilities suffices.
    """
    experts = expert_logprobs.shape[0]
    top_k = min(top_k, experts)
    logp = torch.from_numpy(expert_logprobs).double()
    evidence = torch.cumsum(logp, dim=-1) - logp  # log P(tokens predicted before t | e)
    posterior = torch.log_softmax(evidence, dim=0)
    if top_k < experts:
        kth = posterior.topk(top_k, dim=0).values[-1:]
        # Ties stay in: with no evidence yet (the first prediction) every expert is kept, uniformly.
        posterior = torch.log_softmax(posterior.masked_fill(posterior < kth, float("-inf")), dim=0)
    return torch.logsumexp(posterior + logp, dim=0).float().numpy()


def btm_scores(experts: list[ModelScores], top_k: int) -> ModelScores:
    single = {d: btm_logprobs(np.stack([e.single[d] for e in experts]), top_k) for d in experts[0].single}
    mixed = (btm_logprobs(np.stack([e.mixed for e in experts]), top_k) if experts[0].mixed.size
             else experts[0].mixed)
    return ModelScores(single, mixed, experts[0].mixed_labels)


def oracle_scores(experts: dict[str, ModelScores]) -> dict[str, float]:
    """Single-domain loss of each domain's own expert (the oracle a domain label would pick)."""
    return {d: float(-scores.single[d].mean()) for d, scores in experts.items()}
