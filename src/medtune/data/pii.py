"""Scrub personal identifiers from training text, replacing each with a typed placeholder.

Precision matters as much as recall: a medical corpus is full of numbers that look like
identifiers (doses `500 mg`, pressures `120/80 mmHg`, ranges `3.5-5.0`, years `2019년`, question
numbers, trial and IRB numbers). So the rules are narrow:
- RRNs, phone numbers and e-mails are matched by their layout, never next to another digit. RRNs
  (hyphenated or 13 bare digits) must carry a valid YYMMDD date and sex digit; phones follow
  Korean, trunk-0 national, North American or `+`/`00` international layouts.
- Record numbers, SSNs and dates of birth are only scrubbed after words that announce them: an
  identifier noun (`번호`, `ID`, `number`, `no.`, `#`) qualified by a care-system word (`환자`,
  `접수`, `patient`, `chart`, `accession` ...), `MRN`-style abbreviations, or a birth word before or
  after the date (`생년월일`, `DOB`, `born`, `...일생`): a bare date or number in a vignette is
  clinical data.
Only the identifier itself is replaced; the keyword stays so the sentence still reads. Measured
by `benchmarks/pii.py` on the labelled sets in `tests/data/pii/`.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import NamedTuple

from medtune.data.schema import Record

PII_TYPES = ("RRN", "PHONE", "EMAIL", "MRN", "DOB")
# Every free-text field of a `Record` (schema.py); `options` and a list-valued `context` are
# scrubbed item by item, and `answer` only when it is free text rather than a canonical letter.
TEXT_FIELDS = ("question", "context", "explanation", "prompt", "response")

_NOT_DIGIT_BEFORE = r"(?<![\d.\-/])"
_NOT_DIGIT_AFTER = r"(?![\d\-/]|\.\d)"

# A measurement unit after the digits means a quantity, not a number to call (`250-500-1000 mg`).
_NOT_UNIT = (
    r"(?!\s?(?:mg|mcg|µg|ug|g|kg|ml|mL|L|mmHg|mm|cm|IU|U|%|Hz|mEq|mmol|회|명|개|번(?!호)|원|단위)"
    r"(?![A-Za-z]))"
)

# An RRN carries a valid YYMMDD date; with a hyphen it is specific enough to match after `/` or `.`,
# written as 13 bare digits (or with a space) the 7th digit must also be a sex/century digit (1-8).
_YYMMDD = r"\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
_RRN = re.compile(
    r"(?<!\d)" + _YYMMDD + r"\s?-\s?(?:\d{7}|[1-8]\*{6}|[1-8]X{6})(?!\d)"
    r"|(?<![\w.\-/])" + _YYMMDD + r"\s?[1-8]\d{6}(?![\d\-/]|\.\d)"
)
# US social security numbers (national ids, counted as RRN) are only taken after their keyword:
# bare `123-45-6789` is too close to lot numbers and ranges.
_SSN = re.compile(
    r"(?i)\b(?:SSN|social\s+security(?:\s+(?:number|no\.?|#))?)\s*[:#]?\s*"
    r"(?P<value>\d{3}[- ]?\d{2}[- ]?\d{4})(?!\d)"
)

_GROUP_SEP = r"(?:\s?[-.]\s?|\s|/)"
_PHONE = re.compile(
    "|".join(
        [
            # National numbers behind a trunk 0, in groups: Korean 010-1234-5678, 02-2072-1234,
            # (02) 3410-5678, 062)220-3114, 0505-123-4567, UK 07700 900456, 0161 496 0000. The
            # groups after the prefix have 3+ digits, so dates (`05/21/1990`) and ranges never fit.
            _NOT_DIGIT_BEFORE
            + r"(?:\(0\d{1,4}\)\s?|0\d{1,4}(?:\)\s?|"
            + _GROUP_SEP
            + r"))\d{3,4}"
            + _GROUP_SEP
            + r"?\d{3,4}"
            + _NOT_DIGIT_AFTER,
            # Korean mobile without separators: 01012345678
            _NOT_DIGIT_BEFORE + r"01[016789]\d{7,8}" + _NOT_DIGIT_AFTER,
            # North American (555) 123-4567, 555-123-4567, 212 555 0198, 1-800-555-0123, 2125550173
            # (bare ten digits only with valid area and exchange codes)
            r"(?<![\w+.\-/])(?<!\d[ ,])(?:1[-. ])?(?:\(\d{3}\)\s?|\d{3}[-. ])\d{3}[-. ]\d{4}"
            + _NOT_DIGIT_AFTER
            + r"(?!\s\d)"
            + _NOT_UNIT,
            _NOT_DIGIT_BEFORE + r"[2-9]\d{2}[2-9]\d{6}" + _NOT_DIGIT_AFTER,
        ]
    )
)
# International: `+` or `00` and a country code, then groups; 8-15 digits in all (checked in code),
# so karyotypes (`47,XX,+21`) and Gleason sums (`3+4`) never match.
_PHONE_INTL = re.compile(
    r"(?<![\w+])(?:\+|(?<![\d.])00(?=[1-9]\d{0,2}[ .-]))\d{1,3}(?:[ .-]?\(?\d{1,5}\)?){1,6}"
)
# After a phone keyword any 7-15 digit group counts (`대표전화 1588-1234`); without one, numbers
# like `1588-1234` stay: they look exactly like year or frequency ranges (`1975-1990`, `1500-6000 Hz`).
_PHONE_KEYWORD = re.compile(
    r"(?i)(?:전화(?:번호)?|연락처|휴대폰|핸드폰|팩스|\btel\b\.?|\bphone\b|\bfax\b|\bcall\b|\bmobile\b|\bcell\b"
    r"|\bpager\b)\s*(?:[:.]|은|는)?\s*"
    r"(?P<value>\+?\d[\d\s().-]{5,18}\d)" + _NOT_DIGIT_AFTER
)
_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")

# A record number is an identifier-shaped value after an identifier noun (number, no., ID, #, 번호,
# 아이디) qualified by a word from a care system, or after an abbreviation that needs none (MRN).
# The qualifiers are vocabularies, not a list of known field names, so unseen combinations
# (`hospital registration number`, `내원번호`) are found. The regex starts at the noun and the
# qualifier is checked behind it: a pattern that starts at an open-ended word is retried at every
# syllable of a Korean text.
_CARE_WORD = (
    r"(?:patient(?:'s)?|pt|hospital|hosp|medical\s+record|med\.?\s?rec(?:ord)?|record|chart|unit|account"
    r"|encounter|visit|admission|inpatient|outpatient|accession|specimen|sample|lab|registration"
    r"|health\s+plan|insurance|member|beneficiary|subscriber|policy|medicaid|medicare|NHS|UR|MR|client)"
)
# Korean compounds qualify through a care-system stem anywhere in the word (`외래환자번호`,
# `영상검사 접수번호`, `의료급여증 번호`); `일련번호`, `논문 번호`, `우편번호` have none.
_CARE_STEM_KO = (
    r"(?:환자|병원|병록|차트|챠트|진료|의무|기록|외래|입원|내원|접수|검체|병리|보험|가입자|수진자|급여"
    r"|등록|고유|식별|카드)"
)
_QUALIFIED_BEFORE = re.compile(
    r"(?i)(?:\b" + _CARE_WORD + r"\.?(?:\s+" + _CARE_WORD + r"\.?)?"
    r"|" + _CARE_STEM_KO + r"[가-힣]*(?:\s?(?:ID|아이디))?)\s?$"
)
_ID_NOUN = (
    r"(?:(?:ID\b|I\.D\.|아이디)(?:\s?번호)?|번호|identifier|identification\s+(?:number|no\b\.?)|number|num\b\.?"
    r"|nbr\b|\bno\b\.?|#|(?P<abbr>\b(?:MRN|PID|EMPI|CSN|UHID)\b|\bM\.R\.N\b\.?))"
)
_MRN = re.compile(
    r"(?i)(?P<key>" + _ID_NOUN + r")"
    r"(?P<sep>\s*(?:\([^()\d]{1,12}\))?\s*(?:is|was|는|은|번호)?[\s:#=(]*)"
    r"(?P<value>(?:[A-Z]{1,5}-?)?\d[A-Z0-9]*(?:[-/][A-Z0-9]+)*(?:\s\d{3,4}){0,2})(?![A-Za-z0-9-])"
)
_MRN_MIN_DIGITS = 5  # `문항 번호 102`, `Patient 3`, `Gene ID 7157` are not record numbers
# Public registries whose numbers sit behind the same words (`임상시험 등록번호 NCT04280705`,
# `IRB 승인번호 2020-0123`, `grant number`): never a patient's.
_NOT_PATIENT_CONTEXT = re.compile(
    r"(?i)전화|휴대|핸드폰|팩스|연락|주민|외국인|사업자|임상시험|연구|승인|허가"
    r"|trial|IRB|ethic|approv|grant|protocol|gene|CAS\b|ISBN|ISSN"
)
_REGISTRY_ID = re.compile(r"(?i)NCT\d|KCT\d|ISRCTN|ChiCTR|UMIN|ACTRN|DRKS|CTRI|EudraCT")

_MONTH = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]*\.?"
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
_YEAR = r"(?:19|20)\d{2}"
# Numeric and Korean layouts: 1962-03-14, 1990. 5. 21., 03/14/1962, 62.03.14, 1962년 3월 14일
_KO_DATE = (
    r"(?:" + _YEAR + r"\s?[./-]\s?\d{1,2}\s?[./-]\s?\d{1,2}\.?"
    r"|\d{1,2}[./-]\d{1,2}[./-](?:19|20)?\d{2}"
    r"|(?:19|20)?\d{2}\s?년\s?\d{1,2}\s?월\s?\d{1,2}\s?일)"
)
# ... and English ones: March 14, 1962; June 3rd, 1975; 14 March 1962; 14-Mar-1962; 1st of April
# 1970; and bare 19620314 / 620314 (only ever taken right after a birth keyword)
_DATE = (
    r"(?:" + _KO_DATE
    + r"|" + _MONTH + r"\s" + _DAY + r",?\s" + _YEAR
    + r"|" + _DAY + r"(?:\s(?:of\s)?|-)" + _MONTH + r"[\s,-]\s?" + _YEAR
    + r"|" + _YEAR + r"\d{4}|\d{6})"
)  # fmt: skip
_DOB = re.compile(
    r"(?i)(?P<key>생년월일|출생\s?일자?|출생|생일|태어난\s?날짜?|D\.?O\.?B\.?|date[\s-]+of[\s-]+birth"
    r"|birth\s?date|birthday|\bborn(?:\s+on)?)"
    r"(?P<sep>\s*(?:\([^()]{1,10}\))?(?:/[가-힣A-Za-z]{1,4})?\s*(?:[:=-]|은|는|이|is|was|as)?\s*)"
    r"(?P<value>" + _DATE + r")(?!\d)"
)
# Korean also puts the birth word after the date: `1962년 3월 14일생`, `2021년 4월 1일에 태어났다`.
# `생` must end the word there: `3월 15일 생검` is a biopsy date.
_DOB_BEFORE_BIRTH_WORD = re.compile(
    r"(?<![\d.])(?P<value>" + _KO_DATE + r")\s?(?:생(?![가-힣])|생(?=[이인의으])|에?\s?(?:출생|태어))"
)


_MRN_WORDS = ("번호", "아이디", "id", "no", "num", "nbr", "#", "mrn", "m.r.n", "empi", "csn")
_PHONE_WORDS = tuple("전화 연락처 휴대폰 핸드폰 팩스 tel phone fax call mobile cell pager".split())
_KEYWORD_RULES = (
    ("DOB", _DOB, ("생년", "출생", "생일", "태어", "dob", "d.o.b", "birth", "born")),
    ("DOB", _DOB_BEFORE_BIRTH_WORD, ("생", "태어")),
    ("PHONE", _PHONE_KEYWORD, _PHONE_WORDS),
    ("RRN", _SSN, ("ssn", "social")),
)
_DIGIT_OR_AT = re.compile(r"[\d@]")
_PHONE_GATE = re.compile(r"\d{3}(?:\s?[-./)]\s?|\s)\d{3}|\d{10}|\+\d|\b00\d")
_SIX_DIGITS = re.compile(r"\d{6}")
_PRIORITY = {"RRN": 0, "EMAIL": 1, "DOB": 2, "MRN": 3, "PHONE": 4}


class Finding(NamedTuple):
    kind: str
    start: int
    end: int
    text: str


def find_pii(text: str) -> list[Finding]:
    """Every identifier in `text`, left to right, without overlaps (keyword rules win ties)."""
    found: list[Finding] = []
    # Cheap gates first: most medical text has digits but no keyword, no `@` and no 6-digit run.
    # Substring tests on the lowered text cost a fraction of one regex alternation over it, and
    # the full patterns (lookbehinds at every position) are what costs time at a million records.
    lower = text.lower()
    if any(word in lower for word in _MRN_WORDS):
        found += _record_numbers(text)
    for kind, rx, words in _KEYWORD_RULES:
        if any(word in lower for word in words):
            found += [Finding(kind, *m.span("value"), m.group("value")) for m in rx.finditer(text)]
    gated = (
        ("EMAIL", _EMAIL, "@" in text),
        ("RRN", _RRN, _SIX_DIGITS.search(text)),
        ("PHONE", _PHONE, _PHONE_GATE.search(text)),
    )
    for kind, rx, gate in gated:
        if gate:
            found += [Finding(kind, m.start(), m.end(), m.group()) for m in rx.finditer(text)]
    if "+" in text or "00" in text:
        found += [
            Finding("PHONE", m.start(), m.end(), m.group())
            for m in _PHONE_INTL.finditer(text)
            if _digits(m.group()) >= 8
        ]
    # Overlaps: the most specific rule wins (an RRN is never re-read as a record number), then
    # the earlier and longer match.
    found.sort(key=lambda f: (_PRIORITY[f.kind], f.start, -(f.end - f.start)))
    kept: list[Finding] = []
    for f in found:
        if all(f.end <= k.start or f.start >= k.end for k in kept):
            kept.append(f)
    return sorted(kept, key=lambda f: f.start)


def _digits(s: str) -> int:
    return sum(c.isdigit() for c in s)


def _record_numbers(text: str) -> list[Finding]:
    """Record numbers with enough digits to identify someone, outside research/legal/contact contexts."""
    out = []
    for m in _MRN.finditer(text):
        value, key_start = m.group("value"), m.start("key")
        before = text[max(0, key_start - 30) : key_start]
        if (
            _digits(value) < _MRN_MIN_DIGITS
            or not (m.group("abbr") or _QUALIFIED_BEFORE.search(before))
            or _REGISTRY_ID.match(value)
            or _NOT_PATIENT_CONTEXT.search(before[-14:] + m.group("key") + m.group("sep"))
            or (value[0] == "0" and _PHONE.fullmatch(value))  # `대표번호 02-2072-2114` is a phone
        ):
            continue
        out.append(Finding("MRN", *m.span("value"), value))
    return out


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
    """Scrub every free-text field of a training record in place; each span is counted once.

    Instruction records carry their prompt in `question` too (validate.build_record): that is one
    text, so `question` takes the scrubbed prompt instead of being scrubbed and counted again.
    """
    total: Counter[str] = Counter()

    def clean(value: str) -> str:
        text, counts = scrub_text(value)
        total.update(counts)
        return text

    mirrored = record.get("prompt") is not None and record["question"] == record["prompt"]
    for key in TEXT_FIELDS:
        value = record.get(key)
        if key == "question" and mirrored:
            continue
        if isinstance(value, str) and value:
            record[key] = clean(value)  # type: ignore[literal-required]
        elif isinstance(value, list):  # a PubMedQA-style context given as its list of passages
            record[key] = [clean(v) if isinstance(v, str) else v for v in value]  # type: ignore[literal-required]
    if mirrored:
        record["question"] = record["prompt"]  # type: ignore[typeddict-item]
    record["options"] = [clean(option) for option in record["options"]]
    answer = record.get("answer")
    if isinstance(answer, str) and len(answer) > 1:  # free text, not a canonical letter
        record["answer"] = clean(answer)
    return total
