"""Training end to end on a tiny synthetic Aff-Wild2: determinism, resume after a kill, torchrun with 2 processes,
submission files, clear errors, the command lines and the papermill experiment notebook of each task."""
import json, os, shutil, signal, subprocess, sys
from pathlib import Path

import pandas as pd
import pytest

from affect_nb.data import EXPR_CLASSES, AU_NAMES, frame_index
from affect_nb.cli import main_predict
from affect_nb.config import load_checkpoint
from affect_nb.metrics import score_videos
from affect_nb.predict import predict, predict_videos, predictions_frame, write_submission
from affect_nb.synth import make_synthetic
from affect_nb.params import prepare_data_dir
from affect_nb.train import train
from affect_nb.windows import load_split
from trees import extract_all

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
BACKBONE = dict(backbone="vit_tiny_patch16_224", pretrained=False, img_size=32, pooling="avg")
TINY = dict(seq_len=16, batch_size=4, epochs=4, lr=3e-3, patience=10, d_model=16, n_heads=2, n_layers=1, d_ff=32,
            dropout=0.1, mask_p=0.3)


def cli_args(config: dict) -> list[str]:
    "Command-line options of `config` (underscores become dashes)."
    return [a for k, v in config.items() for a in (f"--{k.replace('_', '-')}", str(v).lower() if isinstance(v, bool) else str(v))]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    "A synthetic tree of 8 short videos (every task has train and val videos) and its features from a tiny random ViT."
    base = tmp_path_factory.mktemp("tiny")
    data, cache = base / "data", base / "features"
    make_synthetic(data, n_videos=8, n_frames=60, progress=False)
    extract_all(data, cache, BACKBONE)
    return data, cache


def run_train(data, cache, out, task="expr", **over):
    return train(data, task, out, cache_dir=cache, **BACKBONE, progress=False, feature_workers=0, **{**TINY, **over})


def test_same_seed_same_metrics(tiny, tmp_path):
    data, cache = tiny
    a, b = run_train(data, cache, tmp_path / "a"), run_train(data, cache, tmp_path / "b")
    assert a.metrics == b.metrics
    pd.testing.assert_frame_equal(a.history.drop(columns=["seconds", "train_windows_per_s"]),
                                  b.history.drop(columns=["seconds", "train_windows_per_s"]))
    c = run_train(data, cache, tmp_path / "c", seed=1)
    assert c.history["train_loss"].tolist() != a.history["train_loss"].tolist()


KILL_AT_EPOCH = """
import os, signal, sys
import affect_nb.train as T
from affect_nb.cli import main_train
inner = T._train_epoch
def epoch(run, epoch, progress):
    if epoch == {epoch}: os.kill(os.getpid(), signal.SIGKILL)
    return inner(run, epoch, progress)
T._train_epoch = epoch
main_train(sys.argv[1:])
"""


@pytest.mark.parametrize("task", ["va", "mtl"])
def test_resume_after_kill_matches_uninterrupted_run(tiny, tmp_path, task):
    "A run killed in epoch 3 and resumed equals the uninterrupted run; the multi-task run with learned task weights (its loss's state) too."
    data, cache = tiny
    extra = ["--task-weighting", "uncertainty"] if task == "mtl" else []
    args = [str(data), "--task", task, "--cache-dir", str(cache), *cli_args(BACKBONE), *cli_args({**TINY, "epochs": 5}), *extra]
    full = subprocess.run([sys.executable, "-c", KILL_AT_EPOCH.format(epoch=99), *args, "--out-dir", str(tmp_path / "full")],
                          env=ENV, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    run = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILL_AT_EPOCH.format(epoch=3), *args, "--out-dir", str(run)],
                            env=ENV, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    assert len(pd.read_csv(run / "history.csv")) == 2 and not (run / "metrics.json").exists()
    resumed = subprocess.run([sys.executable, "-c", KILL_AT_EPOCH.format(epoch=99), *args, "--out-dir", str(run)],
                             env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "full", run))
    assert (a["P"], a["valence"], a["arousal"], a["best_epoch"]) == (b["P"], b["valence"], b["arousal"], b["best_epoch"])
    ha, hb = (pd.read_csv(d / "history.csv") for d in (tmp_path / "full", run))
    assert len(ha) == 5 and ha["train_loss"].tolist() == hb["train_loss"].tolist() and ha["val_P"].tolist() == hb["val_P"].tolist()
    assert not list(run.rglob("*.tmp"))


