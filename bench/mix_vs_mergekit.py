"""MiX: `btx mix` vs `mergekit-moe`, wall time and peak anonymous memory, side by side in one run.

    .venv/bin/python bench/mix_vs_mergekit.py [--families small large] [--rounds 6] [--json FILE]

Inputs are families of 4 dense Llama experts branched from one random seed (bench/make_family.py,
generated once and cached under bench/.cache). Four ways of building the Mixtral, each in its own
subprocess:

- btx-mean:  `btx mix` with its default shared policy (non-FFN tensors averaged in fp32), the BTX recipe;
- mk-2pass:  mergekit's equivalent: `mergekit-yaml` linear average of the 4 (equal weights), then
             `mergekit-moe` with that average as base_model (times added, memory = max of the passes);
- btx-copy:  `btx mix --shared-policy copy --copy-from 0` (non-FFN tensors from expert 0);
- mk-1pass:  `mergekit-moe` with base_model = expert 0, which copies the base's non-FFN tensors.

btx-mean is compared with mk-2pass and btx-copy with mk-1pass: each pair builds the same model
(up to the random routers, and bf16 rounding of the average). mergekit runs on the CPU with its
defaults (no --cuda, no --lazy-unpickle, 5B-parameter shards, --quiet); MoE configs use
gate_mode random, dtype bfloat16, 2 experts per token, placeholder positive_prompts.

Within a round the four run in alternating order (reversed every other round, so with an even
number of rounds each side runs in each position equally). Each output is deleted after its run
(the last round's are kept for the check); before each run the inputs are read into the page
cache, `sync` flushes earlier writes and the run waits 8 s (a journal commit, which sends the
discards of deleted files on a filesystem mounted with `discard`, as here). So every run starts
from the same state: warm inputs, no earlier output in the page cache, no dirty pages, no pending
discards. Memory is the process tree's RssAnon (anonymous pages, which mmapped safetensors inputs
do not count towards) sampled from /proc every 20 ms; VmRSS is shown beside it. After the last
round the outputs of each pair are compared tensor by tensor, and the small family's btx output
is loaded with from_pretrained.

Concurrent edits to btx_core stop the run (the rounds would mix two versions); `--btx-rev REV`
times btx_core as committed at REV instead of the working tree.

mergekit lives in its own virtualenv (bench/.venv-mergekit, created on first use: torch 2.13.0
CPU first, so pip does not fetch a CUDA build, then mergekit 0.1.5).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from make_family import describe, make_family  # noqa: E402

MK_VENV = HERE / ".venv-mergekit"
RUNS = HERE / ".cache" / "runs"
SIDES = ("btx-mean", "mk-2pass", "btx-copy", "mk-1pass")
PAIRS = (("btx-mean", "mk-2pass"), ("btx-copy", "mk-1pass"))


def btx_source_digest(root: Path = REPO) -> str:
    """sha256 over btx_core's sources: a run whose btx changed under it measured two versions."""
    import hashlib
    h = hashlib.sha256()
    for path in sorted((root / "btx_core").rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def btx_command(rev: str | None) -> tuple[list[str], dict | None, Path]:
    """The btx CLI to time: the working tree's, or btx_core as committed at `rev` (exported with
    `git archive` and put first on PYTHONPATH), so edits made while the benchmark runs don't count."""
    if rev is None:
        return [str(REPO / ".venv/bin/btx")], None, REPO
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], capture_output=True, text=True,
                         check=True).stdout.strip()
    root = HERE / ".cache" / f"btx-{sha}"
    if not (root / "btx_core").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", sha, "btx_core"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep))
    code = "import sys; sys.argv[0] = 'btx'; from btx_core.cli.main import main; main()"
    return [str(REPO / ".venv/bin/python"), "-P", "-c", code], env, root  # -P: not the cwd's btx_core


