"""Answer graders: the ONE definition of "is this response right", shared by evaluation and RL rewards.

    from megatron_bluelm.eval.graders import grade, extract_answer
    grade("math", "<think>...</think> so \\boxed{\\frac12}", "0.5")          # True
    grade("choice", "The answer is (B).", "B")                               # True
    extract_answer("math", "... Time is up; the answer:\\n42")               # "42"

Kinds (``KINDS``):

* ``math``   the last ``\\boxed{}`` / ``\\fbox{}`` of the answer part, else the text after "answer is"
             / "answer:", else the answer's last line (then its last number, as GSM8K graders do;
             ``require_boxed=True`` turns both fallbacks off). Compared by value with sympy: fractions
             (``\\frac12``, ``1/2``, ``0.5``), roots (``\\sqrt3``), powers (``10^{3}``), ``x=3`` vs ``3``,
             units / currency / degrees (``5 cm``, ``\\$5``, ``90^\\circ``), percentages (``50\\%`` =
             ``50`` = ``0.5``), thousands separators (``1,000``), sets, lists and ``\\pm`` in any order,
             intervals and tuples in order, unions of intervals in any order. Malformed or ambiguous
             spellings are *not* accepted: ``1_000`` is not 1000, ``{1}{2}`` is not 12.
* ``exact``  the answer part equals the reference after case folding, whitespace and end punctuation.
* ``choice`` a letter A-J: "answer is (B)", "\\boxed{B}", "B) ...", or the only standalone option
             letter in the answer; two different letters ("A or B") grade wrong.
* ``image_qa`` short free-form answers (VQA style): articles, punctuation and number words
             normalized; the answer must equal a reference, or contain one as whole words while
             being at most three words long and not hedging with "or".

``reference`` may be one string or a list of acceptable strings (any match counts). The *answer
part* of a response is the text after its ``</think>`` (a response with an unclosed ``<think>`` has
none and grades wrong), with the budget bridge that generation forces after a budget-closed think
block (``data/sft.DEFAULT_BRIDGE``) removed. Graders never raise on model output.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache
from typing import Optional, Union

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
KINDS = ("math", "exact", "choice", "image_qa")
Reference = Union[str, int, float, Sequence[str]]

__all__ = ["KINDS", "answer_part", "extract_answer", "grade", "last_boxed", "math_equal"]


# ----------------------------------------------------------------------------- the answer part

@lru_cache(maxsize=1)
def _bridge() -> str:
    from megatron_bluelm.data.sft import DEFAULT_BRIDGE

    return DEFAULT_BRIDGE.strip()


def answer_part(response: str) -> str:
    """The text after the think block, without the forced budget bridge; '' if thinking never closed."""
    if THINK_CLOSE in response:
        response = response.rsplit(THINK_CLOSE, 1)[1]
    elif THINK_OPEN in response:
        return ""
    response = response.strip()
    if response.startswith(_bridge()):
        response = response[len(_bridge()):]
    return response.strip()


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (nested braces allowed; ``\\boxed 5``
    takes one token); None if absent or unbalanced."""
    starts = [(m.start(), m.end()) for m in re.finditer(r"\\(?:boxed|fbox)\s*(\{|\s\S)", text)]
    if not starts:
        return None
    begin, end = starts[-1]
    if text[end - 1] != "{":
        return re.match(r"\S+", text[end - 1:]).group(0).rstrip(".,;$")
    depth = 1
    for j in range(end, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[end:j]
    return None


_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*[:\-]?\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def extract_answer(kind: str, response: str, require_boxed: bool = False) -> Optional[str]:
    """The final answer a response gives, as text (None when it gives none); see the module doc."""
    _check_kind(kind)
    part = answer_part(response)
    if kind == "choice":
        return _extract_choice(part)
    if kind != "math":
        return part or None
    boxed = last_boxed(part)
    if boxed is not None or require_boxed:
        return boxed
    said = _ANSWER_IS.findall(part)
    if said:
        return said[-1].strip().rstrip(".")
    lines = [ln.strip() for ln in part.splitlines() if ln.strip()]
    return lines[-1].rstrip(".") if lines else None


def grade(kind: str, response: str, reference: Reference, *, require_boxed: bool = False,
          choices: Optional[Sequence[str]] = None) -> bool:
    """True if ``response`` answers ``reference`` (or any of a list of references) correctly.
    ``choices`` (kind ``choice``): the option texts, so an answer that quotes exactly one option's
    text counts as that option's letter."""
    _check_kind(kind)
    refs = [reference] if isinstance(reference, (str, int, float)) else list(reference)
    refs = [str(r) for r in refs]
    try:
        if kind == "math":
            return _grade_math(response, refs, require_boxed)
        if kind == "choice":
            return _grade_choice(response, refs, choices)
        pred = answer_part(response)
        if kind == "exact":
            return any(_norm_exact(pred) == _norm_exact(r) for r in refs)
        return any(_vqa_match(pred, r) for r in refs)
    except Exception:  # never let a pathological response end an evaluation or an RL step
        return False


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"grader kind {kind!r} is not one of {KINDS}")


