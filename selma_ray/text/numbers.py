"""The counts a description states, in digits or in words, for skills with a count limit.

The counting skill asks the LLM for at most 3 of each object; ``stated_counts`` finds what a
candidate actually states so that the prompts stage can check it. It reads cardinals written
as digits ("4", "1,000") or words ("four", "twenty-one", "five hundred", "a dozen",
"half a dozen", "two dozen"), and vague plurals of large numbers ("dozens", "hundreds",
"thousands", "millions") as 24, 200, 2,000 and 2,000,000.

Numbers that do not count objects are skipped: numbers glued to letters ("3D", "4K",
"1950s", "10th"), decimals, times and sizes ("2.5", "2:30", "4x4"), hyphenated adjectives
("three-legged", "10-year-old"), a number followed by a unit of time, measure or share
("5 o'clock", "3 pm", "10 feet", "50%", "three times") or preceded by a currency sign or an
identifier word ("$5", "route 66", "room 12"), and bare years (1100 to 2099 in digits
without a separator). Ordinals ("third") and vague quantities ("several", "many", "a few")
are not numbers here.
"""

from __future__ import annotations

import re

_UNITS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen".split()
    )
}
_TENS = {
    w: 10 * i
    for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)
}
_SCALES = {"thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
_VAGUE = {"dozens": 24, "hundreds": 200, "thousands": 2_000, "millions": 2_000_000}
_GROUPS = {"couple": 2, "pair": 2, "trio": 3}  # after "a": "a pair of socks"
_WORDS = {*_UNITS, *_TENS, *_SCALES, "hundred", "dozen"}
# A number right before one of these measures something other than objects.
_NOT_OBJECTS = {
    "am",
    "pm",
    "o'clock",
    "percent",
    "%",
    "times",
    "degrees",
    "seconds",
    "second",
    "minutes",
    "minute",
    "hours",
    "hour",
    "days",
    "day",
    "weeks",
    "week",
    "months",
    "month",
    "years",
    "year",
    "inches",
    "inch",
    "feet",
    "foot",
    "ft",
    "yards",
    "miles",
    "mile",
    "mph",
    "km",
    "kilometers",
    "meters",
    "metres",
    "meter",
    "cm",
    "mm",
    "kg",
    "pounds",
    "lbs",
    "ounces",
    "liters",
    "litres",
}
# ... or right after one of these: money and identifiers ("route 66", "room 12").
_IDENTIFIERS = {
    "$",
    "£",
    "€",
    "#",
    "number",
    "no",
    "route",
    "room",
    "gate",
    "platform",
    "page",
    "chapter",
    "channel",
    "level",
    "size",
    "age",
    "aged",
    "version",
}
_TOKEN = re.compile(r"\d+(?:[:x]\d+)+|\d+(?:,\d{3})*(?:\.\d+)?[a-z]*|[a-z]+(?:'[a-z]+)?|[-$£€%#]")
_PLAIN_INT = re.compile(r"\d+(?:,\d{3})*")


def _accepts(last: str | None, word: str) -> bool:
    """Whether ``word`` may continue a number word phrase whose last part was ``last``."""
    if word in _UNITS and _UNITS[word] < 10:
        return last in (None, "tens", "hundred", "scale", "and")
    if word in _UNITS or word in _TENS:  # ten..nineteen, twenty..ninety
        return last in (None, "hundred", "scale", "and")
    if word in ("hundred", "dozen"):
        return last in ("unit", "teen", "tens")
    if word in _SCALES:
        return last in ("unit", "teen", "tens", "hundred", "dozen")
    return False


def _words_at(tokens: list[str], i: int, current: int = 0, last: str | None = None):
    """(value, end) of the number word phrase starting at ``tokens[i]``, or (None, i)."""
    total, j, n = 0, i, len(tokens)
    while j < n:
        word = tokens[j]
        if word == "-" and j + 1 < n and last is not None and _accepts(last, tokens[j + 1]):
            j += 1  # twenty-one, five-hundred
            continue
        if word == "and" and last in ("hundred", "scale") and j + 1 < n:
            if _accepts("and", tokens[j + 1]):
                last, j = "and", j + 1
                continue
            break
        if not _accepts(last, word):
            break
        if word in _UNITS:
            current += _UNITS[word]
            last = "unit" if _UNITS[word] < 10 else "teen"
        elif word in _TENS:
            current += _TENS[word]
            last = "tens"
        elif word == "hundred":
            current, last = current * 100, "hundred"
        elif word == "dozen":
            current, last = current * 12, "dozen"
        else:
            total, current, last = total + current * _SCALES[word], 0, "scale"
        j += 1
    if last is None:
        return None, i
    return total + current, j


def _number_at(tokens: list[str], i: int) -> tuple[int | None, int]:
    """(value, end) of the number starting at ``tokens[i]``; value None where none starts,
    or where the digits are no count (glued to letters, a decimal)."""
    tok, nxt = tokens[i], tokens[i + 1] if i + 1 < len(tokens) else ""
    if tok[0].isdigit():
        if not _PLAIN_INT.fullmatch(tok):
            return None, i + 1  # 3d, 4k, 1950s, 10th, 2.5, 2:30, 4x4
        value = int(tok.replace(",", ""))
        if 1100 <= value <= 2099 and "," not in tok and nxt not in _WORDS:
            return None, i + 1  # a year
        if nxt in ("hundred", "dozen") or nxt in _SCALES:  # 5 hundred, 2 dozen, 3 million
            return _words_at(tokens, i + 1, value, "unit")
        return value, i + 1
    if tok in ("a", "an"):
        if nxt in _GROUPS:
            return _GROUPS[nxt], i + 2
        if nxt in ("hundred", "dozen") or nxt in _SCALES:  # a dozen, a hundred and five
            return _words_at(tokens, i + 1, 1, "unit")
    if tok in ("hundred", "dozen") or tok in _SCALES:  # "dozen roses", no article
        return _words_at(tokens, i, 1, "unit")
    if tok == "half" and tokens[i + 1 : i + 3] == ["a", "dozen"]:
        return 6, i + 3
    if tok in _VAGUE:
        return _VAGUE[tok], i + 1
    return _words_at(tokens, i)


def stated_counts(text: str) -> list[int]:
    """Every count ``text`` states, in order (see the module docstring for what counts)."""
    tokens = _TOKEN.findall(text.lower().replace("\u2019", "'"))
    counts, i = [], 0
    while i < len(tokens):
        value, end = _number_at(tokens, i)
        if value is None:
            i = max(end, i + 1)
            continue
        before = tokens[i - 1] if i else ""
        after = tokens[end] if end < len(tokens) else ""
        adjective = (
            after == "-"
            and end + 1 < len(tokens)
            and tokens[end + 1][0].isalpha()
            and tokens[end + 1] not in _WORDS
        )
        if not adjective and after not in _NOT_OBJECTS and before not in _IDENTIFIERS:
            counts.append(value)
        i = end
    return counts


def exceeds_count(text: str, limit: int) -> bool:
    """Whether ``text`` states any count above ``limit``."""
    return any(c > limit for c in stated_counts(text))
