"""cmalign.prompts.sets: each publisher's file format, filters, detection, de-duplication and refusals.

Every fixture is written here, in the publisher's layout, with made-up prompts (no third-party text)."""

import importlib.util
import json
import sys

import pytest

from cmalign.errors import UserError
from cmalign.prompts import bundled_prompts
from cmalign.prompts.sets import FORMATS, PromptSet, detect_format, load_prompts, parse_spec

HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None


def refusal(match, spec, **kw) -> str:
    """The one-line UserError that load_prompts raises, with no chained traceback."""
    with pytest.raises(UserError, match=match) as info:
        load_prompts(spec, **kw)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)
    return message


def write(path, text: str, encoding="utf-8", newline="\n"):
    path.write_bytes(text.replace("\n", newline).encode(encoding))
    return path


# ------------------------------------------------------------------------------------------------ parti

PARTI = (
    "Prompt\tCategory\tChallenge\tNote\n"
    "a lone heron\tAnimals\tBasic\t\n"
    '"Open late" painted on a café window, in gold\tArts\tWriting & Symbols\tquotes, commas\n'
    "a fox in a scarf, reading\tAnimals\tImagination\tmade up \n"
    "Schnee über 日本 rooftops \tOutdoor Scenes\tBasic\t\n"
    "\n"
)


@pytest.fixture
def parti(tmp_path):
    return write(tmp_path / "PartiPrompts.tsv", PARTI)


def test_parti_reads_every_row_literally(parti):
    s = load_prompts(f"parti:{parti}")
    assert isinstance(s, PromptSet) and s.format == "parti" and not s.detected and s.source == str(parti)
    assert s.prompts == [
        "a lone heron",
        '"Open late" painted on a café window, in gold',  # TSV: quotes are the prompt's own, kept as written
        "a fox in a scarf, reading",
        "Schnee über 日本 rooftops",
    ]
    assert s.metadata[1] == {"index": 1, "category": "Arts", "challenge": "Writing & Symbols", "note": "quotes, commas"}
    assert s.total == len(s) == 4 and s.categories == ["Animals", "Arts", "Outdoor Scenes"]


def test_parti_filters(parti):
    animals = load_prompts(str(parti), category="Animals")
    assert animals.prompts == ["a lone heron", "a fox in a scarf, reading"]
    assert [m["index"] for m in animals.metadata] == [0, 2]  # the index in the publisher's file, for seeds
    assert load_prompts(str(parti), category="animals").prompts == animals.prompts  # case-insensitive fallback
    assert load_prompts(str(parti), challenge="Basic").prompts == ["a lone heron", "Schnee über 日本 rooftops"]
    both = load_prompts(str(parti), category="Animals", challenge="Imagination")
    assert both.prompts == ["a fox in a scarf, reading"]
    assert load_prompts(str(parti), category=["Arts", "Outdoor Scenes"]).prompts == [
        '"Open late" painted on a café window, in gold', "Schnee über 日本 rooftops"]
    limited = load_prompts(str(parti), category="Animals", limit=1)
    assert limited.prompts == ["a lone heron"] and limited.total == 4
    assert limited.describe() == f"parti (detected): 1 of 4 prompts from {parti}; category Animals; limit 1"


def test_parti_bom_crlf_and_utf16(tmp_path):
    crlf = write(tmp_path / "a.tsv", "\ufeff" + PARTI, newline="\r\n")
    utf16 = write(tmp_path / "b.tsv", PARTI, encoding="utf-16")
    expected = load_prompts(str(write(tmp_path / "c.tsv", PARTI))).prompts
    assert load_prompts(str(crlf)).prompts == expected
    assert load_prompts(str(utf16)).prompts == expected


def test_parti_refusals(parti, tmp_path):
    msg = refusal("unknown category 'Robots'", str(parti), category="Robots")
    assert "available: Animals, Arts, Outdoor Scenes" in msg and str(parti) in msg
    msg = refusal("unknown challenge 'Hard'", str(parti), challenge="Hard")
    assert "available: Basic, Writing & Symbols, Imagination" in msg
    msg = refusal("no parti prompts", str(parti), category="Arts", challenge="Basic")
    assert "category Arts and challenge 'Basic'" in msg and "challenges there: Writing & Symbols" in msg
    bad = write(tmp_path / "bad.tsv", "prompt,category\na cat,Animals\n")
    assert "Prompt, Category, Challenge, Note" in refusal("has the header 'prompt,category'", f"parti:{bad}")
    short = write(tmp_path / "short.tsv", "Prompt\tCategory\tChallenge\tNote\na cat\tAnimals\n")
    refusal(r"line 2 has 2 tab-separated field\(s\), expected 4", str(short))
    latin = tmp_path / "latin.tsv"
    latin.write_bytes(PARTI.encode("latin-1", errors="replace"))
    assert str(latin) in refusal(r"is not UTF-8 text \(byte 0x[0-9a-f]{2} at offset \d+\); save it as UTF-8", str(latin))
    refusal("is empty", str(write(tmp_path / "empty.tsv", "")))
    refusal("has no prompts", str(write(tmp_path / "header.tsv", "Prompt\tCategory\tChallenge\tNote\n")))
    refusal("is a folder; the parti format reads one file", f"parti:{tmp_path}")
    refusal("limit must be a whole number >= 1, got 0", str(parti), limit=0)


