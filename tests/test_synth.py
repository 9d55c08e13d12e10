"""The synthetic Aff-Wild2 (`affect_nb.synth`): byte-for-byte determinism, files that agree with the planted truth
(read both independently and through `affect_nb.data`), the `affect-synth` command, and interrupted builds."""
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from affect_nb.data import frame_index
from affect_nb.explore import summarize
from affect_nb.synth import GENERATOR_VERSION, MARKER, make_synthetic, synthetic_params, synthetic_version

SMALL = dict(n_videos=6, n_frames=30)

# The formats as the design chapter (nbs/design.ipynb) states them, written out here rather than imported, so the files are checked against the spec.
FOLDERS = {"va": "VA_Estimation_Challenge", "expr": "EXPR_Recognition_Challenge", "au": "AU_Detection_Challenge"}
SPLIT_FOLDERS = {"train": "Train_Set", "val": "Validation_Set"}
HEADERS = {"va": "valence,arousal", "expr": "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other",
           "au": "AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26"}
COLUMNS = {t: h.split(",") if t != "expr" else ["expr"] for t, h in HEADERS.items()}


def tree_hash(root):
    "SHA-256 over the relative path and bytes of every file under `root`."
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        if p.is_file(): h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def mtimes(root): return {p: p.stat().st_mtime_ns for p in Path(root).rglob("*")}


def cli(*args, **kw):
    "Run the `affect-synth` console script (or, when it is not installed, `main` through the same interpreter)."
    exe = Path(sys.executable).parent / "affect-synth"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from affect_nb.synth import main; sys.exit(main())"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "tree"
    return root, make_synthetic(root, **SMALL, seed=0, progress=False)


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tree, tmp_path):
    root, _ = tree
    make_synthetic(tmp_path / "again", **SMALL, seed=0, progress=False)
    make_synthetic(tmp_path / "other", **SMALL, seed=1, progress=False)
    assert tree_hash(tmp_path / "again") == tree_hash(root)
    assert tree_hash(tmp_path / "other") != tree_hash(root)


def test_annotation_files_follow_the_format_and_hold_the_planted_labels(tree):
    root, truth = tree
    for task, folder in FOLDERS.items():
        for split, sub in SPLIT_FOLDERS.items():
            want = truth[task][split]
            files = sorted((root / folder / sub).glob("*.txt"))
            assert files and {f.stem for f in files} == set(want.video)
            for f in files:
                lines = f.read_bytes().decode("ascii").split("\n")
                assert lines[0] == HEADERS[task] and lines[-1] == ""
                rows = want[want.video == f.stem]
                values = np.array([[float(x) for x in l.split(",")] for l in lines[1:-1]])
                assert values.shape == (len(rows), len(COLUMNS[task]))
                np.testing.assert_array_equal(values, rows[COLUMNS[task]].to_numpy(float))
                np.testing.assert_array_equal(rows.frame, np.arange(1, len(rows) + 1))
                if task == "va":
                    assert ((np.abs(values) <= 1).all(1) | (values == -5).all(1)).all()
                    valid = ~(values == -5).all(1)
                elif task == "expr":
                    assert np.isin(values, np.arange(-1, 8)).all()
                    valid = values[:, 0] != -1
                else:
                    assert np.isin(values, (-1, 0, 1)).all()
                    valid = ~(values == -1).any(1)
                np.testing.assert_array_equal(valid, rows.valid)


def test_images_are_the_planted_frames_plus_those_past_the_end(tree):
    root, truth = tree
    videos = truth["videos"].set_index("video")
    assert sorted(p.name for p in (root / "cropped_aligned").iterdir()) == sorted(videos.index)
    has_image = {}
    for task in FOLDERS:
        for split in SPLIT_FOLDERS:
            for v, d in truth[task][split].groupby("video"): has_image.setdefault(v, []).append(d.has_image.to_numpy())
    for v, r in videos.iterrows():
        assert all((h == has_image[v][0]).all() for h in has_image[v]), "a frame has an image for one task and not another"
        frames = np.r_[np.flatnonzero(has_image[v][0]) + 1, np.arange(r.n_frames + 1, r.n_frames + r.images_past_end + 1)]
        assert sorted(p.name for p in (root / "cropped_aligned" / v).iterdir()) == [f"{f:05d}.jpg" for f in frames]
        assert r.frames_without_image == (~has_image[v][0]).sum()
    img = Image.open(next((root / "cropped_aligned").rglob("*.jpg")))
    assert (img.format, img.size, img.mode) == ("JPEG", (112, 112), "RGB")


