"""Cross-field checks of the config, written over plain mappings so that they also run on a raw
config whose other fields failed validation: every problem is reported at once, each with its fix."""

from __future__ import annotations

from collections.abc import Mapping

GENERAL = "general"  # the finetuning mixture's name for the seed's general corpus
HELD_OUT_FRACTION = 0.05  # default held-out fraction of the seed's corpus and of every domain


def source_problems(d: Mapping) -> list[str]:
    given = [k for k in ("builtin", "path", "hub") if d.get(k) is not None]
    if len(given) != 1:
        return [f"set exactly one of `builtin`, `path` or `hub` (got {', '.join(given) or 'none'})"]
    return []


def budget_problems(d: Mapping) -> list[str]:
    if (d.get("steps") is None) == (d.get("tokens") is None):
        return ["set exactly one of `steps` and `tokens` (the training budget)"]
    return []


def lease_problems(d: Mapping) -> list[str]:
    if d["renew_s"] * 3 > d["ttl_s"]:
        return [f"renew_s ({d['renew_s']:g}) must be at most a third of ttl_s ({d['ttl_s']:g}), so that "
                "a failed renewal is retried before the lease expires: lower renew_s or raise ttl_s"]
    return []


def head_problems(d: Mapping) -> list[str]:
    hidden, heads, kv = d["hidden_size"], d["num_heads"], d["num_kv_heads"]
    if hidden % heads:
        return [f"hidden_size ({hidden}) must be divisible by num_heads ({heads})"]
    if heads % kv:
        return [f"num_heads ({heads}) must be divisible by num_kv_heads ({kv})"]
    return []


def seed_problems(d: Mapping) -> list[str]:
    if (d.get("model") is None) == (d.get("create") is None):
        return ["set exactly one of `model` (an existing seed) and `create` (a tiny one)"]
    if d.get("create") is not None and d.get("pretrain") is None:
        return ["`create` needs `pretrain` settings (at least `steps` or `tokens`)"]
    if d.get("model") is not None and d.get("pretrain") is not None:
        return ["`pretrain` applies only to a created seed: remove it, or use `create`"]
    return []


def _leak_problems(d: Mapping) -> list[str]:
    # The split is by document hash, the same in every stage: a domain's held-out documents are
    # outside the seed's pretraining data only if its fraction is not above the seed's.
    seed = d.get("seed") if isinstance(d.get("seed"), Mapping) else {}
    if seed.get("create") is None:
        return []
    limit = seed.get("held_out_fraction", HELD_OUT_FRACTION)
    default = HELD_OUT_FRACTION
    return [f"domains[{i}].held_out_fraction: {f} is above seed.held_out_fraction ({limit}), so "
            "some of its held-out documents would be in the seed's pretraining data; lower it "
            "or raise seed.held_out_fraction"
            for i, dom in enumerate(d.get("domains") or []) if isinstance(dom, Mapping)
            for f in [dom.get("held_out_fraction", default)] if f > limit]


