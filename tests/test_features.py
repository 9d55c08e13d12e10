"""Frame features: equality with a direct timm forward, weight files by name, resuming, changed and bad images, the store layout,
concurrent extractions, torchrun sharding and the command line, on a tiny ViT and tiny JPEG folders."""
import json, os, re, shutil, subprocess, sys, threading, time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform

from affect_nb import features as F
from affect_nb.cli import main_extract
from affect_nb.backbone import cache_key, file_sha256, load_backbone
from affect_nb.data import IMAGE_DIR, TASKS, SPLITS, frame_index, image_listing

from trees import save_tiny_vit

TINY = dict(name="vit_tiny_patch16_224", img_size=32, depth=2)
ROOT = Path(__file__).resolve().parents[1]
EXTRACT = Path(sys.executable).parent / "affect-extract"


def make_tree(root, n_frames=None, size=32, seed=0, gaps=None, extra=None):
    "Image folders `<root>/cropped_aligned/<video>/%05d.jpg` and their frame index; `gaps`: video → frames without image; `extra`: video → annotated frames past the last image."
    n_frames = n_frames or {"v1": 6, "v2": 5, "v3": 4}
    gaps, extra = gaps or {"v1": [3]}, extra or {"v3": 2}
    rng, rows = np.random.default_rng(seed), []
    for v, n in n_frames.items():
        d = Path(root) / IMAGE_DIR / v
        d.mkdir(parents=True, exist_ok=True)
        for f in range(1, n + 1 + extra.get(v, 0)):
            has = f <= n and f not in gaps.get(v, [])
            if has: Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{f:05d}.jpg")
            rows.append(dict(video=v, frame=f, path=str(d / f"{f:05d}.jpg"), has_image=has, valid=True))
    return pd.DataFrame(rows)


def direct(model, paths):
    "Reference features: timm's own eval transform on PIL images, then the timm model's forward_features and pooling."
    x = torch.stack([create_transform(**model.data_config)(Image.open(p).convert("RGB")) for p in paths])
    with torch.inference_mode(): t = model.forward_features(x)
    pooled = t[:, model.num_prefix_tokens:].mean(1) if model.cache_identity["pooling"] == "avg" else t[:, 0]
    return pooled.numpy()


def store_arrays(store):
    return {v: tuple(np.array(a) for a in store.load(v)) for v in store.videos}




@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "tree")


@pytest.mark.parametrize("pooling", ["avg", "token"])
def test_features_equal_direct_timm_forward(tmp_path, tree, pooling):
    model = load_backbone(**TINY, pretrained=False, pooling=pooling)
    store = F.extract_features(tree, tmp_path / "cache", model, batch_size=4, num_workers=2, progress=False)
    assert store.videos == ["v1", "v2", "v3"] and sorted(store.computed) == store.videos
    for v, n in {"v1": 6, "v2": 5, "v3": 4}.items():
        x, frames, has = store.load(v)
        assert isinstance(x, np.memmap) and x.dtype == np.float16 and x.shape == (n, 192)
        np.testing.assert_array_equal(frames, np.arange(1, n + 1))
        rows = tree[(tree.video == v) & tree.has_image]
        np.testing.assert_array_equal(frames[has], rows.frame)
        np.testing.assert_allclose(x[has].astype(np.float32), direct(model, rows.path), atol=4e-3, rtol=2e-3)
        assert not np.any(x[~has])
    assert store.load("v1")[2].tolist() == [True, True, False, True, True, True]
    manifest = store.manifest
    assert manifest["dim"] == 192 and manifest["pooling"] == pooling and manifest["img_size"] == [32, 32]
    assert manifest["weights"] == "random-init(0)" and manifest["key"] == store.key


def test_features_for_aligns_with_index_rows(tmp_path, tree, tiny):
    store = F.extract_features(tree, tmp_path / "cache", tiny, num_workers=0, progress=False)
    rows = tree[tree.video == "v3"]
    feats, has = store.features_for("v3", rows.frame)
    assert has.tolist() == [True] * 4 + [False] * 2
    np.testing.assert_array_equal(feats[:4], store.load("v3")[0])
    assert not feats[4:].any()
    with pytest.raises(KeyError, match="v9"): store.load("v9")



