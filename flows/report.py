"""The run's artifacts in the Prefect UI, built from the manifests in the store (the durable
record of every stage), so a report is the same whichever process or machine trained a stage.

Keys are `<run>-<what>` (lowercase letters, digits, dashes), stable per run name, so the
Artifacts page keeps the history of each across runs:
    <run>-evaluation   table: held-out loss per domain and mixed: seed, experts, BTM, MiX, BTX
    <run>-compute      table: steps, tokens, wall time, tokens/s per stage
    <run>-checkpoints  markdown: every stage output and training checkpoint in the store
    <run>-loss-curves  markdown: training-loss curves (PNG)
    <run>-routing      markdown: where each domain's tokens go (PNG heatmap per layer group, tables), once
                       evaluated (BTX), before that the MiX stage's routing at initialisation
    <run>-merge-cost   markdown: what MiX cost each domain (oracle-routed loss) and the weight distances
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from btx_core.config.schema import BTXConfig, scheme
from btx_core.errors import IncompleteOutputError
from btx_core.evaluation import merge_cost
from btx_core.evaluation.plots import loss_curves_png, routing_by_domain_png, routing_load_png
from btx_core.evaluation.report import routing_groups_markdown, routing_layers_markdown
from btx_core.stages.common import open_store
from btx_core.store import layout
from btx_core.store.core import Manifest, Store
from flows.progress import artifact_key

DPI = 90  # the images live in the Prefect database: keep them tens of kB


@dataclass(frozen=True)
class StageRecord:
    name: str
    location: str
    manifest: Manifest | None
    """None while the stage has no complete output."""
    checkpoints: list[tuple[int, str]]
    """(step, location) of the stage's complete training checkpoints."""

    @property
    def metrics(self) -> dict:
        return self.manifest.metrics if self.manifest else {}


def stage_locations(config: BTXConfig) -> list[tuple[str, str, str | None]]:
    """(stage, output location, checkpoint prefix) of every stage, in pipeline order."""
    run = config.run_root
    rows = [("seed", layout.seed_model(run), layout.seed_checkpoints(run))]
    rows += [(f"expert[{d.name}]", layout.expert_model(run, d.name), layout.expert_checkpoints(run, d.name))
             for d in config.domains]
    rows.append(("mix", layout.mix_model(run), None))
    if config.finetune is not None:
        rows.append(("finetune", layout.trained_model(run, "btx"), layout.trained_checkpoints(run, "btx")))
    return rows


def evaluation(config: BTXConfig, store: Store | None = None) -> dict | None:
    """The evaluation stage's results (losses, routing), once it has run."""
    try:
        return (store or open_store(config)).read_manifest(layout.eval_results(config.run_root)).metrics
    except IncompleteOutputError:
        return None


def collect(config: BTXConfig, store: Store | None = None) -> list[StageRecord]:
    store = store or open_store(config)
    records = []
    for name, location, checkpoints in stage_locations(config):
        try:
            manifest = store.read_manifest(location)
        except IncompleteOutputError:
            manifest = None
        kept = store.list_checkpoints(checkpoints) if checkpoints else []
        records.append(StageRecord(name, location, manifest, kept))
    return records


def _number(value, digits: int = 4):
    return round(float(value), digits) if isinstance(value, (int, float)) else None


def evaluation_rows(config: BTXConfig, records: list[StageRecord], results: dict | None = None) -> list[dict]:
    """Held-out loss (nats/token) of each domain: from the evaluation stage (seed, expert, BTM,
    MiX, BTX, and the mixed-domain set) once it has run, else the seed vs the expert."""
    if results:
        losses = results["losses"]
        models = [m for m in losses if not m.startswith("expert:")]
        rows = [{"set": d.name, "expert": _number(losses[f"expert:{d.name}"]["single"][d.name]),
                 **{m: _number(losses[m]["single"][d.name]) for m in models}} for d in config.domains]
        for key in ("average", "mixed"):
            rows.append({"set": key, "expert": None, **{m: _number(losses[m].get(key)) for m in models}})
        return rows
    by_name = {r.name: r for r in records}
    rows = []
    for d in config.domains:
        m = by_name[f"expert[{d.name}]"].metrics
        seed, expert = _number(m.get("seed_heldout_loss")), _number(m.get("heldout_loss"))
        rows.append({"domain": d.name, "seed_heldout_loss": seed, "expert_heldout_loss": expert,
                     "change": None if seed is None or expert is None else round(expert - seed, 4)})
    return rows


