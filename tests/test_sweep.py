"Sweeps through papermill: resuming a killed sweep, failures among successes, reruns on changed parameters, a registry shared by processes."
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from affect_nb.registry import append_registry, load_registry
from affect_nb.sweep import (RunOptions, execute_run, expand_grid, plan_sweep, run_complete,
                             run_sweep)

QUIET = RunOptions(progress=False)

BODY = '''
import json, os, random, time, uuid
from pathlib import Path
Path(marks).mkdir(parents=True, exist_ok=True)
Path(marks, f"{Path(out_dir).name}.{uuid.uuid4().hex}").touch()
time.sleep(sleep)
if fail: raise ValueError(f"told to fail at x={x}")
Path(out_dir, "metrics.json").write_text(json.dumps(dict(task="toy", P=0.5 + 0.1 * x * (mode == "b") + random.Random(seed).gauss(0, 0.02), params=dict(x=x))))
'''


def toy_notebook(path: Path) -> Path:
    "A tiny experiment notebook: it leaves one marker file per execution in `marks`, can `sleep` and `fail`, and writes metrics.json."
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "python3", "language": "python"}})
    p = nbformat.v4.new_code_cell("x: float = 0.0\nmode: str = 'a'\nseed: int = 0\nout_dir: str = 'out'\nmarks: str = 'marks'\n"
                                  "fail: bool = False\nsleep: float = 0.0")
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell(BODY)]
    nbformat.write(nb, path)
    return path


def executions(marks: Path) -> pd.Series:
    "How many times each run folder was executed, from the marker files."
    names = [p.name.split(".")[0] for p in marks.iterdir()] if marks.is_dir() else []
    return pd.Series(names, dtype=object).value_counts()


@pytest.fixture
def toy(tmp_path):
    return toy_notebook(tmp_path / "toy.ipynb")


