"""Standard evaluation prompt sets, read from local files in their publishers' own formats.

`load_prompts(spec)` takes `FORMAT:PATH`, a bare `PATH` (the format is detected from the name, the
header or the content, and reported), or the name of a set shipped with cmalign (`simple_animals`,
`varied`). Formats:

* `parti`     PartiPrompts.tsv: tab-separated, header `Prompt, Category, Challenge, Note`; fields are
              not quoted (quotes in a prompt are kept as written). Filters: category, challenge.
* `drawbench` DrawBench CSV: header `Prompts,Category` (extra columns kept as metadata), standard CSV
              quoting (commas, doubled quotes and newlines inside quoted fields). Filter: category.
* `hpsv2`     HPSv2 benchmark prompts: one style file (`anime.json`, ...: a JSON array of strings) or
              the folder holding all four; the style is the file's stem. Filter: category = style.
* `geneval`   GenEval `evaluation_metadata.jsonl`: one JSON object per line with a `prompt`; the whole
              object is kept as metadata. Filter: category = `tag`.
* `pickapic`  Pick-a-Pic v2 captions: CSV (or parquet, with pyarrow) with a `caption` column. Captions
              repeat across rows (one row per image pair); they are de-duplicated, keeping the first
              occurrence's order, because the field evaluates on the unique captions.
* `txt`       UTF-8 text, one prompt per line (blank lines and lines starting with # are skipped).

Every prompt's metadata has `index`: its 0-based position in the source (for hpsv2, within its style
file; for pickapic, the row of its first occurrence) -- the index the publishers' protocols name images
and seeds by -- and, where the format has one, `category`. Each failure is one `UserError` line that
names the file and what was expected.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import UserError

__all__ = ["FORMATS", "BUILTIN_SETS", "HPSV2_STYLES", "PromptSet", "load_prompts", "detect_format", "parse_spec"]

FORMATS = ("parti", "drawbench", "hpsv2", "geneval", "pickapic", "txt")
BUILTIN_SETS = ("simple_animals", "varied")
HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")
_CATEGORY_FORMATS = ("parti", "drawbench", "hpsv2", "geneval")
_PARTI_HEADER = ("Prompt", "Category", "Challenge", "Note")
_EXPECTED = {
    "parti": "a PartiPrompts TSV with the tab-separated header Prompt, Category, Challenge, Note",
    "drawbench": "a DrawBench CSV with the header Prompts,Category",
    "hpsv2": "an HPSv2 benchmark file (a JSON array of prompt strings, e.g. anime.json) or the folder holding "
    + ", ".join(f"{s}.json" for s in HPSV2_STYLES),
    "geneval": "a GenEval evaluation_metadata.jsonl (one JSON object with a \"prompt\" per line)",
    "pickapic": "a Pick-a-Pic CSV or parquet file with a caption column",
    "txt": "UTF-8 text with one prompt per line",
}


@dataclass
class PromptSet:
    """Prompts read from one source, in the source's order, after any filters.

    `metadata[i]` belongs to `prompts[i]`; `format` is the format read (`builtin` for a shipped set) and
    `detected` says whether it was detected rather than named. `total` counts the prompts in the source
    before filters and limit (after de-duplication for pickapic, which dropped `duplicates_dropped`).
    """

    prompts: list[str]
    format: str
    source: str
    metadata: list[dict[str, Any]] = field(default_factory=list)
    detected: bool = False
    total: int = 0
    duplicates_dropped: int = 0
    filters: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        return iter(self.prompts)

    @property
    def categories(self) -> list[str]:
        """The categories present (hpsv2: styles; geneval: tags), in first-seen order."""
        return list(dict.fromkeys(m["category"] for m in self.metadata if m.get("category") is not None))

    def describe(self) -> str:
        """One line for the CLI, e.g. `parti (detected): 42 of 1632 prompts from X; category Animals`."""
        how = " (detected)" if self.detected else ""
        what = f"{len(self.prompts)} of {self.total}" if len(self.prompts) != self.total else f"{len(self.prompts)}"
        line = f"{self.format}{how}: {what} prompts from {self.source}"
        if self.duplicates_dropped:
            line += f" ({self.duplicates_dropped} repeated captions dropped)"
        extra = [f"{k} {', '.join(v) if isinstance(v, (list, tuple)) else v}" for k, v in self.filters.items()]
        return line + ("; " + "; ".join(extra) if extra else "")


# ----------------------------------------------------------------------------------------------- helpers


def _one_line(value: object, width: int = 80) -> str:
    """A value quoted for an error message: one line, at most `width` characters."""
    text = re.sub(r"\s+", " ", str(value)).strip()
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def _decode(data: bytes, path: Path, fmt: str) -> str:
    """UTF-8 (with or without a BOM), or UTF-16 with a BOM (spreadsheet 'Unicode text' exports)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise UserError(f"prompt file {path} starts with a UTF-16 mark but is not UTF-16 text; expected {_EXPECTED[fmt]}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"prompt file {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            f"save it as UTF-8 -- expected {_EXPECTED[fmt]}"
        ) from None


def _read_text(path: Path, fmt: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read prompt file {path}: {exc.strerror or exc}") from None
    return _decode(data, path, fmt)


def _lines(text: str) -> list[str]:
    """Lines split on \\n, \\r\\n or \\r only (not on the other characters str.splitlines treats as breaks)."""
    return re.split(r"\r\n|\r|\n", text)


def _csv_rows(text: str, path: Path, fmt: str, delimiter: str = ",") -> list[list[str]]:
    try:
        return list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True))
    except csv.Error as exc:
        raise UserError(f"prompt file {path} is not valid CSV ({exc}); expected {_EXPECTED[fmt]}") from None


