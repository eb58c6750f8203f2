#!/usr/bin/env python3
"""Regenerate the numeric tables of README.md and docs/RESULTS.md from the committed CSVs under results/.

    python scripts/results_tables.py            # rewrite README.md, docs/RESULTS.md (and any .md named) in place
    python scripts/results_tables.py --check    # write nothing; print the diff; exit 1 if anything differs

Exit status: 0 all generated blocks match (or were rewritten), 1 (--check) some block differs, 2 a marker is
wrong (unknown key, missing CSV, column or row filter value that does not exist, no row selected ...); on 2
nothing is written and one line ``results_tables: error: FILE:LINE: ...`` says why.

Markers
-------
A table: everything between the two comments is regenerated (the comments stay)::

    <!-- results-table: SPEC -->
    | ... generated ... |
    <!-- /results-table -->

A single number inside prose or a hand-written table cell::

    gold <!-- results-value: SPEC -->7.62<!-- /results-value --> after 150 steps

Markers inside `code spans` and fenced code blocks are ignored, so documentation can show them.

SPEC grammar
------------
SPEC is a list of KEY=VALUE items separated by spaces; a VALUE holding spaces is quoted ("..." or '...',
shell rules).  Lists inside a value are separated by "," (row filters by ";").  Keys:

    csv=PATH                CSV file, relative to the repository root (required)
    rows="F;F;..."          keep the rows matching every filter F:
                              COL=V        COL equals V (numbers compare by value: beta=3 matches 3.0)
                              COL=V1|V2    COL equals one of them
                              COL!=V       COL differs from V (or from each of V1|V2)
                            every COL and every V must occur in the CSV, and some row must remain
    group=COL,...           one row per distinct combination of the COLs (first-seen order), with
    mean=COL,...              COL: the mean of COL over the group's rows (missing values skipped)
    sd=COL,...                COL_sd: the sample standard deviation of COL (missing for one value)
                              n: the number of rows in the group (e.g. seeds)
                            group columns render as written; mean=/sd= without group= pool all rows
    sort=COL,-COL,...       order by COL (ascending; "-COL" descending), numbers by value, missing last;
                            default: CSV order
    columns="SRC:Header,.." results-table: the columns shown (default: all, headed by their names);
                            ":Header" is optional (default SRC); headers may not contain ","
    column=SRC              results-value: the cell shown; the selection must leave exactly one row
    digits=N                decimals for every non-integer numeric column (default: the CSV's text)
    fmt="SRC:SPEC,..."      per-column Python format spec (".0f", ".1%", ".3g", "d"; no ",") or "raw" (the
                            CSV's text, e.g. for a learning-rate column: fmt="lr:raw"); for results-value a
                            bare fmt=SPEC applies to its column

SRC is a column name, or LO-HI for two columns rendered as an interval "[lo, hi]" (e.g. lo-hi, ci_lo-ci_hi).
Steps run in this order: rows -> group/mean/sd -> sort -> columns.  A column is integer when every value in
the CSV is an integer (rendered as written), numeric when every value is a number (digits/fmt apply), text
otherwise.  Missing values (empty, nan, NA, None) render as "–".  Formatting never depends on the locale.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import math
import re
import shlex
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FILES = ("README.md", "docs/RESULTS.md")
MISSING = "–"
MISSING_TEXTS = {"", "nan", "na", "n/a", "none", "null"}
INT_RE = re.compile(r"[+-]?\d+")
# float() would also accept "1_000" and surrounding spaces; a CSV cell is a number only in plain notation
NUMBER_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?inf")
# [\w-]+ so that a misspelt "results-tabel" or "results-table-x" is reported instead of skipped
MARKER_RE = re.compile(r"<!--\s*(/?)results-([\w-]+)\s*(?::(.*?))?-->", re.DOTALL)
TABLE_KEYS = {"csv", "rows", "group", "mean", "sd", "sort", "columns", "digits", "fmt"}
VALUE_KEYS = {"csv", "rows", "group", "mean", "sd", "column", "digits", "fmt"}


class SpecError(Exception):
    """A marker that cannot be rendered; its message is one line."""


# ---------------------------------------------------------------------------------------------- spec


@dataclass
class RowFilter:
    column: str
    values: tuple[str, ...]
    negate: bool

    def __str__(self) -> str:
        return f"{self.column}{'!=' if self.negate else '='}{'|'.join(self.values)}"


@dataclass
class Spec:
    csv: str
    filters: list[RowFilter] = field(default_factory=list)
    group: list[str] = field(default_factory=list)
    mean: list[str] = field(default_factory=list)
    sd: list[str] = field(default_factory=list)
    sort: list[str] = field(default_factory=list)
    columns: list[tuple[str, str]] = field(default_factory=list)
    digits: int | None = None
    formats: dict[str, str] = field(default_factory=dict)


def split_spec_items(text: str, allowed: set[str]) -> dict[str, str]:
    try:
        words = shlex.split(text)
    except ValueError as e:  # an unclosed quote
        raise SpecError(f"cannot read spec ({e})") from None
    items: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            raise SpecError(f"spec item {word!r} is not KEY=VALUE")
        if key not in allowed:
            raise SpecError(f"unknown spec key {key!r} (known: {', '.join(sorted(allowed))})")
        if key in items:
            raise SpecError(f"spec key {key!r} given twice")
        items[key] = value
    if "csv" not in items:
        raise SpecError("spec has no csv=")
    return items


def split_list(text: str, sep: str = ",") -> list[str]:
    return [part.strip() for part in text.split(sep) if part.strip()]


def parse_row_filters(text: str) -> list[RowFilter]:
    filters = []
    for item in split_list(text, ";"):
        # "!=" first: "a!=b" also contains "="
        negate = "!=" in item
        column, _, values = item.partition("!=" if negate else "=")
        if not column.strip() or not values.strip():
            raise SpecError(f"row filter {item!r} is not COL=VALUE or COL!=VALUE")
        filters.append(RowFilter(column.strip(), tuple(v.strip() for v in values.split("|")), negate))
    return filters


def parse_columns(text: str) -> list[tuple[str, str]]:
    columns = []
    for item in split_list(text):
        source, sep, header = item.partition(":")
        columns.append((source.strip(), header.strip() if sep else source.strip()))
    return columns


def parse_formats(text: str, bare_source: str | None) -> dict[str, str]:
    formats = {}
    for item in split_list(text):
        source, sep, fmt = item.partition(":")
        if not sep:
            if bare_source is None:
                raise SpecError(f"fmt item {item!r} is not SRC:SPEC")
            source, fmt = bare_source, item
        formats[source.strip()] = fmt.strip()
    return formats


def parse_spec(text: str, kind: str) -> tuple[Spec, str | None]:
    """The spec of a marker, and for a results-value marker the source of its one cell."""
    items = split_spec_items(text, TABLE_KEYS if kind == "table" else VALUE_KEYS)
    value_source = items.get("column")
    if kind == "value" and not value_source:
        raise SpecError("results-value spec has no column=")
    digits = items.get("digits")
    if digits is not None and not digits.isdigit():
        raise SpecError(f"digits={digits!r} is not a whole number")
    spec = Spec(
        csv=items["csv"],
        filters=parse_row_filters(items.get("rows", "")),
        group=split_list(items.get("group", "")),
        mean=split_list(items.get("mean", "")),
        sd=split_list(items.get("sd", "")),
        sort=split_list(items.get("sort", "")),
        columns=parse_columns(items.get("columns", "")),
        digits=None if digits is None else int(digits),
        formats=parse_formats(items.get("fmt", ""), value_source),
    )
    return spec, value_source


# --------------------------------------------------------------------------------------------- table


@dataclass
class Table:
    name: str  # the CSV path, for messages
    columns: list[str]
    rows: list[dict[str, object]]  # CSV text, or float/int for aggregated columns; None when missing
    kinds: dict[str, str]  # "int", "float" or "text"
    verbatim: set[str] = field(default_factory=set)  # columns rendered as written (group keys)


def is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return str(value).strip().lower() in MISSING_TEXTS


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) or bool(NUMBER_RE.fullmatch(str(value).strip()))


def infer_kind(values: list[object]) -> str:
    present = [v for v in values if not is_missing(v)]
    if not present:
        return "text"
    if all(isinstance(v, int) or INT_RE.fullmatch(str(v).strip()) for v in present):
        return "int"
    return "float" if all(is_number(v) for v in present) else "text"


def load_csv(root: Path, relative: str) -> Table:
    path = root / relative
    if not path.is_file():
        raise SpecError(f"{relative}: no such CSV file")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise SpecError(f"{relative}: empty CSV (no header)")
        if len(set(header)) != len(header):
            raise SpecError(f"{relative}: a column name appears twice in the header")
        # short rows leave their last cells missing; extra cells have no column and are ignored
        rows = [{c: (line[i] if i < len(line) else None) for i, c in enumerate(header)} for line in reader if line]
    kinds = {c: infer_kind([r[c] for r in rows]) for c in header}
    return Table(relative, list(header), rows, kinds)


def require_column(table: Table, column: str, role: str) -> None:
    if column not in table.columns:
        raise SpecError(f"{role} {column!r} is not a column of {table.name} (columns: {', '.join(table.columns)})")


def cell_equals(value: object, wanted: str) -> bool:
    if is_missing(value):
        return False
    text = str(value).strip()
    if text == wanted:
        return True
    return is_number(text) and is_number(wanted) and float(text) == float(wanted)


def filter_rows(table: Table, filters: list[RowFilter]) -> Table:
    rows = table.rows
    for flt in filters:
        require_column(table, flt.column, f"row filter {flt}: column")
        for wanted in flt.values:
            # a typo in a value would otherwise drop rows silently (or keep all of them, for !=)
            if not any(cell_equals(r[flt.column], wanted) for r in table.rows):
                present = sorted({str(r[flt.column]) for r in table.rows})
                shown = ", ".join(present[:10]) + (", ..." if len(present) > 10 else "")
                raise SpecError(f"row filter {flt}: no row of {table.name} has {flt.column}={wanted!r} (values: {shown})")
        rows = [r for r in rows if any(cell_equals(r[flt.column], v) for v in flt.values) != flt.negate]
    if not rows:
        raise SpecError(f"rows={';'.join(map(str, filters))} leaves no row of {table.name}")
    return Table(table.name, table.columns, rows, table.kinds, table.verbatim)


def numbers_of(rows: list[dict[str, object]], column: str) -> list[float]:
    return [float(r[column]) for r in rows if not is_missing(r[column])]


def aggregate_group(keys: list[str], rows: list[dict[str, object]], mean: list[str], sd: list[str]) -> dict[str, object]:
    out: dict[str, object] = {k: rows[0][k] for k in keys}
    for column in mean:
        values = numbers_of(rows, column)
        out[column] = statistics.fmean(values) if values else None
    for column in sd:
        values = numbers_of(rows, column)
        out[f"{column}_sd"] = statistics.stdev(values) if len(values) > 1 else None
    out["n"] = len(rows)
    return out


def aggregate(table: Table, keys: list[str], mean: list[str], sd: list[str]) -> Table:
    for column in keys:
        require_column(table, column, "group column")
    for column in mean + sd:
        require_column(table, column, "mean/sd column")
        if table.kinds[column] == "text":
            raise SpecError(f"mean/sd column {column!r} of {table.name} holds text, not numbers")
    groups: dict[tuple, list[dict[str, object]]] = {}
    for row in table.rows:  # dicts keep first-seen order: groups come out in CSV order
        groups.setdefault(tuple(str(row[k]) for k in keys), []).append(row)
    rows = [aggregate_group(keys, members, mean, sd) for members in groups.values()]
    sd_columns = [f"{c}_sd" for c in sd]
    columns = keys + mean + sd_columns + ["n"]
    kinds = {k: table.kinds[k] for k in keys} | {c: "float" for c in mean + sd_columns} | {"n": "int"}
    return Table(table.name, columns, rows, kinds, set(keys))


def sort_rows(table: Table, sort_keys: list[str]) -> Table:
    rows = list(table.rows)
    # one stable sort per key, last key first, gives the lexicographic order with CSV order for ties
    for key in reversed(sort_keys):
        descending = key.startswith("-")
        column = key.lstrip("-")
        require_column(table, column, "sort column")
        numeric = table.kinds[column] != "text"
        present = [r for r in rows if not is_missing(r[column])]
        absent = [r for r in rows if is_missing(r[column])]
        present.sort(key=lambda r: float(r[column]) if numeric else str(r[column]), reverse=descending)
        rows = present + absent  # missing values last in either direction
    return Table(table.name, table.columns, rows, table.kinds, table.verbatim)


def select_table(spec: Spec, root: Path) -> Table:
    table = filter_rows(load_csv(root, spec.csv), spec.filters)
    if spec.group or spec.mean or spec.sd:
        table = aggregate(table, spec.group, spec.mean, spec.sd)
    return sort_rows(table, spec.sort)


# ------------------------------------------------------------------------------------------ rendering


def resolve_source(table: Table, source: str) -> tuple[str, ...]:
    """(column,) for a plain column, (lo, hi) for an interval LO-HI."""
    if source in table.columns:
        return (source,)
    splits = [(source[:i], source[i + 1:]) for i, ch in enumerate(source) if ch == "-"]
    intervals = [pair for pair in splits if pair[0] in table.columns and pair[1] in table.columns]
    if len(intervals) == 1:
        return intervals[0]
    if len(intervals) > 1:
        raise SpecError(f"interval {source!r} splits into columns of {table.name} in more than one way")
    raise SpecError(f"column {source!r} is not a column (or LO-HI pair) of {table.name} (columns: {', '.join(table.columns)})")


def apply_format(number: float, fmt: str) -> str:
    try:
        text = format(number, fmt)
    except ValueError:
        if not number.is_integer():
            raise
        text = format(int(number), fmt)  # integer specs such as "d" or ",d"
    # "-0.00" is a rounding artefact, not a sign worth showing
    return text[1:] if re.fullmatch(r"-[0.]+%?", text) else text


def format_cell(table: Table, column: str, value: object, spec: Spec, fmt: str | None) -> str:
    if is_missing(value):
        return MISSING
    kind = table.kinds[column]
    if fmt == "raw" or kind == "text" or (column in table.verbatim and fmt is None):
        return str(value).strip()
    if fmt is not None:
        try:
            return apply_format(float(value), fmt)
        except ValueError as e:
            raise SpecError(f"fmt {fmt!r} for {column!r}: {e}") from None
    if kind == "int":
        return str(value).strip()
    if spec.digits is not None:
        return apply_format(float(value), f".{spec.digits}f")
    # without digits=: CSV text as written; computed means get a readable precision
    return str(value).strip() if isinstance(value, str) else apply_format(float(value), ".6g")


def render_source(table: Table, row: dict[str, object], source: str, spec: Spec) -> str:
    columns = resolve_source(table, source)
    fmt = spec.formats.get(source)
    cells = [format_cell(table, c, row[c], spec, fmt if fmt is not None else spec.formats.get(c)) for c in columns]
    if len(cells) == 1:
        return cells[0]
    return MISSING if MISSING in cells else f"[{cells[0]}, {cells[1]}]"


def check_formats_known(table: Table, spec: Spec) -> None:
    for source in spec.formats:
        resolve_source(table, source)  # a fmt for a misspelt column must not be ignored


def render_table(spec: Spec, root: Path) -> str:
    table = select_table(spec, root)
    check_formats_known(table, spec)
    columns = spec.columns or [(c, c) for c in table.columns]
    for source, _ in columns:
        resolve_source(table, source)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    lines = [line([header for _, header in columns]), line(["---"] * len(columns))]
    lines += [line([render_source(table, row, source, spec) for source, _ in columns]) for row in table.rows]
    return "\n".join(lines)


def render_value(spec: Spec, source: str, root: Path) -> str:
    table = select_table(spec, root)
    check_formats_known(table, spec)
    if len(table.rows) != 1:
        raise SpecError(f"results-value selects {len(table.rows)} rows of {table.name}; rows=/group= must leave exactly one")
    return render_source(table, table.rows[0], source, spec)


# ------------------------------------------------------------------------------------------- markdown


@dataclass
class Block:
    kind: str  # "table" or "value"
    spec_text: str
    line: int
    inner_start: int
    inner_end: int


def code_spans(text: str) -> list[tuple[int, int]]:
    """Offsets of fenced code blocks and inline code spans, where markers are examples, not markers."""
    spans, offset, fence = [], 0, None
    for raw_line in text.splitlines(keepends=True):
        match = re.match(r" {0,3}(`{3,}|~{3,})", raw_line)
        if fence is None and match:
            fence = (match.group(1), offset)
        elif fence is not None and match and match.group(1).startswith(fence[0]):
            spans.append((fence[1], offset + len(raw_line)))
            fence = None
        offset += len(raw_line)
    if fence is not None:
        spans.append((fence[1], len(text)))
    # inline spans: a backtick run closed by an equal run within the same paragraph (no blank line)
    for match in re.finditer(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", text, re.DOTALL):
        spans.append(match.span())
    return spans


def find_blocks(text: str, label: str) -> list[Block]:
    spans = code_spans(text)
    blocks: list[Block] = []
    opening = None
    for match in MARKER_RE.finditer(text):
        if any(a <= match.start() < b for a, b in spans):
            continue
        line = text.count("\n", 0, match.start()) + 1
        closing, kind, spec_text = match.group(1) == "/", match.group(2), match.group(3)
        where = f"{label}:{line}"
        if kind not in ("table", "value"):
            raise SpecError(f"{where}: unknown marker 'results-{kind}' (known: results-table, results-value)")
        if not closing:
            if opening is not None:
                raise SpecError(f"{where}: results-{kind} opens before the results-{opening[0]} of line {opening[2]} is closed")
            if spec_text is None or not spec_text.strip():
                raise SpecError(f"{where}: results-{kind} marker has no spec (<!-- results-{kind}: csv=... -->)")
            opening = (kind, spec_text.strip(), line, match.end())
            continue
        if opening is None or opening[0] != kind or spec_text is not None:
            raise SpecError(f"{where}: closing /results-{kind} without a matching opening marker")
        blocks.append(Block(kind, opening[1], opening[2], opening[3], match.start()))
        opening = None
    if opening is not None:
        raise SpecError(f"{label}:{opening[2]}: results-{opening[0]} is never closed (<!-- /results-{opening[0]} -->)")
    return blocks


def render_block(block: Block, root: Path) -> str:
    spec, value_source = parse_spec(block.spec_text, block.kind)
    if block.kind == "value":
        return render_value(spec, value_source, root)
    # the table on its own lines between the two comment lines
    return "\n" + render_table(spec, root) + "\n"


def regenerate(text: str, label: str, root: Path) -> tuple[str, list[Block]]:
    """The text with every generated block rebuilt, and the blocks whose content changed."""
    pieces, changed, position = [], [], 0
    for block in find_blocks(text, label):
        try:
            inner = render_block(block, root)
        except SpecError as e:
            raise SpecError(f"{label}:{block.line}: {e}") from None
        pieces += [text[position:block.inner_start], inner]
        position = block.inner_end
        if inner != text[block.inner_start:block.inner_end]:
            changed.append(block)
    pieces.append(text[position:])
    return "".join(pieces), changed


# ------------------------------------------------------------------------------------------------ CLI


def describe(block: Block) -> str:
    csv_path = re.search(r"csv=(\S+)", block.spec_text)
    return f"results-{block.kind} from {csv_path.group(1) if csv_path else '?'}"


def markdown_paths(root: Path, extra: list[str]) -> list[Path]:
    paths = [root / name for name in DEFAULT_FILES] + [Path(p).resolve() for p in extra]
    unique = list(dict.fromkeys(p.resolve() for p in paths))
    for path in unique:
        if not path.is_file():
            raise SpecError(f"{path}: no such markdown file")
    return unique


def display_name(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def report_check(label: str, old: str, new: str, changed: list[Block]) -> None:
    diff = difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True), f"a/{label}", f"b/{label}")
    sys.stdout.writelines(line if line.endswith("\n") else line + "\n" for line in diff)
    for block in changed:
        print(f"results_tables: {label}:{block.line}: {describe(block)} is out of date")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="results_tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="more markdown files (README.md and docs/RESULTS.md always)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated block differs")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root (csv= paths are relative to it)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    try:
        # everything is rendered before anything is written: an error leaves every file as it was
        documents = []
        for path in markdown_paths(root, args.files):
            label = display_name(path, root)
            old = path.read_bytes().decode("utf-8")  # bytes: keep line endings as they are
            documents.append((path, label, old, *regenerate(old, label, root)))
    except SpecError as e:
        print(f"results_tables: error: {e}", file=sys.stderr)
        return 2
    stale = [d for d in documents if d[4]]
    for path, label, old, new, changed in stale:
        if args.check:
            report_check(label, old, new, changed)
        else:
            path.write_bytes(new.encode("utf-8"))
            for block in changed:
                print(f"results_tables: updated {label}:{block.line} ({describe(block)})")
    if args.check and stale:
        count = sum(len(d[4]) for d in stale)
        print(f"results_tables: {count} generated block(s) out of date; run python scripts/results_tables.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
