"""README.md is generated from nbs/index.ipynb (`make readme`); this keeps the two in sync."""
from pathlib import Path

import nbformat
from nbconvert import MarkdownExporter

ROOT = Path(__file__).resolve().parents[1]


def test_readme_matches_index_notebook():
    nb = nbformat.read(ROOT / "nbs" / "index.ipynb", as_version=4)
    body, _ = MarkdownExporter().from_notebook_node(nb)
    assert (ROOT / "README.md").read_text(encoding="utf-8") == body, "README.md is stale: run `make readme`"


def test_quickstart_has_exactly_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Quickstart", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [l for l in block.splitlines() if l.strip() and not l.strip().startswith("#")]
    assert [c.split("#")[0].strip() for c in commands] == ["make demo", "make test"]