def _column(header: list[str], *names: str) -> int | None:
    folded = [h.strip().casefold() for h in header]
    for name in names:
        if name.casefold() in folded:
            return folded.index(name.casefold())
    return None


def _blank(row: Sequence[str]) -> bool:
    return all(not cell.strip() for cell in row)


# ----------------------------------------------------------------------------------------------- readers


def _read_parti(path: Path) -> list[tuple[str, dict[str, Any]]]:
    lines = _lines(_read_text(path, "parti"))
    if not lines or not lines[0].strip():
        raise UserError(f"prompt file {path} is empty; expected {_EXPECTED['parti']}")
    header = [h.strip() for h in lines[0].split("\t")]
    if [h.casefold() for h in header[:3]] != [h.casefold() for h in _PARTI_HEADER[:3]]:
        raise UserError(f"prompt file {path} has the header {_one_line(lines[0])}; expected {_EXPECTED['parti']}")
    out = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 3:
            raise UserError(
                f"prompt file {path} line {number} has {len(fields)} tab-separated field(s), expected 4 "
                f"(Prompt, Category, Challenge, Note): {_one_line(line)}"
            )
        fields += [""] * (4 - len(fields))
        prompt = fields[0].strip()
        if not prompt:
            raise UserError(f"prompt file {path} line {number} has an empty Prompt field")
        meta = {"index": len(out), "category": fields[1].strip(), "challenge": fields[2].strip(), "note": fields[3].strip()}
        out.append((prompt, meta))
    return out


def _read_drawbench(path: Path) -> list[tuple[str, dict[str, Any]]]:
    rows = _csv_rows(_read_text(path, "drawbench"), path, "drawbench")
    while rows and _blank(rows[0]):
        rows.pop(0)
    if not rows:
        raise UserError(f"prompt file {path} is empty; expected {_EXPECTED['drawbench']}")
    header = rows[0]
    p_col, c_col = _column(header, "Prompts", "Prompt"), _column(header, "Category")
    if p_col is None or c_col is None:
        raise UserError(f"prompt file {path} has the header {_one_line(','.join(header))}; expected {_EXPECTED['drawbench']}")
    extra = [(i, h.strip()) for i, h in enumerate(header) if i not in (p_col, c_col) and h.strip()]
    out = []
    for number, row in enumerate(rows[1:], start=2):
        if _blank(row):
            continue  # spreadsheet exports end with empty rows
        row = row + [""] * (len(header) - len(row))
        prompt = row[p_col].strip()
        if not prompt:
            raise UserError(f"prompt file {path} record {number} has an empty {header[p_col].strip()} field")
        meta: dict[str, Any] = {"index": len(out), "category": row[c_col].strip()}
        meta.update({name: row[i] for i, name in extra if i < len(row) and name not in meta})
        out.append((prompt, meta))
    return out


