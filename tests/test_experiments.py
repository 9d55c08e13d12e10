"Sweeps through papermill: resuming a killed sweep, failures among successes, reruns on changed parameters, a registry shared by processes, and the statistics against scipy."
import json
import random
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from affect_nb.experiments import (append_registry, expand_grid, holm, load_registry, mean_ci, paired_test, plan_sweep,
                                   run_complete, run_sweep, summarize_runs)

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
              base_params=dict(marks=str(marks), sleep=0.5), n_jobs=1, progress=False)
    code = f"from affect_nb.experiments import run_sweep; run_sweep({str(toy)!r}, **{kw!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        ok = lambda: sum('"status": "ok"' in f.read_text() for f in reports.glob("s/*/run.json"))
        while ok() < 2:
            assert time.time() < deadline and proc.poll() is None, "the sweep did not finish two runs in time"
            time.sleep(0.1)
    finally: os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    plan = plan_sweep(toy, **{k: v for k, v in kw.items() if k not in ("n_jobs", "progress")})
    done_before = {r["run_id"] for r in plan if r["complete"]}
    assert 2 <= len(done_before) < 4
    before = executions(marks)

    runs = run_sweep(toy, **kw)
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
    kw = dict(seeds=[3], sweep="f", reports_dir=tmp_path / "r", base_params=dict(marks=str(tmp_path / "m")), progress=False)
    runs = run_sweep(toy, grid, n_jobs=2, **kw)
    assert runs.status.tolist() == ["ok", "failed", "ok"]
    assert runs.error[1] == "ValueError: told to fail at x=1.0"
    np.testing.assert_allclose(runs.P[[0, 2]], [0.5 + random.Random(3).gauss(0, 0.02), 0.7 + random.Random(3).gauss(0, 0.02)])
    reg = load_registry(tmp_path / "r" / "registry.csv")
    assert sorted(reg.status) == sorted(runs.status) and reg.P[reg.status == "failed"].isna().all()
    assert (reg.git_commit.notna() & reg.torch_version.notna() & reg.params.str.contains('"marks"')).all()
    failed = Path(runs.run_dir[1])
    assert json.loads((failed / "run.json").read_text())["status"] == "failed" and (failed / "toy.ipynb").is_file()
    assert (failed / "stderr.log").is_file()
    again = run_sweep(toy, grid, **kw)
    assert again.status.tolist() == ["skipped", "failed", "skipped"]
    assert executions(tmp_path / "m").to_dict() == {rid: (2 if "fail" in rid else 1) for rid in runs.run_id}


def test_changed_parameters_rerun_the_same_folder(toy, tmp_path):
    kw = dict(grid={"x": [1.0]}, seeds=[0, 1], sweep="p", reports_dir=tmp_path / "r", progress=False)
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
        run_sweep(toy, {"mask_q": [0.5]}, sweep="t", reports_dir=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
    with pytest.raises(FileNotFoundError, match="preset .*nope.yaml does not exist"):
        run_sweep(toy, {"x": [0.5]}, sweep="t", reports_dir=tmp_path / "r", preset=tmp_path / "nope.yaml", progress=False)


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


def test_mean_ci_matches_scipy_t_interval():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 10):
        x = rng.normal(0.4, 0.05, n)
        m, lo, hi = mean_ci(x)
        np.testing.assert_allclose((lo, hi), stats.t.interval(0.95, n - 1, loc=x.mean(), scale=stats.sem(x)))
        np.testing.assert_allclose(m, x.mean())
    np.testing.assert_allclose(mean_ci([0.1, np.nan, 0.3])[:1], [0.2])


def test_summary_and_paired_test_against_scipy():
    rng = np.random.default_rng(1)
    seeds, base = np.arange(5), rng.normal(0.5, 0.05, 5)
    eff = {"ref": 0.0, "small": 0.002, "big": 0.05}
    runs = pd.DataFrame([dict(task=t, cond=c, seed=s, P=base[s] + e + rng.normal(0, 0.005) + (0.1 if t == "au" else 0), status="ok")
                         for t in ("va", "au") for c, e in eff.items() for s in seeds])
    runs.loc[len(runs)] = dict(task="va", cond="big", seed=9, P=np.nan, status="failed")
    s = summarize_runs(runs, "cond", within="task")
    assert s.n.tolist() == [5] * 6
    g = runs[(runs.task == "va") & (runs.cond == "big") & (runs.status == "ok")].P
    row = s[(s.task == "va") & (s.cond == "big")].iloc[0]
    np.testing.assert_allclose((row.ci_low, row.ci_high), stats.t.interval(0.95, 4, loc=g.mean(), scale=stats.sem(g)))
    pt = paired_test(runs, "cond", "ref", within="task")
    assert pt[["task", "cond"]].values.tolist() == [["au", "big"], ["au", "small"], ["va", "big"], ["va", "small"]]
    for t in ("va", "au"):
        r = runs[runs.task == t].pivot_table(index="seed", columns="cond", values="P")
        got = pt[pt.task == t].set_index("cond")
        p = [stats.ttest_rel(r[c], r["ref"]).pvalue for c in ("big", "small")]
        np.testing.assert_allclose(got.p_t[["big", "small"]], p)
        np.testing.assert_allclose(got.p_holm[["big", "small"]], np.minimum(1, np.maximum.accumulate(np.sort(p) * [2, 1]))[np.argsort(np.argsort(p))])
        np.testing.assert_allclose(got.delta["big"], (r["big"] - r["ref"]).mean())
        np.testing.assert_allclose(got.p_wilcoxon["big"], stats.wilcoxon(r["big"] - r["ref"]).pvalue)
    assert pt.set_index(["task", "cond"]).significant.to_dict() == {("au", "big"): True, ("au", "small"): False, ("va", "big"): True, ("va", "small"): False}


def test_holm_against_its_definition():
    p = np.array([0.04, 0.001, 0.03, 0.2, 0.012])
    order = np.argsort(p)
    adj = np.empty(5)
    adj[order] = np.minimum(1, np.maximum.accumulate([(5 - i) * p[j] for i, j in enumerate(order)]))
    np.testing.assert_allclose(holm(p), adj)
    np.testing.assert_allclose(holm(p), [0.09, 0.005, 0.09, 0.2, 0.048])


def test_expand_grid_is_the_product_times_seeds():
    pts = expand_grid({"a": [1, 2], "b": ["x", "y", "z"]}, seeds=[0, 1])
    assert len(pts) == 12 and len({json.dumps(p, sort_keys=True) for p in pts}) == 12


ROOT = Path(__file__).resolve().parents[1]
FAKE_BODY = '''
import json, random
from pathlib import Path
if seed == 7: raise RuntimeError("planted failure")
effect = {"avg": 0.05, "token": 0.0}[pooling] + 0.1 * mask_p * (mask_mode == "frame")
P = 0.5 + effect + random.Random(seed).gauss(0, 0.01)
m = dict(task=task, P=P, best_epoch=1, probe=dict(P=0.3))
if task == "va": m.update(valence=P - 0.05, arousal=P + 0.05)
Path(out_dir).mkdir(parents=True, exist_ok=True)
Path(out_dir, "metrics.json").write_text(json.dumps(m))
'''


def fake_train_notebook(path: Path) -> Path:
    "The real training notebook's parameters cell over a body that scores in microseconds: pooling avg adds 0.05, frame masking 0.1·p."
    real = nbformat.read(ROOT / "nbs" / "experiments" / "train.ipynb", as_version=4)
    params = next(c for c in real.cells if "parameters" in c.metadata.get("tags", []))
    nb = nbformat.v4.new_notebook(metadata=real.metadata)
    nb.cells = [params, nbformat.v4.new_code_cell(FAKE_BODY)]
    nbformat.write(nb, path)
    return path


def papermill(path, out, **params):
    import papermill as pm
    pm.execute_notebook(str(path), str(out), parameters=params, cwd=str(ROOT), progress_bar=False, kernel_name="python3")


@pytest.mark.skipif(not (ROOT / "nbs" / "experiments" / "train.ipynb").is_file(), reason="no training notebook")
def test_ablation_and_paper_notebooks_end_to_end(tmp_path):
    fake = fake_train_notebook(tmp_path / "train.ipynb")
    out, reg = tmp_path / "ablations", tmp_path / "registry.csv"
    papermill(ROOT / "nbs" / "experiments" / "ablations.ipynb", tmp_path / "ablations.ipynb", study="pooling", tasks=["expr"], seeds=[0, 1],
              shared_backbone=False, notebook=str(fake), out_dir=str(out), registry=str(reg))
    res = pd.read_csv(out / "results.csv")
    avg = res[(res.study == "pooling") & (res.pooling == "avg")].iloc[0]
    np.testing.assert_allclose([avg.delta, avg.delta_low, avg.delta_high], 0.05, atol=1e-9)
    assert bool(avg.significant) and avg.n == 2
    tok = res[res.pooling == "token"].iloc[0]
    np.testing.assert_allclose(tok["mean"], 0.5 + 0.1 * 0.3 + np.mean([random.Random(s).gauss(0, 0.01) for s in range(2)]))
    assert (out / "figures" / "pooling.png").is_file() and (out / "findings.csv").is_file()
    assert pd.read_csv(out / "findings.csv").best.tolist() == ["pooling=avg"]
    assert load_registry(reg).status.tolist() == ["ok"] * 4

    papermill(ROOT / "nbs" / "experiments" / "paper.ipynb", tmp_path / "paper.ipynb", tasks=["va"], seeds=[0], quick=True,
              notebook=str(fake), out_dir=str(tmp_path / "paper"), registry=str(reg), cache_dir=str(tmp_path / "cache"))
    table = pd.read_csv(tmp_path / "paper" / "paper.csv", index_col=0)
    col = next(c for c in table if c.startswith("this run"))
    assert "synthetic" in col and "random-init" in col, col
    run = json.loads((tmp_path / "paper" / "task=va-seed=0" / "run.json").read_text())["params"]
    assert run["weights"].endswith("random0.safetensors") and Path(run["weights"]).is_file() and run["d_model"] == 64 and run["seq_len"] == 100
    m = json.loads((tmp_path / "paper" / "task=va-seed=0" / "metrics.json").read_text())
    assert table.loc["P_VA", col] == f"{m['P']:.3f}" and table.loc["CCC arousal", col] == f"{m['arousal']:.3f}"
    assert table.loc["P_AU (mean F1)", col] == "–" and table.loc["P_AU (mean F1)", "ABAW6 winner (test)"] == "0.56"
    assert len(load_registry(reg)) == 5


@pytest.mark.skipif(not (ROOT / "nbs" / "experiments" / "train.ipynb").is_file(), reason="no training notebook")
def test_ablation_notebook_fails_at_the_end_when_runs_failed(tmp_path):
    "A failed run does not stop the study, but the notebook (and so `make reports`) fails after writing the tables."
    import papermill as pm
    fake = fake_train_notebook(tmp_path / "train.ipynb")
    out, reg = tmp_path / "ablations", tmp_path / "registry.csv"
    with pytest.raises(pm.PapermillExecutionError, match="2 training runs failed"):
        papermill(ROOT / "nbs" / "experiments" / "ablations.ipynb", tmp_path / "ablations.ipynb", study="pooling", tasks=["expr"],
                  seeds=[0, 1, 7], shared_backbone=False, notebook=str(fake), out_dir=str(out), registry=str(reg))
    res = pd.read_csv(out / "results.csv")
    assert res.n.tolist() == [2, 2]  # the tables hold the runs that finished
    assert sorted(load_registry(reg).status) == ["failed"] * 2 + ["ok"] * 4