@pytest.mark.parametrize("task", ["expr", "mtl"])
def test_torchrun_two_processes_match_one(tiny, tmp_path, task):
    """Data parallel over 2 CPU processes (gloo, `affect-train` under torch.distributed.run, status 0) reaches the single-process
    validation P within 0.05 per task; its evaluation is exact. The multi-task run learns its task weights (averaged over processes)."""
    data, cache = tiny
    config = {**TINY, "dropout": 0.0, "mask_p": 0.0, "epochs": 3, **({"task_weighting": "uncertainty"} if task == "mtl" else {})}
    args = [str(data), "--task", task, "--cache-dir", str(cache), *cli_args(BACKBONE), *cli_args(config)]
    one = subprocess.run([sys.executable, "-c", "import sys; from affect_nb.cli import main_train; main_train(sys.argv[1:])", *args,
                          "--out-dir", str(tmp_path / "one")], env=ENV, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    # the console script itself under torch.distributed.run: every process must end with status 0
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(BIN / "affect-train"),
                          *args, "--out-dir", str(tmp_path / "two")], env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    p1, p2 = (json.loads((tmp_path / d / "metrics.json").read_text())["P"] for d in ("one", "two"))
    assert abs(p1 - p2) <= 0.05 * (3 if task == "mtl" else 1), (p1, p2)
    model, cfg, meta = load_checkpoint(tmp_path / "two")  # the 2-process P is the P of its checkpoint on the whole split
    val = load_split(data, task, "val", cache, cfg.features, progress=False)[0]
    again = score_videos(task, val, predict_videos(model, val, task, cfg.seq_len, cfg.eval_stride))
    assert again["P"] == pytest.approx(p2, abs=1e-9)


def test_predict_and_submission_cover_every_annotated_frame(tiny, tmp_path):
    data, cache = tiny
    run_train(data, cache, tmp_path / "run", task="au", epochs=2)
    preds = predict(tmp_path / "run", data, "val", task="au", progress=False)
    index = frame_index(data, "au", "val")
    assert len(preds) == len(index) and (~preds.has_image).any()
    sub = write_submission(preds, tmp_path / "au.csv", "au", frames=index)
    lines = sub.read_text().splitlines()
    assert lines[0] == "image_location,AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26"
    assert len(lines) == 1 + len(index)
    assert [l.split(",")[0] for l in lines[1:]] == [f"{v}/{f:05d}.jpg" for v, f in zip(index.video, index.frame)]
    assert all(len(l.split(",")) == 13 and set(l.split(",")[1:]) <= {"0", "1"} for l in lines[1:])
    # the command line gives the same file; test videos (images only) get a row per frame up to their last image
    out = tmp_path / "cli.csv"
    main_predict([str(tmp_path / "run"), str(data), "--split", "val", "--out", str(out)])
    assert out.read_text() == sub.read_text()
    names = tmp_path / "test_videos.txt"
    names.write_text("\n".join(sorted(set(index.video))[:2]) + "\n")
    main_predict([str(tmp_path / "run"), str(data), "--split", "test", "--videos", str(names), "--out", str(tmp_path / "test.csv")])
    rows = pd.read_csv(tmp_path / "test.csv")
    n_images = sum(max(int(p.stem) for p in (data / "cropped_aligned" / v).glob("*.jpg")) for v in sorted(set(index.video))[:2])
    assert len(rows) == n_images and list(rows.columns) == ["image_location", *AU_NAMES]


def test_expr_and_va_submission_headers(tiny, tmp_path):
    data, cache = tiny
    for task, header in (("expr", ["image_location", *EXPR_CLASSES]), ("va", ["image_location", "valence", "arousal"])):
        r = run_train(data, cache, tmp_path / task, task=task, epochs=1)
        preds = predictions_frame(task, r.val_videos, r.val_scores)
        lines = write_submission(preds, tmp_path / f"{task}.csv", task).read_text().splitlines()
        assert lines[0] == ",".join(header) and len(lines) == 1 + len(frame_index(data, task, "val"))
        assert all(len(l.split(",")) == (2 if task == "expr" else 3) for l in lines[1:])


