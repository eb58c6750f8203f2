"""scripts/results_tables.py: the tables of README.md and docs/RESULTS.md are generated from results/*.csv,
and --check fails when a generated number no longer matches its data."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "results_tables.py"


def load_script():
    # scripts/ is not a package: load the file as a module so that the tests call main() in-process
    spec = importlib.util.spec_from_file_location("results_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there while the file executes
    spec.loader.exec_module(module)
    return module


results_tables = load_script()

INTERVALS_CSV = """quantity,method,estimate,lo,hi,seeds
test_gold,rocm,7.6213,7.5,7.74,3
test_gold,rlcm,7.0449,6.9,7.2,3
test_gold,ddpo,5.1,,,1
time_ratio,rocm,0.3612,0.3,0.42,3
"""

SUMMARY_CSV = """method,lr,seed,test_gold,test_accuracy,train_s
rocm,1e-4,0,7.6,0.91,120.4
rocm,1e-4,1,7.8,0.93,118.9
rocm,1e-4,2,7.7,0.95,121.2
rlcm,1e-4,0,7.0,0.80,99.5
rlcm,1e-4,1,7.2,0.84,101.0
rlcm,3e-4,0,6.5,0.70,100.0
"""

GOLD_MARKER = ('<!-- results-table: csv=results/cm/intervals.csv rows="quantity=test_gold" '
               'columns="method:method,estimate:gold,lo-hi:95% interval,seeds:seeds" digits=2 -->')
GOLD_TABLE = """| method | gold | 95% interval | seeds |
| --- | --- | --- | --- |
| rocm | 7.62 | [7.50, 7.74] | 3 |
| rlcm | 7.04 | [6.90, 7.20] | 3 |
| ddpo | 5.10 | – | 1 |"""


def make_repo(root: Path, readme_body: str, results_body: str = "# Results\n") -> Path:
    (root / "results" / "cm").mkdir(parents=True)
    (root / "results" / "cm" / "intervals.csv").write_text(INTERVALS_CSV)
    (root / "results" / "cm" / "summary.csv").write_text(SUMMARY_CSV)
    (root / "docs").mkdir()
    (root / "docs" / "RESULTS.md").write_text(results_body)
    (root / "README.md").write_text(readme_body)
    return root


def run(root: Path, *args: str) -> int:
    return results_tables.main(["--root", str(root), *args])


def readme(root: Path) -> str:
    return (root / "README.md").read_text()


def test_regeneration_fills_the_table_and_check_then_passes(tmp_path, capsys):
    root = make_repo(tmp_path, f"# Title\n\n{GOLD_MARKER}\n<!-- /results-table -->\n\nafter\n")
    assert run(root, "--check") == 1  # the empty block differs from its data
    assert run(root) == 0
    assert readme(root) == f"# Title\n\n{GOLD_MARKER}\n{GOLD_TABLE}\n<!-- /results-table -->\n\nafter\n"
    assert "updated README.md:3" in capsys.readouterr().out
    assert run(root, "--check") == 0
    assert capsys.readouterr().out == ""
    assert run(root) == 0  # a second run is a no-op
    assert readme(root) == f"# Title\n\n{GOLD_MARKER}\n{GOLD_TABLE}\n<!-- /results-table -->\n\nafter\n"


def test_a_hand_edited_number_fails_check_with_a_diff(tmp_path, capsys):
    edited = GOLD_TABLE.replace("| rocm | 7.62 |", "| rocm | 7.65 |")
    text = f"intro\n{GOLD_MARKER}\n{edited}\n<!-- /results-table -->\n"
    root = make_repo(tmp_path, "# README\n", results_body=text)
    assert run(root, "--check") == 1
    out = capsys.readouterr().out
    assert "--- a/docs/RESULTS.md" in out and "+++ b/docs/RESULTS.md" in out
    assert "-| rocm | 7.65 |" in out and "+| rocm | 7.62 |" in out
    assert "results_tables: docs/RESULTS.md:2: results-table from results/cm/intervals.csv is out of date" in out
    assert (root / "docs" / "RESULTS.md").read_text() == text  # --check writes nothing


def test_inline_values_fill_prose_and_table_cells(tmp_path, capsys):
    value = '<!-- results-value: csv=results/cm/intervals.csv rows="quantity=test_gold;method=rocm" column={} {} -->'
    text = (f"ROCM reaches {value.format('estimate', 'digits=2')}9.99<!-- /results-value --> gold "
            f"{value.format('lo-hi', 'digits=1')}<!-- /results-value -->.\n"
            f"| claim | value |\n| --- | --- |\n"
            f"| faster | {value.format('seeds', '').replace('test_gold', 'time_ratio')}?<!-- /results-value --> seeds |\n")
    root = make_repo(tmp_path, text)
    assert run(root) == 0
    lines = readme(root).splitlines()
    assert lines[0].startswith("ROCM reaches <!--") and "-->7.62<!-- /results-value --> gold" in lines[0]
    assert "-->[7.5, 7.7]<!-- /results-value -->." in lines[0]
    assert lines[3].endswith("-->3<!-- /results-value --> seeds |")
    assert run(root, "--check") == 0


def test_group_means_over_seeds_with_count_and_sort(tmp_path):
    marker = ('<!-- results-table: csv=results/cm/summary.csv group=method,lr mean=test_gold,test_accuracy sd=test_gold '
              'sort=-test_gold columns="method,lr,test_gold:gold,test_gold_sd:sd,test_accuracy:accuracy,n:seeds" '
              'digits=2 fmt="test_accuracy:.1%" -->')
    root = make_repo(tmp_path, f"{marker}\n<!-- /results-table -->\n")
    assert run(root) == 0
    assert readme(root) == (
        f"{marker}\n"
        "| method | lr | gold | sd | accuracy | seeds |\n| --- | --- | --- | --- | --- | --- |\n"
        "| rocm | 1e-4 | 7.70 | 0.10 | 93.0% | 3 |\n"
        "| rlcm | 1e-4 | 7.10 | 0.14 | 82.0% | 2 |\n"
        "| rlcm | 3e-4 | 6.50 | – | 70.0% | 1 |\n"
        "<!-- /results-table -->\n")


def test_pooled_mean_as_an_inline_value_and_filters_with_alternatives(tmp_path):
    pooled = '<!-- results-value: csv=results/cm/summary.csv rows="method=rocm" mean=train_s column=train_s fmt=.0f -->'
    table = ('<!-- results-table: csv=results/cm/summary.csv rows="method!=rocm;lr=0.0001|3e-4;seed=0" '
             'columns="method,lr,train_s:train s" fmt="train_s:.0f,lr:raw" -->')
    root = make_repo(tmp_path, f"mean {pooled}<!-- /results-value --> s\n\n{table}\n<!-- /results-table -->\n")
    assert run(root) == 0
    assert f"mean {pooled}120<!-- /results-value --> s" in readme(root)
    # lr=0.0001 matches the CSV's 1e-4 by value; rows keep CSV order
    assert "| rlcm | 1e-4 | 100 |\n| rlcm | 3e-4 | 100 |\n<!--" in readme(root)


def test_markers_in_code_are_examples_not_markers(tmp_path):
    text = ("Tables sit between `<!-- results-table: SPEC -->` and `<!-- /results-table -->`.\n\n"
            "```markdown\n<!-- results-table: csv=results/nothing.csv -->\n<!-- /results-table -->\n```\n")
    root = make_repo(tmp_path, text)
    assert run(root, "--check") == 0
    assert run(root) == 0 and readme(root) == text


BAD_SPECS = {
    "missing csv": ('<!-- results-table: csv=results/cm/nope.csv -->', "results/cm/nope.csv: no such CSV file"),
    "unknown column": ('<!-- results-table: csv=results/cm/intervals.csv columns="method,gold" -->', "column 'gold'"),
    "unknown filter column": ('<!-- results-table: csv=results/cm/intervals.csv rows="metric=gold" -->', "'metric'"),
    "unknown filter value": ('<!-- results-table: csv=results/cm/intervals.csv rows="method=rocmm" -->', "method='rocmm'"),
    "no row left": ('<!-- results-table: csv=results/cm/intervals.csv rows="quantity=time_ratio;method=ddpo" -->', "leaves no row"),
    "unknown key": ('<!-- results-table: csv=results/cm/intervals.csv digit=2 -->', "unknown spec key 'digit'"),
    "misspelt marker": ('<!-- results-tabel: csv=results/cm/intervals.csv -->', "unknown marker 'results-tabel'"),
    "unknown fmt column": ('<!-- results-table: csv=results/cm/intervals.csv fmt="estimat:.1f" -->', "column 'estimat'"),
    "mean of text": ('<!-- results-table: csv=results/cm/summary.csv group=lr mean=method -->', "holds text"),
}


@pytest.mark.parametrize("marker,message", BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_a_bad_marker_is_one_error_line_and_exit_2(tmp_path, capsys, marker, message):
    closing = "<!-- /results-table -->"
    text = f"# ok\n{GOLD_MARKER}\n{closing}\n\n{marker}\n{closing}\n"
    root = make_repo(tmp_path, text)
    assert run(root) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("results_tables: error: README.md:5: ") and message in err, err
    assert readme(root) == text  # nothing written, not even the good table above it


@pytest.mark.parametrize("text,message", [
    ("<!-- results-table: csv=results/cm/intervals.csv -->\nno end\n", "README.md:1: results-table is never closed"),
    ("x\n<!-- /results-table -->\n", "README.md:2: closing /results-table without a matching opening"),
    ('<!-- results-value: csv=results/cm/intervals.csv column=estimate -->?<!-- /results-value -->', "selects 4 rows"),
])
def test_unbalanced_markers_and_ambiguous_values_exit_2(tmp_path, capsys, text, message):
    root = make_repo(tmp_path, text)
    assert run(root, "--check") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_extra_markdown_files_on_the_command_line(tmp_path):
    root = make_repo(tmp_path, "# README\n")
    extra = root / "docs" / "extra.md"
    extra.write_text(f"{GOLD_MARKER}\n<!-- /results-table -->\n")
    assert run(root, "--check", str(extra)) == 1
    assert run(root, str(extra)) == 0
    assert GOLD_TABLE in extra.read_text()


def test_the_repository_tables_match_the_committed_results():
    """README.md and docs/RESULTS.md as committed: every generated block matches results/."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