def test_extract_with_weights_by_name(tmp_path, tree):
    ref = save_tiny_vit(tmp_path / "w.safetensors", seed=7, num_classes=0, global_pool="avg")
    ref.data_config, ref.cache_identity = load_backbone(**TINY, pretrained=False).data_config, dict(pooling="avg")
    store = F.extract_features(tree, tmp_path / "cache", TINY["name"], weights=tmp_path / "w.safetensors", img_size=32,
                               depth=2, num_workers=0, progress=False)
    assert store.manifest["weights"] == "sha256:" + file_sha256(tmp_path / "w.safetensors")
    for v in store.videos:
        rows = tree[(tree.video == v) & tree.has_image]
        x, _, has = store.load(v)
        np.testing.assert_allclose(x[has].astype(np.float32), direct(ref, rows.path), atol=4e-3, rtol=2e-3)


def test_second_run_computes_nothing(tmp_path, tree, tiny):
    s1 = F.extract_features(tree, tmp_path / "cache", tiny, num_workers=0, progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in s1.folder.glob("v*")}
    s2 = F.extract_features(tree, tmp_path / "cache", tiny, num_workers=0, progress=False)
    assert s2.computed == [] and len(s2) == 3 and len(mtimes) >= 6
    assert {p: p.stat().st_mtime_ns for p in s2.folder.glob("v*")} == mtimes


def test_interrupted_run_resumes_with_identical_results(tmp_path, tree, tiny, monkeypatch):
    clean = store_arrays(F.extract_features(tree, tmp_path / "clean", tiny, num_workers=0, progress=False))
    write, calls = F.FeatureStore.write, []
    def dying_write(self, *a, **k):
        calls.append(a[0])
        if len(calls) == 2: raise KeyboardInterrupt
        write(self, *a, **k)
    monkeypatch.setattr(F.FeatureStore, "write", dying_write)
    with pytest.raises(KeyboardInterrupt): F.extract_features(tree, tmp_path / "cache", tiny, num_workers=2, progress=False)
    monkeypatch.setattr(F.FeatureStore, "write", write)
    store = F.FeatureStore(next((tmp_path / "cache").iterdir()))
    assert store.videos == [calls[0]] and not list(store.root.rglob(".*"))
    resumed = F.extract_features(tree, tmp_path / "cache", tiny, num_workers=0, progress=False)
    assert sorted(resumed.computed) == sorted(set(clean) - {calls[0]})
    got = store_arrays(resumed)
    assert got.keys() == clean.keys()
    for v in clean:
        for a, b in zip(got[v], clean[v]): np.testing.assert_array_equal(a, b)


def test_changed_image_folder_is_recomputed(tmp_path, tree, tiny):
    s = F.extract_features(tree, tmp_path / "cache", tiny, num_workers=0, progress=False)
    before = store_arrays(s)
    p = Path(tree.path[(tree.video == "v2") & (tree.frame == 2)].item())
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(p)
    (p.parent / "00004.jpg").unlink()
    s = F.extract_features(tree.assign(has_image=tree.has_image & ~((tree.video == "v2") & (tree.frame == 4))),
                           tmp_path / "cache", tiny, num_workers=0, progress=False)
    assert s.computed == ["v2"]
    x, _, has = s.load("v2")
    assert has.tolist() == [True, True, True, False, True] and not x[3].any()
    np.testing.assert_allclose(x[1].astype(np.float32), direct(tiny, [p])[0], atol=4e-3, rtol=2e-3)
    assert np.abs(x[1].astype(np.float32) - before["v2"][0][1].astype(np.float32)).max() > 0.05
    np.testing.assert_array_equal(x[[0, 2, 4]], before["v2"][0][[0, 2, 4]])