# -------------------------------------------------------------------------------------------- drawbench

# A spreadsheet export: CRLF, quoted fields with commas, doubled quotes and a newline, an extra column,
# and the empty rows a sheet leaves at the end.
DRAWBENCH = (
    "Prompts,Category,Note\r\n"
    "A red cube on top of a blue sphere.,Positional,\r\n"
    '"A sign that says ""Café Ö"", in neon, at night.",Text,hand-made\r\n'
    '"Two lines:\nfirst, then second",Descriptions,\r\n'
    "一只猫 beside a bicycle,Colors,x\r\n"
    ",,\r\n"
    ",,\r\n"
)


@pytest.fixture
def drawbench(tmp_path):
    path = tmp_path / "drawbench.csv"
    path.write_bytes(DRAWBENCH.encode("utf-8"))
    return path


def test_drawbench_quoting_and_columns(drawbench):
    s = load_prompts(str(drawbench))
    assert s.format == "drawbench" and s.detected
    assert s.prompts == [
        "A red cube on top of a blue sphere.",
        'A sign that says "Café Ö", in neon, at night.',
        "Two lines:\nfirst, then second",
        "一只猫 beside a bicycle",
    ]
    assert s.metadata[1] == {"index": 1, "category": "Text", "Note": "hand-made"}
    assert load_prompts(f"drawbench:{drawbench}", category="Text").prompts == [s.prompts[1]]


def test_drawbench_header_variants_and_refusals(tmp_path, drawbench):
    lower = write(tmp_path / "lower.csv", "\ufeffprompts,category\na kite,Colors\n")
    assert load_prompts(str(lower)).prompts == ["a kite"]
    msg = refusal("unknown category 'Count'", str(drawbench), category="Count")
    assert "available: Positional, Text, Descriptions, Colors" in msg
    wrong = write(tmp_path / "wrong.csv", "text,label\na kite,Colors\n")
    assert "expected Prompts,Category" in refusal("has the CSV header 'text,label'", str(wrong))
    assert "expected a DrawBench CSV with the header Prompts,Category" in refusal(
        "has the header 'text,label'", f"drawbench:{wrong}")
    refusal("no challenge column; challenge filters work with parti only", str(drawbench), challenge="Basic")
    broken = write(tmp_path / "broken.csv", 'Prompts,Category\n"never closed,Text\n')
    refusal("is not valid CSV", f"drawbench:{broken}")


# ------------------------------------------------------------------------------------------------ hpsv2


def hps_folder(tmp_path, ensure_ascii=True):
    folder = tmp_path / "benchmark"
    folder.mkdir()
    styles = {
        "anime": ["a café girl with ö-shaped earrings", "a mecha, \"quiet\", under rain"],
        "concept-art": ["a floating 日本 castle"],
        "paintings": ["an oil study of pears"],
        "photo": ["a street at dawn", "a street at dawn"],  # repeats are kept: the benchmark scores every row
    }
    for style, prompts in styles.items():
        (folder / f"{style}.json").write_text(json.dumps(prompts, ensure_ascii=ensure_ascii, indent=2), encoding="utf-8")
    (folder / "drawbench.json").write_text(json.dumps(["not part of the four styles"]), encoding="utf-8")
    return folder


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_hpsv2_folder_and_file(tmp_path, ensure_ascii):
    folder = hps_folder(tmp_path, ensure_ascii)
    s = load_prompts(str(folder))
    assert s.format == "hpsv2" and s.detected
    assert s.prompts == ["a café girl with ö-shaped earrings", 'a mecha, "quiet", under rain', "a floating 日本 castle",
                         "an oil study of pears", "a street at dawn", "a street at dawn"]
    assert s.categories == ["anime", "concept-art", "paintings", "photo"]
    assert [m["index"] for m in s.metadata] == [0, 1, 0, 0, 0, 1]  # index within the style file
    assert load_prompts(f"hpsv2:{folder}", category="photo").prompts == ["a street at dawn"] * 2
    one = load_prompts(str(folder / "concept-art.json"))
    assert one.prompts == ["a floating 日本 castle"] and one.metadata == [{"index": 0, "category": "concept-art"}]


