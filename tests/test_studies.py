"The ablation and paper notebooks end to end through papermill, over a training notebook that scores in microseconds."
import json
import random
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from affect_nb.registry import load_registry

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
