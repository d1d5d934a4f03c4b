"""Every number in README.md, RESULTS.md and bench/RESULTS.md cites the committed file it comes from.

Convention (also stated at the top of RESULTS.md)
-------------------------------------------------
* A *block* is a paragraph, one list item (with its wrapped continuation lines) or one table row.
* Every block that contains a number must cite at least one committed file: a Markdown link, or an inline
  code span that is nothing but the path (a path inside a command is not a citation), to a ``.json``, ``.md``, ``.csv`` or ``.yaml`` file under ``results/``, ``bench/`` or ``configs/``
  (the three documents themselves do not count). ``results/report.{md,json}`` cites both files.
  Backticked paths are relative to the repository root; link targets are relative to the document, as in
  Markdown.
* Inherited citations, so that tables and nested lists stay readable: a table row also uses the citations of
  its table's header row and of the block directly above the table (its caption); a nested list item also
  uses those of its parent items.
* Every cited file must exist.
* Every number quoted in a block must occur in the block's cited files. JSON: every numeric leaf (lists
  included, booleans excluded). Markdown, CSV, YAML: every number written in the text. A quoted number ``q``
  shown with ``d`` decimals matches a value ``v`` when ``|q - s*v| <= 0.5 * 10**-d``, for a scale ``s`` of 1
  or 100 (fractions quoted as percentages or points), or the scale its unit implies: ``k`` 1e-3, ``M`` and
  ``MB`` 1e-6, ``B`` (billions, written ``3B``) and ``GB`` 1e-9, ``ms`` 1e3 (seconds quoted as
  milliseconds), ``min`` 1/60 (seconds quoted as minutes). The sign counts.
* Arithmetic: an inline code span that is an equation of numbers (``3 x 256 + 48 = 816``; words such as units
  are ignored, ``x``/``×`` multiply) must evaluate to its right-hand side at the shown precision. Its operands
  are worked-example inputs and need no citation; that is the only way to show a calculation.

Exclusions (narrow, and the only ones)
--------------------------------------
* Fenced code blocks, indented code blocks (four spaces after a blank line, outside lists), HTML comments,
  headings, link targets and the cited paths themselves.
* Inline code spans (commands, config keys, arguments), except a span that holds only a number with an
  optional unit (``39.0 %``), which is checked like prose, and arithmetic spans, which are evaluated.
* Identifiers: a number glued to a preceding letter or ``_`` (``S7``, ``pi0``, ``H100``, ``fp32``,
  ``PickCube-v1``, ``ZeRO-2``), or followed by letters that are not one of the units above (``3D``).
* Dates ``YYYY-MM-DD``; version strings ``a.b.c``; a number right after ``Python``, ``numpy``, ``mplib``,
  ``Vulkan``, ``torch``, ``Debian``, ``Gemma``, ``arXiv`` (versions, model names, paper ids); ZeRO stage
  numbers (``ZeRO 2``, ``stage 0–3``, ``stages 1-3``); exit codes (``exits with status 2``); issue
  references (``issue 6``); the marker of an ordered list item (``1.``).

Known looseness: a changed number still passes if the new value happens to occur in a cited file (small
integers in particular). The negative tests below show that an uncited number, a missing file, a changed
number, a wrong sum and a number hidden in a bare code span are each reported.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "RESULTS.md", "bench/RESULTS.md")
CITABLE_DIRS = ("results/", "bench/", "configs/")
CITABLE_EXTS = (".json", ".md", ".csv", ".yaml", ".yml")

# A number: optional sign (ASCII hyphen or U+2212 minus), integer part with optional thousands commas,
# optional decimals, optional exponent. The look-behind keeps `pi0`, `x.5` and `12.3.4` pieces out.
NUM_RE = re.compile(r"(?<![\w.])([+\-\u2212]?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?([eE][+\-]?\d+)?")
UNIT_RE = re.compile(r"\s?(GiB|MiB|GB|MB|ms|min|k|M|B|x|s|%)(?![A-Za-z])")
UNIT_SCALES = {"k": (1e-3,), "M": (1e-6,), "MB": (1e-6,), "B": (1e-9,), "GB": (1e-9,), "ms": (1e3,),
               "min": (1 / 60,)}
UNITS_GLUED = {"GiB", "MiB", "GB", "MB", "ms", "min", "k", "M", "B", "x", "s"}
EXCLUDE_RES = [
    re.compile(r"\b\d{4}-\d{2}-\d{2}\b"),                                # dates
    re.compile(r"(?<![\w.])\d+\.\d+\.\d+(?:\.\d+)*"),                    # version strings
    re.compile(r"\b(?:Python|numpy|mplib|Vulkan|torch|Debian|Gemma|arXiv)\s*(?:≥|>=|<=|==|<|>)?\s*\d[\d.]*"),
    re.compile(r"\bZeRO[\s-]?\d\b"),
    re.compile(r"\bstages?\s+\d(?:\s*[-–]\s*\d)?\b"),
    re.compile(r"\bexits?\s+(?:with\s+)?status\s+\d+"),             # process exit codes
    re.compile(r"\bissues?\s+#?\d+"),                                  # issue references
]
CODE_SPAN_RE = re.compile(r"(`+)(.+?)\1")
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")
COMMENT_RE = re.compile(r"<!--.*?-->")
LIST_RE = re.compile(r"^(\s*)(?:[-*+]|\d+\.)\s+")
PATHISH_RE = re.compile(r"(?:results|bench|configs)/[\w./{},\-]+")


def _expand_braces(path: str) -> list[str]:
    """`a/b.{md,json}` -> [`a/b.md`, `a/b.json`] (one brace group is all the docs use)."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(",") for p in _expand_braces(path[: m.start()] + alt + path[m.end():])]


