"""Answer extraction and symbolic grading for math benchmarks (MATH-500, AIME).

``grade(response, gold)`` extracts the model's final answer -- the content of
the LAST complete ``\\boxed{...}`` (or ``\\fbox{...}``) in the response, or,
when there is none, the last "final answer" line ("The final answer is ...",
"The answer is ...", "Answer: ...") or else the last non-empty line -- and
compares it with the gold answer using math-verify
(https://github.com/huggingface/Math-Verify): both sides are parsed to SymPy
and compared numerically/symbolically, so ``0.5``, ``\\frac12``, ``\\dfrac{1}{2}``
and ``1/2`` all match; sets compare in any order; tuples and intervals compare
element-wise; ``10\\%`` matches ``10``/``0.1``; units text (``5 \\text{ cm}``) and
degree marks (``90^\\circ``) are dropped; a multiple-choice gold such as
``\\text{(C)}`` matches the bare letter (and only that letter).

Robustness:

* ``grade`` never raises on garbage input; it returns ``False``.
* math-verify guards parsing and comparison with ``signal.alarm`` timeouts,
  which only work in the main thread of the main interpreter. ``grade`` uses
  them (``timeout_s``, default 5 s per step) when called from the main thread
  with no ``ITIMER_REAL`` of the caller's pending (which math-verify would
  cancel), and disables them otherwise (thread pools for RL rewards), where
  it instead relies on size caps: answers longer than ``MAX_ANSWER_CHARS`` and
  expressions with huge literal exponents (power towers) grade ``False``
  without calling SymPy. For hard wall-clock guarantees across threads, call
  ``grade`` in worker processes.
"""

from __future__ import annotations

import logging
import re
import signal
import threading

__all__ = ["MAX_ANSWER_CHARS", "extract_answer", "grade", "parse_answer"]

#: Extracted answers (and golds) longer than this grade False without parsing.
MAX_ANSWER_CHARS = 1000
#: Responses longer than this are cut to their last MAX_RESPONSE_CHARS chars.
MAX_RESPONSE_CHARS = 200_000

# math-verify logs a warning for every timeout and a one-off warning when the
# alarm timeout is disabled; keep our callers' logs clean.
logging.getLogger("math_verify").setLevel(logging.ERROR)

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*")
_FINAL_RE = re.compile(
    r"(?:final\s+answer|the\s+answer|answer)\s*[*_]*\s*(?:is|:|=)\s*[*_]*\s*:?\s*[*_]*\s*(?P<ans>.+)",
    re.IGNORECASE,
)
_UNICODE = {
    "\u2212": "-",  # minus sign
    "\u2013": "-",
    "\u00b0": "^\\circ",
    "\u03c0": "\\pi ",
    "\u221e": "\\infty ",
    "\u221a": "\\sqrt",
    "\u00d7": "\\times ",
    "\u22c5": "\\cdot ",
    "\u00b7": "\\cdot ",
    "\u2264": "\\le ",
    "\u2265": "\\ge ",
    "\u222a": "\\cup ",
    "\u00bd": "\\frac{1}{2}",
    "\u00bc": "\\frac{1}{4}",
    "\u00be": "\\frac{3}{4}",
    "\u00a0": " ",
}
# A literal exponent with many digits or a tower of three or more powers can
# make SymPy compute astronomically large integers (no timeout in threads).
_HUGE_POWER_RE = re.compile(
    r"(?:\^|\*\*)\s*\{?\s*\(?\s*[-+]?\d{6,}"  # 2^{1234567}
    r"|\d\s*\^\s*\{\s*\d+\s*\^"  # 9^{9^{9}}
    r"|\*\*\s*\(?\s*\d+\s*\)?\s*\*\*"  # 9**9**9
    r"|\d{5,}\s*!"  # 123456!
)


# --------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------


def _balanced_group(text: str, start: int) -> tuple[str, int] | None:
    """``text[start]`` is ``{``: return (content, index after the closing brace).

    Escaped braces (``\\{``, ``\\}``) do not count. None when unbalanced.
    """
    depth = 0
    i = start
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    return None


