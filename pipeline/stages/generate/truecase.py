"""Truecasing (UltraChat truecased its data): repair SHOUTED and all-lowercase turns without breaking what
casing carries: code, URLs, paths, identifiers, acronyms and proper nouns stay as they are.

A shouted turn is lower-cased word by word except acronyms (a known list, or any token with digits) and the
words the rest of the dialogue writes capitalised mid-sentence (its proper nouns); a lowercase-typed turn
gets capital sentence starts and "I". Well-cased text is left alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# `code`, ```blocks```, URLs, e-mail addresses: copied through untouched
_PROTECTED = re.compile(r"```.*?(?:```|\Z)|`[^`\n]*`|\b(?:https?|ftp)://\S+|\bwww\.\S+|[\w.+-]+@[\w-]+\.[\w.]+",
                        re.DOTALL)
_TOKEN = re.compile(r"\S+")
_CORE = re.compile(r"^([^\w]*)(.*?)([^\w]*)$", re.DOTALL)  # leading punctuation, the word, trailing punctuation
# identifiers, paths, versions, camelCase, numbers: casing is meaning
_CODE_LIKE = re.compile(r"[_/\\<>{}\[\]()=#$@|*+^~]|\w\.\w|\d|[a-z][A-Z]")
_ABBREVIATIONS = {"e.g.", "i.e.", "etc.", "vs.", "cf.", "approx.", "mr.", "mrs.", "ms.", "dr.", "st.", "no."}
_PRONOUN_I = {"i": "I", "i'm": "I'm", "i've": "I've", "i'll": "I'll", "i'd": "I'd"}
# Acronyms that are not also ordinary words when shouted (so not US, IT, WHO, AM).
ACRONYMS = frozenset(
    "AI API APIs CPU GPU RAM ROM SSD USB HTML CSS SQL JSON XML YAML HTTP HTTPS URL URLs PDF CSV GPS DNA RNA "
    "NASA FBI CIA NSA USA UK EU UN NATO UNESCO CEO CFO CTO HR PR TV PC FAQ ASAP DIY BBC CNN IBM AWS GCP "
    "MIT UCLA NYC LA DC SUV ATM PIN VAT GDP IRS IRA ETF PhD MBA MRI ICU ADHD HIV COVID IQ UV LED LCD".split())


def _sentences_start(text: str) -> Iterable[int]:
    """Offsets of the first token of each sentence (after . ! ? or a blank line, not after e.g./i.e.)."""
    starts, at_start = [], True
    for m in _TOKEN.finditer(text):
        if at_start:
            starts.append(m.start())
        tok = m.group(0)
        at_start = tok[-1] in ".!?" and tok.lower() not in _ABBREVIATIONS or "\n\n" in text[m.end():m.end() + 3]
    return starts


def _plain(core: str) -> bool:
    return core.isalpha() or (core.replace("'", "").isalpha() and "'" in core)


def case_vocabulary(texts: Iterable[str]) -> dict[str, str]:
    """lowercase -> spelling, for words well-cased text writes capitalised mid-sentence and never in lower case
    (proper nouns, brand names, acronyms): what a shouted turn in the same dialogue should get back."""
    capital: dict[str, str] = {}
    lower: set[str] = set()
    for text in texts:
        if _mode(text) != "cased":
            continue
        starts = set(_sentences_start(text))
        for m in _TOKEN.finditer(_PROTECTED.sub(" ", text)):
            core = _CORE.match(m.group(0)).group(2)
            if not _plain(core):
                continue
            if core.islower():
                lower.add(core)
            elif m.start() not in starts and core[0].isupper():
                capital.setdefault(core.lower(), core)
    return {k: v for k, v in capital.items() if k not in lower and k not in _PRONOUN_I}


def _mode(text: str) -> str:
    """'shouting', 'lowercase' or 'cased', judged on plain words only (code and URLs do not count)."""
    free = _PROTECTED.sub(" ", text)
    cores = [_CORE.match(t).group(2) for t in _TOKEN.findall(free)]
    plain = [c for c in cores if _plain(c) and not _CODE_LIKE.search(c)]
    letters = "".join(plain)
    if len(plain) >= 2 and len(letters) > 3 and letters.isupper():
        return "shouting"
    starts = set(_sentences_start(free))
    first = [_CORE.match(m.group(0)).group(2) for m in _TOKEN.finditer(free) if m.start() in starts]
    first = [c for c in first if _plain(c)]
    if (first and all(c[0].islower() for c in first)) or any(c in ("i", "i'm", "i've", "i'll", "i'd") for c in cores):
        return "lowercase"
    return "cased"


def _fix_word(core: str, mode: str, known: dict[str, str]) -> str:
    if not _plain(core) or _CODE_LIKE.search(core):
        return core
    low = core.lower()
    if low in _PRONOUN_I:
        return _PRONOUN_I[low]
    if mode == "shouting":
        if low in known:
            return known[low]
        return core if core in ACRONYMS or core.rstrip("s") in ACRONYMS else low
    return known[low] if core.islower() and low in known else core


def truecase(text: str, known: dict[str, str] | None = None) -> str:
    """Sentence case for a shouted or lowercase-typed text; `known` spellings (see `case_vocabulary`) restore
    proper nouns. Well-cased text, code, URLs and identifiers come back unchanged."""
    mode = _mode(text)
    if mode == "cased":
        return text
    known = known or {}
    out, last = [], 0
    for span in [*_PROTECTED.finditer(text), None]:
        end = span.start() if span else len(text)
        out.append(_fix_free(text, last, end, mode, known))
        if span:
            out.append(span.group(0))
            last = span.end()
    return "".join(out)


def _fix_free(text: str, start: int, end: int, mode: str, known: dict[str, str]) -> str:
    starts = set(_sentences_start(text))
    pieces, pos = [], start
    for m in _TOKEN.finditer(text, start, end):
        lead, core, trail = _CORE.match(m.group(0)).groups()
        word = _fix_word(core, mode, known)
        if m.start() in starts and _plain(word) and word[0].islower() and not _CODE_LIKE.search(word):
            word = word[0].upper() + word[1:]
        pieces.append(text[pos:m.start()] + lead + word + trail)
        pos = m.end()
    pieces.append(text[pos:end])
    return "".join(pieces)
