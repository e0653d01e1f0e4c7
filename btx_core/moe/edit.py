"""Editing a mixed MoE after the fact: drop one expert (an opt-out, as FlexOlmo allows).

The expert's FFNs and its router row go in every layer; later experts move down one index;
top-k stays <= the number of experts. Streamed like mixing: one tensor at a time.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from btx_core.errors import BTXError
from btx_core.model.families import COMPANION_FILES, MOE_TARGETS, MoETarget, num_experts
from btx_core.model.tensor_io import CheckpointReader, ShardedWriter, TensorMeta
from btx_core.store.manifest import FileEntry


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)")
                      .replace(r"\{expert\}", r"(?P<expert>\d+)"))


def expert_names(config: dict) -> list[str]:
    count = num_experts(config)
    names = config.get("btx_expert_names") or []
    return list(names) if len(names) == count else [str(i) for i in range(count)]


def resolve_expert(config: dict, expert: str) -> int:
    names = expert_names(config)
    if expert in names:
        return names.index(expert)
    if expert.isdigit() and int(expert) < len(names):
        return int(expert)
    raise BTXError(f"no expert {expert!r} in this MoE; its experts are {', '.join(names)} (by name or index)")


def drop_expert(source: Path, expert: str, out_dir: Path, *, shard_size: int = 2 * 10**9) -> tuple[dict, dict[str, FileEntry]]:
    """Write `source` without `expert` (a name from `btx_expert_names`, or an index) into the
    empty directory `out_dir`; return (the new config, the files written)."""
    config = json.loads((source / "config.json").read_text())
    target: MoETarget | None = MOE_TARGETS.get(config.get("model_type"))
    if target is None:
        raise BTXError(f"{source} is a {config.get('model_type')!r} model; drop-expert edits: "
                       f"{', '.join(MOE_TARGETS)}")
    drop, count = resolve_expert(config, expert), num_experts(config)
    if count < 2:
        raise BTXError(f"{source} has a single expert: dropping it would leave no MoE")
    reader = CheckpointReader(source)
    router, experts = _pattern(target.router), [_pattern(t) for t in target.experts.values()]
    plan: list[tuple[str, TensorMeta, str]] = []  # (new name, meta, source name)
    for name, meta in reader.meta.items():
        if router.fullmatch(name):
            plan.append((name, TensorMeta(meta.dtype, (count - 1, *meta.shape[1:])), name))
            continue
        match = next((m for p in experts if (m := p.fullmatch(name))), None)
        if match is None:
            plan.append((name, meta, name))
        elif (e := int(match["expert"])) != drop:
            start, end = match.span("expert")
            plan.append((name[:start] + str(e - (e > drop)) + name[end:], meta, name))
    writer = ShardedWriter(out_dir, [(n, m) for n, m, _ in plan], shard_size)
    try:
        for new, _, old in plan:
            tensor = reader.get(old)
            if router.fullmatch(old):
                tensor = torch.cat([tensor[:drop], tensor[drop + 1:]])
            writer.write(new, tensor)
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    names = expert_names(config)
    dropped = names.pop(drop)
    from transformers import AutoConfig  # written through the config class, like mix

    edited = AutoConfig.from_pretrained(str(source))
    setattr(edited, target.experts_key, count - 1)
    edited.btx_expert_names = names
    edited.num_experts_per_tok = min(config.get("num_experts_per_tok", 2), count - 1)
    edited.save_pretrained(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    for f in COMPANION_FILES:
        if (source / f).is_file():
            shutil.copy2(source / f, out_dir / f)
    card = (source / "README.md").read_text() if (source / "README.md").is_file() else ""
    (out_dir / "README.md").write_text(
        card + f"\n## Edited: expert {dropped!r} dropped\n\nMade from `{source}` by `btx moe drop-expert`: "
        f"its FFNs and router row were removed in every layer; experts now: {', '.join(names)}; "
        f"top-{config['num_experts_per_tok']}.\n")
    return config, files
