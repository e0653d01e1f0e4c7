"""Held-out evaluation: per-token log-probabilities of any causal LM (dense or MoE) on two
held-out sets, the losses they give, where an MoE routes each domain's tokens, and the
Branch-Train-Merge ensemble of dense experts computed from the experts' own log-probabilities.

- Single-domain set: each domain's first `eval_blocks` held-out blocks.
- Mixed-domain set: blocks spliced from 2-3 domains' held-out text (a segment of each), every token
  labelled with its domain. There, token-level routing (BTX) and a sequence-level ensemble (BTM),
  whose domain posterior lags behind each switch, really differ.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

EVAL_SEED = 20240311  # fixes the mixed-domain set: every model and every random seed sees the same


@dataclass(frozen=True)
class EvalSets:
    domains: list[str]
    single: dict[str, np.ndarray]
    """Domain -> held-out blocks [n, T]."""
    mixed: np.ndarray
    """Spliced blocks [m, T]."""
    mixed_labels: np.ndarray
    """Domain index of every token of `mixed` [m, T]."""

    def describe(self) -> dict:
        return {"single_blocks": {d: len(b) for d, b in self.single.items()},
                "mixed_blocks": len(self.mixed), "seq_len": int(self.mixed.shape[1]) if len(self.mixed) else 0}


def build_eval_sets(heldout: dict[str, np.ndarray], *, eval_blocks: int, mixed_blocks: int,
                    seed: int = EVAL_SEED) -> EvalSets:
    """Both held-out sets from each domain's held-out blocks [n, T]."""
    domains = list(heldout)
    single = {d: np.asarray(b[:eval_blocks]) for d, b in heldout.items()}
    seq_len = next(iter(heldout.values())).shape[1]
    rng = np.random.default_rng(seed)
    mixed = np.zeros((mixed_blocks if len(domains) > 1 else 0, seq_len), dtype=np.int64)
    labels = np.zeros_like(mixed)
    for row in range(len(mixed)):
        parts = rng.choice(len(domains), size=min(len(domains), int(rng.integers(2, 4))), replace=False)
        # Cut points at least a quarter block from each other, so every segment has context.
        cuts = np.sort(rng.choice(np.arange(1, 4), size=len(parts) - 1, replace=False)) * seq_len // 4
        bounds = [0, *cuts.tolist(), seq_len]
        for part, start, end in zip(parts, bounds, bounds[1:]):
            source = heldout[domains[part]]
            block = source[int(rng.integers(len(source)))]
            offset = int(rng.integers(0, seq_len - (end - start) + 1))
            mixed[row, start:end] = block[offset:offset + end - start]
            labels[row, start:end] = part
    return EvalSets(domains, single, mixed, labels)


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
def token_logprobs(model, blocks: np.ndarray, *, batch_size: int, precision: str = "bf16",
                   labels: np.ndarray | None = None, routing: RoutingCounts | None = None) -> np.ndarray:
    """log p(x_{t+1} | x_<=t) of every next token [n, T-1] (float32). With `routing`, an MoE's
    router choices are counted per token label (the label of the token being routed)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.zeros((len(blocks), max(blocks.shape[1] - 1, 0)), dtype=np.float32)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision == "bf16"
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


def score_model(model, sets: EvalSets, *, batch_size: int, precision: str = "bf16") -> ModelScores:
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