def test_tree_has_every_quirk_of_the_real_data(tree):
    root, truth = tree
    v = truth["videos"]
    pairs = [n[:-5] for n in v.video if n.endswith("_left")]
    assert pairs and all(f"{p}_right" in set(v.video) for p in pairs)
    for p in pairs:
        for side in ("_left", "_right"):
            assert (root / "cropped_aligned" / f"{p}{side}").is_dir()
            assert any((root / f / s / f"{p}{side}.txt").exists() for f in FOLDERS.values() for s in SPLIT_FOLDERS.values())
    assert v.images_past_end.gt(0).any() and v.frames_without_image.gt(0).any() and v.n_frames.nunique() > 1
    assert (v.tasks != "va,expr,au").any(), "some video should miss a task"
    for task in FOLDERS:
        for split in SPLIT_FOLDERS:
            d = truth[task][split]
            assert (~d.valid).any() and d.valid.any() and (~d.has_image).any(), (task, split)
    au = truth["au"]["train"][COLUMNS["au"]]
    assert ((au == -1).any(axis=1) & ~(au == -1).all(axis=1)).any(), "an AU row with a single -1"


@pytest.mark.parametrize("task", FOLDERS)
@pytest.mark.parametrize("split", SPLIT_FOLDERS)
def test_frame_index_reads_back_what_was_planted(tree, task, split):
    root, truth = tree
    got = frame_index(root, task, split).sort_values(["video", "frame"]).reset_index(drop=True)
    want = truth[task][split].sort_values(["video", "frame"]).reset_index(drop=True)
    assert got[["video", "frame"]].equals(want[["video", "frame"]])
    np.testing.assert_array_equal(got.valid, want.valid)
    np.testing.assert_array_equal(got.has_image, want.has_image)
    expected_paths = [str(root / "cropped_aligned" / v / f"{f:05d}.jpg") for v, f in zip(want.video, want.frame)]
    assert [str(Path(p)) for p in got.path] == expected_paths
    assert [Path(p).exists() for p in got.path] == want.has_image.tolist()
    ok = want.valid.to_numpy()
    np.testing.assert_allclose(got.loc[ok, COLUMNS[task]].to_numpy(float), want.loc[ok, COLUMNS[task]].to_numpy(float), atol=1e-6, rtol=0)


def test_summary_counts_match_the_planted_truth(tree):
    root, truth = tree
    for split in SPLIT_FOLDERS:
        t = summarize(root, split).table
        for task in FOLDERS:
            d = truth[task][split]
            vids = truth["videos"].set_index("video").loc[d.video.unique()]
            assert (t.loc[task, "videos"], t.loc[task, "frames"], t.loc[task, "valid_frames"]) == (d.video.nunique(), len(d), d.valid.sum())
            assert (t.loc[task, "frames_without_image"], t.loc[task, "images_past_end"]) == ((~d.has_image).sum(), vids.images_past_end.sum())


def test_cli_builds_reuses_refuses_and_rebuilds(tmp_path):
    root, args = tmp_path / "cli", ["--n-videos", 3, "--n-frames", 20]
    r = cli(root, *args, "--summary")
    assert r.returncode == 0, r.stderr
    assert "built" in r.stdout and "Aff-Wild2 split 'train'" in r.stdout and "Aff-Wild2 split 'val'" in r.stdout
    assert synthetic_params(root) == dict(n_videos=3, n_frames=20, seed=0)
    h, t = tree_hash(root), mtimes(root)
    r = cli(root, *args)
    assert r.returncode == 0 and "reusing" in r.stdout
    assert mtimes(root) == t
    r = cli(root, *args, "--seed", 1)
    assert r.returncode == 2 and "--force" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert tree_hash(root) == h
    r = cli(root, *args, "--seed", 1, "--force")
    assert r.returncode == 0, r.stderr
    assert synthetic_params(root)["seed"] == 1 and tree_hash(root) != h
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cli.lock", "cli"], "no temporary folder left beside the tree"