def git_revision() -> str:
    r = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def ensure_mergekit_venv() -> Path:
    """Create the mergekit virtualenv if missing; torch first so the CPU wheel on disk is used."""
    bin_dir = MK_VENV / "bin"
    if not (bin_dir / "mergekit-moe").exists():
        print(f"creating {MK_VENV} (torch 2.13.0 CPU, mergekit 0.1.5)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(MK_VENV)], check=True)
        pip = [str(bin_dir / "python"), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        subprocess.run(pip + ["mergekit==0.1.5"], check=True)
    return bin_dir


# --- measuring a process tree -----------------------------------------------------------------

def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return pids


def _status_kb(pid: int, fields: tuple[str, ...]) -> dict[str, int]:
    out = dict.fromkeys(fields, 0)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in out:
                    out[key] = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def measure(cmd: list[str], log: Path, env: dict | None = None, interval: float = 0.02) -> dict:
    """Run `cmd`; return wall seconds and the tree's peak RssAnon and VmRSS (bytes)."""
    peak = {"RssAnon": 0, "VmRSS": 0}
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                total = dict.fromkeys(peak, 0)
                for p in _tree(proc.pid):
                    for k, v in _status_kb(p, tuple(peak)).items():
                        total[k] += v
                for k in peak:
                    peak[k] = max(peak[k], total[k] * 1024)
                done.wait(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}; its output is in {log}:\n"
                           + log.read_text()[-3000:])
    return {"wall_s": wall, "anon_bytes": peak["RssAnon"], "rss_bytes": peak["VmRSS"]}


# --- the four sides -----------------------------------------------------------------------------

def moe_yaml(base: Path, experts: list[Path]) -> str:
    lines = [f"base_model: {base}", "gate_mode: random", "dtype: bfloat16", "experts_per_token: 2", "experts:"]
    for i, e in enumerate(experts):
        lines += [f"  - source_model: {e}", f'    positive_prompts: ["placeholder for expert {i}"]']
    return "\n".join(lines) + "\n"


def linear_yaml(experts: list[Path]) -> str:
    lines = ["merge_method: linear", "dtype: bfloat16", "models:"]
    for e in experts:
        lines += [f"  - model: {e}", "    parameters: {weight: 1.0}"]
    return "\n".join(lines) + "\n"


def fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


def run_side(side: str, experts: list[Path], work: Path, btx: list[str], btx_env: dict | None,
             mk_bin: Path, settle_s: float) -> dict:
    """Build one Mixtral the way `side` does; returns its measurement (several passes merged)."""
    out = fresh(work / side)
    cfg_dir = work / "configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    passes: list[tuple[str, list[str]]] = []
    if side.startswith("btx"):
        cmd = [*btx, "mix", *[a for e in experts for a in ("--expert", str(e))], "--out", str(out)]
        if side == "btx-copy":
            cmd += ["--shared-policy", "copy", "--copy-from", "0"]
        passes.append((side, cmd))
    elif side == "mk-1pass":
        (cfg_dir / "moe-1pass.yml").write_text(moe_yaml(experts[0], experts))
        passes.append((side, [str(mk_bin / "mergekit-moe"), str(cfg_dir / "moe-1pass.yml"), str(out), "--quiet"]))
    else:
        avg = fresh(work / "mk-average")
        (cfg_dir / "linear.yml").write_text(linear_yaml(experts))
        (cfg_dir / "moe-2pass.yml").write_text(moe_yaml(avg, experts))
        passes.append(("mk-2pass-linear", [str(mk_bin / "mergekit-yaml"), str(cfg_dir / "linear.yml"), str(avg),
                                           "--quiet"]))
        passes.append(("mk-2pass-moe", [str(mk_bin / "mergekit-moe"), str(cfg_dir / "moe-2pass.yml"), str(out),
                                        "--quiet"]))
    warm_page_cache(experts)
    settle(settle_s)
    result = {"wall_s": 0.0, "anon_bytes": 0, "rss_bytes": 0, "passes": {}}
    for name, cmd in passes:
        m = measure(cmd, work / f"{name}.log", btx_env if name.startswith("btx") else None)
        result["passes"][name] = m
        result["wall_s"] += m["wall_s"]
        result["anon_bytes"] = max(result["anon_bytes"], m["anon_bytes"])
        result["rss_bytes"] = max(result["rss_bytes"], m["rss_bytes"])
    fresh(work / "mk-average")
    return result


def settle(seconds: float) -> None:
    """Let the disk finish what earlier runs left: flush dirty pages, then wait out a journal commit,
    which on a filesystem mounted with `discard` sends the discards of deleted outputs (GBs here)."""
    os.sync()
    time.sleep(seconds)
    os.sync()


def warm_page_cache(experts: list[Path]) -> None:
    for path in sorted(p for e in experts for p in e.glob("*.safetensors")):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


# --- checking that each pair built the same model -----------------------------------------------

class Checkpoint:
    """Tensors of a safetensors directory (one file or an index of shards), opened lazily."""

    def __init__(self, directory: Path):
        from safetensors import safe_open
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(directory / "model.safetensors", "pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        self._files = {name: safe_open(directory / name, "pt") for name in set(weight_map.values())}
        self.map = weight_map
        self.files = sorted(set(weight_map.values()))
        self.config = json.loads((directory / "config.json").read_text())

    def keys(self) -> set[str]:
        return set(self.map)

    def get(self, key: str):
        return self._files[self.map[key]].get_tensor(key)


def mean_of(experts: list[Checkpoint], key: str):
    import torch
    total = experts[0].get(key).float()
    for e in experts[1:]:
        total += e.get(key).float()
    return (total / len(experts)).to(torch.bfloat16)


def compare(btx_dir: Path, mk_dir: Path, expert_dirs: list[Path], shared: str) -> dict:
    """Tensor-by-tensor comparison of a btx Mixtral with mergekit's, and of both with the inputs.

    mergekit writes the fused in-memory layout (`mlp.experts.gate_up_proj` [E, 2F, H],
    `mlp.experts.down_proj` [E, H, F], `mlp.gate.weight`); btx writes save_pretrained's
    (`block_sparse_moe.experts.{e}.w1/w2/w3.weight`, `block_sparse_moe.gate.weight`).
    """
    import torch
    b, m = Checkpoint(btx_dir), Checkpoint(mk_dir)
    ins = [Checkpoint(d) for d in expert_dirs]
    n_layers, n_experts = b.config["num_hidden_layers"], len(ins)
    ffn = b.config["intermediate_size"]
    problems: list[str] = []
    stats = {"expert_tensors": 0, "expert_mismatch": 0, "shared_tensors": 0, "shared_bit_equal": 0,
             "shared_max_abs_diff": 0.0, "shared_max_ulp_diff": 0, "btx_vs_reference_bit_equal": 0,
             "mk_vs_reference_bit_equal": 0}

    expected_btx, expected_mk = set(), set()
    for L in range(n_layers):
        expected_btx.add(f"model.layers.{L}.block_sparse_moe.gate.weight")
        expected_mk |= {f"model.layers.{L}.mlp.gate.weight", f"model.layers.{L}.mlp.experts.gate_up_proj",
                        f"model.layers.{L}.mlp.experts.down_proj"}
        for e in range(n_experts):
            expected_btx |= {f"model.layers.{L}.block_sparse_moe.experts.{e}.{w}.weight" for w in ("w1", "w2", "w3")}
    dense_shared = {k for k in ins[0].keys() if ".mlp." not in k}
    for name, ck, expected in (("btx", b, expected_btx | dense_shared), ("mergekit", m, expected_mk | dense_shared)):
        if ck.keys() != expected:
            problems.append(f"{name} keys: missing {sorted(expected - ck.keys())[:5]}, "
                            f"unexpected {sorted(ck.keys() - expected)[:5]}")

    for L in range(n_layers):
        gate_up = m.get(f"model.layers.{L}.mlp.experts.gate_up_proj")
        down = m.get(f"model.layers.{L}.mlp.experts.down_proj")
        for e in range(n_experts):
            pre = f"model.layers.{L}.block_sparse_moe.experts.{e}"
            src = f"model.layers.{L}.mlp"
            for w, mk_t, dense in (("w1", gate_up[e, :ffn], "gate_proj"), ("w3", gate_up[e, ffn:], "up_proj"),
                                   ("w2", down[e], "down_proj")):
                t = b.get(f"{pre}.{w}.weight")
                ref = ins[e].get(f"{src}.{dense}.weight")
                stats["expert_tensors"] += 1
                if not (torch.equal(t, ref) and torch.equal(mk_t, ref)):
                    stats["expert_mismatch"] += 1
                    if stats["expert_mismatch"] <= 3:
                        problems.append(f"{pre}.{w}: btx==input {torch.equal(t, ref)}, "
                                        f"mergekit==input {torch.equal(mk_t, ref)}")
        bg, mg = b.get(f"model.layers.{L}.block_sparse_moe.gate.weight"), m.get(f"model.layers.{L}.mlp.gate.weight")
        if bg.shape != mg.shape or bg.dtype != mg.dtype:
            problems.append(f"router {L}: btx {tuple(bg.shape)} {bg.dtype}, mergekit {tuple(mg.shape)} {mg.dtype}")

    for key in sorted(dense_shared):
        bt, mt = b.get(key), m.get(key)
        ref = mean_of(ins, key) if shared == "mean" else ins[0].get(key)
        stats["shared_tensors"] += 1
        if bt.shape != mt.shape or bt.dtype != mt.dtype:
            problems.append(f"{key}: btx {tuple(bt.shape)} {bt.dtype}, mergekit {tuple(mt.shape)} {mt.dtype}")
            continue
        stats["shared_bit_equal"] += torch.equal(bt, mt)
        stats["btx_vs_reference_bit_equal"] += torch.equal(bt, ref)
        stats["mk_vs_reference_bit_equal"] += torch.equal(mt, ref)
        stats["shared_max_abs_diff"] = max(stats["shared_max_abs_diff"], (bt.float() - mt.float()).abs().max().item())
        # bf16 values of one sign are ordered like their bit patterns: the gap in int16 is the ulp distance
        ulp = (bt.view(torch.int16).int() - mt.view(torch.int16).int()).abs().max().item()
        stats["shared_max_ulp_diff"] = max(stats["shared_max_ulp_diff"], ulp)

    config_keys = ("num_local_experts", "num_experts_per_tok", "tie_word_embeddings", "rope_parameters",
                   "rope_theta", "sliding_window", "vocab_size", "hidden_size", "intermediate_size",
                   "num_key_value_heads", "rms_norm_eps", "bos_token_id", "eos_token_id", "dtype",
                   "router_aux_loss_coef", "output_router_logits")
    stats["config_differences"] = {k: [b.config.get(k), m.config.get(k)] for k in config_keys
                                   if b.config.get(k) != m.config.get(k)}
    stats["btx_files"] = b.files
    stats["problems"] = problems
    return stats


def loads_in_transformers(directory: Path) -> str:
    """Load a Mixtral with from_pretrained and report missing/unexpected keys (run for the small family)."""
    code = ("import sys,torch;from transformers import AutoModelForCausalLM as A;"
            "m,i=A.from_pretrained(sys.argv[1],dtype=torch.bfloat16,output_loading_info=True);"
            "print(type(m).__name__,{k:len(v) for k,v in i.items() if v is not None and hasattr(v,'__len__')},"
            "m(torch.tensor([[1,2,3]])).logits.shape)")
    r = subprocess.run([str(REPO / ".venv/bin/python"), "-c", code, str(directory)], capture_output=True, text=True)
    return (r.stdout.strip() or r.stderr.strip()[-500:])


# --- reporting ---------------------------------------------------------------------------------

def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["small", "large"], choices=["small", "large"])
    parser.add_argument("--rounds", type=int, default=6, help="even: each side runs in each position equally")
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--settle", type=float, default=8.0,
                        help="seconds to wait before each run, after sync (ext4 commits every 5 s)")
    parser.add_argument("--work", type=Path, default=RUNS, help="where outputs go (default: bench/.cache/runs)")
    parser.add_argument("--btx-rev", help="time btx_core as committed at this git revision (default: the working tree)")
    parser.add_argument("--no-check", action="store_true", help="skip the tensor-by-tensor comparison")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the last round's checkpoints")
    parser.add_argument("--json", help="also write the raw measurements here")
    args = parser.parse_args()

    mk_bin = ensure_mergekit_venv()
    btx, btx_env, btx_root = btx_command(args.btx_rev)
    if any(s.startswith("btx") for s in args.sides):
        r = subprocess.run([*btx, "mix", "--help"], capture_output=True, text=True, env=btx_env)
        if r.returncode != 0:
            sys.exit(f"`btx mix --help` failed (exit {r.returncode}): {r.stderr.strip()[-500:]}")
    raw: dict = {"machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                             "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
                 "families": {}, "git": args.btx_rev or git_revision(),
                 "btx_core_digest": btx_source_digest(btx_root)}
    for family in args.families:
        t_family = time.perf_counter()
        family_dir = make_family(family)
        experts = sorted(family_dir.glob("expert*"))
        work = args.work / family
        work.mkdir(parents=True, exist_ok=True)
        print(f"{family}: {describe(family_dir)}", file=sys.stderr)
        rounds = []
        for r in range(args.rounds):
            order = args.sides if r % 2 == 0 else args.sides[::-1]
            rounds.append({})
            for side in order:
                if side.startswith("btx") and btx_source_digest(btx_root) != raw["btx_core_digest"]:
                    sys.exit("btx_core changed during the run (someone edited it): the rounds would mix two "
                             "versions of btx mix; rerun when it is stable, or with --btx-rev")
                m = run_side(side, experts, work, btx, btx_env, mk_bin, args.settle)
                rounds[-1][side] = m
                if r < args.rounds - 1:  # only inputs and one output in the page cache at a time
                    fresh(work / side)
                print(f"  round {r + 1} {side:9s} {m['wall_s']:7.1f} s  anon {gb(m['anon_bytes'])} GB  "
                      f"rss {gb(m['rss_bytes'])} GB", file=sys.stderr)
        fam = {"describe": describe(family_dir), "rounds": rounds, "checks": {}}
        if not args.no_check:
            for b_side, m_side in PAIRS:
                if b_side in args.sides and m_side in args.sides:
                    policy = "mean" if b_side == "btx-mean" else "copy"
                    fam["checks"][b_side] = compare(work / b_side, work / m_side, experts, policy)
                    print(f"  check {b_side} vs {m_side}: {json.dumps(fam['checks'][b_side])}", file=sys.stderr)
            if family == "small" and "btx-mean" in args.sides:
                fam["btx_loads"] = loads_in_transformers(work / "btx-mean")
                print(f"  from_pretrained(btx-mean): {fam['btx_loads']}", file=sys.stderr)
        if not args.keep_outputs:
            for side in (*SIDES, "mk-average"):
                fresh(work / side)
        fam["family_wall_s"] = time.perf_counter() - t_family
        raw["families"][family] = fam

    print(f"\n{raw['machine']['cpus']} CPUs, {raw['machine']['mem_gb']} GiB, median of {args.rounds} rounds, "
          f"at {raw['git']} (btx_core {raw['btx_core_digest']})\n")
    print("| family | build | wall s | peak RssAnon GB | peak VmRSS GB | per-round wall s | per-round RssAnon GB |")
    print("|---|---|---:|---:|---:|---|---|")
    for family, fam in raw["families"].items():
        med = {}
        for side in args.sides:
            walls = [r[side]["wall_s"] for r in fam["rounds"]]
            anons = [r[side]["anon_bytes"] for r in fam["rounds"]]
            rss = [r[side]["rss_bytes"] for r in fam["rounds"]]
            med[side] = (statistics.median(walls), statistics.median(anons), statistics.median(rss))
            print(f"| {family} | {side} | {med[side][0]:.1f} | {gb(med[side][1])} | {gb(med[side][2])} | "
                  f"{' '.join(f'{w:.1f}' for w in walls)} | {' '.join(gb(a) for a in anons)} |")
        fam["medians"] = med
        for b_side, m_side in PAIRS:
            if b_side in med and m_side in med:
                print(f"| {family} | {b_side} / {m_side} | **{med[b_side][0] / med[m_side][0]:.2f}x** | "
                      f"{med[b_side][1] / med[m_side][1]:.2f}x | {med[b_side][2] / med[m_side][2]:.2f}x | | |")
    print()
    for family, fam in raw["families"].items():
        passes = {p: statistics.median(r["mk-2pass"]["passes"][p]["wall_s"] for r in fam["rounds"])
                  for p in ("mk-2pass-linear", "mk-2pass-moe")} if "mk-2pass" in args.sides else {}
        split = (f"; mk-2pass = linear {passes['mk-2pass-linear']:.1f} s + moe {passes['mk-2pass-moe']:.1f} s "
                 "(medians)") if passes else ""
        print(f"- {family}: {fam['describe']}{split}; the whole family took {fam['family_wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