# ----------------------------------------------------------------------------- exact / image QA

def _norm_exact(s: str) -> str:
    return " ".join(s.casefold().split()).strip(" .!?;:'\"")


_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}


def _vqa_words(s: str) -> list[str]:
    words = re.sub(r"[^\w\s]", " ", s.casefold()).split()
    return [_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES]


def _vqa_match(pred: str, ref: str) -> bool:
    p, r = _vqa_words(pred), _vqa_words(ref)
    if not r:
        return False
    if p == r:
        return True
    if len(p) > 3 or "or" in p:
        return False
    return any(p[i:i + len(r)] == r for i in range(len(p) - len(r) + 1))


# ----------------------------------------------------------------------------- multiple choice

_LETTERS = "ABCDEFGHIJ"


def _extract_choice(part: str) -> Optional[str]:
    boxed = last_boxed(part)
    if boxed is not None:
        part = re.sub(r"\\text\{([^{}]*)\}", r"\1", boxed)
    said = re.findall(r"answer\s*(?:is|:)\s*[:\-]?\s*\(?([A-J])\b\)?", part, re.IGNORECASE)
    if said:
        return said[-1].upper()
    if re.search(r"(?<![\w'])\(?[A-J]\)?\s+or\s+\(?[A-J]\)?(?![\w'])", part):
        return None  # "A or B": two options, no answer
    lead = re.match(r"^\s*\(?([A-J])(?:[).:]|\s*$)", part)
    if lead:
        return lead.group(1)
    # the only standalone letter; "I" and "A" before a lower-case word are the pronoun and the article
    found = set(re.findall(r"(?<![\w'])\(?([A-J])\)?(?![\w'])(?!\s+[a-z])", part))
    found |= set(re.findall(r"(?<![\w'])\(?([B-HJ])\)?(?![\w'])", part))
    return found.pop() if len(found) == 1 else None


def _grade_choice(response: str, refs: list[str], choices: Optional[Sequence[str]]) -> bool:
    letters = {_LETTERS[int(r)] if r.isdigit() else r.strip().strip("()").upper() for r in refs}
    pred = _extract_choice(answer_part(response))
    if pred is None and choices:
        text = _norm_exact(answer_part(response))
        hits = [i for i, c in enumerate(choices) if _norm_exact(str(c)) == text]
        pred = _LETTERS[hits[0]] if len(hits) == 1 else None
    return pred is not None and pred in letters


# ----------------------------------------------------------------------------- math