def _read_hpsv2_file(path: Path, style: str, start: int = 0) -> list[tuple[str, dict[str, Any]]]:
    text = _read_text(path, "hpsv2")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"prompt file {path} is not valid JSON (line {exc.lineno}: {exc.msg}); expected {_EXPECTED['hpsv2']}") from None
    if not isinstance(data, list):
        raise UserError(f"prompt file {path} holds a JSON {type(data).__name__}, expected {_EXPECTED['hpsv2']}")
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, str):
            raise UserError(f"prompt file {path} item {i} is a JSON {type(item).__name__}, expected a prompt string")
        if not item.strip():
            raise UserError(f"prompt file {path} item {i} is an empty prompt")
        out.append((item.strip(), {"index": i, "category": style}))
    return out


def _read_hpsv2(path: Path) -> list[tuple[str, dict[str, Any]]]:
    if not path.is_dir():
        return _read_hpsv2_file(path, path.stem)
    missing = [f"{s}.json" for s in HPSV2_STYLES if not (path / f"{s}.json").is_file()]
    if missing:
        raise UserError(
            f"prompt folder {path} lacks {', '.join(missing)}; expected the HPSv2 benchmark folder holding "
            f"{', '.join(f'{s}.json' for s in HPSV2_STYLES)} (or name one style file)"
        )
    out = []
    for style in HPSV2_STYLES:
        out += _read_hpsv2_file(path / f"{style}.json", style)
    return out


def _read_geneval(path: Path) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for number, line in enumerate(_lines(_read_text(path, "geneval")), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"prompt file {path} line {number} is not JSON ({exc.msg}); expected {_EXPECTED['geneval']}") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            what = "has no \"prompt\" string" if isinstance(record, dict) else f"is a JSON {type(record).__name__}"
            raise UserError(f"prompt file {path} line {number} {what}; expected {_EXPECTED['geneval']}")
        if not record["prompt"].strip():
            raise UserError(f"prompt file {path} line {number} has an empty prompt")
        tag = record.get("tag")
        meta = dict(record)
        meta.update(index=len(out), category=None if tag is None else str(tag))
        out.append((record["prompt"].strip(), meta))
    return out


def _pickapic_captions(path: Path) -> list[object]:
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq  # optional: not a dependency of cmalign
        except ImportError:
            raise UserError(
                f"reading the parquet file {path} needs pyarrow: pip install pyarrow (or convert it to a CSV with a caption column)"
            ) from None
        try:
            names = pq.read_schema(path).names
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise UserError(f"prompt file {path} is not a readable parquet file ({_one_line(exc)}); expected {_EXPECTED['pickapic']}") from None
        if "caption" not in names:
            raise UserError(f"prompt file {path} has the columns {_one_line(', '.join(names))}; expected {_EXPECTED['pickapic']}")
        return pq.read_table(path, columns=["caption"]).column("caption").to_pylist()
    rows = _csv_rows(_read_text(path, "pickapic"), path, "pickapic")
    while rows and _blank(rows[0]):
        rows.pop(0)
    if not rows:
        raise UserError(f"prompt file {path} is empty; expected {_EXPECTED['pickapic']}")
    col = _column(rows[0], "caption")
    if col is None:
        raise UserError(f"prompt file {path} has the header {_one_line(','.join(rows[0]))}; expected {_EXPECTED['pickapic']}")
    return [row[col] if col < len(row) else None for row in rows[1:] if not _blank(row)]


def _read_pickapic(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], int]:
    """Unique captions in first-seen order, and how many repeated rows were dropped."""
    first: dict[str, dict[str, Any]] = {}
    for row, caption in enumerate(_pickapic_captions(path)):
        if caption is None or not str(caption).strip():
            continue  # a few captions are empty in the published data; nothing to render
        text = str(caption).strip()
        if text in first:
            first[text]["rows"] += 1
        else:
            first[text] = {"index": row, "rows": 1}
    dropped = sum(m["rows"] - 1 for m in first.values())
    return list(first.items()), dropped


def _parse_txt(text: str) -> list[tuple[str, dict[str, Any]]]:
    prompts = [line.strip() for line in _lines(text) if line.strip() and not line.lstrip().startswith("#")]
    return [(p, {"index": i}) for i, p in enumerate(prompts)]


def _read_txt(path: Path) -> list[tuple[str, dict[str, Any]]]:
    return _parse_txt(_read_text(path, "txt"))


# --------------------------------------------------------------------------------------------- detection