def test_hpsv2_refusals(tmp_path):
    folder = hps_folder(tmp_path)
    assert "available: anime, concept-art, paintings, photo" in refusal("unknown category 'cartoon'", str(folder), category="cartoon")
    (folder / "photo.json").unlink()
    refusal("lacks photo.json; expected the HPSv2 benchmark folder", f"hpsv2:{folder}")
    obj = write(tmp_path / "obj.json", '{"prompts": ["a"]}')
    refusal("holds a JSON dict, expected an HPSv2 benchmark file", str(obj))
    mixed = write(tmp_path / "mixed.json", '["a", 3]')
    refusal("item 1 is a JSON int, expected a prompt string", str(mixed))
    refusal(r"is not valid JSON \(line 1", str(write(tmp_path / "bad.json", "[\"a\",")))
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    refusal("is a folder without HPSv2 style files", str(empty_dir))


# ---------------------------------------------------------------------------------------------- geneval

GENEVAL_RECORDS = [
    {"tag": "single_object", "include": [{"class": "kite", "count": 1}], "prompt": "a photo of a kite"},
    {"tag": "counting", "include": [{"class": "pear", "count": 3}], "exclude": [{"class": "pear", "count": 4}],
     "prompt": "a photo of three pears"},
    {"tag": "colors", "include": [{"class": "café chair", "count": 1, "color": "blue"}], "prompt": "a photo of a blue café chair"},
    {"tag": "counting", "include": [{"class": "bowl", "count": 2}], "prompt": "a photo of two bowls, \"empty\""},
]


@pytest.fixture
def geneval(tmp_path):
    lines = "".join(json.dumps(r) + "\n" for r in GENEVAL_RECORDS)
    return write(tmp_path / "evaluation_metadata.jsonl", lines + "\n")


def test_geneval(geneval):
    s = load_prompts(str(geneval))
    assert s.format == "geneval" and s.detected
    assert s.prompts == [r["prompt"] for r in GENEVAL_RECORDS]
    counting = load_prompts(f"geneval:{geneval}", category="counting")
    assert counting.prompts == ["a photo of three pears", 'a photo of two bowls, "empty"']
    assert counting.metadata[0]["exclude"] == [{"class": "pear", "count": 4}]  # the evaluator's metadata line
    assert counting.metadata[0]["index"] == 1 and counting.metadata[0]["category"] == "counting"


def test_geneval_refusals(tmp_path, geneval):
    msg = refusal("unknown category 'position'", str(geneval), category="position")
    assert "available: single_object, counting, colors" in msg
    refusal(r"line 2 is not JSON", str(write(tmp_path / "a.jsonl", '{"prompt": "a"}\nnot json\n')))
    refusal(r'line 1 has no "prompt" string', str(write(tmp_path / "b.jsonl", '{"text": "a"}\n')))
    refusal("line 1 is a JSON list", str(write(tmp_path / "c.jsonl", '["a"]\n')))


# --------------------------------------------------------------------------------------------- pickapic

# Pick-a-Pic rows are image pairs: a caption repeats once per pair shown for it.
PICKAPIC = (
    "are_different,best_image_uid,caption,created_at,has_label,ranking_id,user_id\n"
    'True,u1,"a castle, made of cake",2023-04-01,True,1,7\n'
    'True,u2,"a lamp that says ""hi""",2023-04-01,True,2,8\n'
    'True,u3,"a castle, made of cake",2023-04-02,True,3,7\n'
    "True,u4,café in 日本 at night,2023-04-02,True,4,9\n"
    'True,u5,"two lines\nof caption",2023-04-03,True,5,9\n'
    'True,u6,"a lamp that says ""hi""",2023-04-03,True,6,8\n'
    "True,u7,,2023-04-03,True,7,9\n"
)


def test_pickapic_dedupes_in_first_seen_order(tmp_path):
    path = write(tmp_path / "test.csv", PICKAPIC)
    s = load_prompts(str(path))
    assert s.format == "pickapic" and s.detected
    assert s.prompts == ["a castle, made of cake", 'a lamp that says "hi"', "café in 日本 at night", "two lines\nof caption"]
    assert s.duplicates_dropped == 2 and s.total == 4
    assert s.metadata[1] == {"index": 1, "rows": 2}
    assert "(2 repeated captions dropped)" in s.describe()
    assert load_prompts(f"pickapic:{path}", limit=2).prompts == s.prompts[:2]


