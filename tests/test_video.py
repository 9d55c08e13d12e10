"""A video in, an affect timeline out: `analyze_video` and `affect-video` on videos the tests write (frames made from the public-domain
astronaut photograph of scikit-image), with checkpoints trained on a tiny synthetic Aff-Wild2."""
import json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from affect_nb.config import load_checkpoint
from affect_nb.synth import make_synthetic
from affect_nb.tasks import AU_NAMES, EXPR_CLASSES
from affect_nb.train import train
from affect_nb.video import analyze_video, load_predictors, main_video
from videos import face_frames, write_audio_only, write_corrupt, write_face_video, write_video

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
BACKBONE = dict(backbone="vit_tiny_patch16_224", pretrained=False, img_size=32, pooling="avg")
TINY = dict(seq_len=16, batch_size=4, epochs=2, lr=3e-3, patience=10, d_model=16, n_heads=2, n_layers=1, d_ff=32, dropout=0.1, mask_p=0.3)
EMPTY = (20, 30)  # frames without a face in the test videos


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "Checkpoints trained on a tiny synthetic tree: one multi-task run and one per single task."
    base = tmp_path_factory.mktemp("video_runs")
    make_synthetic(base / "data", n_videos=6, n_frames=40, progress=False)
    kw = dict(cache_dir=base / "features", **BACKBONE, progress=False, feature_workers=0, **TINY)
    return {t: train(base / "data", t, base / t, **kw) and base / t for t in ("mtl", "va", "expr", "au")}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    "A 60-frame H.264 video of the moving astronaut face, frames 20-30 without it, and the true box of each frame."
    path = tmp_path_factory.mktemp("clip") / "astronaut.mp4"
    return path, write_face_video(path, n_frames=60, size=(320, 240), empty=(EMPTY,))


def iou(a, b) -> float:
    "Intersection over union of two boxes (x, y, w, h)."
    w = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return w * h / (a[2] * a[3] + b[2] * b[3] - w * h)


def test_one_row_per_frame_faces_where_the_face_is_and_predictions_in_range(runs, clip):
    path, truth = clip
    t = analyze_video(path, runs["mtl"], device="cpu", progress=False)
    assert t["frame"].tolist() == list(range(1, 61)) and t["time_s"].is_monotonic_increasing
    every = t.attrs["detect_every"]
    near_edge = lambda f: min(abs(f - EMPTY[0]), abs(f - EMPTY[1])) < every  # boxes are detected every `every` frames
    on = {f for f, b in enumerate(truth, 1) if b is not None and not near_edge(f)}
    off = {f for f, b in enumerate(truth, 1) if b is None and not near_edge(f)}
    has = dict(zip(t["frame"], t["has_face"]))
    assert all(has[f] for f in on) and not any(has[f] for f in off)
    faces = t[t["has_face"]]
    overlap = [iou(r[["x", "y", "w", "h"]].to_numpy(float), truth[int(r["frame"]) - 1]) for _, r in faces.iterrows()
               if truth[int(r["frame"]) - 1] is not None]
    assert min(overlap) >= 0.5, overlap
    assert faces[["valence", "arousal"]].stack().between(-1, 1).all()
    assert np.allclose(faces[[f"p_{c}" for c in EXPR_CLASSES]].sum(axis=1), 1, atol=1e-5)
    assert faces[[f"p_{a}" for a in AU_NAMES]].stack().between(0, 1).all()
    assert (faces["expr"] == faces[[f"p_{c}" for c in EXPR_CLASSES]].to_numpy().argmax(1)).all()
    empty = t[~t["has_face"]]
    assert empty[["valence", "p_Neutral", "p_AU1", "x", "det_score"]].isna().all().all()
    assert empty[["expr", "AU1", "face_id"]].isna().all().all()


def test_the_same_file_twice_gives_the_same_table(runs, clip):
    a = analyze_video(clip[0], runs["mtl"], device="cpu", progress=False)
    b = analyze_video(clip[0], runs["mtl"], device="cpu", progress=False)
    pd.testing.assert_frame_equal(a, b)


