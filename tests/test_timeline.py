"""The drawing side of a video's analysis (affect_nb.timeline): timeline.png for tables with any subset of the tasks, with no face
and with several faces; the overlay MP4 of a small video written here with PyAV from scikit-image's astronaut photograph (public
domain), decoded back frame by frame; and the player widget following its slider (real ipywidgets objects)."""
import itertools, time, tracemalloc

import av
import cv2
import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from skimage.data import astronaut
from videos import face_frames, write_face_video, write_video

from affect_nb.tasks import AU_NAMES, EXPR_CLASSES
from affect_nb.timeline import (AU_PROBS, EXPR_PROBS, draw_predictions, no_face_spans, plot_timeline, save_timeline, video_player,
    write_overlay)

FPS = 25
COLUMNS = {"va": ["valence", "arousal"], "expr": ["expr", *EXPR_PROBS], "au": [*AU_NAMES, *AU_PROBS]}


def table(n, away=(), faces=(0,), seed=0):
    "A table of `n` frames in analyze_video's form with made-up predictions; no face in the frames `away`; `faces`: the face ids."
    rng, rows = np.random.default_rng(seed), []
    for f in range(1, n + 1):
        for k in faces if f not in away else [None]:
            rows.append(dict(frame=f, time_s=(f - 1) / FPS, face_id=k, has_face=k is not None, x=20.0 + 100 * (k or 0) + f, y=30.0,
                             w=60.0, h=70.0, det_score=0.9))
    df = pd.DataFrame(rows).astype({"face_id": "Int64"})
    m, n_rows = df.has_face.to_numpy(), len(df)
    df["valence"], df["arousal"] = rng.uniform(-1, 1, n_rows), rng.uniform(-1, 1, n_rows)
    p = rng.dirichlet(np.ones(len(EXPR_CLASSES)), n_rows)
    df["expr"] = pd.array(p.argmax(1), "Int64")
    df[EXPR_PROBS] = p
    pa = rng.uniform(0, 1, (n_rows, len(AU_NAMES)))
    for j, a in enumerate(AU_NAMES): df[a] = pd.array((pa[:, j] >= 0.5).astype(int), "Int64")
    df[AU_PROBS] = pa
    df.loc[~m, ["x", "y", "w", "h", "det_score", "valence", "arousal", *EXPR_PROBS, *AU_PROBS]] = np.nan
    df.loc[~m, ["expr", *AU_NAMES]] = pd.NA
    return df


def with_boxes(df, boxes):
    "`df` with the true face `boxes` of the test video (one per frame, None where it shows no face) as its boxes."
    assert [b is not None for b in boxes] == list(df.has_face)
    df.loc[df.has_face, ["x", "y", "w", "h"]] = [b for b in boxes if b is not None]
    return df


def decoded(path):
    with av.open(str(path)) as c: return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def panels(fig):
    return [a.get_label() for a in fig.axes if a.get_label().startswith("panel:")]


# --- timeline.png --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tasks", [t for k in range(4) for t in itertools.combinations(("va", "expr", "au"), k)])
def test_save_timeline_writes_a_png_for_each_subset_of_the_tasks(tmp_path, tasks):
    df = table(80, away=range(30, 45))
    base = [c for c in df.columns if not any(c in cols for cols in COLUMNS.values())]
    df = df[base + [c for t in tasks for c in COLUMNS[t]]]
    out = save_timeline(df, tmp_path / "timeline.png", title="clip.mp4")
    png, fig = imread(out), plot_timeline(df)
    assert png.shape[:2] == (round(100 * fig.get_figheight()), round(100 * fig.get_figwidth()))
    assert png[..., :3].std() > 0.05  # something is drawn
    assert panels(fig) == ([f"panel:{t}" for t in tasks] or ["panel:none"])
    assert [p.name for p in tmp_path.iterdir()] == ["timeline.png"]


def test_a_table_without_any_face_gives_a_figure_saying_so(tmp_path):
    df = table(50, away=range(1, 51))
    fig = plot_timeline(df)
    assert panels(fig) == ["panel:none"] and "no face in any of the 50 frames" in fig.axes[0].texts[0].get_text()
    assert imread(save_timeline(df, tmp_path / "t.png")).shape[0] > 100
    assert "no frames" in plot_timeline(df.iloc[:0]).axes[0].texts[0].get_text()


def test_no_face_spans_of_a_hand_made_table():
    df = pd.DataFrame(dict(frame=[1, 2, 3, 4, 5], time_s=[0.0, 0.5, 1.0, 1.5, 2.0], face_id=pd.array([None, 0, 0, None, 0], "Int64"),
                           has_face=[False, True, True, False, True]))
    assert np.allclose(no_face_spans(df), [(-0.25, 0.25), (1.25, 1.75)])
    assert no_face_spans(df[df.has_face]) == []


