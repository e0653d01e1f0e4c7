"""Plain text from the light HTML of the built-in corpora's sources (the Factbook's prose, the
Bible's verse markup): one cleaner for both."""

from __future__ import annotations

import html
import re

TAG = re.compile(r"<[^<>]*>")
BREAK = re.compile(r"<br\s*/?>|</?p(\s[^<>]*)?>", re.IGNORECASE)


def clean_html(text: str) -> str:
    """Plain text from the Factbook's light HTML: breaks become newlines, tags go, entities are
    decoded (after the tags are gone, so an escaped '&lt;' stays a literal '<')."""
    text = html.unescape(TAG.sub("", BREAK.sub("\n", text))).replace("\xa0", " ")
    lines = [" ".join(line.split()) for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
