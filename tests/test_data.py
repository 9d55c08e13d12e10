"""Bad input, odd layouts and edge cases of the Aff-Wild2 reader (`affect_nb.data`), on tiny trees written here."""
import os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from affect_nb import data
from affect_nb.data import (AU_NAMES, EXPR_CLASSES, HEADERS, IMAGE_DIR, INVALID, SPLITS, TASKS, AnnotationError, check_task,
                            frame_index, label_columns, list_videos, read_annotation, split_overlap)

from trees import AU_HEADER, EXPR_HEADER, VA_HEADER, ann, imageless_tree, jpgs, write





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


def test_frames_without_images_and_images_past_the_end(tmp_path):
    ann(tmp_path, "expr", "train", "v1", f"{EXPR_HEADER}\n0\n1\n2\n3\n4\n")
    jpgs(tmp_path, "v1", [1, 2, 4, 6, 7, 8])
    (tmp_path / IMAGE_DIR / "v1" / "notes.txt").write_text("not an image")
    idx = frame_index(tmp_path, "expr", "train")
    assert idx.frame.tolist() == [1, 2, 3, 4, 5], "images past the last annotation are not rows"
    assert idx.has_image.tolist() == [True, True, False, True, False]
    assert idx.has_image.tolist() == [os.path.exists(p) for p in idx.path]
    assert idx.path[2] == str(tmp_path / IMAGE_DIR / "v1" / "00003.jpg")


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
    calls, scandir = [], os.scandir
    monkeypatch.setattr(data.os, "scandir", lambda p: calls.append(p) or scandir(p))
    def no_stat(*a, **k): raise AssertionError("one file check per frame")
    monkeypatch.setattr(data.os.path, "exists", no_stat)
    monkeypatch.setattr(data.os.path, "isfile", no_stat)
    monkeypatch.setattr(Path, "exists", no_stat)
    idx = frame_index(tmp_path, "au", "train")
    monkeypatch.undo()  # before asserting: pytest's failure report checks paths itself
    assert len(idx) == 150 and idx.has_image.sum() == 6
    assert sorted(Path(p).name for p in calls if Path(p).parent.name == IMAGE_DIR) == ["a", "b", "c"]


# ---------------------------------------------------------------- reliability: overlap, images, confusions, names

def test_split_overlap_names_videos_in_both_splits(tmp_path):
    for v in ("b", "a", "c"): ann(tmp_path, "expr", "train", v, f"{EXPR_HEADER}\n1\n")
    for v in ("c", "d", "a"): ann(tmp_path, "expr", "val", v, f"{EXPR_HEADER}\n1\n")
    ann(tmp_path, "va", "val", "a", f"{VA_HEADER}\n0,0\n")            # VA has no Train_Set: counts as empty
    assert split_overlap(tmp_path, "expr") == ["a", "c"]
    assert split_overlap(tmp_path, "va") == [] and split_overlap(tmp_path, "au") == []
    with pytest.raises(ValueError, match="'va', 'expr', 'au'"): split_overlap(tmp_path, "EXPR")



def test_video_without_any_image_is_an_error_naming_it(tmp_path):
    imageless_tree(tmp_path)
    with pytest.raises(FileNotFoundError) as info: frame_index(tmp_path, "va", "val")
    msg, images = str(info.value), tmp_path / IMAGE_DIR
    assert msg.startswith(f"3 video(s) of va val ({tmp_path / TASKS['va'] / SPLITS['val']}) have no image for any annotated frame")
    assert f"absent: no folder {images / 'absent'}" in msg and f"empty: {images / 'empty'} is empty" in msg
    assert f"named: {images / 'named'} holds no numbered image (2 other file(s): frame_00001.jpg, frame_00002.jpg)" in msg
    assert "00001.jpg, 00002.jpg, ... (%05d.jpg" in msg and 'on_missing_images="skip" skips such videos' in msg
    assert "  ok:" not in msg
    with pytest.raises(ValueError, match="unknown on_missing_images 'ignore': expected one of 'error', 'skip'"):
        frame_index(tmp_path, "va", "val", on_missing_images="ignore")