def _parse_number(sign: str, integer: str, frac: str | None, exp: str | None) -> tuple[float, float]:
    """(value, half a unit in the last shown place)."""
    text = integer.replace(",", "") + (frac or "")
    value = float(text + (exp or ""))
    if sign in ("-", "\u2212"):
        value = -value
    decimals = len(frac) - 1 if frac else 0
    exponent = int(exp[1:]) if exp else 0
    return value, 0.5 * 10.0 ** (exponent - decimals)


def numbers_in_text(text: str) -> list[float]:
    """Every number written in a cited Markdown/CSV/YAML file (no exclusions: more values only helps)."""
    out = []
    for m in NUM_RE.finditer(text):
        out.append(_parse_number(*m.groups())[0])
    return out


def _flatten_json(obj) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)]
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in _flatten_json(x)]
    if isinstance(obj, list):
        return [v for x in obj for v in _flatten_json(x)]
    return []


def values_of(path: Path) -> list[float]:
    if path.suffix == ".json":
        return _flatten_json(json.loads(path.read_text()))
    return numbers_in_text(path.read_text())


ARITH_TOKEN_RE = re.compile(
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][+\-]?\d+)?)"
    r"|(?P<op>[+\-\u2212*/×()])|(?P<word>[A-Za-z_][\w.]*)|(?P<space>\s+)|(?P<other>.)"
)


def _eval_arithmetic(span: str) -> tuple[bool, str] | None:
    """Check an inline-code equation; None if the span is not one (commands, keys, formulas with symbols)."""
    if "=" not in span or "==" in span:
        return None
    parts = span.split("=")
    lhs, rhs = parts[-2], parts[-1]
    expr, n_nums = [], 0
    for m in ARITH_TOKEN_RE.finditer(lhs):
        kind = m.lastgroup
        if kind == "num":
            expr.append(m.group(0).replace(",", ""))
            n_nums += 1
        elif kind == "op":
            expr.append({"\u2212": "-", "×": "*"}.get(m.group(0), m.group(0)))
        elif kind == "word":
            if m.group(0) == "x":
                expr.append("*")  # `3 x 256`: multiplication, as the docs write it
            # other words (units such as B, calls) are dropped
        elif kind == "other":
            return None  # symbols (β, ⟨, ...): a formula, not arithmetic
    rhs_nums = [m for m in ARITH_TOKEN_RE.finditer(rhs) if m.lastgroup == "num"]
    if n_nums < 2 or len(rhs_nums) != 1 or any(m.lastgroup in ("op", "other") for m in ARITH_TOKEN_RE.finditer(rhs)):
        return None
    try:
        got = eval(" ".join(expr), {"__builtins__": {}}, {})  # only numbers and operators reach here
    except (SyntaxError, ZeroDivisionError):
        return None  # not a well-formed equation: treated as code, like any other span
    want, tol = _parse_number(*NUM_RE.fullmatch(rhs_nums[0].group(0)).groups())
    ok = abs(got - want) <= tol * (1 + 1e-9)
    return ok, f"arithmetic `{span}`: left side is {got:g}, not {rhs_nums[0].group(0)}"