def compute_rows(records: list[StageRecord]) -> list[dict]:
    """What each complete stage cost, from its manifest's metrics (FLOPs: btx_core.training.compute)."""
    return [{"stage": r.name, "steps": r.metrics.get("steps"), "tokens": r.metrics.get("tokens"),
             "train_flops": _number(r.metrics.get("train_flops"), 0),
             "wall_s": _number(r.metrics.get("wall_s"), 2), "tokens_per_s": _number(r.metrics.get("tokens_per_s"), 1)}
            for r in records if r.manifest is not None]


def _image(png: bytes) -> str:
    """A PNG as a data URI: the UI renders `![...](data:image/png;base64,...)` in markdown."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _link(location: str) -> str:
    url = f"file://{location}" if scheme(location) == "local" else location
    return f"[{location}]({url})"


def checkpoints_markdown(config: BTXConfig, records: list[StageRecord]) -> str:
    lines = [f"# {config.run_name}: outputs in the store", "",
             f"Store: {_link(config.store)}", "",
             "| stage | output | manifest | written | training checkpoints |", "|---|---|---|---|---|"]
    for r in records:
        if r.manifest is None and not r.checkpoints:
            continue
        output = _link(r.location) if r.manifest else "(not complete)"
        manifest = f"`{r.manifest.hash[:12]}`" if r.manifest else ""
        written = r.manifest.created_at if r.manifest else ""
        kept = "<br>".join(f"step {s}: {_link(loc)}" for s, loc in r.checkpoints) or "none kept"
        lines.append(f"| {r.name} | {output} | {manifest} | {written} | {kept} |")
    return "\n".join(lines) + "\n"


def loss_curves_markdown(config: BTXConfig, records: list[StageRecord]) -> str | None:
    curves = {r.name: r.metrics["train_losses"] for r in records if r.metrics.get("train_losses")}
    if not curves:
        return None
    image = _image(loss_curves_png(curves, title=f"{config.run_name}: training loss per step", dpi=DPI))
    return f"# {config.run_name}: loss curves\n\n![training loss]({image})\n"


def moe_routing(records: list[StageRecord], results: dict | None) -> tuple[dict | None, str]:
    """The routing to show and what it is: BTX's on the single-domain held-out set (per domain)
    once evaluated, else MiX-only's, else the MiX stage's load on its sample at initialisation."""
    evaluated = (results or {}).get("routing") or {}
    for name, which in (("btx", "BTX after finetuning"), ("btx-mix", "MiX before finetuning")):
        if (evaluated.get(name) or {}).get("single"):
            return evaluated[name]["single"], which
    mixed = next((r.metrics.get("routing") for r in records if r.name == "mix"), None)
    return mixed, "MiX at initialisation"


def routing_png(config: BTXConfig, routing: dict, which: str) -> bytes:
    """Per domain (one panel per layer group, domains x experts) when the routing has it, else the load."""
    if "by_domain_top1" in routing:
        return routing_by_domain_png(routing, dpi=DPI, title=f"{config.run_name}: share of each domain's "
                                     f"held-out tokens whose top-1 expert is each expert ({which})")
    return routing_load_png(routing, title=f"{config.run_name}: share of tokens per expert ({which})", dpi=DPI)


def routing_section(config: BTXConfig, routing: dict, which: str, image: str, *, heading: str = "#") -> str:
    """The routing heatmap (`image`: a data URI or a file beside the markdown), and for per-domain
    routing one table per layer group and the per-layer own-expert table."""
    if "by_domain_top1" not in routing:
        return (f"{heading} {config.run_name}: routing ({which})\n\nEach row is a layer (H: routing entropy, "
                f"nats); each cell the share of tokens routed to that expert.\n\n![routing heatmap]({image})\n")
    return "\n".join([
        f"{heading} {config.run_name}: routing per domain ({which})", "",
        "Where each domain's held-out tokens go first: one panel per layer group, a row per domain, "
        "a column per expert; each cell the share of the domain's tokens whose top-1 expert it is "
        "(mean over the group's layers).", "", f"![routing per domain]({image})", "",
        f"{heading}# Per layer group", "", routing_groups_markdown(routing),
        f"{heading}# Per layer: own expert and least-used expert", "", routing_layers_markdown(routing)])


def routing_markdown(config: BTXConfig, records: list[StageRecord], results: dict | None = None) -> str | None:
    routing, which = moe_routing(records, results)
    if not routing:
        return None
    return routing_section(config, routing, which, _image(routing_png(config, routing, which)))


def merge_cost_markdown(config: BTXConfig, records: list[StageRecord], *, heading: str = "#") -> str | None:
    """What the merge cost before finetuning (the MiX stage's report: btx_core/evaluation/merge_cost.py)
    and the finetune's router levers (warm-up, learning rate)."""
    cost = next((r.metrics.get("merge_cost") for r in records if r.name == "mix"), None)
    if not cost:
        return None
    finetuned = next((r.metrics for r in records if r.name == "finetune" and r.manifest), {})
    lines = [f"{heading} {config.run_name}: what the merge cost", "", merge_cost.markdown(cost)]
    if made := merge_cost.finetune_levers(finetuned):
        lines.append("Finetuned with " + ", ".join(f"`{k}: {v}`" for k, v in made.items()) + ".")
    return "\n".join(lines) + "\n"


def publish(config: BTXConfig) -> str:
    """Create (a new version of) each artifact of the run; returns the run's root location."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    records = collect(config)
    results = evaluation(config)
    run = config.run_name
    create_table_artifact(evaluation_rows(config, records, results), key=artifact_key(run, "evaluation"),
                          description="Held-out loss (nats/token) per domain and on mixed-domain text")
    create_table_artifact(compute_rows(records), key=artifact_key(run, "compute"),
                          description="Compute per stage: steps, tokens, training FLOPs, wall time, throughput")
    create_markdown_artifact(checkpoints_markdown(config, records), key=artifact_key(run, "checkpoints"),
                             description="Every stage output and training checkpoint in the store")
    report = write_report(config)
    create_markdown_artifact(f"Report in the store (stays after this run): [{report}]"
                             f"({'file://' + report if scheme(report) == 'local' else report})",
                             key=artifact_key(run, "report"), description="Where the run's report is kept")
    for key, markdown, description in (
            ("loss-curves", loss_curves_markdown(config, records), "Training loss per step, per stage"),
            ("routing", routing_markdown(config, records, results),
             "MoE routing: each domain's tokens per expert, per layer group"),
            ("merge-cost", merge_cost_markdown(config, records), "What MiX cost each domain, and where the weights went")):
        if markdown is not None:
            create_markdown_artifact(markdown, key=artifact_key(run, key), description=description)
    return config.run_root


# --- the run's answer: a table on the terminal, a report in the store --------------------------

def _loss(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def evaluation_table(config: BTXConfig, records: list[StageRecord], results: dict | None) -> str:
    """Held-out loss (nats/token, lower is better) per domain: the seed, each expert, BTM, MiX and
    BTX once the evaluation stage has run; else the seed vs each domain's own expert."""
    domains = [d.name for d in config.domains]
    if results:
        losses = results["losses"]
        columns = ["seed", *(f"expert:{d}" for d in domains),
                   *(m for m in losses if m.startswith("btm")), *(m for m in ("btx-mix", "btx") if m in losses)]
        rows = [[d, *(_loss(losses[c]["single"].get(d)) for c in columns)] for d in domains]
        for key in ("average", "mixed"):
            rows.append([key, *(_loss(losses[c].get(key)) for c in columns)])
        header = ["held-out loss", *columns]
    else:
        by_name = {r.name: r for r in records}
        header = ["held-out loss", "seed", "its expert"]
        rows = [[d, _loss(by_name[f"expert[{d}]"].metrics.get("seed_heldout_loss")),
                 _loss(by_name[f"expert[{d}]"].metrics.get("heldout_loss"))] for d in domains]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def routing_summary(results: dict | None) -> list[str]:
    """Per domain: the expert most of its tokens reach first (top-1, mean over layers), and how many."""
    routing = ((results or {}).get("routing") or {}).get("btx") or ((results or {}).get("routing") or {}).get("btx-mix")
    report = (routing or {}).get("single")
    if not report or "by_domain_top1" not in report:
        return []
    experts = report["experts"]
    lines = []
    for domain, layers in report["by_domain_top1"].items():
        shares = [sum(layer[e] for layer in layers) / len(layers) for e in range(len(experts))]
        best = max(range(len(experts)), key=shares.__getitem__)
        lines.append(f"{domain}: {shares[best]:.0%} of its tokens go first to expert {experts[best]} "
                     f"(uniform: {1 / len(experts):.0%})")
    return lines


def report_location(config: BTXConfig) -> str:
    return f"{config.run_root}/report"


def report_markdown(config: BTXConfig, records: list[StageRecord], results: dict | None,
                    images: dict[str, str], routing_md: str | None = None) -> str:
    lines = [f"# btx run `{config.run_name}`", "",
             "Held-out loss, nats/token (lower is better):", "", "```",
             evaluation_table(config, records, results), "```", ""]
    if (routing := routing_summary(results)):
        lines += ["## Routing (BTX, held-out tokens, top-1, mean over layers)", "",
                  *(f"- {line}" for line in routing), ""]
    if (merge := merge_cost_markdown(config, records, heading="##")):
        lines += [merge]
    for title, name in images.items():
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    if routing_md:
        lines += [routing_md]
    lines += ["## Stage outputs", ""]
    lines += [f"- {r.name}: `{r.location}`" + (f" (manifest `{r.manifest.hash[:12]}`)" if r.manifest else
                                                " (not complete)") for r in records]
    return "\n".join(lines) + "\n"


def write_report(config: BTXConfig, store: Store | None = None) -> str:
    """The run's report as a stage output in the store (`<run>/report`: report.md and its PNGs,
    with a manifest): it stays after the run, whatever Prefect keeps. Returns report.md's location."""
    import tempfile
    from pathlib import Path

    from btx_core.config.values import stable_hash

    store = store or open_store(config)
    records, results = collect(config, store), evaluation(config, store)
    inputs = {r.name: r.manifest.hash for r in records if r.manifest}
    location = report_location(config)
    # "routing": the report's routing became per domain; reports written before are rewritten.
    config_hash = stable_hash({"stage": "report", "results": bool(results), "routing": "per-domain"})
    if store.exists_with(location, config_hash, inputs) is None:
        with tempfile.TemporaryDirectory(prefix="btx-report-") as tmp:
            images = {}
            curves = {r.name: r.metrics["train_losses"] for r in records if r.metrics.get("train_losses")}
            if curves:
                Path(tmp, "loss-curves.png").write_bytes(
                    loss_curves_png(curves, title=f"{config.run_name}: training loss per step", dpi=DPI))
                images["Training loss"] = "loss-curves.png"
            routing, which = moe_routing(records, results)
            section = None
            if routing:
                Path(tmp, "routing.png").write_bytes(routing_png(config, routing, which))
                section = routing_section(config, routing, which, "routing.png", heading="##")
            Path(tmp, "report.md").write_text(report_markdown(config, records, results, images, section))
            store.write_dir(Path(tmp), location, stage="report", config_hash=config_hash, inputs=inputs)
    return f"{location}/report.md"


def terminal_summary(config: BTXConfig) -> str:
    """What `btx run` prints last: the evaluation table, the routing summary and the report's path."""
    store = open_store(config)
    records, results = collect(config, store), evaluation(config, store)
    lines = ["", "Held-out loss, nats/token (lower is better):", evaluation_table(config, records, results)]
    if (routing := routing_summary(results)):
        lines += ["", "Routing (BTX, top-1, mean over layers):", *(f"  {line}" for line in routing)]
    if (cost := next((r.metrics.get("merge_cost") for r in records if r.name == "mix"), None)):
        lines += ["", "What the merge cost (MiX, before finetuning):", *(f"  {n}" for n in merge_cost.notes(cost))]
    if store.is_complete(report_location(config)):
        lines += ["", f"Report (kept in the store): {report_location(config)}/report.md"]
    return "\n".join(lines)