def _sniff(head: str) -> str | None:
    """The format a file's first line implies, or None."""
    first = next((line for line in _lines(head) if line.strip()), "")
    stripped = first.strip()
    if "\t" in first and [f.strip().casefold() for f in first.split("\t")[:3]] == ["prompt", "category", "challenge"]:
        return "parti"
    if stripped.startswith("{"):
        try:
            if isinstance(json.loads(stripped), dict):
                return "geneval"
        except json.JSONDecodeError:
            pass  # e.g. a plain-text prompt that starts with a brace
    if stripped == "[" or re.match(r'\[\s*"', stripped):
        return "hpsv2"
    header = next(csv.reader([first]), [])
    if _column(header, "caption") is not None:
        return "pickapic"
    if _column(header, "Prompts", "Prompt") is not None and _column(header, "Category") is not None:
        return "drawbench"
    return None


def detect_format(path: str | Path) -> str:
    """The format of a prompt file or folder, from its name, then its first line (`UserError` if unclear)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"prompt file {path} does not exist")
    if path.is_dir():
        if any((path / f"{s}.json").is_file() for s in HPSV2_STYLES):
            return "hpsv2"
        raise UserError(
            f"prompt path {path} is a folder without HPSv2 style files ({', '.join(f'{s}.json' for s in HPSV2_STYLES)}); "
            "name a prompt file, or FORMAT:PATH"
        )
    suffix = path.suffix.lower()
    by_suffix = {".tsv": "parti", ".jsonl": "geneval", ".json": "hpsv2", ".parquet": "pickapic", ".txt": "txt"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    try:
        with path.open("rb") as fh:
            head = fh.read(64 * 1024)
    except OSError as exc:
        raise UserError(f"cannot read prompt file {path}: {exc.strerror or exc}") from None
    # only the first line matters here; the reader checks the whole file's encoding
    text = head.decode("utf-16" if head.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf-8-sig", errors="replace")
    sniffed = _sniff(text)
    if sniffed:
        return sniffed
    if suffix == ".csv":
        first = next((line for line in _lines(text) if line.strip()), "")
        raise UserError(
            f"prompt file {path} has the CSV header {_one_line(first)}; expected Prompts,Category (DrawBench) "
            "or a caption column (Pick-a-Pic) -- or name the format as FORMAT:PATH"
        )
    return "txt"


# ------------------------------------------------------------------------------------------------- entry


def parse_spec(spec: str) -> tuple[str | None, str]:
    """(format or None, path or built-in name) from `FORMAT:PATH`, `PATH` or a built-in set's name."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"empty prompt set; give FORMAT:PATH ({', '.join(FORMATS)}), a path, or one of {', '.join(BUILTIN_SETS)}")
    spec = spec.strip()
    prefix, sep, rest = spec.partition(":")
    if sep and prefix.lower() in FORMATS:
        if not rest.strip():
            raise UserError(f"prompt set {spec!r} names no file; expected {prefix.lower()}:PATH")
        return prefix.lower(), rest.strip()
    # `name:path` with an unknown name (not a Windows drive letter, not an existing file) is a typo'd format
    if sep and re.fullmatch(r"[A-Za-z][\w-]+", prefix) and not Path(spec).expanduser().exists():
        raise UserError(f"unknown prompt format {prefix!r} in {spec!r}; formats: {', '.join(FORMATS)}")
    return None, spec


def _as_list(value: str | Iterable[str] | None, what: str) -> list[str] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    values = [str(v).strip() for v in values if str(v).strip()]
    if not values:
        raise UserError(f"empty prompt {what}")
    return values


def _match(
    wanted: list[str], present: list[str], known: list[str], what: str, fmt: str, source: str, scope: str = ""
) -> set[str]:
    """The values among `present` that the wanted ones name (exact, else case-insensitive).

    One line if a wanted value is not in the file at all (`known`: all the file's values, listed) or is in
    the file but not among the prompts left by an earlier filter (`scope` says which).
    """
    chosen = set()
    for w in wanted:
        hits = [a for a in present if a == w] or [a for a in present if a.casefold() == w.casefold()]
        if hits:
            chosen.update(hits)
        elif any(a.casefold() == w.casefold() for a in known):
            raise UserError(
                f"no {fmt} prompts in {source} have {scope} and {what} {_one_line(w)}; "
                f"{what}s there: {', '.join(present) or '(none)'}"
            )
        else:
            raise UserError(
                f"unknown {what} {_one_line(w)} in {fmt} prompts {source}; available: {', '.join(known) or '(none)'}"
            )
    return chosen


