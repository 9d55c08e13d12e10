"""The multi-task run (task 'mtl') on a tiny synthetic Aff-Wild2: the joined frame index against the planted labels, the
experiment notebook end to end (P_VA, P_EXPR, P_AU, P_MTL, three submission files, the same numbers for the same seed),
prediction with a multi-task checkpoint and its tuned AU thresholds."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from affect_nb.config import load_checkpoint
from affect_nb.data import SPLITS, TASKS, frame_index, held_out_videos
from affect_nb.explore import summarize
from affect_nb.synth import make_synthetic
from affect_nb.tasks import AU_NAMES, EXPR_CLASSES, INVALID, TASK_NAMES, label_columns
from affect_nb.train import train
from trees import extract_all

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "nbs" / "experiments" / "train.ipynb"
BACKBONE = dict(backbone="vit_tiny_patch16_224", pretrained=False, img_size=32, pooling="avg")
TINY = dict(seq_len=16, stride=8, batch_size=4, epochs=2, lr=3e-3, patience=10, d_model=16, n_heads=2, n_layers=1, d_ff=32, dropout=0.1, mask_p=0.3)
LOSS = {"va": "ccc", "expr": "focal", "au": "bce"}  # the experiment notebook's default, one loss per task
MOVED = "6-30-480x360"  # an EXPR and AU training video of the tree, given a VA validation file below


def _held_out_tree(root: Path) -> dict:
    "The tiny synthetic tree at `root` with `MOVED` also in the VA validation split; the planted truth of the tree."
    truth = make_synthetic(root, n_videos=8, n_frames=40, progress=False)
    n = int((truth["expr"]["train"].video == MOVED).sum())
    (root / TASKS["va"] / SPLITS["val"] / f"{MOVED}.txt").write_text("valence,arousal\n" + "0.5,-0.25\n" * n)
    return truth


@pytest.fixture(scope="module")
def mtl_tree(tmp_path_factory):
    "The tree of `_held_out_tree`, its truth and the features of all its frames from a tiny random ViT."
    base = tmp_path_factory.mktemp("mtl")
    data, cache = base / "data", base / "features"
    truth = _held_out_tree(data)
    extract_all(data, cache, BACKBONE)
    return data, cache, truth


def test_the_multitask_index_joins_the_planted_labels_of_each_task(mtl_tree):
    data, _, truth = mtl_tree
    assert held_out_videos(data) == [MOVED]
    index = {s: frame_index(data, "mtl", s) for s in SPLITS}
    assert MOVED not in set(index["train"].video) and MOVED in set(index["val"].video)  # a validation video for every task
    for split, df in index.items():
        assert not df.duplicated(["video", "frame"]).any()
        for task in TASK_NAMES:
            planted = truth[task][split]
            planted = planted[planted.video != MOVED] if split == "train" else planted
            got = df.merge(planted[["video", "frame"]], on=["video", "frame"])
            assert len(got) == len(planted)  # every planted frame of the task is a row
            np.testing.assert_array_equal(got[f"valid_{task}"], planted.valid)
            np.testing.assert_allclose(got[label_columns(task)].to_numpy(float), planted[label_columns(task)].to_numpy(float))
            others = df[df.video != MOVED]  # MOVED's VA file is not planted: it is checked below
            rest = others[~others.set_index(["video", "frame"]).index.isin(planted.set_index(["video", "frame"]).index)]
            assert not rest[f"valid_{task}"].any() and (rest[label_columns(task)] == INVALID[task]).all().all()
        assert (df.valid == df[[f"valid_{t}" for t in TASK_NAMES]].any(axis=1)).all()
    moved = index["val"][index["val"].video == MOVED]
    assert moved.valid_va.all() and not moved.valid_expr.any() and not moved.valid_au.any()  # its training labels are not read
    # a video some tasks do not annotate contributes its own tasks only: video2 has VA and AU training files, no EXPR one
    v2 = index["train"][index["train"].video == "video2"]
    assert len(v2) and not v2.valid_expr.any() and v2.valid_va.any() and v2.valid_au.any()
    assert summarize(data, "val").held_out == [MOVED]


def test_an_empty_multitask_split_is_named(tmp_path):
    from affect_nb.windows import load_split
    (tmp_path / TASKS["va"] / SPLITS["train"]).mkdir(parents=True)
    with pytest.raises(ValueError, match="the 'val' split of task 'mtl' is empty: no annotation file in the Validation_Set folders of "):
        load_split(tmp_path, "mtl", "val", tmp_path / "cache", BACKBONE, progress=False)


def _run_notebook(data, cache, out, seed=0):
    import papermill as pm
    out.mkdir()
    params = dict(task="mtl", data_dir=str(data), out_dir=str(out), cache_dir=str(cache), **BACKBONE, **TINY, seed=seed, browse=False)
    pm.execute_notebook(str(NB), str(out / "train.ipynb"), parameters=params, cwd=str(NB.parent), kernel_name="python3",
                        progress_bar=False, log_output=False)
    return json.loads((out / "metrics.json").read_text())


def test_experiment_notebook_multitask_run(mtl_tree, tmp_path):
    "`-p task mtl`: the four measures, one submission file per task with the rows of that task's files, the same seed the same numbers."
    data, cache, _ = mtl_tree
    stored = {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")}
    m = _run_notebook(data, cache, tmp_path / "run")
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")} == stored  # the single-task runs' features, none recomputed
    assert m["task"] == "mtl" and m["P"] == pytest.approx(m["P_VA"] + m["P_EXPR"] + m["P_AU"], abs=1e-12)
    assert len(m["expr_f1"]) == 8 and len(m["au_f1"]) == 12 and len(m["tuned"]["thresholds"]) == 12
    headers = {"va": "image_location,valence,arousal", "expr": "image_location," + ",".join(EXPR_CLASSES),
               "au": "image_location," + ",".join(AU_NAMES)}
    for task in TASK_NAMES:
        lines = (tmp_path / "run" / f"val_predictions_{task}.csv").read_text().splitlines()
        listed = frame_index(data, task, "val")
        assert lines[0] == headers[task] and [l.split(",")[0] for l in lines[1:]] == [f"{v}/{f:05d}.jpg" for v, f in zip(listed.video, listed.frame)]
    frames = pd.read_csv(tmp_path / "run" / "val_frames.csv")
    assert len(frames) == len(frame_index(data, "mtl", "val")) and {"valence", "expr", "AU1", "p_Anger", "p_AU26"} <= set(frames)
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert {"val_P_VA", "val_P_EXPR", "val_P_AU", "weight_va"} <= set(history)
    # the same seed in another process (the package's train, no notebook): the same numbers to the last digit
    again = train(data, "mtl", tmp_path / "again", cache_dir=cache, **BACKBONE, progress=False, feature_workers=0, loss=LOSS, **TINY)
    assert {k: again.metrics[k] for k in ("P", "P_VA", "P_EXPR", "P_AU")} == {k: m[k] for k in ("P", "P_VA", "P_EXPR", "P_AU")}


def test_affect_predict_writes_a_file_per_task_and_uses_tuned_thresholds_when_asked(mtl_tree, tmp_path):
    data, cache, _ = mtl_tree
    run = tmp_path / "run"
    train(data, "mtl", run, cache_dir=cache, **BACKBONE, progress=False, feature_workers=0, loss=LOSS, **{**TINY, "epochs": 1})
    thresholds = load_checkpoint(run)[2]["au_thresholds"]
    assert len(thresholds) == 12
    names = tmp_path / "test_videos.txt"
    names.write_text("4-24-640x480\nvideo5\n")
    outs = {}
    for flag in ([], ["--tuned-thresholds"]):
        out = tmp_path / ("tuned" if flag else "plain") / "test.csv"
        r = subprocess.run([sys.executable, "-c", "import sys; from affect_nb.cli import main_predict; sys.exit(main_predict(sys.argv[1:]))",
                            str(run), str(data), "--split", "test", "--videos", str(names), "--out", str(out), "--frames-csv",
                            str(out.with_name("frames.csv")), *flag], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert sorted(p.name for p in out.parent.glob("test_*.csv")) == ["test_au.csv", "test_expr.csv", "test_va.csv"]
        outs[bool(flag)] = pd.read_csv(out.with_name("test_au.csv")), pd.read_csv(out.with_name("frames.csv"))
    n_images = sum(max(int(p.stem) for p in (data / "cropped_aligned" / v).glob("*.jpg")) for v in ("4-24-640x480", "video5"))
    for au, frames in outs.values():
        assert len(au) == n_images and list(au.columns) == ["image_location", *AU_NAMES]
    scores = outs[False][1][[f"p_{a}" for a in AU_NAMES]].to_numpy()
    np.testing.assert_array_equal(outs[False][0][AU_NAMES].to_numpy(), (scores >= 0.5).astype(int))
    np.testing.assert_array_equal(outs[True][0][AU_NAMES].to_numpy(), (scores >= np.array(thresholds)).astype(int))
    assert len(pd.read_csv(tmp_path / "plain" / "test_va.csv")) == n_images
