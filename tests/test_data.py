"""Bad input, odd layouts and edge cases of the Aff-Wild2 reader (`affect_nb.data`), on tiny trees written here."""
import os
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import numpy as np
import pytest
from PIL import Image

from affect_nb import data
from affect_nb.data import (AU_NAMES, EXPR_CLASSES, IMAGE_DIR, SPLITS, TASKS, AnnotationError, FrameBrowser,
                            frame_index, label_columns, list_videos, read_annotation, summarize)

VA_HEADER = "valence,arousal"
EXPR_HEADER = ",".join(EXPR_CLASSES)
AU_HEADER = ",".join(AU_NAMES)


def write(path, text, newline="\n"):
    "Write `text` (lines joined by \\n) to `path` with `newline` line endings, creating folders."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", newline).encode())
    return path


def jpgs(root, video, frames):
    "Write tiny 112×112 JPEG crops `%05d.jpg` for `frames` of `video` under `root`."
    folder = Path(root) / IMAGE_DIR / video
    folder.mkdir(parents=True, exist_ok=True)
    for f in frames: Image.new("RGB", (112, 112), (f * 20 % 256, 80, 120)).save(folder / f"{f:05d}.jpg")


def ann(root, task, split, video, text, newline="\n"):
    "Write the annotation file of `video` for `task` in `split` under `root`."
    return write(Path(root) / TASKS[task] / SPLITS[split] / f"{video}.txt", text, newline)


def raised(f):
    with pytest.raises(AnnotationError) as info: f()
    return info.value


# ---------------------------------------------------------------- one test per bad input: file and line named

