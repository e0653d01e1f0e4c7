"""Load a domain's documents from wherever its `DataSource` points: a built-in corpus, local or
S3 files, or a Hugging Face Hub dataset.

Files and Hub datasets are parsed by one call, `datasets.load_dataset`, so the path that tests
exercise on local files is the path users take with S3 and the Hub. Files move through fsspec
(as checkpoints do): we list them ourselves, to infer the format and to say exactly what is
missing, and copy remote ones to a local temporary directory first. `datasets` refuses every
remote URL, S3 included, when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set, and clusters often
set them to keep jobs off the Hub; a private object store must still work there.
Plain-text files are read whole: one file is one document (`sample_by="document"`), as a
source file or an article should be.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec

from btx_core.config.schema import DataSource
from btx_core.data.builtin.corpora import builtin_documents, builtin_fingerprint, cap_documents
from btx_core.errors import DataError

FORMAT_BY_EXTENSION = {".txt": "text", ".text": "text", ".md": "text", ".json": "json",
                       ".jsonl": "json", ".parquet": "parquet"}
# datasets decompresses these on the fly; the format is the extension before them.
COMPRESSION_EXTENSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
GLOB_CHARS = re.compile(r"[*?\[]")


def load_documents(source: DataSource, *, cache_dir: str | None = None) -> list[str]:
    """The source's documents (non-empty strings, in source order), capped by `max_documents`
    and `max_bytes`. `cache_dir` is where `datasets` keeps its Arrow cache (default: its own)."""
    dataset = None
    if source.builtin is not None:
        docs = builtin_documents(source.builtin, max_bytes=source.max_bytes,
                                 max_documents=source.max_documents)
        where = f"built-in corpus {source.builtin!r}"
    elif source.path is not None:
        files, fmt = resolve_data_files(source)
        where = f"{source.path} ({len(files)} {fmt} file{'s' * (len(files) != 1)})"
        config = {"sample_by": "document"} if fmt == "text" else {}
        with _local_copies(files, source, cache_dir) as local_files:
            if all(os.path.getsize(f) == 0 for f in local_files):
                raise DataError(f"{where} holds no non-empty documents (its files are empty): add "
                                "data or point at another source")
            hint = f"check that the files are valid {fmt} (or set `format`)"
            dataset = _load_dataset(where, hint, fmt, data_files={source.split: local_files},
                                    split=source.split, cache_dir=cache_dir, **config)
        docs = cap_documents(_texts(dataset, source, where), source.max_documents, source.max_bytes)
    else:
        where = f"Hub dataset {source.hub!r}" + (f" ({source.hub_config})" if source.hub_config else "")
        hint = ("check the dataset name, `hub_config` and `split`, and network access (unset "
                "HF_HUB_OFFLINE and HF_DATASETS_OFFLINE, or use a local copy through `path`)")
        dataset = _load_dataset(where, hint, source.hub, source.hub_config, split=source.split,
                                cache_dir=cache_dir)
        docs = cap_documents(_texts(dataset, source, where), source.max_documents, source.max_bytes)
    if not docs:
        # Every document larger than the cap, or no text at all?
        capped = source.max_bytes and (dataset is None or next(_texts(dataset, source, where), None))
        if capped:
            raise DataError(f"{where}: every document is larger than max_bytes ({source.max_bytes}): "
                            "raise max_bytes")
        raise DataError(f"{where} holds no non-empty documents: add data or point at another source")
    return docs


def source_fingerprint(source: DataSource) -> dict[str, Any]:
    """What the source's content depends on beyond its config, for cache keys: corpus versions
    for built-ins, each file's size and modification stamp for files. Hub datasets give nothing
    cheap to check; pin their revision in the dataset name if they may change."""
    if source.builtin is not None:
        return builtin_fingerprint(source.builtin)
    if source.path is None:
        return {}
    fs, files = _list_files(source)
    stamps = {}
    for path in files:
        info = fs.info(path)
        stamp = next((info[k] for k in ("ETag", "mtime", "LastModified") if k in info), None)
        stamps[path] = [info.get("size"), str(stamp)]
    return {"files": stamps}


# ---------------------------------------------------------------------------------------------
# Finding the files


def resolve_data_files(source: DataSource) -> tuple[list[str], str]:
    """(files, format) for a `path` source: a file, a directory (every data file below it), or
    a glob, local or remote. Raises DataError when nothing matches or the format is unclear."""
    fs, files = _list_files(source)
    if not files:
        raise DataError(f"path {source.path!r} matches no data files: check the path (a file, a "
                        "directory, a glob like data/*.jsonl, or s3://bucket/prefix)")
    formats = {_format_of(f) for f in files}
    if source.format is not None:
        fmt = source.format
    elif None in formats:
        unknown = next(f for f in files if _format_of(f) is None)
        raise DataError(f"cannot tell the format of {unknown} from its extension: set `format` "
                        "to text, json or parquet")
    elif len(formats) > 1:
        raise DataError(f"path {source.path!r} mixes {' and '.join(sorted(formats))} files: set "
                        "`format`, or narrow the path with a glob (e.g. dir/*.jsonl)")
    else:
        fmt = formats.pop()
    return [_full_path(fs, f) for f in files], fmt


def _list_files(source: DataSource) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    path = source.path
    local = "://" not in path or path.startswith("file://")
    if local:
        path = os.path.expanduser(path.removeprefix("file://"))
    try:
        fs, root = fsspec.core.url_to_fs(path, **source.storage_options)
        if match := GLOB_CHARS.search(root):
            # fsspec's "*" matches dot files, unlike a shell's.
            static = root[:match.start()].rsplit("/", 1)[0]
            found = [p for p in fs.glob(root) if fs.isfile(p) and not _hidden(p[len(static):])]
        elif fs.isdir(root):
            # A dataset's README or lock file is not data.
            found = [p for p in fs.find(root) if not _hidden(p[len(root):])
                     and not p.rsplit("/", 1)[-1].lower().startswith("readme.")]
            # Files of another known format are side files; a given format also claims the
            # files whose extension says nothing.
            wanted = {source.format, None} if source.format else set(FORMAT_BY_EXTENSION.values())
            found = [p for p in found if _format_of(p) in wanted]
        elif fs.isfile(root):
            found = [root]
        else:
            found = []
    except (OSError, ValueError, ImportError) as exc:
        raise DataError(f"cannot list {source.path!r}: {exc}; check the path, the endpoint in "
                        "`storage_options` and the credentials in the environment") from exc
    return fs, sorted(found)


def _hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/") if part)


def _format_of(path: str) -> str | None:
    name = path.rsplit("/", 1)[-1].lower()
    for ext in COMPRESSION_EXTENSIONS:
        name = name.removesuffix(ext)
    return FORMAT_BY_EXTENSION.get(os.path.splitext(name)[1])


def _full_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else fs.unstrip_protocol(path)


# ---------------------------------------------------------------------------------------------
# Reading them


@contextmanager
def _local_copies(files: list[str], source: DataSource, cache_dir: str | None) -> Iterator[list[str]]:
    """Local paths for the files; remote ones are copied into a temporary directory that lives
    until `datasets` has converted them to its Arrow cache."""
    if all("://" not in f for f in files):
        yield files
        return
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="btx-data-", dir=cache_dir) as tmp:
        local = []
        for i, uri in enumerate(files):
            # The index keeps same-named files of different folders apart; the name keeps the
            # extension, from which datasets infers compression.
            target = os.path.join(tmp, f"{i:06d}-{uri.rsplit('/', 1)[-1]}")
            try:
                fs, path = fsspec.core.url_to_fs(uri, **source.storage_options)
                fs.get_file(path, target)
            except (OSError, ValueError) as exc:
                raise DataError(f"cannot download {uri}: {exc}; check the endpoint in "
                                "`storage_options` and the credentials in the environment") from exc
            local.append(target)
        yield local


def _load_dataset(where: str, hint: str, *args: Any, **kwargs: Any):
    import datasets  # heavy; only paths that read files or the Hub pay for it

    try:
        with _quiet("datasets"):  # it logs its failures too: the user gets one message, ours
            return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # datasets raises many types; each becomes one actionable error
        cause = _root_cause(exc)
        raise DataError(f"could not load {where}: {type(cause).__name__}: {cause}; {hint}") from exc


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # setLevel, not `.level =`: it clears the children's caches
    try:
        yield
    finally:
        logger.setLevel(level)


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost explicitly chained cause that says something ("JSON parse error in row 0"
    rather than "An error occurred while generating the dataset")."""
    found, seen = exc, {id(exc)}
    while (exc := exc.__cause__) is not None and id(exc) not in seen:
        seen.add(id(exc))
        if str(exc):
            found = exc
    return found


def _texts(dataset, source: DataSource, where: str) -> Iterator[str]:
    """The text column's non-empty values, batch by batch (stops early under a cap)."""
    from datasets import Value

    column = source.text_column
    if column not in dataset.column_names:
        raise DataError(f"{where} has no column {column!r}; its columns are "
                        f"{', '.join(dataset.column_names)}: set `text_column` to the one holding "
                        "the documents")
    feature = dataset.features[column]
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        raise DataError(f"column {column!r} of {where} holds {feature} values, not text: set "
                        "`text_column` to a column of strings")
    for batch in dataset.select_columns([column]).with_format("arrow").iter(batch_size=10_000):
        for text in batch.column(column).to_pylist():
            if text:  # nulls and empty strings carry no tokens
                yield text