def test_pickapic_refusals(tmp_path, monkeypatch):
    path = write(tmp_path / "test.csv", PICKAPIC)
    refusal("have no categories", str(path), category="x")
    refusal("has the header 'prompt,label'", f"pickapic:{write(tmp_path / 'w.csv', 'prompt,label' + chr(10) + 'a,b' + chr(10))}")
    parquet = tmp_path / "test-00000-of-00001.parquet"
    parquet.write_bytes(b"PAR1 not really")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as on a machine without pyarrow
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    msg = refusal("needs pyarrow: pip install pyarrow", str(parquet))
    assert str(parquet) in msg and "convert it to a CSV with a caption column" in msg


@pytest.mark.skipif(not HAS_PYARROW, reason="pyarrow is optional and not installed")
def test_pickapic_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "test.parquet"
    pq.write_table(pa.table({"caption": ["a kite", "a café", "a kite"], "ranking_id": [1, 2, 3]}), path)
    s = load_prompts(str(path))
    assert s.format == "pickapic" and s.prompts == ["a kite", "a café"] and s.duplicates_dropped == 1
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "bad.parquet")
    refusal("has the columns 'text'", str(tmp_path / "bad.parquet"))


# -------------------------------------------------------------------------------------------------- txt


def test_txt(tmp_path):
    path = write(tmp_path / "mine.txt", "\ufeffa café at dawn\n\n  Köln, \"at night\"  \n# a comment\n日本の庭\n", newline="\r\n")
    s = load_prompts(str(path))
    assert s.format == "txt" and s.detected and s.prompts == ["a café at dawn", 'Köln, "at night"', "日本の庭"]
    assert load_prompts(f"txt:{path}", limit=1).prompts == ["a café at dawn"]
    refusal("have no categories", str(path), category="Animals")
    refusal("has no prompts; expected UTF-8 text", str(write(tmp_path / "blank.txt", "\n\n# only a comment\n")))


def test_builtin_sets_by_name():
    for name in ("simple_animals", "varied"):
        s = load_prompts(name)
        assert s.format == "builtin" and s.prompts == bundled_prompts(name) and name in s.source
    assert load_prompts("varied", limit=3).prompts == bundled_prompts("varied")[:3]


# ------------------------------------------------------------------------------------ detection, specs


def test_detection_by_name_and_content(tmp_path, parti, drawbench, geneval):
    assert detect_format(parti) == "parti" and detect_format(drawbench) == "drawbench"
    assert detect_format(geneval) == "geneval" and detect_format(hps_folder(tmp_path)) == "hpsv2"
    # no telling suffix: the first line decides, and plain lines are txt
    assert detect_format(write(tmp_path / "p", PARTI)) == "parti"
    assert detect_format(write(tmp_path / "d.dat", DRAWBENCH)) == "drawbench"
    assert detect_format(write(tmp_path / "g", json.dumps(GENEVAL_RECORDS[0]) + "\n")) == "geneval"
    assert detect_format(write(tmp_path / "h", '["a"]')) == "hpsv2"
    assert detect_format(write(tmp_path / "c", PICKAPIC)) == "pickapic"
    assert detect_format(write(tmp_path / "prompts.list", "a kite\na pear\n")) == "txt"
    assert detect_format(write(tmp_path / "styled", "[cinematic] a kite\n{a, b} pear\n")) == "txt"
    assert detect_format(write(tmp_path / "braces", "{a, b} pear\n")) == "txt"
    assert detect_format(write(tmp_path / "h2", '[\n  "a"\n]\n')) == "hpsv2"
    assert load_prompts(str(tmp_path / "p")).prompts == load_prompts(str(parti)).prompts
    # a named format overrides the file name
    named = write(tmp_path / "sheet.txt", DRAWBENCH)
    assert load_prompts(f"drawbench:{named}").format == "drawbench"


def test_spec_parsing_and_general_refusals(tmp_path):
    assert parse_spec("parti:P.tsv") == ("parti", "P.tsv")
    assert parse_spec("GenEval:x/y.jsonl") == ("geneval", "x/y.jsonl")
    assert parse_spec("C:\\prompts\\a.txt") == (None, "C:\\prompts\\a.txt")  # a drive letter, not a format
    assert parse_spec("varied") == (None, "varied")
    assert set(FORMATS) == {"parti", "drawbench", "hpsv2", "geneval", "pickapic", "txt"}
    assert "formats: parti, drawbench, hpsv2, geneval, pickapic, txt" in refusal("unknown prompt format 'tsv'", "tsv:x.tsv")
    refusal("prompt file .*missing.tsv does not exist", f"parti:{tmp_path / 'missing.tsv'}")
    assert "built-in sets: simple_animals, varied" in refusal("prompt file variedd does not exist", "variedd")
    refusal("names no file; expected parti:PATH", "parti:")
    refusal("empty prompt set", " ")
    refusal("empty prompt category", "varied", category=" ")
