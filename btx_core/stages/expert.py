"""The expert stage (Branch and Train): a copy of the seed continued-pretrained on one domain,
resumable from its checkpoints in the store."""

from __future__ import annotations

from btx_core.config.schema import BTXConfig, stable_hash
from btx_core.data.cache import ensure_prepared, tokenizer_id
from btx_core.errors import BTXError, IncompleteOutputError
from btx_core.model.dense import load_causal_lm
from btx_core.model.families import tensor_kinds
from btx_core.stages.common import ProgressCallback, TrainingRun, cache_dir, open_store
from btx_core.store import layout
from btx_core.store.outputs import STAGE_FORMAT, StageOutput
from btx_core.training.distributed import init_distributed, main_rank_first, pick_device


def expert_config_hash(config: BTXConfig, domain: str) -> str:
    # `branch` enters only when it is not the paper's: experts trained before it existed stay valid.
    branch = {"branch": config.branch.model_dump(mode="json")} if config.branch.train != "all" else {}
    return stable_hash({"stage": "expert", "format": STAGE_FORMAT,
                        "domain": config.domain(domain).model_dump(mode="json"),
                        "training": config.expert_training.result_hash(), **branch})


def freeze_shared(model, train: str) -> dict[str, int]:
    """`branch.train` on a loaded dense model: every parameter outside the kinds that train
    (families.py's `tensor_kinds`) stops taking gradients, so it is in no optimizer group (AdamW's
    weight decay would otherwise move it) and the expert saves it bit-identical to the seed's.
    Returns the number of parameters frozen, by kind."""
    if train == "all":
        return {}
    trained = {"ffn": {"ffn"}, "ffn_and_norms": {"ffn", "norms"}}[train]
    kinds = tensor_kinds(model.config.to_dict())
    frozen: dict[str, int] = {}
    for name, param in model.named_parameters():  # a tied lm_head is the embedding's parameter
        if (kind := kinds.get(name)) is None:
            raise BTXError(f"parameter {name} of the {model.config.model_type} seed is not declared in "
                           "btx_core/model/families.py: declare it before training with branch.train: " + train)
        if kind not in trained:
            param.requires_grad_(False)
            frozen[kind] = frozen.get(kind, 0) + param.numel()
    return frozen


def train_expert(config: BTXConfig, domain: str, *, seed_location: str | None = None,
                 on_progress: ProgressCallback | None = None,
                 stop_after: int | None = None) -> StageOutput:
    """Branch the seed and continue pretraining it on one domain; resumes from its checkpoints."""
    spec = config.domain(domain)
    settings = config.expert_training
    store = open_store(config)
    seed_location = seed_location or layout.seed_model(config.run_root)
    try:
        seed_manifest = store.read_manifest(seed_location)
    except IncompleteOutputError:
        raise BTXError(f"no complete seed at {seed_location}: run `btx seed CONFIG` first") from None
    ranks = init_distributed(settings.device)
    cache = cache_dir(config)
    with main_rank_first(ranks):  # rank 0 tokenizes and fetches; the others reuse its work
        prepared = ensure_prepared(store, spec.data, store_root=config.store,
                                   tokenizer=tokenizer_id(seed_manifest),
                                   tokenizer_dir=lambda: store.fetch(seed_location, cache),
                                   seq_len=settings.seq_len, held_out_fraction=spec.held_out_fraction,
                                   cache_dir=cache)
    location = layout.expert_model(config.run_root, domain)
    config_hash = expert_config_hash(config, domain)
    inputs = {"seed": seed_manifest.hash, "data": prepared.content_id}
    if (done := store.exists_with(location, config_hash, inputs)) is not None:
        return StageOutput(location, done, skipped=True)

    with main_rank_first(ranks):
        seed_dir = store.fetch(seed_location, cache)
        data = prepared.load(store, cache)
    model, tokenizer = load_causal_lm(str(seed_dir), trust_remote_code=config.seed.trust_remote_code)
    frozen = freeze_shared(model, config.branch.train)
    model.to(pick_device(settings.device, ranks, settings.precision))
    run = TrainingRun(store, config, settings, ranks, location=location,
                      checkpoints=layout.expert_checkpoints(config.run_root, domain), stage="expert",
                      config_hash=config_hash, inputs=inputs)
    # Measured before training (a resumed run loads its checkpoint inside train()).
    seed_heldout = run.heldout_loss(model, data)
    return run.train_and_save(model, tokenizer, data, on_progress=on_progress, stop_after=stop_after,
                              metrics={"seed_heldout_loss": seed_heldout, "domain": domain,
                                       "branch_train": config.branch.train, "frozen_parameters": frozen})