def _split_blocks(lines: list[str]) -> list[dict]:
    """Markdown -> blocks (paragraphs, list items, table rows) with line numbers; code and headings dropped.

    A list item keeps a link to its parent item and a table row to its table (header row and caption block),
    for the inherited citations of the convention.
    """
    blocks: list[dict] = []
    cur: dict | None = None      # the paragraph or item that a wrapped line continues
    last: dict | None = None     # the last block since the last heading: a table's caption candidate
    items: list[dict] = []       # open list items, outermost first
    table: dict | None = None
    in_fence = in_indented_code = False
    prev_blank = True
    for i, raw in enumerate(lines, 1):
        line = raw.rstrip("\n")
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            in_fence = not in_fence
            cur = table = None
            prev_blank = False
            continue
        if in_fence:
            continue
        if not stripped:
            cur = table = None
            prev_blank = True
            continue
        indent = len(line) - len(line.lstrip(" "))
        if indent >= 4 and (in_indented_code or (prev_blank and not items and not LIST_RE.match(line))):
            in_indented_code, prev_blank, cur = True, False, None
            continue  # an indented code block (outside lists)
        in_indented_code = False
        was_blank, prev_blank = prev_blank, False
        if stripped.startswith("#"):
            cur = table = last = None
            items = []
            continue
        if stripped.startswith("|"):
            if table is None:
                caption = last if last is not None and last["kind"] != "row" else None
                table = {"header": None, "caption": caption}
            row = {"kind": "row", "lineno": i, "text": stripped, "table": table, "parent": None}
            if table["header"] is None:
                table["header"] = row
            blocks.append(row)
            cur, last = None, row
            continue
        table = None
        m = LIST_RE.match(line)
        if m:
            depth = len(m.group(1))
            while items and items[-1]["depth"] >= depth:
                items.pop()
            cur = {"kind": "item", "lineno": i, "text": line[m.end():], "parent": items[-1] if items else None,
                   "depth": depth}
            items.append(cur)
            blocks.append(cur)
            last = cur
            continue
        if cur is not None and not was_blank:
            cur["text"] += " " + stripped
            continue
        if indent == 0:
            items = []
        cur = {"kind": "para", "lineno": i, "text": stripped, "parent": items[-1] if items else None}
        blocks.append(cur)
        last = cur
    return blocks


def _citations(text: str, doc_dir: Path) -> tuple[set[str], list[str]]:
    """(repo-relative cited paths, errors for cited paths that do not exist)."""
    found: set[str] = set()
    candidates: list[str] = []
    for m in LINK_RE.finditer(text):
        target = m.group(1).split("#")[0]
        if target and "://" not in target:
            rel = (doc_dir / target).resolve()
            try:
                candidates.append(str(rel.relative_to(REPO_FOR_LINKS[0])))
            except ValueError:
                continue
    for m in CODE_SPAN_RE.finditer(text):
        # only a span that is a path cites it; a path inside a command (an output to be written) does not
        if PATHISH_RE.fullmatch(m.group(2).strip()):
            candidates.append(m.group(2).strip())
    for c in candidates:
        for p in _expand_braces(c.rstrip(".,;:)")):
            if not p.startswith(CITABLE_DIRS) or not p.endswith(CITABLE_EXTS) or p in DOCS:
                continue
            found.add(p)
    return found, []


REPO_FOR_LINKS = [REPO]  # link targets resolve against the checked repository (tests swap in a tmp repo)


