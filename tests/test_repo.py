"""The repository's own structure: every document or notebook the project cites is in the repository."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("nbs", "tests", "affect_nb", ".ci")
DOC = re.compile(r"(?<![\w/.-])([A-Za-z_][\w-]*\.md)(?![\w.])")
NB_PATH = re.compile(r"(?<![\w/.-])(nbs/[\w./-]+\.(?:ipynb|yaml))\b")


def project_files():
    "The project's own text files: the sources, the README, settings and Makefile (executed reports are outputs, not sources)."
    files = [ROOT / n for n in ("README.md", "Makefile", "settings.ini", "setup.py", "data/README.md", "reports/README.md")]
    files += [p for d in SOURCES for p in (ROOT / d).rglob("*") if p.suffix in (".ipynb", ".py", ".md", ".yaml") and p.is_file()]
    return [p for p in files if p.exists() and p != Path(__file__).resolve()]


def test_every_cited_document_and_notebook_is_in_the_repository():
    names = {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts and ".git" not in p.parts}
    missing = []
    for p in project_files():
        text = p.read_text(errors="ignore")
        missing += [f"{p.relative_to(ROOT)} cites {d}" for d in set(DOC.findall(text)) if d not in names]
        missing += [f"{p.relative_to(ROOT)} cites {n}" for n in set(NB_PATH.findall(text)) if not (ROOT / n).exists()]
    assert not missing, "\n".join(sorted(missing))


def test_the_check_sees_a_missing_document(tmp_path):
    "The pattern finds a cited .md file and a notebook path in the forms the sources use."
    text = "see MISSING_NOTES.md, the notebook nbs/experiments/nothere.ipynb and `nbs/experiments/params/x.yaml`; not foo.md.bak"
    assert DOC.findall(text) == ["MISSING_NOTES.md"]
    assert NB_PATH.findall(text) == ["nbs/experiments/nothere.ipynb", "nbs/experiments/params/x.yaml"]


# --- the layout: one home per helper, imports that follow the data flow, readable modules -------------------------------

import ast, json, subprocess, sys
from dataclasses import fields

PACKAGE = ROOT / "affect_nb"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_"))


def _top_imports(module: str) -> set[str]:
    "What `module`'s top-level statements import: affect_nb modules by full name, other packages by their top name."
    out = set()
    for node in ast.parse((PACKAGE / f"{module}.py").read_text()).body:
        if isinstance(node, ast.Import): out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level: out.add(f"affect_nb.{node.module}" if node.module else "affect_nb")
            elif node.module == "affect_nb": out |= {f"affect_nb.{a.name}" for a in node.names}
            else: out.add(node.module if node.module.startswith("affect_nb.") else node.module.split(".")[0])
    return out


def imported_modules(module: str) -> set[str]:
    "The affect_nb modules and plotting/widget packages that importing `module` loads (its top-level imports, transitively)."
    seen, todo = set(), [f"affect_nb.{module}"]
    while todo:
        m = todo.pop()
        for d in _top_imports(m.split(".", 1)[1]) if m.startswith("affect_nb.") else ():
            if d not in seen and d != "affect_nb": seen.add(d); todo.append(d)
    return {m for m in seen if m.startswith("affect_nb.") or m in ("matplotlib", "ipywidgets", "IPython", "seaborn")} - {f"affect_nb.{module}"}


def test_the_import_check_sees_what_python_loads():
    "The static reading agrees with a real import, in a fresh interpreter, for a module that draws and one that does not."
    for m in ("report", "metrics"):
        code = (f"import sys, affect_nb.{m}; print(sorted(x for x in sys.modules if x.startswith('affect_nb.') "
                "or x in ('matplotlib', 'ipywidgets', 'IPython', 'seaborn')))")
        real = set(ast.literal_eval(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout))
        assert imported_modules(m) <= real - {f"affect_nb.{m}"}
        assert ("matplotlib" in imported_modules(m)) == ("matplotlib" in real)


def test_the_papers_ideas_import_no_loop_no_data_layer_and_no_plotting():
    for m in ("masking", "model", "losses", "metrics"):
        loaded = imported_modules(m)
        assert loaded <= {"affect_nb.tasks", "affect_nb.utils", "affect_nb.masking"}, (m, loaded)


def test_the_data_layer_imports_no_model_and_the_loop_no_sweep_code():
    for m in ("data", "features", "windows", "decode", "detect"):
        loaded = imported_modules(m)
        assert not loaded & {"affect_nb.model", "affect_nb.masking", "affect_nb.losses", "affect_nb.train"}, (m, loaded)
    for m in ("train", "predict", "config"):
        loaded = imported_modules(m)
        assert not loaded & {"affect_nb.sweep", "affect_nb.stats", "affect_nb.studies", "affect_nb.params"}, (m, loaded)


def test_only_explore_report_studies_and_the_video_timeline_draw():
    drawing = {m for m in MODULES if imported_modules(m) & {"matplotlib", "ipywidgets", "IPython", "seaborn"}}
    assert drawing <= {"explore", "report", "studies", "cli", "timeline", "video"}, drawing


def test_each_helper_has_one_home():
    "Each shared definition is written once in the package (a second `def`/assignment anywhere else fails)."
    names = ["atomic_write", "check_writable", "path_component", "get_device", "check_device", "rank_world", "init_distributed",
             "seed_everything", "jsonable", "json_params", "git_commit", "image_listing", "check_task", "check_option",
             "label_columns", "INVALID", "EXPR_CLASSES", "AU_NAMES", "HEADERS", "TASK_NAMES", "SUBMISSION_HEADER",
             "load_preset", "notebook_parameters", "repo_root", "make_loss", "score_videos",
             "machine", "reproducible_env", "is_reproducible", "repo_relative", "THREAD_VARS"]
    homes = {n: [] for n in names}
    for p in PACKAGE.glob("*.py"):
        if p.name == "_modidx.py": continue
        for node in ast.parse(p.read_text()).body:
            defined = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
                      [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            for n in defined:
                if n in homes: homes[n].append(p.stem)
    assert {n: h for n, h in homes.items() if len(h) != 1} == {}


def test_modules_are_small_and_lines_short():
    for p in PACKAGE.glob("*.py"):
        if p.name == "_modidx.py": continue
        lines = p.read_text().splitlines()
        assert len(lines) <= 330, f"{p.name} has {len(lines)} lines"
        long = [i + 1 for i, l in enumerate(lines) if len(l) > 140]
        assert not long, f"{p.name}: lines over 140 characters: {long}"


# --- one source for the settings: TrainConfig ----------------------------------------------------------------------------

def test_the_training_notebook_declares_every_setting_of_TrainConfig():
    from affect_nb.config import TrainConfig
    from affect_nb.params import EXPERIMENT_PARAMS, TRAIN_SETTINGS, notebook_parameters
    declared = notebook_parameters(ROOT / "nbs/experiments/train.ipynb")
    assert set(declared) == set(EXPERIMENT_PARAMS)
    settings = {f.name for f in fields(TrainConfig)} - {"task", "in_dim", "features"}
    assert set(TRAIN_SETTINGS) == settings and settings <= set(declared), settings - set(declared)


def test_the_command_line_has_an_option_for_every_setting():
    from affect_nb.cli import _train_parser
    from affect_nb.params import TRAIN_SETTINGS
    options = {a.dest for a in _train_parser()._actions}
    assert set(TRAIN_SETTINGS) <= options, set(TRAIN_SETTINGS) - options


def test_every_preset_states_every_setting_and_nothing_unknown():
    from affect_nb.params import TRAIN_SETTINGS, load_preset
    notebook = ROOT / "nbs/experiments/train.ipynb"
    presets = sorted((ROOT / "nbs/experiments/params").glob("*.yaml"))
    assert presets
    for p in presets:
        stated = load_preset(p)
        assert set(TRAIN_SETTINGS) <= set(stated), (p.name, sorted(set(TRAIN_SETTINGS) - set(stated)))
        load_preset(p, notebook)  # an unknown key is an error naming it and the file


def test_a_preset_with_an_unknown_key_is_an_error_naming_key_and_file(tmp_path):
    import pytest
    from affect_nb.params import load_preset
    p = tmp_path / "typo.yaml"
    p.write_text("seq_len: 16\nmask_pp: 0.3\n")
    with pytest.raises(ValueError, match=r"preset .*typo\.yaml: train\.ipynb declares no parameter 'mask_pp'"):
        load_preset(p, ROOT / "nbs/experiments/train.ipynb")
    short = tmp_path / "short.yaml"
    short.write_text("seq_len: 16\n")
    got = load_preset(short, ROOT / "nbs/experiments/train.ipynb")
    from affect_nb.config import TrainConfig
    assert (got["seq_len"], got["mask_p"], got["d_model"]) == (16, TrainConfig.mask_p, TrainConfig.d_model)  # the paper's
