"""The load-balancing loss (the paper's per layer, and transformers' own as an option) and the
routing strategies' training behaviour (sample top-1 with an annealed Gumbel temperature), on
hand-made router logits and on pico MoEs of every family btx mixes into."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from btx_core.config.schema import TrainSettings
from btx_core.model.families import DENSE_FAMILIES
from btx_core.moe.mix import Expert, MixOptions, mix
from btx_core.moe.routing import (
    GumbelTop1,
    RouterObjective,
    RoutingPlan,
    aux_loss_coefficient,
    configure,
    gumbel_temperature,
    layer_balance_losses,
    lm_loss_only,
    moe_blocks,
    paper_load_balancing_loss,
)
from btx_core.training.loop import train
from tests.pico import branch, dense

ALPHA = 0.01


def balanced_logits(experts: int, top_k: int, repeats: int = 3) -> torch.Tensor:
    """Tokens that cycle through every set of k experts: each expert gets k/N of the tokens and,
    by symmetry, a mean router probability of exactly 1/N: perfect balance."""
    rows = []
    for chosen in itertools.combinations(range(experts), top_k):
        row = torch.zeros(experts)
        row[list(chosen)] = 4.0
        rows.append(row)
    return torch.stack(rows * repeats)


# --- the loss on hand-made logits ------------------------------------------------------------------

@pytest.mark.parametrize("experts,top_k,layers", [(4, 2, 6), (4, 1, 2), (8, 2, 3), (3, 1, 1), (6, 3, 4)])
def test_at_perfect_balance_it_is_alpha_per_layer(experts, top_k, layers):
    logits = [balanced_logits(experts, top_k) for _ in range(layers)]
    assert torch.allclose(torch.softmax(logits[0], -1).mean(0), torch.full((experts,), 1 / experts))
    per_layer = layer_balance_losses(logits, top_k, ALPHA)
    assert per_layer.shape == (layers,) and torch.allclose(per_layer, torch.full((layers,), ALPHA))
    assert float(paper_load_balancing_loss(logits, top_k, ALPHA)) == pytest.approx(ALPHA * layers, rel=1e-6)
    # transformers' loss at btx's coefficient counts a top-k token k times: k x the paper's here.
    stock = float(load_balancing_loss_func(tuple(logits), experts, top_k)) * aux_loss_coefficient(ALPHA, layers)
    assert stock == pytest.approx(top_k * ALPHA * layers, rel=1e-6)


def test_matches_a_hand_computation():
    # 3 tokens, 3 experts, top-2. Token 0 picks experts {0, 1}, token 1 {0, 2}, token 2 {1, 0}.
    logits = torch.tensor([[2.0, 1.0, 0.0], [1.0, -1.0, 0.5], [0.3, 0.7, -2.0]])
    probs = [[math.exp(v) / sum(math.exp(w) for w in row) for v in row] for row in logits.tolist()]
    u = [(1 / 2 + 1 / 2 + 1 / 2) / 3, (1 / 2 + 0 + 1 / 2) / 3, (0 + 1 / 2 + 0) / 3]  # = [1/2, 1/3, 1/6]
    p = [sum(row[i] for row in probs) / 3 for i in range(3)]
    expected = 0.01 * 3 * sum(ui * pi for ui, pi in zip(u, p))
    assert float(paper_load_balancing_loss([logits], 2, 0.01)) == pytest.approx(expected, rel=1e-6)
    # A second layer adds its own term (here the same one).
    assert float(paper_load_balancing_loss([logits, logits], 2, 0.01)) == pytest.approx(2 * expected, rel=1e-6)


def test_one_layers_imbalance_is_seen_and_corrected_in_that_layer():
    # Layer 0 balanced; layer 1 sends every token to experts 0 and 1.
    experts, top_k = 4, 2
    x = torch.randn(60, 8, generator=torch.Generator().manual_seed(0))
    balanced = balanced_logits(experts, top_k, repeats=10)  # 60 tokens
    skewed = balanced / 2 + torch.tensor([3.0, 3.0, 0.0, 0.0])  # every token's top 2: experts 0, 1
    # Each layer's router: logits = x W^T + b, the bias standing for what the router already learned.
    weights = [torch.zeros(experts, 8, requires_grad=True) for _ in range(2)]

    def logits():
        return [x @ weights[0].T + balanced, x @ weights[1].T + skewed]

    per_layer = layer_balance_losses(logits(), top_k, ALPHA).detach()
    assert float(per_layer[0]) == pytest.approx(ALPHA) and float(per_layer[1]) > 1.5 * ALPHA
    grads = torch.autograd.grad(paper_load_balancing_loss(logits(), top_k, ALPHA), weights)
    # u is uniform in layer 0, so sum_i u_i p_i = 1/N whatever p is: no gradient there.
    assert grads[1].abs().max() > 1e-4 and grads[0].abs().max() < 1e-5 * grads[1].abs().max()
    # transformers pools u over the layers: layer 1's imbalance pushes layer 0's router as hard.
    stock = load_balancing_loss_func(tuple(logits()), experts, top_k) * aux_loss_coefficient(ALPHA, 2)
    stock_grads = torch.autograd.grad(stock, weights)
    assert stock_grads[0].abs().max() > 0.1 * stock_grads[1].abs().max()


def test_an_imbalance_that_pooling_hides_is_visible_per_layer():
    # Layer 0 uses only experts 0, 1; layer 1 only experts 2, 3: pooled over layers, perfect balance.
    base = torch.full((20, 4), -8.0)
    layer0, layer1 = base.clone(), base.clone()
    layer0[:, :2], layer1[:, 2:] = 0.0, 0.0
    stock = float(load_balancing_loss_func((layer0, layer1), 4, 2)) * aux_loss_coefficient(ALPHA, 2)
    assert stock == pytest.approx(2 * ALPHA * 2, rel=1e-3)  # transformers' value at balance (k x)
    paper = float(paper_load_balancing_loss([layer0, layer1], 2, ALPHA))
    assert paper == pytest.approx(2 * ALPHA * 2, rel=1e-3)  # twice the paper's balanced value
    assert paper > 1.9 * float(paper_load_balancing_loss([balanced_logits(4, 2)] * 2, 2, ALPHA))


def test_transformers_pools_layers_the_paper_does_not():
    # They agree (up to the factor k) whenever the layers route alike, and differ otherwise.
    generator = torch.Generator().manual_seed(0)
    same = [torch.randn(64, 4, generator=generator) * 3] * 5
    stock = float(load_balancing_loss_func(tuple(same), 4, 2)) * aux_loss_coefficient(ALPHA, 5)
    assert stock == pytest.approx(2 * float(paper_load_balancing_loss(same, 2, ALPHA)), rel=1e-5)
    varied = [torch.randn(64, 4, generator=generator) * 3 for _ in range(5)]
    stock = float(load_balancing_loss_func(tuple(varied), 4, 2)) * aux_loss_coefficient(ALPHA, 5)
    paper = float(paper_load_balancing_loss(varied, 2, ALPHA))
    assert stock / 2 < paper and stock / 2 == pytest.approx(paper, rel=0.05)


def test_padding_is_left_out():
    generator = torch.Generator().manual_seed(1)
    real = torch.randn(2, 5, 4, generator=generator)
    padded = torch.cat([real, torch.randn(2, 3, 4, generator=generator) * 10], dim=1)  # 3 pad positions
    mask = torch.cat([torch.ones(2, 5), torch.zeros(2, 3)], dim=1)
    unpadded = paper_load_balancing_loss([real.reshape(-1, 4)], 2, ALPHA)
    masked = paper_load_balancing_loss([padded.reshape(-1, 4)], 2, ALPHA, attention_mask=mask)
    assert float(masked) == pytest.approx(float(unpadded), rel=1e-6)
    assert float(paper_load_balancing_loss([padded.reshape(-1, 4)], 2, ALPHA)) != pytest.approx(float(unpadded))


def test_soft_routing_balances_the_top_k_it_would_pick():
    # Soft routing: u from each token's top mix.top_k experts, not from all N (that would be a
    # constant alpha per layer without a gradient).
    logits = torch.randn(32, 4, generator=torch.Generator().manual_seed(2), requires_grad=True)
    objective = RouterObjective.__new__(RouterObjective)
    objective.plan, objective.routers = RoutingPlan("soft", top_k=2, load_balancing=True, alpha=ALPHA), []
    out = type("Out", (), {"router_logits": (logits,)})()
    loss = objective.extra_loss(out)
    assert float(loss) == pytest.approx(float(paper_load_balancing_loss([logits], 2, ALPHA)))
    assert torch.autograd.grad(loss, logits)[0].abs().max() > 0
    everything = paper_load_balancing_loss([logits], 4, ALPHA)  # all N experts: constant alpha
    assert float(everything) == pytest.approx(ALPHA) and torch.autograd.grad(everything, logits)[0].abs().max() < 1e-9


# --- on pico MoEs of every family ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pico_moes(tmp_path_factory):
    """One pico MoE (3 experts, 2 layers) per MoE target, as MiX writes it."""
    out = {}
    for family in ("llama", "qwen2", "qwen3", "olmo2"):  # Mixtral, Qwen2-MoE, Qwen3-MoE, FlexOlmo
        work = tmp_path_factory.mktemp(family)
        seed = dense(family)
        paths = [branch(seed, work / f"e{i}", seed=i + 1) for i in range(3)]
        (work / "moe").mkdir()
        mix([Expert(f"e{i}", p) for i, p in enumerate(paths)], MixOptions(), work / "moe")
        out[family] = work / "moe"
    return out


def tokens(batch=2, length=24, seed=0):
    return torch.randint(0, 101, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "olmo2"])
def test_every_family_trains_with_the_papers_loss_not_counted_twice(pico_moes, family):
    model = AutoModelForCausalLM.from_pretrained(pico_moes[family]).train()
    plan = RoutingPlan("top_k", top_k=2, load_balancing=True, alpha=ALPHA)
    configure(model, plan)
    objective, ids = RouterObjective(model, plan), tokens()
    out = model(input_ids=ids, labels=ids)
    # One [tokens, experts] tensor per layer (Qwen2-MoE's shared-expert gate is not a router).
    assert [tuple(t.shape) for t in out.router_logits] == [(48, 3), (48, 3)]
    with lm_loss_only(model):
        lm = model(input_ids=ids, labels=ids).loss
    assert float(out.loss) == pytest.approx(float(lm), abs=1e-6)  # transformers' coefficient is 0
    extra = objective.extra_loss(out)
    assert float(extra) == pytest.approx(float(paper_load_balancing_loss(out.router_logits, 2, ALPHA)))
    assert ALPHA * 2 <= float(extra) <= ALPHA * 2 * 3  # between balance and total collapse (N alpha)
    (out.loss + extra).backward()
    assert all(block.gate.weight.grad.abs().sum() > 0 for block in moe_blocks(model))
    # The saved config stays stock: transformers' coefficient alpha x num_layers.
    assert model.config.router_aux_loss_coef == pytest.approx(ALPHA * 2)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_transformers_option_is_the_stock_loss(pico_moes, family):
    model = AutoModelForCausalLM.from_pretrained(pico_moes[family]).train()
    plan = RoutingPlan("top_k", top_k=2, load_balancing=True, alpha=ALPHA, loss="transformers")
    configure(model, plan)
    ids = tokens()
    out = model(input_ids=ids, labels=ids)
    with lm_loss_only(model):
        lm = model(input_ids=ids, labels=ids).loss
    stock = load_balancing_loss_func(out.router_logits, 3, 2)
    assert float(out.loss) == pytest.approx(float(lm) + ALPHA * 2 * float(stock), rel=1e-6)
    assert RouterObjective(model, plan).extra_loss(out) is None  # nothing added on top


# --- sample top-1 ---------------------------------------------------------------------------------

def test_gumbel_temperature_anneals_exponentially_from_start_to_end():
    temps = [gumbel_temperature(s, 11, 1.0, 0.1) for s in range(11)]
    assert temps[0] == pytest.approx(1.0) and temps[-1] == pytest.approx(0.1)
    assert temps[5] == pytest.approx(math.sqrt(0.1))  # geometric midpoint
    assert all(a > b for a, b in zip(temps, temps[1:]))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "olmo2"])
def test_sample_top1_samples_trains_the_router_and_saves_stock_top1(pico_moes, family, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(pico_moes[family])
    reference = AutoModelForCausalLM.from_pretrained(pico_moes[family]).eval()
    configure(reference, RoutingPlan("top_k", top_k=1, load_balancing=False, alpha=ALPHA))
    plan = RoutingPlan("sample_top1", top_k=1, load_balancing=True, alpha=ALPHA, temperature=(1.0, 0.1))
    configure(model, plan)
    objective = RouterObjective(model, plan)
    routers = [block.gate for block in moe_blocks(model)]
    assert all(isinstance(r, GumbelTop1) for r in routers)
    objective.at_step(9, 10)
    assert all(r.temperature == pytest.approx(0.1) for r in routers)

    # Training: the LM loss alone reaches the routers (stock top-1 has weight p/p = 1: no gradient).
    model.train()
    ids = tokens()
    with lm_loss_only(model):
        model(input_ids=ids, labels=ids).loss.backward()
    assert all(r.weight.grad.abs().sum() > 0 for r in routers)
    reference.train()
    reference(input_ids=ids, labels=ids).loss.backward()
    assert all(block.gate.weight.grad is None or block.gate.weight.grad.abs().max() < 1e-7
               for block in moe_blocks(reference))
    # The sampled experts follow the router's softmax (Gumbel-max), not its argmax.
    router = routers[0]
    logits_bias = torch.tensor([1.0, 0.0, -1.0])
    x = torch.zeros(20000, router.weight.shape[1])
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        original = router.weight.clone()
        router.weight.zero_()
        router.weight[:, 0] = logits_bias
        x[:, 0] = 1.0
        _, weight, chosen = router(x)
        router.weight.copy_(original)
    shares = torch.bincount(chosen.flatten(), minlength=3).float() / len(chosen)
    assert torch.allclose(shares, torch.softmax(logits_bias, 0), atol=0.02)
    assert torch.equal(weight, torch.ones_like(weight))

    # Eval mode and the saved model: stock top-1 (argmax), the same logits.
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        assert torch.allclose(ours, reference(input_ids=ids).logits, atol=1e-5)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["num_experts_per_tok"] == 1 and saved["architectures"] == [DENSE_FAMILIES[family].moe.architecture]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert not any(isinstance(block.gate, GumbelTop1) for block in moe_blocks(loaded))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, ours, atol=1e-5)


def test_the_training_loop_adds_the_loss_and_anneals_the_temperature(pico_moes):
    model = AutoModelForCausalLM.from_pretrained(pico_moes["llama"])
    plan = RoutingPlan("sample_top1", top_k=1, load_balancing=True, alpha=ALPHA, temperature=(1.0, 0.1))
    configure(model, plan)
    objective = RouterObjective(model, plan)
    seen = []
    at_step = objective.at_step
    objective.at_step = lambda step, total: (seen.append((step, total)), at_step(step, total))
    blocks = np.random.default_rng(0).integers(0, 101, size=(16, 12), dtype=np.int64)
    settings = TrainSettings(steps=4, lr=1e-3, warmup_steps=0, seq_len=12, batch_size=2, precision="fp32",
                             device="cpu")
    result = train(model, blocks, settings, objective=objective)
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert all(block.gate.temperature == pytest.approx(0.1) for block in moe_blocks(model))
    assert ALPHA * 2 <= result.final_extra_loss <= ALPHA * 2 * 3
    # The reported loss is LM + load balancing: above the LM part by the load-balancing term.
    assert result.final_loss > result.final_extra_loss