def test_shading_and_heatmaps_follow_the_frames_without_the_face():
    df = table(100, away=range(40, 60))
    fig = plot_timeline(df)
    au = next(a for a in fig.axes if a.get_label() == "panel:au")
    assert np.allclose(au.images[0].get_array().filled(-1)[:, 39:59], -1)  # frames 40-59: empty cells
    shade = [c for c in au.collections if c.get_paths()][0].get_paths()
    xs = shade[0].vertices[:, 0]
    assert len(shade) == 1 and np.isclose(xs.min(), 38.5 / FPS) and np.isclose(xs.max(), 58.5 / FPS)  # frames 40-59 at (f - 1) / 25 s


def test_with_several_faces_the_one_with_most_rows_is_shown_or_the_one_asked_for():
    a, b = table(60, faces=(0,)), table(60, faces=(1,), away=range(1, 31))
    df = pd.concat([a, b[b.has_face]]).sort_values(["frame", "face_id"], kind="stable").reset_index(drop=True)
    fig = plot_timeline(df, title="two.mp4")
    assert "face 0 (the most frames of 2 faces: 0, 1)" in fig._suptitle.get_text()
    va = next(a for a in fig.axes if a.get_label() == "panel:va")
    assert np.allclose(va.lines[0].get_ydata(), a.valence)
    fig = plot_timeline(df, face_id=1)
    va = next(a for a in fig.axes if a.get_label() == "panel:va")
    assert "face 1 (chosen of 2 faces" in fig._suptitle.get_text() and np.isnan(va.lines[0].get_ydata()[:30]).all()
    assert np.allclose(va.lines[0].get_ydata()[30:], b.valence[30:])
    with pytest.raises(ValueError, match="no face 5 in the table: its faces are 0, 1"): plot_timeline(df, face_id=5)


def test_a_main_subject_table_is_drawn_whole_whichever_track_each_frame_came_from():
    "One face per frame (analyze_video's main subject), on track 0 then on track 1: the timeline shows every face frame."
    a, b = table(40, faces=(0,)), table(40, faces=(1,))
    df = pd.concat([a[a.frame <= 20], b[b.frame > 20]]).reset_index(drop=True)
    fig = plot_timeline(df, title="main.mp4")
    assert "40 (100%) with a face" in fig._suptitle.get_text()
    va = next(a for a in fig.axes if a.get_label() == "panel:va")
    assert np.allclose(va.lines[0].get_ydata(), df.valence)


def test_a_long_video_draws_in_a_few_seconds(tmp_path):
    n = 100_000
    df = table(1, faces=(0,))
    df = df.loc[np.zeros(n, int)].reset_index(drop=True).assign(frame=np.arange(1, n + 1), time_s=np.arange(n) / 30)
    off = ((df.frame - 1) % 1000) >= 960  # the last 40 frames of every 1000
    df.loc[off, "has_face"] = False; df.loc[off, "face_id"] = pd.NA
    start = time.perf_counter()
    save_timeline(df, tmp_path / "long.png")
    assert time.perf_counter() - start < 10
    assert np.allclose(no_face_spans(df), [((k + 959.5) / 30, (k + 999.5) / 30) for k in range(0, n, 1000)])


def test_bad_tables_are_named_errors():
    with pytest.raises(ValueError, match="lacks the column"): plot_timeline(pd.DataFrame(dict(frame=[1], valence=[0.1])))
    with pytest.raises(ValueError, match="must be a pandas DataFrame"): plot_timeline([1, 2])


