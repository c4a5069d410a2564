"""Language of a record (ko / en / mixed / other) from the share of Hangul vs Latin letters.

No model: the two languages medtune mixes use disjoint scripts, so counting letters is exact enough
and costs microseconds. The trap is Korean exam text that glosses terms in English, e.g.
`직장질루(rectovaginal fistula)`: counted naively, one Hangul syllable loses to a dozen Latin letters.
So (1) parenthesised Latin glosses are ignored when the text has Hangul, and (2) words are counted,
not letters: a word that carries any Hangul is Korean, which also catches English terms with a
Korean particle attached (`gingivalis와`, `DNA의`): the grammar of the sentence is Korean.
"""

from __future__ import annotations

import re

from medtune.data.schema import Record

KO_SHARE = 0.5
"""Share of Hangul-bearing words at or above which a text is `ko`."""
EN_SHARE = 0.2
"""Share of Hangul-bearing words at or below which a text is `en`; in between is `mixed`."""

# "(rectovaginal fistula)", "(mean corpuscular volume, MCV)": brackets with no Hangul inside.
_GLOSS = re.compile(r"[(\[（][^()\[\]（）가-힣]*[)\]）]")


# Syllables, Jamo and compatibility Jamo (ㄱ, ㅏ) all count as Korean.
_HANGUL = re.compile("[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
_LATIN = re.compile("[A-Za-z\u00c0-\u024f]")


def detect_language(text: str) -> str:
    """`ko`, `en`, `mixed` or `other` (no Hangul or Latin letters at all, e.g. only digits)."""
    if _HANGUL.search(text):
        text = _GLOSS.sub(" ", text)
    hangul = latin = 0
    for word in text.split():
        if _HANGUL.search(word):
            hangul += 1
        elif _LATIN.search(word):
            latin += 1
    if hangul == 0 and latin == 0:
        return "other"
    share = hangul / (hangul + latin)
    if share >= KO_SHARE:
        return "ko"
    if share <= EN_SHARE:
        return "en"
    return "mixed"


def record_text(record: Record) -> str:
    """All the text the model reads and writes for this record (for lengths and statistics)."""
    parts = [record["question"], *record["options"], record.get("prompt") or "", record.get("response") or ""]
    return "\n".join(p for p in parts if p)


def record_language(record: Record) -> str:
    """The language of the stem (MCQA) or prompt + response (instruction data).

    Options are left out on purpose: Korean pharmacology items list drug names in Latin script
    (`procaine`, `lidocaine`), yet the item is Korean. They count only when the stem has no letters.
    """
    if record["kind"] == "mcqa":
        lang = detect_language(record["question"])
        return lang if lang != "other" else detect_language(record_text(record))
    return detect_language(f"{record.get('prompt') or ''}\n{record.get('response') or ''}")