def _boxed_contents(text: str) -> list[str]:
    """Contents of every complete ``\\boxed{...}`` / ``\\fbox{...}`` in order."""
    out = []
    for m in _BOXED_RE.finditer(text):
        j = m.end()
        if j < len(text) and text[j] == "{":
            got = _balanced_group(text, j)
            if got is not None:
                out.append(got[0])
        elif m.group(0).endswith((" ", "\t")) or (j < len(text) and text[j] not in "\\}"):
            # ``\boxed 5`` form: the next whitespace/$-delimited token
            tok = re.match(r"[^\s$]+", text[j:])
            if tok:
                out.append(tok.group(0))
    return out


def _strip_math_delims(s: str) -> str:
    s = s.strip()
    for _ in range(3):
        before = s
        s = s.strip().rstrip(".;,").strip().strip("*").strip()  # markdown bold
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if s.startswith(left) and s.endswith(right) and len(s) > len(left) + len(right):
                s = s[len(left) : len(s) - len(right)]
        if s == before:
            break
    return s.strip()


def _final_answer_text(text: str) -> str | None:
    matches = list(_FINAL_RE.finditer(text))
    if matches:
        ans = _strip_math_delims(matches[-1].group("ans"))
        if ans:
            return ans
    for line in reversed(text.splitlines()):
        line = _strip_math_delims(line)
        if line:
            return line
    return None


def extract_answer(response: str) -> str | None:
    """The final answer in a model response, as a string, or None.

    The LAST complete ``\\boxed{...}`` wins (nested braces are fine); without
    one, the last "final answer is / the answer is / Answer:" line, else the
    last non-empty line, with surrounding ``$``/``\\(\\)``/``\\[\\]``, bold
    markers and trailing punctuation stripped.
    """
    if not isinstance(response, str):
        return None
    text = response[-MAX_RESPONSE_CHARS:]
    if not text.strip():
        return None
    boxed = _boxed_contents(text)
    if boxed:
        ans = _strip_math_delims(boxed[-1])
        return ans or None
    return _final_answer_text(text)


# --------------------------------------------------------------------------
# normalisation & comparison
# --------------------------------------------------------------------------


def _normalise(ans: str) -> str:
    s = ans
    for k, v in _UNICODE.items():
        s = s.replace(k, v)
    # ``\text{(C)}``, ``(C)``, ``\textbf{C}`` -> ``C`` (multiple-choice letters)
    m = re.fullmatch(r"\s*(?:\\text(?:bf)?\s*\{\s*)?\(?\s*([A-E])\s*\)?\s*\}?\s*", s)
    if m:
        return m.group(1)
    # thousands separators written with thin spaces: ``10,\!080``, ``10{,}080``
    s = re.sub(r"(\d)\s*(?:\{,\}|,\\!|,\\,)\s*(?=\d{3})", r"\1,", s)
    # scientific notation ``6.72e-5`` -> ``6.72\times 10^{-5}``
    s = re.sub(r"(?<![\w.])(\d+(?:\.\d*)?|\.\d+)[eE]([-+]?\d+)(?![\w.])", r"\1\\times 10^{\2}", s)
    # ``\%`` and a bare ``%`` are both percent
    s = re.sub(r"(?<!\\)%", r"\\%", s)
    # degrees written as ``^{\circ}``, ``^\circ``, ``\circ`` or ``\degree``
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\degree|\\circ", "", s)
    s = re.sub(r"\\text\{\s*degrees?\s*\}|\bdegrees?\b", "", s)
    # \left( ... \right) sizing does not matter
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)\b\s*", "", s)
    return s.strip()


def _base(ans: str) -> int | None:
    m = re.fullmatch(r"[0-9A-Za-z]+\s*_\s*\{?\s*(\d+)\s*\}?", ans)
    return int(m.group(1)) if m else None