BAD_FILES = {  # name: (task, file text, 1-based bad line, words the message must hold)
    "wrong_header":        ("va", "valence;arousal\n0.1,0.2\n", 1, "valence,arousal"),
    "missing_header":      ("expr", "3\n4\n", 1, "header"),
    "empty_file":          ("au", "", 1, "empty file"),
    "too_few_columns":     ("va", f"{VA_HEADER}\n0.1,0.2\n0.3,0.4\n0.5\n0.1,0.1\n", 4, "2 comma-separated values"),
    "too_many_columns":    ("au", AU_HEADER + "\n" + ",".join(["0"] * 12) + "\n" + ",".join(["0"] * 13) + "\n", 3, "12 comma-separated"),
    "blank_middle_line":   ("va", f"{VA_HEADER}\n0.1,0.2\n\n0.3,0.4\n", 3, "2 comma-separated values"),
    "non_number":          ("va", f"{VA_HEADER}\n0.1,0.2\n0.1,abc\n", 3, "numbers"),
    "nan_is_not_a_label":  ("va", f"{VA_HEADER}\n0.1,0.2\n0.3,0.4\nnan,0.1\n", 4, "numbers"),
    "expr_non_number":     ("expr", f"{EXPR_HEADER}\n1\nHappiness\n", 3, "integer class 0-7"),
    "va_above_1":          ("va", f"{VA_HEADER}\n0.1,0.2\n0.3,1.01\n", 3, "[-1, 1]"),
    "va_below_minus_1":    ("va", f"{VA_HEADER}\n-1.5,0.2\n", 2, "[-1, 1]"),
    "va_other_marker":     ("va", f"{VA_HEADER}\n0.1,0.2\n0.1,0.2\n-1,-1\n-4,-4\n", 5, "-5 for an invalid frame"),
    "expr_class_8":        ("expr", f"{EXPR_HEADER}\n0\n7\n8\n", 4, "integer class 0-7"),
    "expr_class_minus_2":  ("expr", f"{EXPR_HEADER}\n-1\n-2\n", 3, "integer class 0-7"),
    "expr_not_integer":    ("expr", f"{EXPR_HEADER}\n0\n2.5\n", 3, "integer class 0-7"),
    "au_value_2":          ("au", AU_HEADER + "\n" + ",".join(["1"] * 12) + "\n" + ",".join(["0"] * 11 + ["2"]) + "\n", 3, "0 or 1"),
    "au_value_half":       ("au", AU_HEADER + "\n" + ",".join(["0.5"] + ["0"] * 11) + "\n", 2, "0 or 1"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_names_file_and_line(tmp_path, name):
    task, text, line, words = BAD_FILES[name]
    path = write(tmp_path / f"{name}.txt", text)
    e = raised(lambda: read_annotation(path, task))
    assert isinstance(e, ValueError)
    assert e.path == path and e.line == line
    assert str(e).startswith(f"{path}, line {line}: expected")
    assert words in str(e)


def test_bad_line_counts_the_others(tmp_path):
    path = write(tmp_path / "v.txt", f"{EXPR_HEADER}\n1\n9\n2\n9\n9\n")
    e = raised(lambda: read_annotation(path, "expr"))
    assert e.line == 3 and "'9'" in str(e) and "2 more bad lines" in str(e)


def test_bad_line_at_the_end_of_a_long_file(tmp_path):
    rows = np.random.default_rng(0).integers(0, 2, (50_000, 12))
    path = write(tmp_path / "long.txt", "\n".join([AU_HEADER] + [",".join(map(str, r)) for r in rows]) + "\n")
    df = read_annotation(path, "au")
    np.testing.assert_array_equal(df[AU_NAMES].to_numpy(), rows)
    with path.open("a") as f: f.write(",".join(["1"] * 11 + ["-2"]) + "\n")
    assert raised(lambda: read_annotation(path, "au")).line == 50_002


def test_unknown_task_and_split(tmp_path):
    with pytest.raises(ValueError, match="'va', 'expr', 'au'"): label_columns("valence")
    with pytest.raises(ValueError, match="'train', 'val'"): list_videos(tmp_path, "va", "test")


# ---------------------------------------------------------------- line endings, markers, dtypes

def test_crlf_and_trailing_blank_lines(tmp_path):
    path = write(tmp_path / "v.txt", f"{VA_HEADER}\n0.5,-0.25\n-5,-5\n1,-1\n\n\n", newline="\r\n")
    df = read_annotation(path, "va")
    assert df.frame.tolist() == [1, 2, 3]
    np.testing.assert_allclose(df[["valence", "arousal"]].to_numpy(), [[0.5, -0.25], [-5, -5], [1, -1]])
    assert df.valid.tolist() == [True, False, True]
    assert df.valence.dtype == np.float32


def test_byte_order_mark_and_spaces(tmp_path):
    path = tmp_path / "v.txt"
    path.write_bytes(("\ufeff" + EXPR_HEADER + "\r\n 3\r\n-1 \r\n").encode("utf-8"))
    df = read_annotation(path, "expr")
    assert df.expr.tolist() == [3, -1] and df.expr.dtype == np.int64 and df.valid.tolist() == [True, False]


def test_au_invalid_when_any_minus_one(tmp_path):
    rows = [[0] * 12, [1] * 12, [1] * 11 + [-1], [-1] * 12]
    path = write(tmp_path / "v.txt", "\n".join([AU_HEADER] + [",".join(map(str, r)) for r in rows]))
    df = read_annotation(path, "au")
    assert df.valid.tolist() == [True, True, False, False]
    np.testing.assert_array_equal(df[AU_NAMES].to_numpy(), rows)


# ---------------------------------------------------------------- layout: folders, images, _left/_right

def test_missing_root_task_and_split_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="root folder") as info: list_videos(tmp_path / "nowhere", "va", "train")
    assert str(tmp_path / "nowhere") in str(info.value) and "cropped_aligned" in str(info.value)
    ann(tmp_path, "va", "val", "v1", f"{VA_HEADER}\n0,0\n")
    with pytest.raises(FileNotFoundError) as info: frame_index(tmp_path, "expr", "val")
    assert str(tmp_path / TASKS["expr"]) in str(info.value) and "EXPR_Recognition_Challenge/{Train_Set,Validation_Set}" in str(info.value)
    with pytest.raises(FileNotFoundError) as info: frame_index(tmp_path, "va", "train")
    assert str(tmp_path / TASKS["va"] / "Train_Set") in str(info.value)
    with pytest.raises(FileNotFoundError, match="v7"): frame_index(tmp_path, "va", "val", videos=["v1", "v7"])


def test_several_bad_files_one_error_naming_all(tmp_path):
    ann(tmp_path, "va", "val", "good", f"{VA_HEADER}\n0.1,0.2\n")
    bad = {"a": (f"{VA_HEADER}\n0.1,0.2\n3,0\n", 3), "b_left": ("valence\n0.1\n", 1), "c": (f"{VA_HEADER}\n0.1\n", 2)}
    for video, (text, _) in bad.items(): ann(tmp_path, "va", "val", video, text)
    e = raised(lambda: frame_index(tmp_path, "va", "val"))
    assert str(e).startswith("3 bad annotation files")
    assert [(x.path.stem, x.line) for x in e.errors] == [(v, line) for v, (_, line) in bad.items()]
    for video, (_, line) in bad.items():
        assert f"{tmp_path / TASKS['va'] / SPLITS['val'] / video}.txt, line {line}:" in str(e)
    assert "good.txt" not in str(e)


def test_summary_gathers_bad_files_of_all_tasks(tmp_path):
    ann(tmp_path, "va", "train", "v1", f"{VA_HEADER}\n2,0\n")
    ann(tmp_path, "expr", "train", "v1", f"{EXPR_HEADER}\n1\n11\n")
    e = raised(lambda: summarize(tmp_path, "train"))
    assert [(x.path.parent.parent.name, x.line) for x in e.errors] == [(TASKS["va"], 2), (TASKS["expr"], 3)]


def test_frames_without_images_and_images_past_the_end(tmp_path):
    ann(tmp_path, "expr", "train", "v1", f"{EXPR_HEADER}\n0\n1\n2\n3\n4\n")
    jpgs(tmp_path, "v1", [1, 2, 4, 6, 7, 8])
    (tmp_path / IMAGE_DIR / "v1" / "notes.txt").write_text("not an image")
    idx = frame_index(tmp_path, "expr", "train")
    assert idx.frame.tolist() == [1, 2, 3, 4, 5], "images past the last annotation are not rows"
    assert idx.has_image.tolist() == [True, True, False, True, False]
    assert idx.has_image.tolist() == [os.path.exists(p) for p in idx.path]
    assert idx.path[2] == str(tmp_path / IMAGE_DIR / "v1" / "00003.jpg")
    t = summarize(tmp_path, "train").table
    assert t.loc["expr", ["frames", "frames_without_image", "images_past_end"]].tolist() == [5, 2, 3]


def test_left_and_right_videos_have_their_own_folders(tmp_path):
    ann(tmp_path, "va", "val", "12-24-1920x1080_left", f"{VA_HEADER}\n0.1,0.1\n0.2,0.2\n0.3,0.3\n")
    ann(tmp_path, "va", "val", "12-24-1920x1080_right", f"{VA_HEADER}\n-0.1,-0.1\n-0.2,-0.2\n")
    jpgs(tmp_path, "12-24-1920x1080_left", [1, 2, 3])
    jpgs(tmp_path, "12-24-1920x1080_right", [2])
    idx = frame_index(tmp_path, "va", "val")
    assert list_videos(tmp_path, "va", "val") == ["12-24-1920x1080_left", "12-24-1920x1080_right"]
    left, right = (idx[idx.video.str.endswith(s)] for s in ("_left", "_right"))
    assert left.has_image.tolist() == [True, True, True] and right.has_image.tolist() == [False, True]
    assert all(f"{IMAGE_DIR}{os.sep}12-24-1920x1080_right{os.sep}" in p for p in right.path)
    np.testing.assert_allclose(right.valence, [-0.1, -0.2], rtol=1e-6)


def test_one_directory_listing_per_video(tmp_path, monkeypatch):
    for v in ("a", "b", "c"):
        ann(tmp_path, "au", "train", v, AU_HEADER + ("\n" + ",".join(["0"] * 12)) * 50)
        jpgs(tmp_path, v, [1, 2])
    calls, listdir = [], os.listdir
    monkeypatch.setattr(data.os, "listdir", lambda p: calls.append(p) or listdir(p))
    def no_stat(*a, **k): raise AssertionError("one file check per frame")
    monkeypatch.setattr(data.os.path, "exists", no_stat)
    monkeypatch.setattr(data.os.path, "isfile", no_stat)
    monkeypatch.setattr(Path, "exists", no_stat)
    idx = frame_index(tmp_path, "au", "train")
    assert len(idx) == 150 and idx.has_image.sum() == 6
    assert sorted(Path(p).name for p in calls) == ["a", "b", "c"]


# ---------------------------------------------------------------- summary and browser

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


def test_browser_render_and_bad_preds(tmp_path):
    ann(tmp_path, "va", "val", "v1", f"{VA_HEADER}\n0.5,0.5\n-5,-5\n-0.5,0.1\n")
    jpgs(tmp_path, "v1", [1, 3])
    fig = FrameBrowser(tmp_path, "va", "val").render("v1", 3)
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), np.asarray(Image.open(tmp_path / IMAGE_DIR / "v1" / "00003.jpg")))
    assert [l.get_xdata()[0] for l in fig.axes[1].lines if l.get_gid() == "current-frame"] == [3]
    assert "invalid" in FrameBrowser(tmp_path).render("v1", 2).axes[0].get_title()
    with pytest.raises(ValueError, match="video, frame"): FrameBrowser(tmp_path, preds=__import__("pandas").DataFrame({"x": [1]}))
    with pytest.raises(ValueError, match="v9"): FrameBrowser(tmp_path, video="v9")
