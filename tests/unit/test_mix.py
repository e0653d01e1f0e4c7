"""MiX on pico models built here: equivalence, exactness, loading, validation, memory, editing."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralForCausalLM,
)

from btx_core.model.tensor_io import CheckpointReader
from btx_core.moe.edit import drop_expert
from btx_core.moe.mix import Expert, MixInputError, MixOptions, mix
from btx_core.moe.router_init import RoutingSamples, mean_entropy
from tests.pico import branch, save, write_tokenizer
from tests.support.equivalence import load_float64, logit_gap

ROOT = Path(__file__).parents[2]


def llama(tie=True, layers=2, ffn=64, vocab=101, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                         max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 5e4})
    return LlamaForCausalLM(config).to(dtype).eval()


def mistral(seed=0):
    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                           sliding_window=8, max_position_embeddings=64)
    return MistralForCausalLM(config).eval()


def tokens(n=2, length=12, vocab=101, seed=0):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make", [lambda: llama(tie=False), lambda: llama(tie=True), mistral],
                         ids=["llama-gqa", "llama-tied", "mistral-sliding-window"])
def test_upcycled_copies_reproduce_the_dense_logits(tmp_path, make):
    dense = make()
    source = save(dense, tmp_path / "dense")
    out = tmp_path / "moe"
    out.mkdir()
    mix([Expert(f"copy{i}", source) for i in range(3)], MixOptions(router_init="normal"), out)
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(moe, MixtralForCausalLM)
    assert moe.config.sliding_window == getattr(dense.config, "sliding_window", None)
    assert moe.config.num_key_value_heads == dense.config.num_key_value_heads
    assert moe.config.rope_parameters == dense.config.rope_parameters
    assert moe.config.tie_word_embeddings == dense.config.tie_word_embeddings
    gap = logit_gap(load_float64(out), dense, tokens())
    assert gap.same, gap
    # drop-expert keeps the function too: the copies left still route to the same FFN
    small = tmp_path / "small"
    small.mkdir()
    drop_expert(out, "copy1", small)
    gap = logit_gap(load_float64(small), dense, tokens())
    assert gap.same, gap


def test_the_mean_of_identical_fp32_copies_is_the_copy_bit_for_bit(tmp_path):
    """Accumulated in fp64: in fp32, (a + a + a) / 3 is off by an ulp for about a third of values,
    and shared weights every branch kept frozen would no longer be the seed's."""
    seed = llama(tie=False)
    source = save(seed, tmp_path / "seed")
    out = tmp_path / "moe"
    out.mkdir()
    mix([Expert(f"c{i}", source) for i in range(3)], MixOptions(), out)
    before, after = CheckpointReader(source), CheckpointReader(out)
    fp32 = (before.get("lm_head.weight") * 3) / 3
    assert not torch.equal(fp32, before.get("lm_head.weight"))  # the round-off this avoids
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.self_attn.q_proj.weight"):
        assert torch.equal(after.get(name), before.get(name)), name


def test_experts_are_copied_exactly_and_shared_tensors_are_the_mean(tmp_path):
    seed = llama(tie=False, dtype=torch.bfloat16)
    paths = [branch(seed, tmp_path / f"e{i}", seed=i) for i in range(3)]
    out = tmp_path / "moe"
    out.mkdir()
    result = mix([Expert(f"e{i}", p) for i, p in enumerate(paths)], MixOptions(), out)
    readers = [CheckpointReader(p) for p in paths]
    moe = CheckpointReader(out)
    assert result.config["dtype"] == "bfloat16"
    for layer in range(2):
        for i, r in enumerate(readers):
            for role, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                got = moe.get(f"model.layers.{layer}.block_sparse_moe.experts.{i}.{w}.weight")
                assert torch.equal(got, r.get(f"model.layers.{layer}.mlp.{role}.weight"))
    for name in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.1.self_attn.k_proj.weight", "model.layers.0.input_layernorm.weight"]:
        exact = torch.stack([r.get(name).float() for r in readers]).mean(0)
        got = moe.get(name)
        assert got.dtype == torch.bfloat16
        ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp(min=torch.finfo(torch.bfloat16).tiny)
        assert ((got.float() - exact).abs() <= ulp).all(), name


def test_weighted_and_copy_policies_and_generalist_kept_out_of_the_mean(tmp_path):
    seed = llama()
    paths = [branch(seed, tmp_path / f"e{i}", seed=i) for i in range(3)]
    experts = [Expert(n, p) for n, p in zip(("a", "b", "seed"), paths)]
    readers = [CheckpointReader(p) for p in paths]
    name = "model.layers.0.self_attn.q_proj.weight"

    def mixed(options, tag):
        out = tmp_path / tag
        out.mkdir()
        mix(experts, options, out)
        return CheckpointReader(out).get(name)

    assert torch.equal(mixed(MixOptions(shared_policy="copy", copy_from="b"), "copy"), readers[1].get(name))
    weighted = mixed(MixOptions(shared_policy="weighted", weights={"a": 3, "b": 1, "seed": 0}), "w")
    torch.testing.assert_close(weighted, 0.75 * readers[0].get(name) + 0.25 * readers[1].get(name))
    excluded = mixed(MixOptions(shared_exclude=("seed",)), "x")
    torch.testing.assert_close(excluded, (readers[0].get(name) + readers[1].get(name)) / 2)