def test_cli_never_overwrites_a_folder_that_is_not_a_synthetic_tree(tmp_path):
    mine = tmp_path / "affwild2"
    (mine / "cropped_aligned").mkdir(parents=True)
    (mine / "notes.txt").write_text("real data")
    for extra in ([], ["--force"]):
        r = cli(mine, "--n-videos", 3, "--n-frames", 20, *extra)
        assert r.returncode == 2 and r.stderr.startswith(f"affect-synth: error: {mine} is not empty") and r.stderr.count("\n") == 1, r.stderr
        assert "refusing to overwrite" in r.stderr
    assert (mine / "notes.txt").read_text() == "real data" and sorted(p.name for p in mine.iterdir()) == ["cropped_aligned", "notes.txt"]
    r = cli(tmp_path / "x", "--n-videos", 1)
    assert r.returncode == 2 and "n_videos must be at least 2" in r.stderr and r.stderr.count("\n") == 1 and not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, named", [
    ([], "the following arguments are required: root"),
    (["{root}", "--n-frames", "many"], "argument --n-frames: invalid int value: 'many'"),
    (["{root}", "--n-frames", "5"], "n_frames must be at least 10, got 5"),
    (["{root}", "--n-videos", "3", "--colour"], "unrecognized arguments: --colour"),
    (["{file}", "--n-videos", "3", "--n-frames", "20"], "{file} is a file, not a folder"),
    (["{file}/tree", "--n-videos", "3", "--n-frames", "20"], "{file}"),
])
def test_cli_bad_inputs_are_one_line_and_status_2(tmp_path, capsys, args, named):
    from affect_nb.synth import main
    (tmp_path / "notes.txt").write_text("x")
    fill = lambda a: a.format(root=tmp_path / "tree", file=tmp_path / "notes.txt")
    with pytest.raises(SystemExit) as e: main([fill(a) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("affect-synth: error: ") and fill(named) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_cli_exits_0(tmp_path):
    from affect_nb.synth import main
    assert main([str(tmp_path / "tree"), "--n-videos", "3", "--n-frames", "20"]) == 0 and synthetic_params(tmp_path / "tree")["n_videos"] == 3


def _interrupt_after(monkeypatch, n):
    "Make the n-th JPEG write raise KeyboardInterrupt, as a Ctrl-C in the middle of a build would."
    calls, save = [0], Image.Image.save
    def interrupted(self, *args, **kw):
        calls[0] += 1
        if calls[0] >= n: raise KeyboardInterrupt
        return save(self, *args, **kw)
    monkeypatch.setattr(Image.Image, "save", interrupted)


def test_interrupted_build_leaves_no_tree_and_keeps_an_older_one(tmp_path, monkeypatch):
    root = tmp_path / "tree"
    with monkeypatch.context() as m:
        _interrupt_after(m, 20)
        with pytest.raises(KeyboardInterrupt): make_synthetic(root, **SMALL, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [".tree.lock"]  # no tree, no partial folder: only the builders' lock
    make_synthetic(root, **SMALL, progress=False)
    h = tree_hash(root)
    with monkeypatch.context() as m:
        _interrupt_after(m, 20)
        with pytest.raises(KeyboardInterrupt): make_synthetic(root, **SMALL, seed=1, force=True, progress=False)
    assert tree_hash(root) == h and synthetic_params(root)["seed"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tree.lock", "tree"]


def test_processes_building_the_same_tree_at_once_all_get_the_complete_tree(tmp_path):
    "The runs of a parallel sweep each prepare the same data folder: one builds it, the others wait and reuse it."
    root, args = tmp_path / "tree", ["--n-videos", "8", "--n-frames", "120"]
    exe = Path(sys.executable).parent / "affect-synth"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from affect_nb.synth import main; sys.exit(main())"]
    procs = [subprocess.Popen(cmd + [str(root), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e for _, e in outs]
    make_synthetic(tmp_path / "reference", n_videos=8, n_frames=120, progress=False)
    assert tree_hash(root) == tree_hash(tmp_path / "reference")
    assert not (tmp_path / ".tree.partial").exists() and not (tmp_path / ".tree.old").exists()


def test_killed_build_leaves_no_tree_and_the_next_build_is_clean(tmp_path):
    root, partial = tmp_path / "tree", tmp_path / ".tree.partial"
    exe = Path(sys.executable).parent / "affect-synth"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from affect_nb.synth import main; sys.exit(main())"]
    proc = subprocess.Popen(cmd + [str(root), "--n-videos", "12", "--n-frames", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ((partial / "cropped_aligned").is_dir() and any((partial / "cropped_aligned").iterdir())):
        assert proc.poll() is None and time.time() < deadline, "the build ended before it could be killed"
        time.sleep(0.01)
    proc.kill(); proc.wait()
    assert not root.exists() and synthetic_params(root) is None
    r = cli(root, "--n-videos", 3, "--n-frames", 20)
    assert r.returncode == 0, r.stderr
    assert not partial.exists()
    make_synthetic(tmp_path / "reference", n_videos=3, n_frames=20, progress=False)
    assert tree_hash(root) == tree_hash(tmp_path / "reference")
    assert json.loads((root / MARKER).read_text())["params"] == dict(n_videos=3, n_frames=20, seed=0)


def test_a_tree_from_an_older_generator_is_rebuilt_not_reused(tmp_path):
    root, args = tmp_path / "tree", ["--n-videos", 3, "--n-frames", 20]
    make_synthetic(tmp_path / "reference", n_videos=3, n_frames=20, progress=False)
    assert cli(root, *args).returncode == 0
    marker = json.loads((root / MARKER).read_text())
    assert marker["version"] == GENERATOR_VERSION and synthetic_version(root) == GENERATOR_VERSION
    del marker["version"]  # what the first generator wrote
    (root / MARKER).write_text(json.dumps(marker))
    (root / "cropped_aligned" / "stale.txt").write_text("old pixels")
    r = cli(root, *args)
    assert r.returncode == 0, r.stderr
    assert "reusing" not in r.stdout and "built" in r.stdout and "version 1" in r.stderr
    assert synthetic_version(root) == GENERATOR_VERSION and tree_hash(root) == tree_hash(tmp_path / "reference")
    marker["version"] = GENERATOR_VERSION - 1
    (root / MARKER).write_text(json.dumps(marker))
    with pytest.warns(UserWarning, match="rebuilding"): make_synthetic(root, n_videos=3, n_frames=20, progress=False)
    assert synthetic_version(root) == GENERATOR_VERSION and tree_hash(root) == tree_hash(tmp_path / "reference")
