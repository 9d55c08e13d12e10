"""The split summary and the frame browser (`affect_nb.explore`) on tiny trees written here: counts, problems named, bad inputs."""
import html, shutil, warnings
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from affect_nb.data import AU_NAMES, EXPR_CLASSES, IMAGE_DIR, SPLITS, TASKS, AnnotationError
from affect_nb.explore import FrameBrowser, summarize

from trees import AU_HEADER, EXPR_HEADER, VA_HEADER, ann, imageless_tree, jpgs, write




def raised(f):
    with pytest.raises(AnnotationError) as info: f()
    return info.value


# ---------------------------------------------------------------- the summary

def test_summary_gathers_bad_files_of_all_tasks(tmp_path):
    ann(tmp_path, "va", "train", "v1", f"{VA_HEADER}\n2,0\n")
    ann(tmp_path, "expr", "train", "v1", f"{EXPR_HEADER}\n1\n11\n")
    ann(tmp_path, "au", "train", "v1", AU_HEADER + "\n\n")                      # a header and no frame rows
    e = raised(lambda: summarize(tmp_path, "train"))
    assert str(e).startswith(f"3 bad annotation files (fix or remove each of them) under {tmp_path}:")
    assert [(x.path.parent.parent.name, x.line) for x in e.errors] == [(TASKS["va"], 2), (TASKS["expr"], 3), (TASKS["au"], None)]


def test_summary_counts_frames_without_image_and_images_past_the_end(tmp_path):
    ann(tmp_path, "expr", "train", "v1", f"{EXPR_HEADER}\n0\n1\n2\n3\n4\n")
    jpgs(tmp_path, "v1", [1, 2, 4, 6, 7, 8])
    (tmp_path / IMAGE_DIR / "v1" / "notes.txt").write_text("not an image")
    s = summarize(tmp_path, "train")
    assert s.table.loc["expr", ["frames", "frames_without_image", "images_past_end"]].tolist() == [5, 2, 3]
    assert "(without image: annotated frames that have no face crop in cropped_aligned/)" in str(s)


def test_summary_of_a_partial_tree(tmp_path):
    ann(tmp_path, "va", "val", "v1", f"{VA_HEADER}\n0.5,0.5\n-5,-5\n-0.5,0.1\n")
    jpgs(tmp_path, "v1", [1, 2, 3])
    s = summarize(tmp_path, "val")
    assert s.table.present.tolist() == [True, False, False]
    assert s.table.loc["va", ["videos", "frames", "valid_frames"]].tolist() == [1, 3, 2]
    np.testing.assert_allclose(s.va_stats.loc["valence", ["mean", "std"]], [0.0, np.std([0.5, -0.5], ddof=1)], atol=1e-6)
    text = str(s)
    assert "EXPR_Recognition_Challenge/Validation_Set  absent" in text and "AU_Detection_Challenge/Validation_Set" in text
    fig = s.plot()
    assert len(fig.axes) == 4 and not fig.axes[0].axison and not fig.axes[1].axison
    empty = summarize(tmp_path / TASKS["va"], "val")
    assert "No annotation folder" in str(empty) and "cropped_aligned" in str(empty)



def test_summary_reports_overlap_and_videos_without_images(tmp_path):
    imageless_tree(tmp_path)
    ann(tmp_path, "va", "train", "ok", f"{VA_HEADER}\n0,0\n"); jpgs(tmp_path, "ok", [1])
    ann(tmp_path, "va", "train", "empty", f"{VA_HEADER}\n0,0\n")
    s = summarize(tmp_path, "val")
    t = s.table
    assert list(t.columns) == ["folder", "present", "videos", "frames", "valid_frames", "frames_without_image", "images_past_end",
                               "videos_in_both_splits", "videos_without_image"]
    counts = ["videos", "frames", "frames_without_image", "videos_in_both_splits", "videos_without_image"]
    assert t.loc["va", counts].tolist() == [4, 12, 10, 2, 3]
    assert t.loc[["expr", "au"], "videos_in_both_splits"].isna().all()
    assert s.in_both_splits == {"va": ["empty", "ok"]} and s.without_image == {"va": ["absent", "empty", "named"]}
    text = str(s)
    assert "in both splits" in text and "imageless videos" in text
    assert "! va: 2 video(s) in both Train_Set and Validation_Set (training refuses them): empty, ok" in text
    assert "! va: 3 video(s) with no image for any annotated frame (frame_index refuses them unless on_missing_images='skip'): " \
           "absent, empty, named" in text
    assert len(s.plot().axes) == 4