# --- frames, the overlay and the player ----------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(240, 320), (1080, 1920)])
def test_draw_predictions_draws_the_box_and_leaves_the_rest(size):
    H, W = size
    img = cv2.resize(astronaut(), (W, H))
    row = table(1).assign(x=W * 0.4, y=H * 0.5, w=W * 0.2, h=H * 0.3)
    out = draw_predictions(img, row)
    changed = (out != img).any(2)
    x0, y0, x1, y1 = int(W * 0.4), int(H * 0.5), int(W * 0.6), int(H * 0.8)
    assert changed[y0, x0:x1].all() and changed[y1, x0:x1].all() and changed[y0:y1, x0].all() and changed[y0:y1, x1].all()
    assert not changed[(y0 + y1) // 2, (x0 + x1) // 2] and not changed[:, : int(W * 0.35)].any() and not changed[:, int(W * 0.8):].any()
    assert changed[: y0 - 2, x0:x1].sum() > 20  # the labels, above the box ...
    assert changed[: y0 - 2].any(1).sum() > 0.1 * H  # ... in text that grows with the frame (fixed-size text: 50 px)


def test_the_overlay_decodes_to_the_same_frames_with_the_boxes_where_the_table_says(tmp_path):
    video = tmp_path / "in.mp4"
    boxes = write_face_video(video, 40, empty=((15, 21),))
    df = with_boxes(table(40, away=range(15, 22)), boxes)
    out = write_overlay(video, df, tmp_path / "out" / "overlay.mp4", progress=False)
    assert sorted(p.name for p in out.parent.iterdir()) == ["overlay.mp4"]
    shown, plain = decoded(out), decoded(video)
    assert len(shown) == len(plain) == 40 and shown[0].shape == plain[0].shape
    for f in (1, 14, 30, 40):
        x, y, w, h = (int(round(v)) for v in boxes[f - 1])
        edge = np.abs(shown[f - 1][y + 5:y + h - 5, x - 1:x + 2].astype(int) - plain[f - 1][y + 5:y + h - 5, x - 1:x + 2]).mean()
        far = np.abs(shown[f - 1][:, :x - 5].astype(int) - plain[f - 1][:, :x - 5]).mean()  # left of the box (labels go right)
        assert edge > 40 and far < 3, (f, edge, far)
    for f in range(15, 22):  # no face: only the tag in the top-left corner
        assert np.abs(shown[f - 1][60:].astype(int) - plain[f - 1][60:]).mean() < 3


def test_an_odd_sized_video_gets_an_even_overlay(tmp_path):
    video = write_video(tmp_path / "odd.mkv", face_frames(6, size=(201, 161), empty=())[0], codec="ffv1", pix_fmt="yuv444p")
    out = write_overlay(video, table(6), tmp_path / "o.mp4", fps=10, progress=False)
    shown = decoded(out)
    assert len(shown) == 6 and shown[0].shape == (162, 202, 3)
    with av.open(str(out)) as c: assert c.streams.video[0].average_rate == 10


def test_overlay_memory_does_not_grow_with_the_video(tmp_path):
    peaks, size = [], (320, 176)
    for n in (30, 150):
        video = tmp_path / f"{n}.mp4"
        write_face_video(video, n, size=size, empty=())
        df = table(n)
        tracemalloc.start()
        write_overlay(video, df, tmp_path / f"o{n}.mp4", progress=False)
        peaks.append(tracemalloc.get_traced_memory()[1]); tracemalloc.stop()
    assert peaks[1] - peaks[0] < 30 * np.prod(size) * 3, peaks  # holding the 120 more frames would add 120 frames' bytes or more


def test_the_player_follows_its_slider(tmp_path):
    video = tmp_path / "in.mp4"
    boxes = write_face_video(video, 30, empty=((10, 14),))
    df = with_boxes(table(30, away=range(10, 15)), boxes)
    ui = video_player(video, df)
    c = ui.controls
    assert (c.slider.min, c.slider.max, c.slider.value) == (1, 30, 1)
    for name in ("slider", "frame", "info", "timeline"): assert f"affect-player-{name}" in getattr(c, name)._dom_classes
    before = (c.frame.value, c.timeline.value)
    c.slider.value = 25
    r = df.set_index("frame").loc[25]
    assert c.frame.value != before[0] and c.timeline.value != before[1]
    for text in ("frame 25", f"{r.valence:+.2f}", f"{r.arousal:+.2f}", EXPR_CLASSES[int(r.expr)]): assert text in c.info.value, text
    frame = cv2.imdecode(np.frombuffer(c.frame.value, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    x, y, w, h = (int(round(v)) for v in boxes[24])
    assert frame[y + 5:y + h - 5, x - 1:x + 2, 1].mean() > 150 and frame[y + 5:y + h - 5, x - 1:x + 2, 0].mean() < 100  # the green box
    c.slider.value = 12
    assert "frame 12" in c.info.value and "no face" in c.info.value
    assert len(c.update_ms) == 3
    cursor = []  # the cursor: a red column over the timeline's panels, moving right in proportion to the frame's time
    for f in (5, 15, 25):
        c.slider.value = f
        a = cv2.imdecode(np.frombuffer(c.timeline.value, np.uint8), cv2.IMREAD_COLOR)[..., ::-1].astype(int)
        cursor.append(np.flatnonzero(((a[..., 0] > 150) & (a[..., 1:].max(-1) < 90)).mean(0) > 0.5).mean())
    assert cursor[0] < cursor[1] < cursor[2] and np.isclose(cursor[2] - cursor[1], cursor[1] - cursor[0], rtol=0.1), cursor