def _grade_math(response: str, refs: list[str], require_boxed: bool) -> bool:
    pred = extract_answer("math", response, require_boxed=require_boxed)
    if pred is None:
        return False
    if any(math_equal(pred, r) for r in refs):
        return True
    if require_boxed or last_boxed(answer_part(response)) is not None:
        return False
    numbers = _NUMBER.findall(pred)
    return bool(numbers) and numbers[-1] != pred and any(math_equal(numbers[-1], r) for r in refs)


def math_equal(pred: str, ref: str) -> bool:
    """Value equality of two final answers (LaTeX or plain); see the module doc. Never raises."""
    try:
        a, b = _parse(str(pred)), _parse(str(ref))
        return a is not None and b is not None and _equal(a, b)
    except Exception:
        return False


# A parsed answer is one of:
#   ("scalar", sympy_expr_or_None, text, percent)   one value (text: normalized spelling, fallback)
#   ("set", (answers))                              unordered: {a, b}, "a, b", "a or b", a \pm b
#   ("seq", open, close, (answers))                 ordered: tuples and intervals (brackets kept)
#   ("union", (answers))                            unordered union of intervals / sets
# all immutable, so parses are cached (a reference is graded against every sample of its item)

_MAX_LEN = 300


@lru_cache(maxsize=8192)
def _parse(s: str):
    s = _clean(s)
    if not s or len(s) > _MAX_LEN:
        return None
    parts = _split_top(s, r"\\cup|∪")
    if len(parts) > 1:
        return ("union", tuple(_parse_group(p) for p in parts))
    return _parse_group(s)


def _parse_group(s: str):
    s = s.strip()
    if _wrapped(s) and s[0] == "{":
        items = _split_top(s[1:-1], ",")
        return _set([_parse_item(x) for x in items]) if len(items) > 1 else _parse_group(s[1:-1])
    if _wrapped(s) and s[0] in "([" and len(_split_top(s[1:-1], ",")) > 1:
        return ("seq", s[0], s[-1], tuple(_parse_item(x) for x in _split_top(s[1:-1], ",")))
    items = _split_top(s, r",|;|\s+or\s+|\s+and\s+")
    if len(items) > 1:
        return _set([_parse_item(x) for x in items])
    return _parse_item(s)


def _set(items: list):
    flat = []
    for it in items:
        flat.extend(it[1] if it[0] == "set" else [it])
    return flat[0] if len(flat) == 1 else ("set", tuple(flat))


def _parse_item(s: str):
    s = _strip_lhs(s.strip())
    if "\\pm" in s and s.count("\\pm") == 1:
        left, right = s.split("\\pm")
        return _set([_parse_item(f"{left}+{right}"), _parse_item(f"{left}-{right}")])
    if _wrapped(s) and s[0] == "{" and "," not in s:
        s = s[1:-1]
    return _scalar(s)


def _equal(a, b) -> bool:
    if a[0] == "set" or b[0] == "set" or a[0] == "union" or b[0] == "union":
        xs = a[1] if a[0] in ("set", "union") else [a]
        ys = b[1] if b[0] in ("set", "union") else [b]
        return _same_multiset(xs, ys)
    if a[0] == "seq" or b[0] == "seq":
        return (a[0] == b[0] and a[1:3] == b[1:3] and len(a[3]) == len(b[3])
                and all(_equal(x, y) for x, y in zip(a[3], b[3])))
    return _scalar_equal(a, b)


def _same_multiset(xs: list, ys: list) -> bool:
    if len(xs) != len(ys):
        return False
    left = list(ys)
    for x in xs:
        hit = next((i for i, y in enumerate(left) if _equal(x, y)), None)
        if hit is None:
            return False
        left.pop(hit)
    return True


# ------------------------------------------------------------------ text clean-up (LaTeX -> plain)

_DROP = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\displaystyle", "\\big", "\\Big", "$", "~")
_DEGREE = re.compile(r"\^\s*\{?\\circ\}?|°|\\degree")
_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf|operatorname)\s*\{([^{}]*)\}")


