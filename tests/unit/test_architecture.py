"""The house rules, checked on the source: no import cycles inside btx_core or flows/, the
library never imports Prefect or flows/ (only its CLI layer may, for `btx run`), and each
btx_core package imports only from the layers below it. Every import counts, also one inside
a function: a lazy import is still a dependency a reader has to follow. No module is over 400
lines. And checked on a run: the config reaches down the layers of an expert's training at most
5 times (the config walk)."""

from __future__ import annotations

import ast
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("btx_core", "flows")
# Bottom to top: a package may import from its own layer and the ones before it; a module is in
# the layer of the longest prefix that names it. The families (which architectures btx mixes, as
# data) sit under the config's value types (config.base, values, checks, execution, method), which
# the store and the models may take (a Store's TransferPolicy). The pipeline's config itself
# (config.schema: BTXConfig and its stage settings; config.load: reading and validating it) sits
# above the store and the models: stages hand them values (a run's folder, a model's shape).
LAYERS = ("btx_core.errors", "btx_core.logs", "btx_core.model.families", "btx_core.config", "btx_core.store",
          "btx_core.model", "btx_core.config.schema", "btx_core.config.load", "btx_core.data",
          "btx_core.training", "btx_core.moe", "btx_core.evaluation", "btx_core.stages", "btx_core.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every module `path` imports (top-level or lazily), as dotted names; `from a import b`
    counts as `a.b` when that is a module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: {m for m in imports_of(path, known) if m in known and m != name}
            for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layer(module: str) -> int | None:
    named = [i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + ".")]
    return max(named, key=lambda i: len(LAYERS[i])) if named else None


def test_no_import_cycles_in_btx_core_or_flows():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_cli_layer_of_the_library_imports_prefect_or_flows():
    mods = modules()
    offenders = []
    for name, path in mods.items():
        if not name.startswith("btx_core") or name.startswith("btx_core.cli"):
            continue
        for imported in imports_of(path, set(mods)):
            if imported.split(".")[0] in {"prefect", "flows"}:
                offenders.append(f"{name} imports {imported}")
    assert offenders == []


def test_each_library_package_imports_only_from_the_layers_below_it():
    edges = graph()
    upward = [f"{a} ({LAYERS[layer(a)]}) imports {b} ({LAYERS[layer(b)]})"
              for a, targets in edges.items() if layer(a) is not None
              for b in sorted(targets) if layer(b) is not None and layer(b) > layer(a)]
    assert upward == []


def test_every_library_module_is_in_a_layer_and_says_what_it_is_for():
    unplaced = [m for m in modules() if m.startswith("btx_core.") and layer(m) is None]
    assert unplaced == []
    undocumented = [name for name, path in modules().items()
                    if not (ast.get_docstring(ast.parse(path.read_text())) or "").strip()
                    and path.read_text().strip()]
    assert undocumented == []


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}

# The config walk. A stage takes the whole config; every time it (or a settings model inside it)
# is handed to a function of a lower layer, that function reaches back up into the pipeline's
# schema for what a plain value would have told it. Issue 26 counted 6 such hand-downs along
# train_expert (3 store locations, the data cache's location, ensure_prepared, the training loop).

class HandDown(NamedTuple):
    site: str
    """`module:line` of the call."""
    callee: str
    """The module of the function called."""
    function: str
    handed: str
    """The config models handed, `parameter: Class`."""

    def __str__(self) -> str:
        return f"{self.site} -> {self.callee}.{self.function}({self.handed})"


def config_walk(call: Callable[[], object]) -> list[HandDown]:
    """Run `call()` and name each call site (once) where a btx_core function hands a config model
    (a pydantic model of btx_core.config) to a btx_core function of a lower layer, outside the
    config's own code."""
    found: set[HandDown] = set()
    layers: dict[str, int | None] = {}

    def of(module: str) -> int | None:
        if module not in layers:
            layers[module] = layer(module) if module.startswith("btx_core.") else None
        return layers[module]

    def profile(frame, event, arg):
        if event != "call" or frame.f_back is None:
            return
        callee, caller = frame.f_globals.get("__name__", ""), frame.f_back.f_globals.get("__name__", "")
        low, high = of(callee), of(caller)
        if low is None or high is None or low >= high or callee.startswith("btx_core.config."):
            return  # the config's own methods are no hand-down
        code = frame.f_code
        names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        handed = [f"{n}: {type(v).__name__}" for n in names if isinstance(v := frame.f_locals.get(n), BaseModel)
                  and type(v).__module__.startswith("btx_core.config.")]
        if handed:
            found.add(HandDown(f"{caller}:{frame.f_back.f_lineno}", callee, code.co_qualname, ", ".join(handed)))

    threading.setprofile(profile)  # the threads a stage starts (read-ahead, lease renewal) too
    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return sorted(found)


def test_the_config_walk_finds_a_config_handed_down():
    def module(name: str, source: str) -> dict:
        namespace = {"__name__": name}
        exec(compile(source, name, "exec"), namespace)
        return namespace

    from btx_core.config.schema import TinyModelSpec

    low = module("btx_core.store.fake", "def where(spec, name):\n    return name\n")
    high = module("btx_core.stages.fake", "def stage(spec, where):\n    where(spec, 'x')\n    where(None, 'y')\n")
    walk = config_walk(lambda: high["stage"](TinyModelSpec(), low["where"]))
    assert [str(w) for w in walk] == ["btx_core.stages.fake:2 -> btx_core.store.fake.where(spec: TinyModelSpec)"]


def test_the_config_climbs_back_up_at_most_five_times_through_train_expert(tmp_path):
    """Issue 26's budget, and no config model reaches the layers below the pipeline's config
    (store, model): stages hand those values."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from btx_core.config.load import parse_config
    from btx_core.data.builtin.corpora import builtin_documents
    from btx_core.model.tokenizer import train_tokenizer
    from btx_core.stages.expert import train_expert
    from btx_core.stages.seed import build_seed

    tokenizer = train_tokenizer(builtin_documents("general", max_bytes=100_000), 300, tmp_path / "tok")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                 max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id)
                     ).save_pretrained(tmp_path / "seed")
    tokenizer.save_pretrained(tmp_path / "seed")
    config = parse_config({
        "run_name": "walk", "store": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache"),
        "seed": {"model": str(tmp_path / "seed")},
        "domains": [{"name": "math", "data": {"builtin": "math", "max_bytes": 40_000}}],
        "expert_training": {"steps": 2, "lr": 1e-3, "warmup_steps": 1, "seq_len": 32, "batch_size": 2,
                            "precision": "fp32", "checkpoint_every": 2, "eval_blocks": 2},
    }, base_dir=tmp_path)
    build_seed(config)
    walk = config_walk(lambda: train_expert(config, "math"))
    shown = "\n".join(map(str, walk))
    assert len(walk) <= 5, shown
    assert [w for w in walk if layer(w.callee) < layer("btx_core.config.schema")] == [], shown
    assert "btx_core.training.loop" in {w.callee for w in walk}  # it sees what a stage hands down