def _mix_problems(d: Mapping) -> list[str]:
    mix = d.get("mix") if isinstance(d.get("mix"), Mapping) else {}
    names = [dom.get("name") for dom in d.get("domains") or [] if isinstance(dom, Mapping)]
    include_seed = mix.get("include_seed", True)
    names += ["seed"] * include_seed
    problems = []
    if include_seed and names.count("seed") > 1:
        problems.append("mix.include_seed adds an expert named 'seed', and a domain has that name: "
                        "rename the domain")
    top_k = mix.get("top_k", 2)
    if len(names) > include_seed and top_k > len(names):  # no domains: reported on its own
        problems.append(f"mix.top_k ({top_k}) is larger than the number of experts ({len(names)}: "
                        f"{', '.join(map(str, names))}); lower it")
    policy, weights, copy_from = mix.get("shared_policy", "mean"), mix.get("weights"), mix.get("copy_from")
    if policy == "weighted":
        if not weights:
            problems.append("mix.shared_policy 'weighted' needs mix.weights (expert name -> weight)")
        elif unknown := sorted(set(weights) - set(names)):
            problems.append(f"mix.weights names unknown expert(s) {', '.join(unknown)} (experts: "
                            f"{', '.join(map(str, names))})")
        elif missing := [n for n in names if n not in weights]:
            problems.append(f"mix.weights needs a weight for every expert; missing: {', '.join(map(str, missing))} "
                            "(0 leaves an expert out of the merge)")
        elif sum(weights.values()) <= 0 or min(weights.values()) < 0:
            problems.append("mix.weights must be >= 0 with a positive sum")
    elif weights:
        problems.append("mix.weights applies only to shared_policy 'weighted'")
    if policy == "copy" and copy_from not in names:
        problems.append(f"mix.shared_policy 'copy' needs mix.copy_from, one of: {', '.join(map(str, names))}")
    elif policy != "copy" and copy_from is not None:
        problems.append("mix.copy_from applies only to shared_policy 'copy'")
    return problems


def _finetune_problems(d: Mapping) -> list[str]:
    ft = d.get("finetune") if isinstance(d.get("finetune"), Mapping) else None
    if ft is None:
        return []
    mix = d.get("mix") if isinstance(d.get("mix"), Mapping) else {}
    domains = [dom.get("name") for dom in d.get("domains") or [] if isinstance(dom, Mapping)]
    experts = len(domains) + bool(mix.get("include_seed", True))
    problems = []
    if unknown := sorted(set(ft.get("mixture") or {}) - {*domains, GENERAL}):
        problems.append(f"finetune.mixture names unknown source(s) {', '.join(unknown)}; use domain "
                        f"names or '{GENERAL}' ({', '.join(map(str, [*domains, GENERAL]))})")
    elif (weights := ft.get("mixture")) and (min(weights.values()) < 0 or sum(weights.values()) <= 0):
        problems.append("finetune.mixture weights must be >= 0 with a positive sum")
    top_k = ft.get("top_k")
    if top_k is not None and domains and top_k > experts:
        problems.append(f"finetune.top_k ({top_k}) is larger than the number of experts ({experts}); lower it")
    steps = (ft.get("training") or {}).get("steps") if isinstance(ft.get("training"), Mapping) else None
    warmup = ft.get("router_warmup_steps") or 0
    if isinstance(steps, int) and warmup >= steps:
        problems.append(f"finetune.router_warmup_steps ({warmup}) leaves none of the {steps} steps to "
                        "train anything but the routers: lower it below finetune.training.steps")
    if ft.get("routing") == "soft" and top_k is not None:
        problems.append("finetune.top_k applies to `top_k` routing; `soft` uses every expert: remove it")
    if ft.get("routing") == "sample_top1" and top_k is not None:
        problems.append("finetune.top_k applies to `top_k` routing; `sample_top1` routes each token to "
                        "one expert: remove it")
    return problems


def _compare_problems(d: Mapping) -> list[str]:
    cmp = d.get("compare") if isinstance(d.get("compare"), Mapping) else {}
    domains = [dom for dom in d.get("domains") or [] if isinstance(dom, Mapping)]
    mix = d.get("mix") if isinstance(d.get("mix"), Mapping) else {}
    experts = len(domains) + bool(mix.get("include_seed", True))
    bad = [k for k in cmp.get("btm_top_k") or [] if not 1 <= k <= experts]
    problems = [f"compare.btm_top_k: {k} is not between 1 and the number of experts ({experts})"
                for k in bad] if domains else []
    seeds = list(cmp.get("seeds") or [])
    if len(set(seeds)) != len(seeds):
        problems.append("compare.seeds has duplicates: give each seed once")
    return problems


def config_problems(d: Mapping) -> list[str]:
    """Checks across the sections of a whole config."""
    return _leak_problems(d) + _mix_problems(d) + _finetune_problems(d) + _compare_problems(d)