def test_single_task_checkpoints_together_give_every_column_and_their_own_thresholds(runs, clip):
    preds = load_predictors([runs["va"], runs["expr"], runs["au"]], "cpu")
    t = analyze_video(clip[0], None, predictors=preds, device="cpu", progress=False, tuned_thresholds=True)
    cols = ["valence", "arousal", "expr", *(f"p_{c}" for c in EXPR_CLASSES), *AU_NAMES, *(f"p_{a}" for a in AU_NAMES)]
    assert list(t.columns) == ["frame", "time_s", "face_id", "has_face", "x", "y", "w", "h", "det_score", *cols]
    thresholds = np.asarray(load_checkpoint(runs["au"])[2]["au_thresholds"])
    faces = t[t["has_face"]]
    assert (faces[AU_NAMES].to_numpy() == (faces[[f"p_{a}" for a in AU_NAMES]].to_numpy() >= thresholds)).all()
    with pytest.raises(ValueError, match="both predict 'va'"): load_predictors([runs["mtl"], runs["va"]])


def test_all_faces_tracks_two_people_and_the_main_subject_is_the_larger(runs, tmp_path):
    import cv2
    left, truth = face_frames(40, size=(320, 480), empty=())
    right, _ = face_frames(40, size=(320, 480), empty=(), seed=1)
    frames = []
    for a, b in zip(left, right):
        small = np.full_like(b, 110)
        small[120:360, 80:240] = cv2.resize(b, (160, 240))
        frames.append(np.concatenate([a, small], axis=1))  # 640x480: the left face full size, the right one half
    path = write_video(tmp_path / "two.mp4", frames)
    every = analyze_video(path, runs["mtl"], all_faces=True, device="cpu", progress=False)
    assert every.groupby("frame")["face_id"].nunique().min() == 2 and every["face_id"].nunique() == 2
    main = analyze_video(path, runs["mtl"], device="cpu", progress=False)
    assert len(main) == 40 and main["has_face"].all() and main["face_id"].nunique() == 1
    assert (main["x"] + main["w"] <= 330).all()  # the left, larger face
    assert np.mean([iou(r, b) for r, b in zip(main[["x", "y", "w", "h"]].to_numpy(float), truth)]) > 0.5


def test_affect_video_writes_each_video_names_the_bad_ones_and_resumes(runs, clip, tmp_path):
    good, still = clip[0], tmp_path / "photo.png"
    from PIL import Image
    from skimage.data import astronaut
    Image.fromarray(astronaut()).save(still)
    corrupt, audio = write_corrupt(tmp_path / "broken.mp4"), write_audio_only(tmp_path / "voice.m4a")
    out = tmp_path / "out"
    r = subprocess.run([BIN / "affect-video", good, corrupt, audio, still, "--checkpoint", runs["mtl"], "--out", out, "--device", "cpu"],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode != 0
    assert str(corrupt) in r.stdout + r.stderr and str(audio) in r.stdout + r.stderr
    assert "no video stream" in r.stdout + r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["astronaut", "photo"]
    for name in ("astronaut", "photo"):
        assert {p.name for p in (out / name).iterdir()} >= {"predictions.csv", "timeline.png", "video.json"}
    table = pd.read_csv(out / "astronaut" / "predictions.csv")
    assert len(table) == 60 and json.loads((out / "astronaut" / "video.json").read_text())["n_frames"] == 60
    assert len(pd.read_csv(out / "photo" / "predictions.csv")) == 1
    before = (out / "astronaut" / "predictions.csv").stat().st_mtime_ns
    assert main_video([str(good), "--checkpoint", str(runs["mtl"]), "--out", str(out), "--device", "cpu"]) == 0
    assert (out / "astronaut" / "predictions.csv").stat().st_mtime_ns == before  # finished before: skipped


def test_a_checkpoint_whose_backbone_cannot_be_rebuilt_is_named(runs, tmp_path):
    import shutil
    ckpt = tmp_path / "moved"
    shutil.copytree(Path(runs["va"]) / "checkpoint", ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["features"]["weights"] = str(tmp_path / "gone.safetensors")
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"checkpoint {ckpt}: its backbone cannot be rebuilt.*gone.safetensors"):
        load_predictors([ckpt])
