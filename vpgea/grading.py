"""Final-answer extraction and equivalence checking (math-verify for LaTeX, numbers compared numerically)."""

from __future__ import annotations

import re
import threading
from fractions import Fraction

__all__ = ["extract_answer", "is_correct"]

_BOX_MARKERS = ("\\boxed{", "\\fbox{")
_FALLBACKS = (
    re.compile(r"####\s*([^\n]+)"),
    re.compile(r"answer is\s*:?\s*\$?([^\n$]+?)\$?\s*\.?\s*$", re.I | re.M),
)
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)(/\d+)?$")
# math-verify's timeouts use signal.alarm, which only works on the main thread: elsewhere pass None (no timeout).
_TIMEOUT_S = 5


def _last_braced(text: str) -> str | None:
    best = -1
    marker = ""
    for m in _BOX_MARKERS:
        i = text.rfind(m)
        if i > best:
            best, marker = i, m
    if best < 0:
        return None
    start = best + len(marker)
    depth = 1
    for k in range(start, len(text)):
        c = text[k]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:k].strip()
    return None  # unbalanced (e.g. truncated at the length limit)


def extract_answer(text: str) -> str | None:
    """The final answer in a response: the last ``\\boxed{...}`` (or ``\\fbox``) with balanced braces, else a
    ``#### x`` line or "the answer is x"; None when there is none."""
    boxed = _last_braced(text)
    if boxed is not None:
        return boxed
    for pat in _FALLBACKS:
        found = pat.findall(text)
        if found:
            ans = found[-1].strip().rstrip(".")
            return ans or None
    return None


def _as_number(s: str) -> Fraction | None:
    t = s.strip().strip("$").replace(",", "").replace("\\!", "").replace(" ", "")
    t = re.sub(r"^\\text\{(.*)\}$", r"\1", t)
    t = t.rstrip("%") if t.endswith("%") else t
    m = re.fullmatch(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}", t)
    if m:
        return Fraction(int(m.group(1)), int(m.group(2))) if int(m.group(2)) else None
    if _NUMBER.match(t):
        try:
            return Fraction(t)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def is_correct(pred: str | None, gold: str) -> bool:
    """Whether ``pred`` (an extracted answer) equals the reference ``gold``.

    Plain numbers (``1,000``, ``27.0``, ``0.5``, ``\\frac{1}{2}``) compare numerically; everything else goes through
    math-verify (LaTeX expressions, intervals, tuples, sets). A checker error or timeout counts as incorrect.
    """
    if pred is None or not str(pred).strip():
        return False
    a, b = _as_number(str(pred)), _as_number(str(gold))
    if a is not None and b is not None:
        return a == b
    try:
        from math_verify import parse, verify
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise RuntimeError("grading needs math-verify: pip install math-verify") from e
    main = threading.current_thread() is threading.main_thread()
    timeout = _TIMEOUT_S if main else None
    try:
        g = parse(f"${gold}$", parsing_timeout=timeout)
        p = parse(f"${pred}$", parsing_timeout=timeout)
        if not g or not p:
            return str(pred).strip() == str(gold).strip()
        return bool(verify(g, p, timeout_seconds=timeout))
    except Exception:
        return False