def _filtered(entries: list, fmt: str, source: str, categories: list[str] | None,
              challenges: list[str] | None) -> tuple[list, dict[str, Any]]:
    """The entries of the named categories and challenges, and the filters applied."""
    all_entries = entries
    filters: dict[str, Any] = {}
    if categories is not None:
        if fmt not in _CATEGORY_FORMATS:
            raise UserError(
                f"the {fmt} prompts in {source} have no categories; category filters work with {', '.join(_CATEGORY_FORMATS)}"
            )
        known = list(dict.fromkeys(m["category"] for _, m in entries if m.get("category")))
        chosen = _match(categories, known, known, "category", fmt, source)
        entries = [(p, m) for p, m in entries if m.get("category") in chosen]
        filters["category"] = categories
    if challenges is not None:
        if fmt != "parti":
            raise UserError(
                f"the {fmt} prompts in {source} have no challenge column; challenge filters work with parti only"
            )
        present = list(dict.fromkeys(m["challenge"] for _, m in entries if m["challenge"]))
        known = list(dict.fromkeys(m["challenge"] for _, m in all_entries if m["challenge"]))
        scope = f"category {', '.join(categories)}" if categories else "a challenge"
        chosen = _match(challenges, present, known, "challenge", fmt, source, scope)
        entries = [(p, m) for p, m in entries if m["challenge"] in chosen]
        filters["challenge"] = challenges
    if not entries:  # only reachable if a filter matched values present in no entry; kept as a guard
        raise UserError(f"no {fmt} prompts in {source} match the filters {filters}")
    return entries, filters


def load_prompts(
    spec: str,
    *,
    category: str | Iterable[str] | None = None,
    challenge: str | Iterable[str] | None = None,
    limit: int | None = None,
) -> PromptSet:
    """Read a prompt set: `FORMAT:PATH`, a bare `PATH` (format detected), or a built-in set's name.

    `category` keeps the prompts of the named categories (parti and drawbench: Category; hpsv2: style;
    geneval: tag), matched exactly or else case-insensitively; `challenge` (parti only) keeps the named
    Challenge values; `limit` keeps the first N after filtering. Pick-a-Pic captions are de-duplicated,
    keeping first-seen order (the field evaluates on unique captions). A bare name of a built-in set
    (`simple_animals`, `varied`) reads that set unless a file of that name exists.
    """
    fmt, target = parse_spec(spec)
    categories, challenges = _as_list(category, "category"), _as_list(challenge, "challenge")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"prompt limit must be a whole number >= 1, got {limit!r}")

    detected = False
    dropped = 0
    if fmt is None and target in BUILTIN_SETS and not Path(target).expanduser().exists():
        fmt, source = "builtin", f"cmalign's built-in set {target!r}"
        ref = resources.files("cmalign.prompts") / f"{target}.txt"
        entries = _parse_txt(ref.read_text(encoding="utf-8"))
    else:
        path = Path(target).expanduser()
        source = str(path)
        if not path.exists():
            bare = fmt is None and "/" not in target and "." not in target
            hint = f" (built-in sets: {', '.join(BUILTIN_SETS)})" if bare else ""
            raise UserError(f"prompt file {path} does not exist{hint}")
        if fmt is None:
            fmt, detected = detect_format(path), True
        if path.is_dir() and fmt != "hpsv2":
            raise UserError(f"prompt path {path} is a folder; the {fmt} format reads one file: {_EXPECTED[fmt]}")
        if fmt == "pickapic":
            entries, dropped = _read_pickapic(path)
        else:
            entries = {"parti": _read_parti, "drawbench": _read_drawbench, "hpsv2": _read_hpsv2,
                       "geneval": _read_geneval, "txt": _read_txt}[fmt](path)
    if not entries:
        raise UserError(f"prompt file {source} has no prompts; expected {_EXPECTED.get(fmt, _EXPECTED['txt'])}")
    total = len(entries)

    entries, filters = _filtered(entries, fmt, source, categories, challenges)
    if limit is not None:
        entries = entries[:limit]
        filters["limit"] = limit
    return PromptSet(
        prompts=[p for p, _ in entries],
        format=fmt,
        source=source,
        metadata=[m for _, m in entries],
        detected=detected,
        total=total,
        duplicates_dropped=dropped,
        filters=filters,
    )