def _quoted_numbers(text: str) -> tuple[list[tuple[str, float, float, tuple]], list[str]]:
    """(numbers to check as (shown, value, tolerance, extra scales), arithmetic errors)."""
    errors = []
    kept = []

    def code(m: re.Match) -> str:
        span = m.group(2).strip()
        arith = _eval_arithmetic(span)
        if arith is not None:
            if not arith[0]:
                errors.append(arith[1])
            return " "
        if re.fullmatch(r"[+\-\u2212]?[\d,.]+\s*(?:%|[A-Za-z/]+)?", span):
            kept.append(span)
            return " " + span + " "  # a bare number in backticks is prose
        return " "

    text = COMMENT_RE.sub(" ", text)
    text = LINK_RE.sub("]", text)
    text = CODE_SPAN_RE.sub(code, text)
    text = PATHISH_RE.sub(" ", text)
    for rx in EXCLUDE_RES:
        text = rx.sub(" ", text)
    out = []
    for m in NUM_RE.finditer(text):
        start, end = m.start(), m.end()
        # `ZeRO-2`, `PickCube-v1`-style identifiers: a hyphen glued to a preceding letter
        if start >= 2 and text[start] in "-" and text[start - 1].isalpha():
            continue
        if start >= 2 and text[start - 1] in "-–" and text[start - 2].isalpha():
            continue
        tail = text[end:]
        glued = re.match(r"[A-Za-z]+", tail)
        if glued and glued.group(0) not in UNITS_GLUED:
            continue  # `3D`, `2nd`: an identifier, not a quantity
        unit = UNIT_RE.match(tail)
        scales = UNIT_SCALES.get(unit.group(1), ()) if unit else ()
        value, tol = _parse_number(*m.groups())
        out.append((m.group(0).strip(), value, tol, scales))
    return out, errors


def _matches(value: float, tol: float, scales: tuple, pool: list[float]) -> bool:
    for s in (1.0, 100.0, *scales):
        for v in pool:
            if abs(value - s * v) <= tol * (1 + 1e-9) + 1e-12 * abs(value):
                return True
    return False


def check_doc(doc: Path, repo: Path = REPO) -> list[str]:
    """All convention violations in one Markdown document, as `path:line: message` strings."""
    REPO_FOR_LINKS[0] = repo
    try:
        lines = doc.read_text().splitlines()
        blocks = _split_blocks(lines)
        name = str(doc.relative_to(repo)) if doc.is_relative_to(repo) else doc.name
        errors: list[str] = []
        cache: dict[str, list[float]] = {}

        def cites(block: dict | None) -> set[str]:
            return _citations(block["text"], doc.parent)[0] if block else set()

        for b in blocks:
            own = cites(b)
            scope = set(own)
            if b["kind"] == "row":
                scope |= cites(b["table"]["header"]) | cites(b["table"]["caption"])
            p = b.get("parent")
            while p is not None:
                scope |= cites(p)
                p = p.get("parent")
            for path in sorted(own):
                if not (repo / path).is_file():
                    errors.append(f"{name}:{b['lineno']}: cites {path}, which does not exist")
            nums, arith_errors = _quoted_numbers(b["text"])
            errors += [f"{name}:{b['lineno']}: {e}" for e in arith_errors]
            if not nums:
                continue
            existing = [p for p in sorted(scope) if (repo / p).is_file()]
            if not scope:
                shown = ", ".join(n[0] for n in nums[:5])
                errors.append(f"{name}:{b['lineno']}: number(s) {shown} without a cited file")
                continue
            pool = []
            for p in existing:
                if p not in cache:
                    cache[p] = values_of(repo / p)
                pool += cache[p]
            for shown, value, tol, scales in nums:
                if not _matches(value, tol, scales, pool):
                    errors.append(f"{name}:{b['lineno']}: {shown} is not in {', '.join(existing) or 'any file'}")
        return errors
    finally:
        REPO_FOR_LINKS[0] = REPO


# ---------------------------------------------------------------------------------------------- the docs


@pytest.mark.parametrize("doc", DOCS)
def test_every_number_cites_a_committed_file(doc):
    errors = check_doc(REPO / doc)
    assert not errors, "\n".join(errors)


def test_docs_cite_the_result_files():
    """The convention is in use: the docs cite the committed result files (not vacuously empty)."""
    cited = set()
    for doc in DOCS:
        for b in _split_blocks((REPO / doc).read_text().splitlines()):
            cited |= _citations(b["text"], (REPO / doc).parent)[0]
    assert {"results/bandit_ablations.json", "bench/results_cpu.json", "bench/pi0_memory.json"} <= cited


# ---------------------------------------------------------------------------------- the checker itself


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "r.json").write_text(json.dumps(
        {"sft": {"success_rate": 0.275}, "rl": {"success_rate": 0.39}, "n": 200, "bytes": 15040512,
         "t_s": 0.002993, "total_s": 1954.6, "flag": True}))
    (tmp_path / "results" / "r.md").write_text("| a | 1709.400 |\n")
    return tmp_path