def test_video_without_any_image_is_skipped_with_a_warning(tmp_path):
    imageless_tree(tmp_path)
    with pytest.warns(UserWarning) as record: idx = frame_index(tmp_path, "va", "val", on_missing_images="skip")
    assert len(record) == 1 and record[0].filename == __file__
    assert str(record[0].message) == f"skipped 3 video(s) of va val without any image in {tmp_path / IMAGE_DIR}: absent, empty, named"
    assert idx.video.unique().tolist() == ["ok"] and idx.has_image.tolist() == [True, False, True]
    only_past_end = tmp_path / "past"
    ann(only_past_end, "au", "train", "v", AU_HEADER + "\n" + ",".join(["0"] * 12) + "\n")
    jpgs(only_past_end, "v", [2, 3])
    with pytest.raises(FileNotFoundError, match="has images only past the last annotated frame 1"):
        frame_index(only_past_end, "au", "train")


def test_expr_one_hot_row_says_one_class_index_per_row(tmp_path):
    path = ann(tmp_path, "expr", "val", "v", f"{EXPR_HEADER}\n0,0,0,0,1,0,0,0\n0,1,0,0,0,0,0,0\n")
    e = raised(lambda: read_annotation(path, "expr"))
    assert e.line == 2 and str(e).startswith(f"{path}, line 2: expected one value per row, a class index 0-7")
    assert "got 8 values in '0,0,0,0,1,0,0,0'; this row looks one-hot" in str(e) and "(4 for Happiness)" in str(e)
    assert "8 comma-separated" not in str(e) and "1 more bad line" in str(e)


CONFUSED = {  # name: (task, file text, 1-based bad line, words the message must hold)
    "expr_class_name":   ("expr", f"{EXPR_HEADER}\n0\nhappiness\n", 3, "write the class index 4, not the name"),
    "va_spaces":         ("va", f"{VA_HEADER}\n0.1 0.2\n", 2, "separated by spaces: separate them by commas"),
    "au_semicolons":     ("au", AU_HEADER + "\n" + ";".join(["0"] * 12) + "\n", 2, "separated by semicolons"),
    "au_trailing_comma": ("au", AU_HEADER + "\n" + ",".join(["0"] * 12) + ",\n", 2,
                          "got 13 values in '0,0,0,0,0,0,0,0,0,0,0,0,'; the line ends with a comma"),
    "va_blank_line":     ("va", f"{VA_HEADER}\n0.1,0.2\n\n0.1,0.2\n", 3,
                          "a blank line (each frame keeps its line: write -5,-5 for an invalid frame)"),
    "expr_file_as_va":   ("va", f"{EXPR_HEADER}\n1\n", 1, "the header of the expr task: is the file in the wrong folder"),
    "au_file_as_expr":   ("expr", f"{AU_HEADER}\n" + ",".join(["0"] * 12) + "\n", 1, "the header of the au task"),
}


@pytest.mark.parametrize("name", list(CONFUSED))
def test_confused_formats_are_named(tmp_path, name):
    task, text, line, words = CONFUSED[name]
    path = write(tmp_path / f"{name}.txt", text)
    e = raised(lambda: read_annotation(path, task))
    assert e.line == line and str(e).startswith(f"{path}, line {line}: expected") and words in str(e)


def test_header_only_file_is_an_error_naming_it(tmp_path):
    path = ann(tmp_path, "au", "train", "v1", AU_HEADER + "\n\n")
    e = raised(lambda: read_annotation(path, "au"))
    assert e.path == path and e.line is None and str(e) == f"{path}: no frame rows after the header (line 2 labels frame 1): " \
                                                           "remove the file if the video has no labels"
    ann(tmp_path, "au", "train", "v2", AU_HEADER + "\n7\n")
    e = raised(lambda: frame_index(tmp_path, "au", "train"))     # gathered with the other bad files of the split
    assert [(x.path.name, x.line) for x in e.errors] == [("v1.txt", None), ("v2.txt", 2)]