def test_output_loads_generates_and_round_trips_through_save_pretrained(tmp_path):
    seed = llama(tie=False)
    paths = [branch(seed, tmp_path / f"e{i}", seed=i) for i in range(4)]
    out = tmp_path / "moe"
    out.mkdir()
    mix([Expert(f"e{i}", p) for i, p in enumerate(paths)], MixOptions(shard_size=40_000), out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded, by bytes
    assert all(f.stat().st_size <= 40_000 + 64 * 1024 for f in out.glob("model-*.safetensors"))
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    assert moe.config.btx_expert_names == ["e0", "e1", "e2", "e3"]
    # off in what is saved (finetuning turns it on for its run); the stock coefficient, alpha x layers
    assert not moe.config.output_router_logits and moe.config.router_aux_loss_coef == pytest.approx(0.02)
    ids = tokens()
    with torch.no_grad():
        out_ = moe(ids, labels=ids)
    assert torch.isfinite(out_.logits).all() and torch.isfinite(out_.loss)
    generated = moe.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)
    moe.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    first, second = moe.state_dict(), again.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # save_pretrained writes the same on-disk names btx wrote
    assert set(CheckpointReader(tmp_path / "again").keys()) == set(CheckpointReader(out).keys())


@pytest.mark.parametrize("other, needle", [
    (lambda: llama(tie=False, ffn=48), "intermediate_size"),
    (lambda: llama(tie=False, vocab=113), "vocab_size"),
    (lambda: mistral(), "'mistral' model"),
], ids=["ffn-size", "vocabulary", "architecture"])
def test_mismatched_experts_fail_before_anything_is_written(tmp_path, other, needle):
    good = save(llama(tie=False), tmp_path / "good")
    bad = save(other(), tmp_path / "bad")
    out = tmp_path / "moe"
    out.mkdir()
    with pytest.raises(MixInputError) as info:
        mix([Expert("good", good), Expert("bad", bad)], MixOptions(), out)
    assert needle in str(info.value) and "expert bad" in str(info.value)
    assert list(out.iterdir()) == []


def test_every_problem_is_reported_at_once(tmp_path):
    good = save(llama(tie=False), tmp_path / "good")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "moe"
    out.mkdir()
    with pytest.raises(MixInputError) as info:
        mix([Expert("a", good), Expert("a", good), Expert("c", tmp_path / "empty")],
            MixOptions(top_k=5, copy_from="zzz", shared_policy="copy", router_init="centroid"), out)
    text = str(info.value)
    for needle in ("used twice", "top-k 5", "'zzz' is not an expert", "needs sample text", "no config.json"):
        assert needle in text
    assert list(out.iterdir()) == []


def test_pickle_only_expert_is_refused(tmp_path):
    good = save(llama(tie=False), tmp_path / "good")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((good / "config.json").read_text())
    (legacy / "pytorch_model.bin").write_bytes(b"not loaded")
    out = tmp_path / "moe"
    out.mkdir()
    with pytest.raises(MixInputError, match="never loads pickle"):
        mix([Expert("good", good), Expert("legacy", legacy)], MixOptions(), out)


@pytest.mark.parametrize("init", ["normal", "zeros", "uniform"])
def test_router_inits(tmp_path, init):
    source = save(llama(tie=False), tmp_path / "dense")
    out = tmp_path / "moe"
    out.mkdir()
    mix([Expert(f"c{i}", source) for i in range(4)], MixOptions(router_init=init, router_seed=3), out)
    router = CheckpointReader(out).get("model.layers.1.block_sparse_moe.gate.weight")
    assert router.shape == (4, 32)
    if init == "zeros":
        assert not router.any()
    elif init == "uniform":
        assert router.abs().max() <= 32 ** -0.5 and router.std() > 0.05
    else:
        assert 0.01 < router.std() < 0.03  # initializer_range 0.02


def test_centroid_init_routes_each_domain_to_its_expert_and_reports_it(tmp_path):
    seed = llama(tie=False)
    paths = [branch(seed, tmp_path / f"e{i}", seed=i) for i in range(2)]
    # Two "domains" of disjoint token ranges; the generalist sees both.
    low = torch.randint(0, 50, (16, 12), generator=torch.Generator().manual_seed(0))
    high = torch.randint(50, 101, (16, 12), generator=torch.Generator().manual_seed(1))
    samples = RoutingSamples(centroid={"low": low[:8], "high": high[:8], "seed": None},
                             heldout={"low": low[8:], "high": high[8:]})
    experts = [Expert("low", paths[0]), Expert("high", paths[1]), Expert("seed", paths[0])]
    out = tmp_path / "moe"
    out.mkdir()
    result = mix(experts, MixOptions(router_init="centroid", top_k=2), out, samples=samples)
    routing = result.routing
    assert routing["experts"] == ["low", "high", "seed"] and len(routing["entropy"]) == 2
    for h in routing["entropy"]:  # neither uniform (log 3 = 1.10) nor saturated (0)
        assert 0.2 < h < 1.0
    for layer in range(2):  # random weights: the domains differ only in their token ids
        top1, topk = routing["by_domain_top1"], routing["by_domain_topk"]
        assert top1["low"][layer][0] > 0.55 and top1["high"][layer][1] > 0.55
        # centred centroids put the generalist near zero: second choice for every token
        assert topk["low"][layer][2] == topk["high"][layer][2] == pytest.approx(0.5)
        assert sum(routing["load"][layer]) == pytest.approx(1.0)
    assert "Routing at initialisation" in (out / "README.md").read_text()