def _check(repo: Path, text: str) -> list[str]:
    doc = repo / "DOC.md"
    doc.write_text(text)
    return check_doc(doc, repo)


def test_cited_numbers_pass(repo):
    text = (
        "SFT 27.5 % and RL **39.0 %** on 200 episodes (`results/r.json`); the step took 2.993 ms,\n"
        "15.0 MB per call and 1955 s in all, 32.6 min (`results/r.json`).\n\n"
        "The run took 1709 s ([report](results/r.md)).\n\n"
        "Source: `results/r.{json,md}`\n\n"
        "| policy | success |\n|---|---|\n| SFT | 27.5 % |\n| RL | 0.390 |\n\n"
        "- list item citing `results/r.json`\n  - nested: 200 episodes\n\n"
        "Worked example, no citation needed: `3 x 256 + 48 = 816` and `15,040,512 B x 3,072 / 1e9 = 46.2 GB`.\n\n"
        "```bash\nfastnft eval --episodes 400   # code is not checked: 123\n```\n\n"
        "Identifiers are not numbers: S7, pi0, H100, ZeRO-2, PickCube-v1, stages 1-3, Python ≥ 3.10, "
        "mplib 0.1.1, 2026-11-21, a `--set env.eval_seed=3000000` argument.\n"
    )
    assert _check(repo, text) == []


def test_uncited_number_is_reported(repo):
    errors = _check(repo, "The gain was +11.5 points.\n")
    assert len(errors) == 1 and "without a cited file" in errors[0] and "11.5" in errors[0]


def test_changed_number_is_reported(repo):
    errors = _check(repo, "SFT 27.5 % and RL 41.75 % (`results/r.json`).\n")
    assert len(errors) == 1 and "41.75" in errors[0]


def test_more_decimals_than_the_file_supports_are_reported(repo):
    # 0.275 -> 27.5 %; claiming 27.55 % is a different number
    assert len(_check(repo, "SFT 27.55 % (`results/r.json`).\n")) == 1


def test_a_path_inside_a_command_is_not_a_citation(repo):
    errors = _check(repo, "SFT 27.5 % (`fastnft eval --json results/r.json`).\n")
    assert len(errors) == 1 and "without a cited file" in errors[0]


def test_missing_file_is_reported(repo):
    errors = _check(repo, "SFT 27.5 % (`results/gone.json`).\n")
    assert any("does not exist" in e for e in errors)


def test_table_row_without_caption_citation_is_reported(repo):
    errors = _check(repo, "A table.\n\n| policy | success |\n|---|---|\n| SFT | 27.5 % |\n")
    assert len(errors) == 1 and ":5:" in errors[0]


def test_table_row_with_a_wrong_number_is_reported(repo):
    errors = _check(repo, "Source: `results/r.json`\n\n| policy | success |\n|---|---|\n| SFT | 30.5 % |\n")
    assert len(errors) == 1 and "30.5" in errors[0]


def test_wrong_arithmetic_is_reported(repo):
    errors = _check(repo, "Prefix: `3 x 256 + 48 = 820` tokens.\n")
    assert len(errors) == 1 and "arithmetic" in errors[0]


def test_bare_number_in_backticks_is_still_checked(repo):
    assert len(_check(repo, "RL reached `41.75 %`.\n")) == 1


def test_unit_scale_only_applies_with_its_unit(repo):
    # 0.002993 s is 2.993 ms, but "2.993" with no unit is not in the file
    assert _check(repo, "It took 2.993 ms (`results/r.json`).\n") == []
    assert len(_check(repo, "It took 2.993 (`results/r.json`).\n")) == 1


def test_citing_the_docs_themselves_does_not_count(repo):
    (repo / "RESULTS.md").write_text("27.5\n")
    assert len(_check(repo, "SFT 27.5 % ([results](RESULTS.md)).\n")) == 1


def test_indented_code_and_headings_are_skipped(repo):
    assert _check(repo, "## 3. Section 12\n\nFormula:\n\n    E0 = sum 2 3 4\n") == []


def test_float_tolerance_is_half_the_last_place():
    assert _matches(27.5, 0.05, (), [0.2754])
    assert not _matches(27.5, 0.05, (), [0.2756])
    assert math.isclose(_parse_number("", "2,923,335,408", None, None)[0], 2923335408)