def _clean(s: str) -> str:
    s = s.strip()
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed
    s = s.replace("\\$", "").replace("\\{", "{").replace("\\}", "}").replace("{,}", ",")
    for token in _DROP:
        s = s.replace(token, "")
    s = _DEGREE.sub("", s)
    s = _WRAPPERS.sub(lambda m: " " + m.group(1) + " ", s)
    s = re.sub(r"\\(?:dfrac|tfrac)", r"\\frac", s)
    s = s.replace("\\infty", "oo").replace("\\le", "<=").replace("\\ge", ">=")
    s = re.sub(r"\s+", " ", s).strip()
    return s.rstrip(".").strip()


def _strip_lhs(s: str) -> str:
    """``x = 3`` -> ``3``: a single variable (or f(x)) on the left of the only '='."""
    m = re.fullmatch(r"\s*[A-Za-z](?:_\{?\w+\}?)?(?:\([A-Za-z]\))?\s*=\s*(.+)", s)
    return m.group(1) if m and "=" not in m.group(1) else s


def _wrapped(s: str) -> bool:
    """The first character opens a bracket that closes at the last character."""
    if len(s) < 2 or s[0] not in "([{" or s[-1] not in ")]}":
        return False
    depth = 0
    for i, ch in enumerate(s):
        depth += 1 if ch in "([{" else -1 if ch in ")]}" else 0
        if depth == 0 and i < len(s) - 1:
            return False
    return depth == 0


def _split_top(s: str, sep: str) -> list[str]:
    """Split at ``sep`` (a regex) outside brackets; a thousands separator (1,000) is not a comma."""
    pat = re.compile(sep)
    if pat.search(s) is None:  # no separator anywhere: the scan would split nowhere (most model output)
        return [s.strip()] if s.strip() else []
    return _split_scan(s, pat)