def test_killed_sweep_resumes_without_redoing_completed_runs(toy, tmp_path):
    marks, reports = tmp_path / "marks", tmp_path / "reports"
    kw = dict(grid={"x": [0.0, 1.0, 2.0, 3.0]}, seeds=[0], sweep="s", reports_dir=str(reports),
              base_params=dict(marks=str(marks), sleep=0.5))
    code = f"from affect_nb.sweep import RunOptions, run_sweep; run_sweep({str(toy)!r}, options=RunOptions(progress=False), **{kw!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        ok = lambda: sum('"status": "ok"' in f.read_text() for f in reports.glob("s/*/run.json"))
        while ok() < 2:
            assert time.time() < deadline and proc.poll() is None, "the sweep did not finish two runs in time"
            time.sleep(0.1)
    finally: os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    plan = plan_sweep(toy, **kw)
    done_before = {r["run_id"] for r in plan if r["complete"]}
    assert 2 <= len(done_before) < 4
    before = executions(marks)

    runs = run_sweep(toy, options=QUIET, **kw)
    after = executions(marks)
    assert set(runs.status[runs.run_id.isin(done_before)]) == {"skipped"}
    assert set(runs.status[~runs.run_id.isin(done_before)]) == {"ok"}
    for rid in done_before: assert after[rid] == before[rid] == 1
    assert after.sum() - before.sum() == 4 - len(done_before)
    assert all(run_complete(r["run_dir"], r["params"]) for r in plan)
    reg = load_registry(reports / "registry.csv")
    assert set(reg.run_id[reg.status == "ok"]) == {r["run_id"] for r in plan}


def test_failing_run_is_recorded_while_the_others_finish(toy, tmp_path):
    grid = [dict(x=0.0), dict(x=1.0, fail=True), dict(x=2.0, mode="b")]
    kw = dict(seeds=[3], sweep="f", reports_dir=tmp_path / "r", base_params=dict(marks=str(tmp_path / "m")))
    runs = run_sweep(toy, grid, options=RunOptions(n_jobs=2, progress=False), **kw)
    assert runs.status.tolist() == ["ok", "failed", "ok"]
    assert runs.error[1] == "ValueError: told to fail at x=1.0"
    np.testing.assert_allclose(runs.P[[0, 2]], [0.5 + random.Random(3).gauss(0, 0.02), 0.7 + random.Random(3).gauss(0, 0.02)])
    reg = load_registry(tmp_path / "r" / "registry.csv")
    assert sorted(reg.status) == sorted(runs.status) and reg.P[reg.status == "failed"].isna().all()
    assert (reg.git_commit.notna() & reg.torch_version.notna() & reg.params.str.contains('"marks"')).all()
    failed = Path(runs.run_dir[1])
    assert json.loads((failed / "run.json").read_text())["status"] == "failed" and (failed / "toy.ipynb").is_file()
    assert (failed / "stderr.log").is_file()
    again = run_sweep(toy, grid, options=QUIET, **kw)
    assert again.status.tolist() == ["skipped", "failed", "skipped"]
    assert executions(tmp_path / "m").to_dict() == {rid: (2 if "fail" in rid else 1) for rid in runs.run_id}


def test_changed_parameters_rerun_the_same_folder(toy, tmp_path):
    kw = dict(grid={"x": [1.0]}, seeds=[0, 1], sweep="p", reports_dir=tmp_path / "r", options=QUIET)
    a = run_sweep(toy, base_params=dict(marks=str(tmp_path / "m"), mode="a"), **kw)
    b = run_sweep(toy, base_params=dict(marks=str(tmp_path / "m"), mode="b"), **kw)
    assert a.run_id.tolist() == b.run_id.tolist() == ["x=1-seed=0", "x=1-seed=1"]
    assert b.status.tolist() == ["ok", "ok"]
    np.testing.assert_allclose(b.P - a.P, 0.1)
    assert executions(tmp_path / "m").tolist() == [2, 2]
    Path(b.run_dir[0], "last.pt").write_text("a checkpoint of mode b")
    c = run_sweep(toy, base_params=dict(marks=str(tmp_path / "m"), mode="a", fail=True), **kw)
    assert not Path(b.run_dir[0], "last.pt").exists(), "a run of other parameters must start from an empty folder"
    assert c.status.tolist() == ["failed", "failed"]
    assert not any((Path(d) / "metrics.json").exists() for d in c.run_dir), "a stale metrics.json of other parameters survived"


def test_unknown_parameter_is_an_error_before_anything_runs(toy, tmp_path):
    with pytest.raises(ValueError, match=r"declares no parameter \['mask_q'\]"):
        run_sweep(toy, {"mask_q": [0.5]}, sweep="t", reports_dir=tmp_path / "r", options=QUIET)
    assert not (tmp_path / "r").exists()
    with pytest.raises(FileNotFoundError, match="preset .*nope.yaml does not exist"):
        run_sweep(toy, {"x": [0.5]}, sweep="t", reports_dir=tmp_path / "r", preset=tmp_path / "nope.yaml", options=QUIET)


def _append(args):
    path, worker, n = args
    for j in range(n): append_registry(path, [dict(run_id=f"w{worker}-{j}", sweep="c", status="ok", worker=worker, P=j / 10)])


def test_registry_keeps_every_row_of_concurrent_processes(tmp_path):
    path = tmp_path / "registry.csv"
    with ProcessPoolExecutor(3, mp_context=get_context("spawn")) as ex: list(ex.map(_append, [(path, w, 10) for w in range(3)]))
    reg = load_registry(path)
    assert len(reg) == 30 and reg.run_id.is_unique
    assert sorted(reg.run_id) == sorted(f"w{w}-{j}" for w in range(3) for j in range(10))
    np.testing.assert_allclose(reg.groupby("worker").P.sum(), 4.5)
    assert not list(tmp_path.glob(".*tmp"))


def test_expand_grid_is_the_product_times_seeds():
    pts = expand_grid({"a": [1, 2], "b": ["x", "y", "z"]}, seeds=[0, 1])
    assert len(pts) == 12 and len({json.dumps(p, sort_keys=True) for p in pts}) == 12


def snapshot(root: Path) -> dict:
    "Every file and folder under `root`: relative path → bytes (None for a folder)."
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_a_folder_the_sweep_did_not_make_is_never_touched(toy, tmp_path):
    reports, marks = tmp_path / "r", tmp_path / "m"
    kw = dict(seeds=[0], sweep="s", reports_dir=reports)
    a = run_sweep(toy, {"x": [1.0, 2.0]}, base_params=dict(marks=str(marks), mode="a"), options=QUIET, **kw)
    assert a.status.tolist() == ["ok", "ok"]
    precious = reports / "s" / "x=3-seed=0"  # where the sweep's third point would run
    (precious / "checkpoint").mkdir(parents=True)
    (precious / "important.txt").write_text("my notes")
    (precious / "checkpoint" / "last.pt").write_bytes(bytes(range(256)))
    before, mine, n_reg = snapshot(tmp_path), snapshot(precious), len(load_registry(reports / "registry.csv"))
    for n_jobs in (1, 2):
        with pytest.raises(FileExistsError, match=re.escape(f"run folder {precious} exists and was not made by a sweep (no run.json)")):
            run_sweep(toy, {"x": [1.0, 2.0, 3.0]}, base_params=dict(marks=str(marks), mode="b"),
                      options=RunOptions(n_jobs=n_jobs, progress=False), **kw)
    with pytest.raises(FileExistsError, match=re.escape(f"run folder {precious} exists")):
        execute_run(toy, precious, dict(x=3.0, seed=0, marks=str(marks)), "x=3-seed=0", "s", registry=reports / "registry.csv")
    assert snapshot(tmp_path) == before, "the refused sweep changed files (the user's, or the runs it had made)"
    assert len(load_registry(reports / "registry.csv")) == n_reg and executions(marks).sum() == 2

    precious.rename(tmp_path / "moved-away")
    precious.mkdir()  # an empty folder may be used
    b = run_sweep(toy, {"x": [1.0, 2.0, 3.0]}, base_params=dict(marks=str(marks), mode="b"), options=QUIET, **kw)
    assert b.status.tolist() == ["ok", "ok", "ok"]  # the sweep's own folders of other parameters are rerun
    np.testing.assert_allclose(b.P[:2] - a.P, [0.1, 0.2])
    assert executions(marks).to_dict() == {"x=1-seed=0": 2, "x=2-seed=0": 2, "x=3-seed=0": 1}
    assert snapshot(tmp_path / "moved-away") == mine and len(mine) == 3


def test_values_and_sweep_names_cannot_leave_the_sweep_folder(toy, tmp_path):
    reports, marks = tmp_path / "r", tmp_path / "m"
    values = ["../../x", "/abs", "a/b", "a\\b", ".."]
    runs = run_sweep(toy, {"mode": values}, seeds=[0], sweep="s", reports_dir=reports, base_params=dict(marks=str(marks)), options=QUIET)
    assert runs.status.tolist() == ["ok"] * len(values) and runs["mode"].tolist() == values
    inside = (reports / "s").resolve()
    assert all(Path(d).resolve().parent == inside for d in runs.run_dir)
    assert sorted(p.name for p in inside.iterdir()) == sorted(runs.run_id) and len(set(runs.run_id)) == len(values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "r", "toy.ipynb"]
    assert sorted(p.name for p in reports.iterdir()) == ["registry.csv", "registry.csv.lock", "s"]
    assert not (tmp_path.parent / "x").exists() and not Path("/abs").exists()
    for sweep in ("../up", "/abs", "a/b", "", ".", ".."):
        with pytest.raises(ValueError, match=re.escape(f"sweep {sweep!r} is not a single file or folder name")):
            run_sweep(toy, {"x": [1.0]}, seeds=[0], sweep=sweep, reports_dir=tmp_path / "r2", options=QUIET)
    assert not (tmp_path / "r2").exists() and not (tmp_path / "up").exists()


def test_sweep_inputs_are_checked_with_errors_naming_what_is_wrong(toy, tmp_path):
    kw = dict(seeds=[0], sweep="t", reports_dir=tmp_path / "r", options=QUIET)
    with pytest.raises(ValueError, match=re.escape(f"{toy} declares no parameter ['mask_q'] in its parameters cell")):
        run_sweep(toy, {"mask_q": [0.5]}, **kw)
    preset = tmp_path / "typo.yaml"
    preset.write_text("mode: b\nmod: a\n")
    with pytest.raises(ValueError, match=re.escape(f"declares no parameter ['mod'] (['mod'] set by preset {preset})")):
        run_sweep(toy, {"x": [0.5]}, preset=preset, **kw)
    preset.write_text("mode: b\nx: 1\n  seed: 2\n")
    with pytest.raises(ValueError, match=re.escape(f"preset {preset} is not valid YAML (line 3, column 7): mapping values are not allowed here")):
        run_sweep(toy, {"x": [0.5]}, preset=preset, **kw)
    preset.write_text("- mode\n- x\n")
    with pytest.raises(ValueError, match=re.escape(f"preset {preset} must hold a mapping of parameter names to values, got list")):
        run_sweep(toy, {"x": [0.5]}, preset=preset, **kw)
    with pytest.raises(ValueError, match="parameter 'x' has a value {0.5} of type set .*; give the values as a list"):
        run_sweep(toy, {"x": {0.5}}, **kw)
    with pytest.raises(ValueError, match="parameter 'mode' has a value <object object at .*> of type object"):
        run_sweep(toy, [dict(x=0.5, mode=object())], **kw)
    with pytest.raises(ValueError, match="grid parameter 'x' has no values"):
        run_sweep(toy, {"x": []}, **kw)
    assert not (tmp_path / "r").exists()
