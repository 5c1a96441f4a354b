"""The README's claims match their measurements: every table in the README names its results file in the text just
above it, and its header and every row stand in that file verbatim. Editing a figure in the README (or
re-measuring without updating the README) fails here. Also: the README starts with its title and what dat-ds is,
has exactly two commands in its first code block, and stays under 25 KB; every docs/ or bench/ file it names exists."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import REPO

SOURCE = re.compile(
    r"\((docs/[^)\s]+\.md|bench/results/[^)\s]+\.md)\)|`((?:docs|bench/results)/[^`\s]+\.md)`"
)


def readme_tables(text: str) -> list[dict]:
    """Each table: its first line number, lines, and the results file named in the text between the previous
    table or heading and this table (the last one named)."""
    lines = text.splitlines()
    tables, i, since = [], 0, 0
    while i < len(lines):
        if lines[i].startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            named = [a or b for a, b in SOURCE.findall("\n".join(lines[since:i]))]
            tables.append({"line": i + 1, "rows": lines[i:j], "source": named[-1] if named else None})
            i = since = j
            continue
        if lines[i].startswith("#"):
            since = i
        i += 1
    return tables


def problems(text: str, root: Path = REPO) -> list[str]:
    out = []
    for t in readme_tables(text):
        where = f"README.md:{t['line']}"
        if t["source"] is None:
            out.append(f"{where}: a table with no results file named above it")
            continue
        path = root / t["source"]
        if not path.is_file():
            out.append(f"{where}: its results file {t['source']} does not exist")
            continue
        have = {ln.strip() for ln in path.read_text().splitlines()}
        for row in t["rows"]:
            if set(row.replace("|", "").strip()) <= set("-: "):
                continue  # the |---| line
            if row.strip() not in have:
                out.append(f"{where}: {row.strip()[:90]!r} is not in {t['source']}")
    return out


def test_every_readme_table_stands_in_its_results_file():
    text = (REPO / "README.md").read_text()
    assert readme_tables(text), "the README shows at least the demo's table"
    assert not problems(text), "\n".join(problems(text))


def test_an_edited_figure_is_found():
    text = (REPO / "README.md").read_text()
    table = readme_tables(text)[0]
    row = table["rows"][2]
    cells = row.split("|")
    k = next(i for i, c in enumerate(cells) if re.fullmatch(r"\s*\d+\.\d+\s*", c))
    cells[k] = f" {float(cells[k]) + 0.01:.2f} "
    edited = text.replace(row, "|".join(cells), 1)
    found = problems(edited)
    assert len(found) == 1 and "is not in" in found[0], found


def test_readme_opens_with_title_what_and_two_commands():
    text = (REPO / "README.md").read_text()
    assert len(text.encode()) <= 25_000, (
        f"README is {len(text.encode())} bytes; keep it under 25 KB (docs/ for more)"
    )
    first = text.splitlines()[0]
    assert first.startswith("# dat-ds"), first
    para = text.split("\n\n")[1]
    assert "DAT" in para and "DeepSpeed" in para
    block = text.split("```")[1].strip().splitlines()
    assert block == ["make demo", "make test"], block
    for placeholder in re.findall(r"\b[A-Z]{3,}_[A-Z_]+\b", text):
        assert placeholder.startswith(("DAT_DS_", "OMP_", "WANDB_", "TORCH_", "HF_", "CUDA_", "DS_ENV")), (
            f"unfilled placeholder {placeholder}"
        )


def test_every_file_the_readme_names_exists():
    text = (REPO / "README.md").read_text()
    named = set(
        re.findall(r"\b((?:docs|bench|recipes|tests|data_prep|dat_ds)/[\w./-]+\.(?:md|png|py|toml))", text)
    )
    missing = sorted(n for n in named if not (REPO / n).exists())
    assert not missing, missing