def test_clear_errors(tiny, tmp_path):
    data, cache = tiny
    with pytest.raises(ValueError, match="unknown task 'valence'; expected one of \\['va', 'expr', 'au', 'mtl'\\]"):
        run_train(data, cache, tmp_path / "x", task="valence")
    with pytest.raises(FileNotFoundError, match="data_dir .*nowhere does not exist"):
        run_train(tmp_path / "nowhere", cache, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_data_dir(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    shutil.copytree(data, empty)
    for f in (empty / "EXPR_Recognition_Challenge" / "Validation_Set").glob("*.txt"): f.unlink()
    with pytest.raises(ValueError, match="the 'val' split of task 'expr' is empty: no annotation file in .*Validation_Set"):
        run_train(empty, cache, tmp_path / "x")
    run_train(data, cache, tmp_path / "expr", task="expr", epochs=1)
    with pytest.raises(ValueError, match="was trained for task 'expr', not 'va'"):
        predict(tmp_path / "expr", data, "val", task="va", progress=False)
    with pytest.raises(SystemExit) as e:
        main_predict([str(tmp_path / "expr"), str(data), "--task", "au", "--out", str(tmp_path / "x.csv")])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="holds a run with other settings \\(lr: 0.003 → 0.1\\)"):
        run_train(data, cache, tmp_path / "expr", task="expr", epochs=1, lr=0.1)


NB = ROOT / "nbs" / "experiments" / "train.ipynb"
FIGURES = {"va": {"learning_curves", "va_over_time", "va_density"}, "expr": {"learning_curves", "confusion"},
           "au": {"learning_curves", "au_f1"}}
HEADERS = {"va": "image_location,valence,arousal", "expr": "image_location," + ",".join(EXPR_CLASSES),
           "au": "image_location," + ",".join(AU_NAMES)}


@pytest.mark.parametrize("task", ["va", "expr", "au"])
def test_experiment_notebook(tiny, tmp_path, task):
    "The papermill experiment notebook, run from nbs/experiments, writes the executed notebook, metrics, figures and submission."
    import papermill as pm
    data, cache = tiny
    out = tmp_path / "run"
    out.mkdir()
    params = dict(task=task, data_dir=str(data), out_dir=str(out), cache_dir=str(cache), **BACKBONE, **{**TINY, "epochs": 2}, browse=True)
    pm.execute_notebook(str(NB), str(out / "train.ipynb"), parameters=params, cwd=str(NB.parent), kernel_name="python3",
                        progress_bar=False, log_output=False)
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == task and 0 < m["epochs_run"] <= 2 and 1 <= m["best_epoch"] <= 2
    assert {"P", "params", "config", "version", "git_commit", "probe"} <= set(m) and m["params"]["seq_len"] == 16
    assert m["config"]["features"]["key"] == [p.name for p in cache.iterdir()][0]
    if task == "va": assert {"valence", "arousal"} <= set(m)
    else: assert len(m["f1"]) == (8 if task == "expr" else 12)
    if task == "au": assert len(m["tuned"]["thresholds"]) == 12
    assert {p.stem for p in (out / "figures").glob("*.png")} == FIGURES[task]
    assert (out / "val_predictions.csv").read_text().splitlines()[0] == HEADERS[task]
    assert len(pd.read_csv(out / "history.csv")) == m["epochs_run"]
    assert {p.name for p in (out / "checkpoint").iterdir()} == {"model.safetensors", "config.json"}
    assert "features" not in {p.name for p in out.iterdir()}  # the shared cache was used, not a new one


def test_experiment_notebook_refuses_missing_data_dir(tmp_path):
    import papermill as pm
    with pytest.raises(pm.PapermillExecutionError, match="does not exist"):
        pm.execute_notebook(str(NB), str(tmp_path / "train.ipynb"), parameters=dict(data_dir=str(tmp_path / "absent"), out_dir=str(tmp_path)),
                            cwd=str(ROOT), kernel_name="python3", progress_bar=False, log_output=False)