def test_mean_entropy_bounds():
    assert mean_entropy(torch.zeros(5, 4)) == pytest.approx(torch.log(torch.tensor(4.0)).item())
    assert mean_entropy(torch.tensor([[100.0, 0, 0]])) < 1e-6


def test_drop_expert_removes_its_ffns_and_router_row(tmp_path):
    seed = llama(tie=False)
    paths = [branch(seed, tmp_path / f"e{i}", seed=i) for i in range(3)]
    moe_dir = tmp_path / "moe"
    moe_dir.mkdir()
    mix([Expert(n, p) for n, p in zip(("math", "code", "wiki"), paths)], MixOptions(top_k=2), moe_dir)
    small = tmp_path / "small"
    small.mkdir()
    config, _ = drop_expert(moe_dir, "code", small)
    assert config["btx_expert_names"] == ["math", "wiki"] and config["num_local_experts"] == 2
    before, after = CheckpointReader(moe_dir), CheckpointReader(small)
    router = "model.layers.0.block_sparse_moe.gate.weight"
    assert torch.equal(after.get(router), before.get(router)[[0, 2]])
    assert torch.equal(after.get("model.layers.1.block_sparse_moe.experts.1.w2.weight"),
                       before.get("model.layers.1.block_sparse_moe.experts.2.w2.weight"))
    assert "model.layers.1.block_sparse_moe.experts.2.w2.weight" not in after.keys()
    model = AutoModelForCausalLM.from_pretrained(small)
    assert model.config.num_local_experts == 2
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    config, _ = drop_expert(small, "0", tiny)  # by index; top-k shrinks to the experts left
    assert config["num_experts_per_tok"] == 1 and config["btx_expert_names"] == ["wiki"]
    assert torch.isfinite(AutoModelForCausalLM.from_pretrained(tiny)(tokens()).logits).all()


MEMORY_PROBE = textwrap.dedent("""
    import json, sys, threading, time
    from pathlib import Path
    import torch
    from btx_core.moe.mix import Expert, MixOptions, mix
    # transformers' config classes (mix reads and writes configs through them) are imported before
    # measuring: their ~100 MB of modules is not the mix's memory, and is the same at any depth.
    from transformers import AutoConfig, GenerationConfig, LlamaConfig, MixtralConfig

    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    peak, done = [anon()], []
    def sample():
        while not done:
            peak.append(anon()); time.sleep(0.002)
    root = Path(sys.argv[1]); out = root / "moe"; out.mkdir()
    thread = threading.Thread(target=sample); thread.start()
    before = anon()
    # bf16 in, fp32 out: every output tensor is a new (anonymous) allocation, none a file mapping
    mix([Expert(f"e{i}", root / f"e{i}") for i in range(4)], MixOptions(dtype=torch.float32), out)
    done.append(1); thread.join()
    print(json.dumps({"before": before, "peak": max(peak)}))
""")


def _write_expert(path: Path, layers: int, hidden=128, ffn=2048, vocab=512):
    from safetensors.torch import save_file

    path.mkdir()
    write_tokenizer(path, vocab)
    LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True).save_pretrained(path)
    g = torch.Generator().manual_seed(len(str(path)))
    tensors = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g),
               "model.norm.weight": torch.ones(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({p + "mlp.gate_proj.weight": torch.randn(ffn, hidden, generator=g),
                        p + "mlp.up_proj.weight": torch.randn(ffn, hidden, generator=g),
                        p + "mlp.down_proj.weight": torch.randn(hidden, ffn, generator=g),
                        p + "input_layernorm.weight": torch.ones(hidden),
                        p + "post_attention_layernorm.weight": torch.ones(hidden),
                        **{p + f"self_attn.{x}_proj.weight": torch.randn(hidden, hidden, generator=g)
                           for x in "qkvo"}})
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, path / "model.safetensors",
              metadata={"format": "pt"})


def _peak_growth(root: Path, layers: int) -> int:
    root.mkdir()
    for i in range(4):
        _write_expert(root / f"e{i}", layers)
    # One malloc arena per thread would let fragmentation, not the mix, decide the peak.
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(root)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=dict(os.environ, MALLOC_ARENA_MAX="2"))
    assert proc.returncode == 0, proc.stderr
    numbers = json.loads(proc.stdout.strip().splitlines()[-1])
    return numbers["peak"] - numbers["before"]