def test_corrupt_jpeg_names_video_and_frame_or_is_flagged(tmp_path, tree, tiny):
    p = Path(tree.path[(tree.video == "v2") & (tree.frame == 2)].item())
    p.write_bytes(p.read_bytes()[:60])
    with pytest.raises(ValueError, match=r"video v2 frame 2: cannot read 00002\.jpg"):
        F.extract_features(tree, tmp_path / "cache", tiny, num_workers=2, progress=False)
    s = F.extract_features(tree, tmp_path / "cache", tiny, num_workers=2, progress=False, on_bad_image="flag")
    x, _, has = s.load("v2")
    assert has.tolist() == [True, False, True, True, True] and not x[1].any() and x[0].any()
    (p.parent / "00003.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"video v2 frame 2"):
        F.extract_features(tree, tmp_path / "cache", tiny, num_workers=0, progress=False)


def test_missing_jpeg_listed_by_index_names_video_and_frame(tmp_path, tree, tiny):
    Path(tree.path[(tree.video == "v1") & (tree.frame == 4)].item()).unlink()
    with pytest.raises(FileNotFoundError, match=r"video v1 frame 4.*00004\.jpg"):
        F.extract_features(tree, tmp_path / "cache", tiny, num_workers=0, progress=False)
    s = F.extract_features(tree, tmp_path / "cache", tiny, num_workers=0, progress=False, on_bad_image="flag")
    assert s.load("v1")[2].tolist() == [True, True, False, False, True, True]


def test_video_without_images(tmp_path, tiny):
    idx = make_tree(tmp_path / "tree", {"v1": 3, "empty": 2}, gaps={"empty": [1, 2]}, extra={})
    s = F.extract_features(idx, tmp_path / "cache", tiny, num_workers=0, progress=False)
    x, frames, has = s.load("empty")
    assert x.shape == (0, 192) and len(frames) == 0
    feats, h = s.features_for("empty", [1, 2])
    assert feats.shape == (2, 192) and not h.any() and not feats.any()


TORCHRUN_SCRIPT = """
import json, os, sys
import pandas as pd, torch.distributed as dist
from affect_nb import features as F
from affect_nb.backbone import load_backbone
dist.init_process_group("gloo")
idx = pd.read_csv(sys.argv[1])
model = load_backbone("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
store = F.extract_features(idx, sys.argv[2], model, batch_size=4, num_workers=0, progress=False)
json.dump(dict(rank=dist.get_rank(), computed=store.computed, n=len(store)), open(f"{sys.argv[3]}/rank{dist.get_rank()}.json", "w"))
dist.destroy_process_group()
"""


def test_torchrun_two_ranks_give_the_one_process_store(tmp_path, tiny):
    idx = make_tree(tmp_path / "tree", {"a": 7, "b": 5, "c": 4, "d": 3}, gaps={"b": [2]}, extra={})
    idx.to_csv(tmp_path / "index.csv", index=False)
    (tmp_path / "run.py").write_text(TORCHRUN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(tmp_path / "run.py"), str(tmp_path / "index.csv"), str(tmp_path / "cache2"), str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(o["n"] == 4 for o in ranks), ranks
    a, b = (set(o["computed"]) for o in ranks)
    assert a and b and not a & b and a | b == {"a", "b", "c", "d"}
    one = F.extract_features(idx, tmp_path / "cache1", tiny, batch_size=4, num_workers=0, progress=False)
    two = F.FeatureStore(tmp_path / "cache2" / one.key)
    assert two.videos == one.videos and two.manifest == one.manifest
    for v in one.videos:
        assert {k: w for k, w in two.info(v).items()} == one.info(v)
        (x1, f1, h1), (x2, f2, h2) = one.load(v), two.load(v)
        np.testing.assert_array_equal(f1, f2); np.testing.assert_array_equal(h1, h2)
        np.testing.assert_allclose(x1.astype(np.float32), x2.astype(np.float32), atol=2e-3, rtol=1e-3)


def _va_tree(root, n_frames):
    "A VA Train_Set in the Aff-Wild2 layout: annotation files and 32 px images (video `b` has no image for frame 2)."
    rng = np.random.default_rng(1)
    ann = Path(root) / TASKS["va"] / SPLITS["train"]
    ann.mkdir(parents=True)
    for v, n in n_frames.items():
        lines = ["valence,arousal"] + [f"{rng.uniform(-1, 1):.3f},{rng.uniform(-1, 1):.3f}" for _ in range(n)]
        (ann / f"{v}.txt").write_text("\n".join(lines) + "\n")
        d = Path(root) / IMAGE_DIR / v
        d.mkdir(parents=True)
        for f in range(1, n + 1):
            if not (v == "b" and f == 2): Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{f:05d}.jpg")


def test_command_line(tmp_path, tiny, capsys):
    _va_tree(tmp_path / "aw", {"a": 4, "b": 3})
    assert main_extract([str(tmp_path / "aw"), "--cache-dir", str(tmp_path / "cache"), "--backbone", "vit_tiny_patch16_224",
                   "--no-pretrained", "--img-size", "32", "--num-workers", "0", "--batch-size", "2"]) == 0
    full = load_backbone("vit_tiny_patch16_224", pretrained=False, img_size=32)
    store = F.FeatureStore(tmp_path / "cache" / cache_key(full.cache_identity))
    assert f"2 videos in {store.root} (2 computed" in capsys.readouterr().out
    assert store.videos == ["a", "b"] and store.load("b")[2].tolist() == [True, False, True]
    paths = [tmp_path / "aw" / IMAGE_DIR / "a" / f"{f:05d}.jpg" for f in range(1, 5)]
    np.testing.assert_allclose(store.load("a")[0].astype(np.float32), direct(full, paths), atol=4e-3, rtol=2e-3)
    assert main_extract([str(tmp_path / "aw"), "--cache-dir", str(tmp_path / "cache"), "--backbone", "vit_tiny_patch16_224",
                   "--no-pretrained", "--img-size", "32", "--num-workers", "0"]) == 0
    assert "(0 computed by this process)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e: main_extract([str(tmp_path / "aw"), "--cache-dir", str(tmp_path / "c"), "--task", "expr", "--no-pretrained"])
    assert e.value.code == 2 and "task 'expr'" in capsys.readouterr().err


def test_benchmark_notebook_quick(tmp_path, monkeypatch):
    pm = pytest.importorskip("papermill")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "bench"
    pm.execute_notebook(str(ROOT / "nbs/experiments/bench_features.ipynb"), str(tmp_path / "bench.ipynb"), cwd=str(ROOT),
                        parameters=dict(quick=True, out_dir=str(out)), progress_bar=False, kernel_name="python3")
    df = pd.read_csv(next(out.glob("features_*.csv")))
    assert {"model", "img_size", "bare_fps", "pipeline_fps", "ratio", "load_fps"} <= set(df.columns)
    assert (df.bare_fps > 0).all() and (df.pipeline_fps > 0).all()
    np.testing.assert_allclose(df.ratio, df.pipeline_fps / df.bare_fps, rtol=1e-3)


# --- reliability: unreadable weight files, store layout and video names, concurrent extractions, the console script ---

def test_extraction_with_an_unreadable_weight_file_stops_before_creating_the_cache(tmp_path):
    (tmp_path / "junk.pth").write_bytes(bytes(range(256)) * 16)
    with pytest.raises(ValueError, match=r"junk\.pth .*not a readable torch checkpoint"):
        F.extract_features(make_tree(tmp_path / "tree"), tmp_path / "cache", TINY["name"], weights=tmp_path / "junk.pth", img_size=32,
                           depth=2)
    assert not (tmp_path / "cache").exists()


def test_a_video_named_manifest_is_stored_beside_the_manifest_safely(tmp_path, tiny):
    idx = make_tree(tmp_path / "tree", {"manifest": 4, "v1": 3}, gaps={}, extra={})
    s = F.extract_features(idx, tmp_path / "cache", tiny, num_workers=0, progress=False)
    assert s.videos == ["manifest", "v1"] and sorted(s.computed) == s.videos
    assert s.manifest["key"] == s.key and s.manifest["format"] == F.STORE_FORMAT and s.manifest["dim"] == 192
    rows = idx[idx.video == "manifest"]
    np.testing.assert_allclose(s.load("manifest")[0].astype(np.float32), direct(tiny, rows.path), atol=4e-3, rtol=2e-3)
    assert F.extract_features(idx, tmp_path / "cache", tiny, num_workers=0, progress=False).computed == []


def test_a_store_of_the_old_layout_is_moved_not_recomputed(tmp_path, tree, tiny):
    s = F.extract_features(tree, tmp_path / "cache", tiny, num_workers=0, progress=False)
    before = store_arrays(s)
    for p in s.folder.glob("*.*"):  # format 1: the video files beside manifest.json
        if p.suffix in (".npy", ".json"): p.rename(s.root / p.name)
    shutil.rmtree(s.folder)
    old = s.manifest; del old["format"]
    (s.root / "manifest.json").write_text(json.dumps(old))
    s2 = F.extract_features(tree, tmp_path / "cache", tiny, num_workers=0, progress=False)
    assert s2.computed == [] and s2.manifest["format"] == F.STORE_FORMAT
    assert sorted(p.name for p in s2.root.iterdir()) == ["manifest.json", "videos"]
    got = store_arrays(s2)
    assert got.keys() == before.keys()
    for v in before:
        for a, b in zip(got[v], before[v]): np.testing.assert_array_equal(a, b)


def test_a_video_name_is_one_path_component(tmp_path, tiny):
    store = F.FeatureStore(tmp_path / "cache" / "k")
    feats, has = np.ones((2, 4)), np.ones(2, bool)
    for bad in ["../x", "a/b", "..", ""]:
        for call in (lambda: store.write(bad, feats, has, "fp"), lambda: store.load(bad), lambda: store.info(bad),
                     lambda: store.features_for(bad, [1]), lambda: store.is_done(bad, "fp")):
            with pytest.raises(ValueError, match=f"video {bad!r} is not a single file or folder name"): call()
    idx = make_tree(tmp_path / "tree", {"v1": 3}, gaps={}, extra={})
    idx = pd.concat([idx, idx.assign(video="../x")])
    with pytest.raises(ValueError, match=r"video '\.\./x'"):
        F.extract_features(idx, tmp_path / "cache", tiny, num_workers=0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "tree"]
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.suffix in (".npy", ".json") and p.name != "manifest.json"]


def test_an_extraction_waits_for_a_video_another_process_holds(tmp_path, tree, tiny):
    """Another holder of v2's lock (a thread with its own lock file handle, as another process would have): the extraction does v1 and v3,
    waits for v2, then skips it when the holder stored it, or computes it when the holder let go without storing it."""
    ref = F.extract_features(tree, tmp_path / "ref", tiny, num_workers=0, progress=False)
    for finishes in (True, False):
        store = F.FeatureStore(tmp_path / f"cache{finishes}" / ref.key)
        held = threading.Event()
        def other():
            with store.lock("v2"):
                held.set()
                time.sleep(1.0)
                if finishes:
                    x, _, has = ref.load("v2")
                    fp = F.fingerprint(image_listing(tmp_path / "tree" / IMAGE_DIR / "v2"), ref.key)
                    store.write("v2", np.array(x), has, fp)
        t = threading.Thread(target=other)
        t.start(); held.wait(10)
        t0 = time.time()
        s = F.extract_features(tree, store.root.parent, tiny, num_workers=0, progress=False)
        waited = time.time() - t0
        t.join()
        assert waited > 0.8 and s.computed == (["v1", "v3"] if finishes else ["v1", "v3", "v2"]), (waited, s.computed)
        assert s.videos == ref.videos and all(s.info(v) == ref.info(v) for v in ref.videos)
        np.testing.assert_array_equal(s.load("v2")[0], ref.load("v2")[0])


CONCURRENT_SCRIPT = """
import json, sys, time
from pathlib import Path
import pandas as pd
from affect_nb import features as F
from affect_nb.backbone import load_backbone
idx, cache, out, me = pd.read_csv(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
model = load_backbone("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
(out / f"ready{me}").touch()
while len(list(out.glob("ready*"))) < 2: time.sleep(0.005)  # start together
store = F.extract_features(idx, cache, model, batch_size=2, num_workers=0, progress=False)
(out / f"done{me}.json").write_text(json.dumps(dict(computed=store.computed, n=len(store))))
"""


def test_two_extractions_into_one_cache_compute_each_video_once(tmp_path, tiny):
    idx = make_tree(tmp_path / "tree", {f"v{i}": 4 + i % 3 for i in range(8)}, gaps={"v0": [2]}, extra={})
    idx.to_csv(tmp_path / "index.csv", index=False)
    (tmp_path / "run.py").write_text(CONCURRENT_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(tmp_path / "run.py"), str(tmp_path / "index.csv"), str(tmp_path / "cache"), str(tmp_path)]
    procs = [subprocess.Popen([sys.executable, *args, str(i)], stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    runs = [json.loads((tmp_path / f"done{i}.json").read_text()) for i in range(2)]
    computed = runs[0]["computed"] + runs[1]["computed"]
    assert sorted(computed) == sorted(set(idx.video)) and all(o["n"] == 8 for o in runs), runs
    one = F.extract_features(idx, tmp_path / "one", tiny, batch_size=2, num_workers=0, progress=False)
    two = F.FeatureStore(tmp_path / "cache" / one.key)
    assert two.videos == one.videos and two.manifest == one.manifest
    for v in one.videos:
        assert two.info(v) == one.info(v)
        np.testing.assert_allclose(two.load(v)[0].astype(np.float32), one.load(v)[0].astype(np.float32), atol=2e-3, rtol=1e-3)


CLI_TINY = ["--backbone", "vit_tiny_patch16_224", "--no-pretrained", "--img-size", "32", "--num-workers", "0", "--batch-size", "2"]


def test_console_script_exits_0_and_one_line_2_on_a_bad_input(tmp_path):
    assert EXTRACT.exists(), f"the console script {EXTRACT} is not installed (pip install -e .)"
    _va_tree(tmp_path / "aw", {"a": 3, "b": 2})
    run = lambda *a: subprocess.run([str(EXTRACT), str(tmp_path / "aw"), "--cache-dir", str(tmp_path / "cache"), *CLI_TINY, *a],
                                    capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    r = run()
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"^2 videos in \S+ \(2 computed by this process\)$", r.stdout, re.M), r.stdout
    assert F.FeatureStore(next((tmp_path / "cache").iterdir())).videos == ["a", "b"]
    (tmp_path / "w.pth").write_text("not weights\n")
    r = run("--weights", str(tmp_path / "w.pth"))
    assert r.returncode == 2 and r.stderr.splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith(f"affect-extract: error: weights file {tmp_path / 'w.pth'} ") and r.stdout == ""


def test_console_script_under_torchrun_every_rank_exits_0(tmp_path):
    _va_tree(tmp_path / "aw", {"a": 5, "b": 4, "c": 3, "d": 3})
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(EXTRACT), str(tmp_path / "aw"), "--cache-dir", str(tmp_path / "cache"), *CLI_TINY, "--device", "cpu"],
                       capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    ranks = dict(re.findall(r"rank (\d)/2: 4 videos in \S+ \((\d+) computed by this process\)", r.stdout))
    assert sorted(ranks) == ["0", "1"] and all(int(n) > 0 for n in ranks.values()) and sum(map(int, ranks.values())) == 4, r.stdout
    full = load_backbone("vit_tiny_patch16_224", pretrained=False, img_size=32)
    two = F.FeatureStore(tmp_path / "cache" / cache_key(full.cache_identity))
    index = frame_index(tmp_path / "aw", "va", "train")
    one = F.extract_features(index, tmp_path / "one", full, batch_size=2, num_workers=0, progress=False)
    assert two.videos == one.videos == ["a", "b", "c", "d"]
    for v in one.videos:
        assert two.info(v) == one.info(v)
        np.testing.assert_allclose(two.load(v)[0].astype(np.float32), one.load(v)[0].astype(np.float32), atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("args, named", [
    (["{missing}", "--cache-dir", "{c}"], "data folder {missing} does not exist"),
    (["{aw}"], "the following arguments are required: --cache-dir"),
    (["{aw}", "--cache-dir", "{c}", "--split", "val"], "split 'val' has no Validation_Set folder under {aw}"),
    (["{aw}", "--cache-dir", "{c}", "--split", "test"], "argument --split: invalid choice: 'test'"),
    (["{aw}", "--cache-dir", "{c}", "--task", "au"], "task 'au' has no Train_Set or Validation_Set folder in {aw}/AU_Detection_Challenge"),
    (["{aw}", "--cache-dir", "{c}", "--img-size", "0"], "argument --img-size: must be at least 1, got 0"),
    (["{aw}", "--cache-dir", "{c}", "--batch-size", "many"], "argument --batch-size: invalid int value: 'many'"),
    (["{aw}", "--cache-dir", "{c}", "--num-workers", "-1"], "argument --num-workers: must be at least 0, got -1"),
    (["{aw}", "--cache-dir", "{c}", "--pooling", "max"], "argument --pooling: invalid choice: 'max'"),
    (["{aw}", "--cache-dir", "{c}", "--device", "gpu"], "device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'gpu'"),
    (["{aw}", "--cache-dir", "{c}", "--backbone", "no_such_vit"], "unknown timm model 'no_such_vit'"),
    (["{aw}", "--cache-dir", "{c}", "--weights", "{missing}.safetensors"], "weight file {missing}.safetensors does not exist"),
    (["{aw}", "--cache-dir", "{aw}/cropped_aligned/a/00001.jpg"], "cache folder {aw}/cropped_aligned/a/00001.jpg is not writable"),
])
def test_command_line_errors_are_one_line_and_status_2(tmp_path, capsys, args, named):
    _va_tree(tmp_path / "aw", {"a": 2})
    fill = lambda s: s.format(aw=tmp_path / "aw", c=tmp_path / "cache", missing=tmp_path / "nope")
    with pytest.raises(SystemExit) as e: main_extract([fill(a) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("affect-extract: error: ") and fill(named) in err, err