def _letter(ans: str) -> str | None:
    m = re.fullmatch(r"[A-E]", ans)
    return m.group(0) if m else None


def _parse(ans: str, timeout: int | None):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    cfg = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
    return parse(
        "\\boxed{" + ans + "}",
        extraction_config=cfg,
        parsing_timeout=timeout,
    )


def _variants(ans: str) -> list[str]:
    """``x\\%`` may be meant as ``x`` or as ``x/100``: try both."""
    m = re.fullmatch(r"(.*?)\s*\\%", ans, flags=re.S)
    if not m or not m.group(1).strip():
        return [ans]
    x = m.group(1).strip()
    return [x, "\\frac{" + x + "}{100}"]


def _alarm_timeout(timeout_s) -> int | None:
    """math-verify's per-step timeout: whole seconds via SIGALRM, so only in
    the main thread, and only when the caller has no ITIMER_REAL of its own
    pending (math-verify would cancel it, e.g. pytest-timeout's)."""
    if not timeout_s or threading.current_thread() is not threading.main_thread():
        return None
    try:
        if signal.getitimer(signal.ITIMER_REAL)[0] > 0:
            return None
    except (AttributeError, OSError, ValueError):
        return None
    return max(1, int(-(-float(timeout_s) // 1)))


def _too_big(ans: str) -> bool:
    return len(ans) > MAX_ANSWER_CHARS or bool(_HUGE_POWER_RE.search(ans))


def grade(response: str, gold: str, *, timeout_s: int = 5) -> bool:
    """True when the final answer in ``response`` equals ``gold``.

    ``gold`` is a LaTeX string (MATH-500: ``\\frac{14}{3}``,
    ``(3, \\frac{\\pi}{2})``, ``\\text{(C)}``, ``10\\%``) or an integer / its string
    (AIME). ``timeout_s`` bounds each parsing/comparison step in the main
    thread (math-verify's SIGALRM timeout); in other threads it is not
    enforceable and size caps apply instead. Never raises on bad input.
    """
    try:
        if isinstance(gold, (int, float)) and not isinstance(gold, bool):
            gold = str(gold)
        if not isinstance(gold, str) or not isinstance(response, str):
            return False
        ans = extract_answer(response)
        if ans is None:
            return False
        gold_n = _normalise(_strip_math_delims(gold))
        ans_n = _normalise(ans)
        if not gold_n or not ans_n:
            return False
        # multiple choice: compare the letters literally
        gl, al = _letter(gold_n), _letter(ans_n)
        if gl is not None or al is not None:
            return gl is not None and gl == al
        # a number in a base, ``52_8``: math-verify drops the subscript
        gb, ab = _base(gold_n), _base(ans_n)
        if gb is not None and ab is not None and gb != ab:
            return False
        if _too_big(gold_n) or _too_big(ans_n):
            return False
        timeout = _alarm_timeout(timeout_s)
        from math_verify import verify

        gold_p = [x for v in _variants(gold_n) for x in _parse(v, timeout)]
        pred_p = [x for v in _variants(ans_n) for x in _parse(v, timeout)]
        if not gold_p or not pred_p:
            return False
        return bool(verify(gold_p, pred_p, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 - garbage in, False out
        return False
    except BaseException as e:  # math-verify's TimeoutException is a BaseException
        if type(e).__name__ == "TimeoutException":
            return False
        raise


def parse_answer(answer: str, *, timeout_s: int = 5) -> list:
    """math-verify's parse of one (already extracted) answer string, after the
    same normalisation ``grade`` applies: a list of SymPy objects and/or
    fallback strings, empty when nothing could be extracted. Never raises."""
    try:
        if not isinstance(answer, str):
            answer = str(answer)
        s = _normalise(_strip_math_delims(answer))
        if not s or _too_big(s):
            return []
        return [x for v in _variants(s) for x in _parse(v, _alarm_timeout(timeout_s))]
    except Exception:  # noqa: BLE001
        return []
