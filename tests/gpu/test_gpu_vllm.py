"""vLLM serves what btx mixes: a Mixtral written by `btx mix` loads in vllm.LLM and its greedy
tokens are the ones transformers picks. Marked `gpu`; skipped without a CUDA device or without
vLLM (`pip install vllm` in an environment with a CUDA torch; `make test-gpu`)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from btx_core.model.tokenizer import train_tokenizer
from tests.integration.test_cli_e2e import btx

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (pip install vllm)")]
PROMPT_TOKENS = 12
NEW_TOKENS = 16
# vLLM runs in bf16; transformers is the fp32 reference. A bf16 rounding can flip the argmax only
# between near-tied tokens: vLLM's pick must be the fp32 argmax or within this many logits of it.
NEAR_TIE = 0.05

# Runs in its own process: vLLM starts engine processes and claims GPU memory, neither of which
# should outlive the test or meet a CUDA context made by pytest's process.
VLLM_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
model, prompt = sys.argv[1], json.loads(sys.argv[2])
llm = LLM(model=model, dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=128, seed=0)
out = llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                   SamplingParams(temperature=0.0, max_tokens=%d, ignore_eos=True))
print("VLLM_TOKENS=" + json.dumps(list(out[0].outputs[0].token_ids)))
""" % NEW_TOKENS


def _pico_seed(path: Path) -> Path:
    """A pico Llama with a tokenizer, head_dim 64 (a size every vLLM attention backend takes),
    RoPE theta 1e5, untied embeddings (tied, a random model repeats its last input token) and a
    final norm scaled up so that its next-token choices are confident."""
    docs = [p.read_text() for p in sorted(Path(json.__file__).parent.glob("*.py"))]
    tokenizer = train_tokenizer(docs, 512, path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e5}, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.mul_(30.0)
    model.save_pretrained(path)
    return path


def _expert(seed: Path, path: Path, salt: int) -> Path:
    """The seed with its weights nudged: an expert of it, with its own FFNs."""
    torch.manual_seed(salt)
    model = AutoModelForCausalLM.from_pretrained(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(path)
    for f in seed.glob("tokenizer*"):
        (path / f.name).write_bytes(f.read_bytes())
    return path


def test_vllm_loads_a_mixed_model_and_its_greedy_tokens_are_transformers(tmp_path):
    seed = _pico_seed(tmp_path / "seed")
    experts = [_expert(seed, tmp_path / name, i + 1) for i, name in enumerate(("math", "code"))]
    mixed = tmp_path / "mixed"
    btx("mix", *[a for e in experts for a in ("--expert", str(e))], "--expert", str(seed), "--out", str(mixed),
        cwd=tmp_path)
    prompt = list(range(3, 3 + PROMPT_TOKENS))

    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING")
    proc = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, str(mixed), json.dumps(prompt)],
                          capture_output=True, text=True, timeout=900, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("VLLM_TOKENS=")]
    assert proc.returncode == 0 and lines, f"vLLM failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    served = json.loads(lines[0].removeprefix("VLLM_TOKENS="))
    assert len(served) == NEW_TOKENS

    model = AutoModelForCausalLM.from_pretrained(mixed, dtype=torch.float32).eval()
    assert type(model).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        reference = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                                   do_sample=False)[0, PROMPT_TOKENS:].tolist()
        # Teacher-force vLLM's own continuation: at each step its token must be transformers' choice.
        logits = model(torch.tensor([prompt + served])).logits[0, PROMPT_TOKENS - 1:-1]
    print(f"\nvLLM greedy:         {served}\ntransformers greedy: {reference}")
    for step, (token, row) in enumerate(zip(served, logits)):
        gap = (row.max() - row[token]).item()
        assert gap <= NEAR_TIE, (f"step {step}: vLLM chose {token}, transformers {row.argmax().item()} "
                                 f"(fp32 logit gap {gap:.3f}); vLLM {served}, transformers {reference}")