def _split_scan(s: str, pat: re.Pattern) -> list[str]:
    out, depth, last = [], 0, 0
    i = 0
    while i < len(s):
        ch = s[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0:
            m = pat.match(s, i)
            if m and m.end() > i and not _thousands_comma(s, i):
                out.append(s[last:i])
                last = i = m.end()
                continue
        i += 1
    out.append(s[last:])
    return [p.strip() for p in out if p.strip()]


_THOUSANDS = re.compile(r"(?:^|[^\d.,])(\d{1,3}(?:,\d{3})+(?:\.\d+)?)(?![\d,])")


def _thousands_comma(s: str, i: int) -> bool:
    if s[i] != ",":
        return False
    start = max(0, i - 40)
    return any(m.start(1) + start < i < m.end(1) + start for m in _THOUSANDS.finditer(s[start:]))


# ------------------------------------------------------------------ scalars: units, %, sympy

_UNITS = {"m", "g", "s", "h", "l", "L", "K", "V", "A", "W", "J", "N", "kg", "km", "cm", "mm"}


def _scalar(s: str):
    s = s.strip()
    percent = bool(re.search(r"\\?%\s*$", s))
    s = re.sub(r"\\?%\s*$", "", s).strip()
    s = _strip_units(s)
    s = re.sub(r"(?<!\d)(\d{1,3}(?:,\d{3})+)(?![\d,])", lambda m: m.group(1).replace(",", ""), s)
    text = s.replace(" ", "").casefold()
    return ("scalar", _to_sympy(s), text, percent)


def _strip_units(s: str) -> str:
    """``5 cm`` / ``12 apples`` / ``3.5 km/h`` -> the number: words after a plain number."""
    m = re.fullmatch(r"([-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?)\s*([A-Za-z][A-Za-z\s/^\d.]*)", s)
    if not m:
        return s
    unit = m.group(2).strip()
    first = re.match(r"[A-Za-z]+", unit).group(0)
    if first in _UNITS or (len(first) >= 2 and first not in _FUNCS and first != "pi" and first != "oo"):
        return m.group(1)
    return s


_FUNCS = {"sqrt", "root", "log", "ln", "sin", "cos", "tan", "exp"}
_ALLOWED = re.compile(r"[0-9A-Za-z+\-*/^().,\s<>=!]*")  # ',': root(x, n) only; lists are split before


def _latex_to_text(s: str) -> Optional[str]:
    """LaTeX commands -> sympy syntax; None for anything we do not understand (then: text compare)."""
    if "\\" not in s and "{" not in s and "}" not in s:  # plain text: the scan would copy every character
        return s
    return _latex_scan(s)


def _latex_scan(s: str) -> Optional[str]:
    out, i = [], 0
    while i < len(s):
        if s.startswith("\\frac", i):
            if out and out[-1][-1:].isdigit():  # 3\frac12: a mixed number or 3 * 1/2? neither is safe
                return None
            i += len("\\frac")
            num, i = _arg(s, i)
            den, i = _arg(s, i)
            if num is None or den is None:
                return None
            out.append(f"(({num})/({den}))")
        elif s.startswith("\\sqrt", i):
            i += len("\\sqrt")
            index = None
            if i < len(s) and s[i] == "[":
                close = s.find("]", i)
                if close < 0:
                    return None
                index, i = _latex_to_text(s[i + 1:close]), close + 1
            arg, i = _arg(s, i)
            if arg is None:
                return None
            out.append(f"root(({arg}),({index}))" if index else f"sqrt({arg})")
        elif s[i] == "\\":
            m = re.match(r"\\([A-Za-z]+)", s[i:])
            if not m:
                return None
            name = m.group(1)
            repl = {"cdot": "*", "times": "*", "div": "/", "pi": "pi", "ln": "log", "log": "log",
                    "sin": "sin", "cos": "cos", "tan": "tan", "exp": "exp"}.get(name)
            if repl is None:
                return None
            out.append(f" {repl} " if repl not in "*/" else repl)
            i += len(m.group(0))
        elif s[i] == "{":
            arg, j = _arg(s, i)
            if arg is None:
                return None
            if j < len(s) and s[j] == "{":  # "{1}{2}": a broken fraction, not 12 and not 1*2
                return None
            out.append(f"({arg})")
            i = j
        elif s[i] == "}":
            return None
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def _arg(s: str, i: int) -> tuple[Optional[str], int]:
    """One LaTeX argument at ``s[i:]``: ``{...}`` (nested) or one character (``\\frac12``)."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None, i
    if s[i] != "{":
        if s[i] in "}\\":
            return None, i
        return s[i], i + 1
    depth = 0
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            inner = _latex_to_text(s[i + 1:j])
            return inner, j + 1
    return None, i


def _to_sympy(s: str):
    text = _latex_to_text(s)
    if text is None or "_" in text or not _ALLOWED.fullmatch(text) or "=" in text or "<" in text or ">" in text:
        return None
    if "!" in text or re.search(r"\d\s+\d", text) or re.search(r"\.\d*\.", text):
        return None  # factorials could be huge; "1 000" or "1.2.3" are no numbers
    names = set(re.findall(r"[A-Za-z]+", text))
    if any(len(n) > 1 and n not in _FUNCS | {"pi", "oo"} for n in names):
        return None
    return _sympify(text)


_PLAIN_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?")


@lru_cache(maxsize=4096)
def _sympify(text: str):
    import sympy

    if _PLAIN_NUMBER.fullmatch(text):  # what parse_expr makes of it (rationalized), without its compile()
        return sympy.Rational(text)
    return _sympify_parsed(text)


def _sympify_parsed(text: str):
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_application,
        implicit_multiplication,
        parse_expr,
        rationalize,
        standard_transformations,
    )

    transforms = standard_transformations + (implicit_multiplication, implicit_application, convert_xor,
                                             rationalize)
    local = {n: sympy.Symbol(n) for n in "abcdefghijklmnopqrstuvwxyzABCDFGHJKLMNOPQRTUVWXYZ"}
    local.update(E=sympy.E, I=sympy.I, e=sympy.E, i=sympy.I, pi=sympy.pi, oo=sympy.oo, sqrt=sympy.sqrt,
                 root=sympy.root, log=sympy.log, sin=sympy.sin, cos=sympy.cos, tan=sympy.tan, exp=sympy.exp)
    try:
        expr = parse_expr(text, local_dict=local, global_dict={"__builtins__": {}, **_sympy_globals()},
                          transformations=transforms, evaluate=False)
    except Exception:
        return None
    if not isinstance(expr, sympy.Expr) or not _small_powers(expr):
        return None
    try:
        return sympy.sympify(expr)  # evaluate now that the exponents are known to be small
    except Exception:
        return None


@lru_cache(maxsize=1)
def _sympy_globals() -> dict:
    import sympy

    # what parse_expr's generated code calls (evaluate=False writes Add/Mul/Pow calls); no builtins
    names = ("Integer", "Float", "Rational", "Symbol", "Function", "Add", "Mul", "Pow", "UnevaluatedExpr")
    return {n: getattr(sympy, n) for n in names}


def _small_powers(expr) -> bool:
    """No exponent above 10^4 in absolute value (a response like 9^9^9 must not hang the grader)."""
    import sympy

    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Pow):
            e = node.exp
            if e.free_symbols:
                continue
            if not _small_powers(e) or not e.is_number:
                return False
            try:
                if abs(complex(sympy.N(e, 15))) > 1e4:
                    return False
            except (TypeError, ValueError):
                return False
    return True


def _scalar_equal(a, b) -> bool:
    _, x, xt, xp = a
    _, y, yt, yp = b
    if x is None or y is None:
        return x is None and y is None and xt == yt and xp == yp and xt != ""
    if _value_equal(x, y):
        return True
    if xp != yp:  # one side a percentage: 50% = 0.5
        return _value_equal(x / 100, y) if xp else _value_equal(x, y / 100)
    return False


def _value_equal(x, y) -> bool:
    import sympy

    if x == y:
        return True
    if isinstance(x, sympy.Rational) and isinstance(y, sympy.Rational) and _clearly_apart(x, y):
        return False  # what the numeric comparison concludes, in exact integer arithmetic (sympy's evalf is slow)
    return _value_equal_full(x, y)


def _clearly_apart(x, y) -> bool:
    """Two rationals more than twice ``_value_equal_full``'s tolerance apart (so float rounding there
    cannot matter), both small enough for its float conversions (no overflow)."""
    if max(x.p.bit_length(), x.q.bit_length(), y.p.bit_length(), y.q.bit_length()) > 900:
        return False
    d = abs(Fraction(int(x.p), int(x.q)) - Fraction(int(y.p), int(y.q)))
    return d > Fraction(2, 10**12) * max(1, abs(Fraction(int(y.p), int(y.q))))


def _value_equal_full(x, y) -> bool:
    import sympy

    if x == y:
        return True
    diff = x - y
    if not x.free_symbols and not y.free_symbols:
        if x.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan) or y.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan):
            return False
        try:
            d = complex(sympy.N(diff, 30))
            scale = max(1.0, abs(complex(sympy.N(y, 30))))
        except (TypeError, ValueError):
            return False
        return abs(d) <= 1e-12 * scale
    if _nonzero_somewhere(diff):
        return False  # not identically zero: what expand / simplify conclude, slowly (10-100 ms)
    return sympy.expand(diff) == 0 or sympy.simplify(diff) == 0


def _nonzero_somewhere(diff) -> bool:
    """A rational function of its symbols with a nonzero value at one fixed rational point (exact)."""
    import sympy

    names = sorted(diff.free_symbols, key=str)
    if not diff.is_rational_function(*names):
        return False
    value = diff.subs({n: sympy.Rational(sympy.prime(i + 2), 7 + i) for i, n in enumerate(names)})
    return bool(value.is_Rational) and value != 0