def test_image_folder_that_is_a_file_names_video_and_path(tmp_path):
    for v in ("good", "f1", "f2"): ann(tmp_path, "va", "val", v, f"{VA_HEADER}\n0,0\n")
    jpgs(tmp_path, "good", [1])
    for v in ("f1", "f2"): write(tmp_path / IMAGE_DIR / v, "not a folder")
    with pytest.raises(NotADirectoryError) as info: frame_index(tmp_path, "va", "val", videos=["good", "f1"])
    assert str(info.value) == f"video 'f1': image folder {tmp_path / IMAGE_DIR / 'f1'} is a file, not a folder of %05d.jpg images"
    with pytest.raises(NotADirectoryError) as info: frame_index(tmp_path, "va", "val", on_missing_images="skip")
    assert str(info.value).startswith("2 bad image folders (fix each of them):")
    assert f"video 'f1': image folder {tmp_path / IMAGE_DIR / 'f1'} is a file" in str(info.value)
    assert f"video 'f2': image folder {tmp_path / IMAGE_DIR / 'f2'} is a file" in str(info.value)
    jpgs(tmp_path, "dup", [3])
    (tmp_path / IMAGE_DIR / "dup" / "00003.jpg").rename(tmp_path / IMAGE_DIR / "dup" / "3.jpg")
    jpgs(tmp_path, "dup", [3])
    ann(tmp_path, "va", "val", "dup", f"{VA_HEADER}\n0,0\n")
    with pytest.raises(ValueError, match="3 bad image folders") as info: frame_index(tmp_path, "va", "val")
    assert "video 'dup': image folder" in str(info.value) and "frame 3 has two images, 00003.jpg and 3.jpg" in str(info.value)


@pytest.mark.parametrize("name", ["../../outside/victim", "../outside/victim", "sub/victim", ".."])
def test_video_names_that_are_paths_are_refused(tmp_path, name):
    root = tmp_path / "tree" / "affwild2"
    ann(root, "va", "val", "v1", f"{VA_HEADER}\n0,0\n"); jpgs(root, "v1", [1])
    outside = write(tmp_path / "outside" / "victim.txt", f"{VA_HEADER}\n0.9,0.9\n")   # a planted, valid annotation file
    jpgs(tmp_path / "outside", "victim", [1])
    for n in (name, str(outside.with_suffix(""))):
        with pytest.raises(ValueError) as info: frame_index(root, "va", "val", videos=["v1", n])
        assert str(info.value).startswith(f"video {n!r} is not a single file or folder name")
        with pytest.raises(ValueError, match="is not a single file or folder name"): frame_index(root, "va", "val", videos=n)


def test_annotation_file_names_that_are_not_one_folder_name(tmp_path):
    ann(tmp_path, "va", "val", "v1", f"{VA_HEADER}\n0,0\n")
    odd = ann(tmp_path, "va", "val", "a\\b", f"{VA_HEADER}\n0,0\n")
    for f in (lambda: list_videos(tmp_path, "va", "val"), lambda: frame_index(tmp_path, "va", "val"),
              lambda: split_overlap(tmp_path, "va")):
        with pytest.raises(ValueError) as info: f()
        assert "video 'a\\\\b' is not a single file or folder name" in str(info.value)
        assert f"rename the annotation file {odd}" in str(info.value)



# ---------------------------------------------------------------- one home for the constants; no plotting in the reader

def test_check_task_names_the_task_and_the_options():
    assert [check_task(t) for t in ("va", "expr", "au")] == ["va", "expr", "au"]
    for bad in ("VA", "valence", "", None, ["va"]):
        with pytest.raises(ValueError) as info: check_task(bad)
        assert str(info.value) == f"unknown task {bad!r}: expected one of 'va', 'expr', 'au'"
    with pytest.raises(ValueError, match="unknown task 'EXPR'"): frame_index(Path("."), "EXPR", "val")


def test_invalid_markers_are_what_the_reader_treats_as_invalid(tmp_path):
    assert INVALID == {"va": -5.0, "expr": -1, "au": -1} and list(HEADERS) == list(TASKS)
    for task in TASKS:
        k = len(label_columns(task))
        row = ",".join([f"{INVALID[task]:g}"] * k)
        ok = {"va": "0.1,0.2", "expr": "3", "au": ",".join(["1"] * 12)}[task]
        df = read_annotation(write(tmp_path / f"{task}.txt", "\n".join([",".join(HEADERS[task]), ok, row]) + "\n"), task)
        assert df.valid.tolist() == [True, False], task
        assert (df[label_columns(task)].iloc[1] == INVALID[task]).all(), task


def test_data_layer_imports_no_plotting_or_widgets():
    "The reader is imported by training and the command-line tools: it must not pull in matplotlib, PIL, ipywidgets or IPython."
    code = "import sys, affect_nb.data; print(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'PIL', 'ipywidgets', 'IPython'}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"affect_nb.data imports {r.stdout.strip()}"
