"""Load a domain's documents from wherever its `DataSource` points: a built-in corpus, local or
S3 files, or a Hugging Face Hub dataset.

Documents are a stream: preparation (btx_core/data/prepare.py) writes them to disk as it reads
them, so a corpus never has to fit in memory. Files move through fsspec, local and `s3://` by
the same code (the path tests exercise on local files is the path users take with S3), read as
they are consumed: an object is fetched in ranged requests, never downloaded whole first. We
list the files ourselves, to infer the format and to say exactly what is missing; then jsonl is
read line by line, parquet batch by batch, and a plain-text file whole: one file is one
document, as a source file or an article should be. (`datasets.load_dataset` would convert
every file to its Arrow cache before the first document, and refuses remote URLs, S3 included,
when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set, as clusters often do.) Hub datasets go through
`datasets.load_dataset`, streamed when the source says `streaming`.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec

from btx_core.config.schema import DataSource
from btx_core.data.builtin.corpora import builtin_documents, builtin_fingerprint
from btx_core.errors import DataError

FORMAT_BY_EXTENSION = {".txt": "text", ".text": "text", ".md": "text", ".json": "json",
                       ".jsonl": "json", ".parquet": "parquet"}
# datasets decompresses these on the fly; the format is the extension before them.
COMPRESSION_EXTENSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
GLOB_CHARS = re.compile(r"[*?\[]")
REMOTE_BLOCK_BYTES = 8 * 2**20


def load_documents(source: DataSource, *, cache_dir: str | None = None) -> list[str]:
    """The source's documents as a list: for small corpora and tests; preparation streams
    `iter_documents` instead."""
    return list(iter_documents(source, cache_dir=cache_dir))


def iter_documents(source: DataSource, *, cache_dir: str | None = None) -> Iterator[str]:
    """The source's documents (non-empty strings, in source order), read as a stream and capped
    by `max_documents` and `max_bytes`: reading stops at the cap. Raises DataError, naming the
    file, when the source holds no document or a file cannot be read. `cache_dir` is where
    `datasets` keeps the Arrow cache of a (non-streamed) Hub dataset."""
    if source.builtin is not None:
        where = f"built-in corpus {source.builtin!r}"
        docs: Iterator[str] = iter(builtin_documents(source.builtin, max_bytes=source.max_bytes,
                                                     max_documents=source.max_documents))
    elif source.path is not None:
        files, fmt = resolve_data_files(source)
        where = f"{source.path} ({len(files)} {fmt} file{'s' * (len(files) != 1)})"
        docs = _file_documents(files, fmt, source)
    else:
        where = f"Hub dataset {source.hub!r}" + (f" ({source.hub_config})" if source.hub_config else "")
        docs = _hub_documents(source, where, cache_dir)
    yield from _capped(docs, source, where)


def _capped(docs: Iterator[str], source: DataSource, where: str) -> Iterator[str]:
    """`docs` under the caps: reading stops at the first document that does not fit in what is
    left of `max_bytes`. A document larger than the whole cap is skipped instead (one large file
    at the start does not end a corpus)."""
    count, budget, skipped = 0, source.max_bytes, 0
    for doc in docs:
        if source.max_documents is not None and count >= source.max_documents:
            return
        if budget is not None:
            size = len(doc.encode("utf-8"))
            if size > source.max_bytes:
                skipped += 1
                continue
            if size > budget:
                return
            budget -= size
        count += 1
        yield doc
    if count == 0 and skipped:
        raise DataError(f"{where}: every document is larger than max_bytes ({source.max_bytes}): "
                        "raise max_bytes")
    if count == 0:
        raise DataError(f"{where} holds no non-empty documents: add data or point at another source")


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
    except (OSError, ValueError, ImportError, *_client_errors()) as exc:
        raise DataError(f"cannot list {source.path!r}: {exc}; check the path, the endpoint in "
                        "`storage_options` and the credentials in the environment") from exc
    return fs, sorted(found)


def _client_errors() -> tuple[type[Exception], ...]:
    """botocore's connection errors (EndpointConnectionError...) are not OSErrors."""
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:
        return ()
    return (BotoCoreError,)


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


def _file_documents(files: list[str], fmt: str, source: DataSource) -> Iterator[str]:
    """Each file's documents, streamed through fsspec (local and remote alike: an s3:// object is
    read in ranged requests as it is consumed, never downloaded whole first)."""
    read = {"text": _text_file, "json": _json_file, "parquet": _parquet_file}[fmt]
    for uri in files:
        try:
            fs, path = fsspec.core.url_to_fs(uri, **source.storage_options)
            compression = None if fmt == "parquet" else "infer"
            with fs.open(path, "rb", compression=compression, **_open_options(fs)) as f:
                yield from read(f, uri, source.text_column)
        except DataError:
            raise
        except (OSError, ValueError, EOFError, *_client_errors()) as exc:  # network, decompression, truncation
            raise DataError(f"cannot read {uri}: {type(exc).__name__}: {exc}; check the file, the "
                            "endpoint in `storage_options` and the credentials in the environment") from exc


