"""Scrub personal identifiers from training text, replacing each with a typed placeholder.

Precision matters as much as recall: a medical corpus is full of numbers that look like
identifiers (doses `500 mg`, pressures `120/80 mmHg`, ranges `3.5-5.0`, years `2019년`, question
numbers). So the rules are narrow:
- RRN and phone numbers are matched by their exact digit layout, never next to another digit, and
  RRNs must carry a valid YYMMDD date and sex digit.
- Record numbers and dates of birth are only scrubbed after a keyword that announces them
  (`등록번호`, `MRN`, `생년월일`, `DOB` ...): a bare date or number in a vignette is clinical data.
Only the identifier itself is replaced; the keyword stays so the sentence still reads.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import NamedTuple

from medtune.data.schema import Record

PII_TYPES = ("RRN", "PHONE", "EMAIL", "MRN", "DOB")
SCRUBBED_FIELDS = ("question", "explanation", "prompt", "response")

_NOT_DIGIT_BEFORE = r"(?<![\d.\-/])"
_NOT_DIGIT_AFTER = r"(?![\d\-/]|\.\d)"

# A measurement unit after the digits means a quantity, not a number to call (`250-500-1000 mg`).
_NOT_UNIT = (
    r"(?!\s?(?:mg|mcg|µg|ug|g|kg|ml|mL|L|mmHg|mm|cm|IU|U|%|Hz|mEq|mmol|회|명|개|번|원|단위)(?![A-Za-z]))"
)

# An RRN is specific enough (valid YYMMDD, hyphen, 7 digits) to match after `/` or `.` as well.
_RRN = re.compile(
    r"(?<!\d)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\s?-\s?(?:[0-9]\d{6}|[1-8]\*{6}|[1-8]X{6})(?!\d)"
)
_PHONE = re.compile(
    "|".join(
        [
            # Korean mobile 010-1234-5678 / 010 1234 5678 / 01012345678
            _NOT_DIGIT_BEFORE + r"01[016789][-. ]?\d{3,4}[-. ]?\d{4}" + _NOT_DIGIT_AFTER + _NOT_UNIT,
            # Korean landline 02-123-4567, 031-1234-5678, (02) 123-4567; the separator is required
            _NOT_DIGIT_BEFORE
            + r"(?:\(0(?:2|[3-6][1-5])\)\s?|0(?:2|[3-6][1-5])[-.])\d{3,4}[-.]\d{4}"
            + _NOT_DIGIT_AFTER,
            # International +82 10-1234-5678, +1 (555) 123-4567, +44 20 7946 0958: the last two groups
            # must look like a subscriber number, so karyotypes (`47,XX,+21`) never match.
            r"(?<![\w+])\+\d{1,3}[ .-]?(?:\(?\d{1,4}\)?[ .-]?)?\d{3,4}[ .-]?\d{4}" + _NOT_DIGIT_AFTER,
            # North American (555) 123-4567, 555-123-4567, 555.123.4567
            _NOT_DIGIT_BEFORE + r"(?:\(\d{3}\)\s?|\d{3}[-.])\d{3}[-.]\d{4}" + _NOT_DIGIT_AFTER + _NOT_UNIT,
        ]
    )
)
# After a phone keyword any 7-15 digit group counts (`대표전화 1588-1234`); without one, numbers
# like `1588-1234` stay: they look exactly like year or frequency ranges (`1975-1990`, `1500-6000 Hz`).
_PHONE_KEYWORD = re.compile(
    r"(?i)(?:전화(?:번호)?|연락처|휴대폰|핸드폰|팩스|\btel\b\.?|\bphone\b|\bfax\b|\bcall\b)\s*(?:[:.]|은|는)?\s*"
    r"(?P<value>\+?\d[\d\s().-]{5,18}\d)" + _NOT_DIGIT_AFTER
)
_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_MRN_KEYWORD = (
    r"(?:(?<!주민)(?<!외국인)등록\s?번호|환자\s?번호|차트\s?번호|병록\s?번호|진료\s?번호|의무기록\s?번호|병원\s?번호"
    r"|MRN|M\.R\.N\.?|medical\s+record\s+(?:number|no\.?|#)|chart\s+(?:number|no\.?|#)"
    r"|patient\s+(?:ID|number|no\.?)|hospital\s+(?:number|no\.?)|record\s+(?:number|no\.?))"
)
_MRN = re.compile(
    r"(?i)(?P<key>" + _MRN_KEYWORD + r")(?P<sep>\s*(?:[:#=]|는|은|:?\s*No\.?)?\s*)"
    r"(?P<value>[A-Z]{0,3}-?\d[\d-]{3,14}\d)(?!\d)"
)
_MONTH = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]*\.?"
_DATE = (
    r"(?:(?:19|20)\d{2}\s?[./-]\s?\d{1,2}\s?[./-]\s?\d{1,2}\.?"
    r"|\d{1,2}[./-]\d{1,2}[./-](?:19|20)?\d{2}"
    r"|(?:19|20)?\d{2}\s?년\s?\d{1,2}\s?월\s?\d{1,2}\s?일"
    r"|" + _MONTH + r"\s\d{1,2},?\s(?:19|20)\d{2}"
    r"|\d{1,2}\s" + _MONTH + r",?\s(?:19|20)\d{2}"
    r"|(?:19|20)\d{2}\d{2}\d{2}|\d{6})"
)
_DOB = re.compile(
    r"(?i)(?P<key>생년월일|출생일|생일|D\.?O\.?B\.?|date\s+of\s+birth|birth\s?date|born(?:\s+on)?)"
    r"(?P<sep>\s*(?:[:=]|은|는|이)?\s*)(?P<value>" + _DATE + r")(?![\d])"
)


_ANY_KEYWORD = re.compile(
    r"(?i)번호|생년|출생|생일|전화|연락처|휴대폰|핸드폰|팩스|m\.?r\.?n|record|chart|patient|hospital|d\.?o\.?b|birth|born"
    r"|tel|phone|fax|call"
)
_DIGIT_OR_AT = re.compile(r"[\d@]")
_PHONE_GATE = re.compile(r"\d{3}[-. )]{1,2}\d{3}|\d{10}|\+\d")
_PRIORITY = {"RRN": 0, "EMAIL": 1, "DOB": 2, "MRN": 3, "PHONE": 4}


class Finding(NamedTuple):
    kind: str
    start: int
    end: int
    text: str


def find_pii(text: str) -> list[Finding]:
    """Every identifier in `text`, left to right, without overlaps (keyword rules win ties)."""
    found: list[Finding] = []
    # Cheap gates first: most medical text has digits but no keyword, no `@` and no 6-digit run,
    # and the full patterns (lookbehinds at every position) are what costs time at a million records.
    if _ANY_KEYWORD.search(text):
        for kind, rx in (("MRN", _MRN), ("DOB", _DOB), ("PHONE", _PHONE_KEYWORD)):
            for m in rx.finditer(text):
                found.append(Finding(kind, m.start("value"), m.end("value"), m.group("value")))
    gated = (
        ("EMAIL", _EMAIL, "@" in text),
        ("RRN", _RRN, "-" in text),
        ("PHONE", _PHONE, _PHONE_GATE.search(text)),
    )
    for kind, rx, gate in gated:
        if gate:
            for m in rx.finditer(text):
                found.append(Finding(kind, m.start(), m.end(), m.group()))
    # Overlaps: the most specific rule wins (an RRN is never re-read as a record number), then
    # the earlier and longer match.
    found.sort(key=lambda f: (_PRIORITY[f.kind], f.start, -(f.end - f.start)))
    kept: list[Finding] = []
    for f in found:
        if all(f.end <= k.start or f.start >= k.end for k in kept):
            kept.append(f)
    return sorted(kept, key=lambda f: f.start)


def scrub_text(text: str) -> tuple[str, Counter[str]]:
    """`text` with identifiers replaced by `[TYPE]`, and how many of each type were replaced."""
    counts: Counter[str] = Counter()
    if not text or not _DIGIT_OR_AT.search(text):
        return text, counts  # fast path: every rule needs a digit or an @
    out: list[str] = []
    pos = 0
    for f in find_pii(text):
        out.append(text[pos : f.start])
        out.append(f"[{f.kind}]")
        counts[f.kind] += 1
        pos = f.end
    out.append(text[pos:])
    return "".join(out), counts


def scrub_record(record: Record) -> Counter[str]:
    """Scrub a training record in place (question, options, explanation, prompt, response)."""
    total: Counter[str] = Counter()
    for key in SCRUBBED_FIELDS:
        value = record.get(key)
        if value:
            record[key], counts = scrub_text(value)  # type: ignore[literal-required]
            total.update(counts)
    options = []
    for option in record["options"]:
        clean, counts = scrub_text(option)
        options.append(clean)
        total.update(counts)
    record["options"] = options
    return total