def test_summary_bad_root_and_split(tmp_path):
    with pytest.raises(FileNotFoundError) as info: summarize(tmp_path / "nowhere", "val")
    assert str(info.value).startswith(f"the Aff-Wild2 root folder not found: {tmp_path / 'nowhere'}") and "cropped_aligned" in str(info.value)
    with pytest.raises(ValueError, match="unknown split 'test': expected one of 'train', 'val'"): summarize(tmp_path, "test")


# ---------------------------------------------------------------- the browser

def test_browser_render_and_bad_preds(tmp_path):
    ann(tmp_path, "va", "val", "v1", f"{VA_HEADER}\n0.5,0.5\n-5,-5\n-0.5,0.1\n")
    jpgs(tmp_path, "v1", [1, 3])
    fig = FrameBrowser(tmp_path, "va", "val").render("v1", 3)
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), np.asarray(Image.open(tmp_path / IMAGE_DIR / "v1" / "00003.jpg")))
    assert [l.get_xdata()[0] for l in fig.axes[1].lines if l.get_gid() == "current-frame"] == [3]
    assert "invalid" in FrameBrowser(tmp_path).render("v1", 2).axes[0].get_title()
    with pytest.raises(ValueError, match="video, frame and a task's label columns; it has \\['x'\\]"):
        FrameBrowser(tmp_path, preds=pd.DataFrame({"x": [1]}))
    with pytest.raises(ValueError, match="it is a dict, not a DataFrame"): FrameBrowser(tmp_path, preds={"video": ["v1"], "frame": [1]})
    with pytest.raises(ValueError) as info: FrameBrowser(tmp_path, video="v9")
    assert str(info.value) == f"no video 'v9' in {tmp_path / TASKS['va'] / SPLITS['val']}"
    with pytest.raises(ValueError, match="unknown task 'VA': expected one of 'va', 'expr', 'au'"): FrameBrowser(tmp_path, "VA")
    with pytest.raises(ValueError, match="unknown split 'test'"): FrameBrowser(tmp_path, "va", "test")
    with pytest.raises(ValueError, match="video 'v1' has annotated frames 1-3, not 4"): FrameBrowser(tmp_path).render("v1", 4)


def test_browser_widget_shows_errors_and_recovers(tmp_path):
    ann(tmp_path, "va", "val", "good", f"{VA_HEADER}\n0.1,0.2\n0.3,0.4\n"); jpgs(tmp_path, "good", [1, 2])
    bad = ann(tmp_path, "va", "val", "bad", f"{VA_HEADER}\n0.1,0.2\n0.3\n"); jpgs(tmp_path, "bad", [1])
    b = FrameBrowser(tmp_path, video="good")
    _, c = b.widget, b.controls
    assert c.message.value == "" and c.image.value[:4] == b"\x89PNG"
    c.video.value = "bad"
    assert f"{bad}, line 3: expected 2 comma-separated values" in c.message.value and c.image.value == b""
    c.video.value = "good"
    assert c.message.value == "" and c.image.value[:4] == b"\x89PNG"
    c.split.value = "train"
    assert "the 'train' annotation folder of task 'va' not found" in html.unescape(c.message.value) and c.video.options == ()


def test_notebook_browser_tree_outlives_the_run(monkeypatch):
    "Run the explore chapter as a user does (not under nbdev_test), then move the live browser's frame slider."
    from execnb.nbio import read_nb
    from execnb.shell import CaptureShell
    from ipywidgets import Widget
    monkeypatch.delenv("IN_TEST", raising=False)
    nb_path = Path(__file__).parents[1] / "nbs" / "03_explore.ipynb"
    nb = read_nb(nb_path)
    shell = CaptureShell(nb_path)
    monkeypatch.chdir(nb_path.parent)
    shell.run_all(nb, exc_stop=True)
    demo, tmp = shell.user_ns["demo_root"], shell.user_ns["tmp"]
    try:
        assert not tmp.exists(), "the chapter's own temporary files are cleaned up"
        assert demo.is_dir(), "the live browser's tree outlives the run"
        cell = next(c for c in nb.cells if c.cell_type == "code" and c.source.lstrip().startswith("demo_root = ") and "browse(" in c.source)
        model = next(o["data"]["application/vnd.jupyter.widget-view+json"]["model_id"] for o in cell.outputs
                     if "application/vnd.jupyter.widget-view+json" in o.get("data", {}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # ipywidgets 8 keeps the registry, deprecated as public API
            ui = Widget.widgets[model]
        (_, frame), message, image = ui.children[1].children, ui.children[2], ui.children[3]
        before = image.value
        frame.value = 4
        assert message.value == "" and image.value != before and image.value[:8] == b"\x89PNG\r\n\x1a\n"
    finally: shutil.rmtree(demo, ignore_errors=True)