def _open_options(fs: fsspec.AbstractFileSystem) -> dict[str, Any]:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    # Remote files: read ahead in blocks of a few MB (s3fs' default block is 50 MB per open file).
    return {} if protocol in ("file", "local") else {"block_size": REMOTE_BLOCK_BYTES}


def _text_file(f, uri: str, column: str) -> Iterator[str]:
    """One file is one document, as a source file or an article should be."""
    text = _utf8(f.read(), uri)
    if text:
        yield text


def _json_file(f, uri: str, column: str) -> Iterator[str]:
    """JSON Lines, one object per line; or a file holding one JSON array of objects."""
    first = f.read(1)
    while first and first.isspace():
        first = f.read(1)
    if first == b"[":
        try:
            rows = json.loads(_utf8(first + f.read(), uri))
        except json.JSONDecodeError as exc:
            raise DataError(f"could not load {uri}: JSON parse error: {exc}; check that the files are "
                            "valid json (or set `format`)") from exc
        for i, row in enumerate(rows):
            if (text := _text_of(row, uri, column, f"item {i}", first=i == 0)) is not None:
                yield text
        return
    lineno = 0
    for lineno, line in enumerate(itertools.chain([first + f.readline()], f), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(_utf8(line, uri, f"line {lineno}"))
        except json.JSONDecodeError as exc:
            raise DataError(f"could not load {uri}: line {lineno} is not JSON ({exc}); check that the "
                            "files are valid json lines (or set `format`)") from exc
        if (text := _text_of(row, uri, column, f"line {lineno}", first=lineno == 1)) is not None:
            yield text


def _text_of(row: Any, uri: str, column: str, where: str, first: bool) -> str | None:
    if not isinstance(row, dict):
        raise DataError(f"could not load {uri}: {where} is a JSON {type(row).__name__}, not an object "
                        "with a text field; check that the files are valid json lines of objects")
    if column not in row:
        if not first:  # a row without the field is a row without text, as a null is
            return None
        raise DataError(f"{uri} has no column {column!r}; its columns are {', '.join(row) or 'none'}: "
                        "set `text_column` to the one holding the documents")
    text = row[column]
    if text is not None and not isinstance(text, str):
        raise DataError(f"column {column!r} of {uri} holds {type(text).__name__} values ({where}), not "
                        "text: set `text_column` to a column of strings")
    return text or None  # nulls and empty strings carry no tokens


def _parquet_file(f, uri: str, column: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(f)
        schema = table.schema_arrow
        if column not in schema.names:
            raise DataError(f"{uri} has no column {column!r}; its columns are {', '.join(schema.names)}: "
                            "set `text_column` to the one holding the documents")
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"column {column!r} of {uri} holds {kind} values, not text: set "
                            "`text_column` to a column of strings")
        for batch in table.iter_batches(batch_size=1024, columns=[column]):
            for text in batch.column(0).to_pylist():
                if text:
                    yield text
    except pa.ArrowException as exc:
        raise DataError(f"could not load {uri}: {type(exc).__name__}: {exc}; check that the files are "
                        "valid parquet (or set `format`)") from exc


def _utf8(data: bytes, uri: str, where: str = "") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = f"{where}, " if where else ""
        raise DataError(f"{uri} is not UTF-8 text ({at}byte {exc.start}: {data[exc.start:exc.start + 4]!r}): "
                        "convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or drop the file") from exc


def _hub_documents(source: DataSource, where: str, cache_dir: str | None) -> Iterator[str]:
    """A Hub dataset's documents; with `streaming`, read row by row over the network (nothing is
    downloaded whole); without, through `datasets`' local Arrow cache."""
    hint = ("check the dataset name, `hub_config` and `split`, and network access (unset "
            "HF_HUB_OFFLINE and HF_DATASETS_OFFLINE, or use a local copy through `path`)")
    dataset = _load_dataset(where, hint, source.hub, source.hub_config, split=source.split,
                            cache_dir=cache_dir, streaming=source.streaming)
    if not source.streaming:
        yield from _texts(dataset, source, where)
        return
    rows = iter(dataset)
    try:
        for i, row in enumerate(rows):
            if (text := _text_of(row, where, source.text_column, f"row {i}", first=i == 0)) is not None:
                yield text
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types mid-stream; each becomes one error
        cause = _root_cause(exc)
        raise DataError(f"could not read {where}: {type(cause).__name__}: {cause}; {hint}") from exc


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
