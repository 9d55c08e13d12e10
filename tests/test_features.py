"""Frame features: equality with a direct timm forward, weight files, cache keys, resuming, changed and bad images,
torchrun sharding and the command line, on a tiny ViT and tiny JPEG folders."""
import json, os, subprocess, sys, time
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
from affect_nb.data import IMAGE_DIR, TASKS, SPLITS

TINY = dict(name="vit_tiny_patch16_224", img_size=32, depth=2)
ROOT = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    "One torch thread: the suite runs in parallel on a few shared cores, where OpenMP threads waiting on each other are many times slower."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    return F.load_backbone(**TINY, pretrained=False)


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "tree")


@pytest.mark.parametrize("pooling", ["avg", "token"])
def test_features_equal_direct_timm_forward(tmp_path, tree, pooling):
    model = F.load_backbone(**TINY, pretrained=False, pooling=pooling)
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


def _save_tiny(path, seed, **kw):
    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=kw.pop("depth", 2), fc_norm=False, **kw).eval()
    sd = m.state_dict()
    save_file(sd, str(path)) if str(path).endswith(".safetensors") else torch.save(sd, path)
    return m


def test_weights_file_loads_that_model(tmp_path, tree, tiny):
    ref = _save_tiny(tmp_path / "w.safetensors", seed=7, num_classes=0, global_pool="avg")
    m = F.load_backbone(**TINY, weights=tmp_path / "w.safetensors")
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        np.testing.assert_array_equal(m(x).numpy(), ref(x).numpy())
        assert (m(x) - tiny(x)).abs().max() > 0.1
    assert m.cache_identity["weights"] == "sha256:" + F.file_sha256(tmp_path / "w.safetensors") and m.cache_identity["pretrained"]
    # a checkpoint with a classifier head (.pth) loads into the headless feature model
    ref2 = _save_tiny(tmp_path / "w.pth", seed=8, num_classes=5, global_pool="avg")
    m2 = F.load_backbone(**TINY, weights=tmp_path / "w.pth")
    with torch.inference_mode(): np.testing.assert_allclose(m2(x).numpy(), ref2.forward_head(ref2.forward_features(x), pre_logits=True).numpy(), atol=1e-6)


def test_extract_with_weights_by_name(tmp_path, tree):
    ref = _save_tiny(tmp_path / "w.safetensors", seed=7, num_classes=0, global_pool="avg")
    ref.data_config, ref.cache_identity = F.load_backbone(**TINY, pretrained=False).data_config, dict(pooling="avg")
    store = F.extract_features(tree, tmp_path / "cache", TINY["name"], weights=tmp_path / "w.safetensors", img_size=32,
                               depth=2, num_workers=0, progress=False)
    assert store.manifest["weights"] == "sha256:" + F.file_sha256(tmp_path / "w.safetensors")
    for v in store.videos:
        rows = tree[(tree.video == v) & tree.has_image]
        x, _, has = store.load(v)
        np.testing.assert_allclose(x[has].astype(np.float32), direct(ref, rows.path), atol=4e-3, rtol=2e-3)


def test_weights_that_do_not_fit_are_an_error(tmp_path):
    _save_tiny(tmp_path / "deep.safetensors", seed=1, depth=3, num_classes=0)
    with pytest.raises(ValueError, match="do not fit.*Unexpected keys.*blocks.2"):
        F.load_backbone(**TINY, weights=tmp_path / "deep.safetensors")
    _save_tiny(tmp_path / "shallow.safetensors", seed=1, depth=1, num_classes=0)
    with pytest.raises(ValueError, match="do not fit.*Missing keys.*blocks.1"):
        F.load_backbone(**TINY, weights=tmp_path / "shallow.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        F.load_backbone(**TINY, weights=tmp_path / "nope.safetensors")


def test_weights_resized_to_another_img_size(tmp_path):
    _save_tiny(tmp_path / "w.safetensors", seed=3, num_classes=0)
    m = F.load_backbone(**{**TINY, "img_size": 48}, weights=tmp_path / "w.safetensors")
    assert m.pos_embed.shape == (1, 1 + 9, 192) and m.data_config["input_size"] == (3, 48, 48)


def test_pretrained_without_hub_or_file_fails_fast(monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(RuntimeError, match=r"weights=PATH.*pretrained=False"):
        F.load_backbone("vit_base_patch16_224.orig_in21k")
    assert time.time() - t < 30, "offline, the error must come at once, not after the hub's retries"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(F, "_reachable", lambda url, timeout=3.0: False)
    with pytest.raises(RuntimeError, match="cannot be reached"):
        F.load_backbone("vit_tiny_patch16_224", img_size=32)
    with pytest.raises(ValueError, match="unknown timm model"):
        F.load_backbone("no_such_vit")


def test_random_init_is_seeded():
    x = torch.randn(2, 3, 32, 32)
    a, b, c = (F.load_backbone(**TINY, pretrained=False, seed=s) for s in (0, 0, 1))
    with torch.inference_mode():
        assert torch.equal(a(x), b(x)) and not torch.allclose(a(x), c(x))


def test_cache_key_changes_with_every_setting(tmp_path):
    _save_tiny(tmp_path / "a.safetensors", seed=1, num_classes=0)
    _save_tiny(tmp_path / "b.safetensors", seed=2, num_classes=0)
    key = lambda **kw: F.cache_key(F.load_backbone(**{**TINY, "pretrained": False, **kw}).cache_identity)
    keys = [key(), key(pooling="token"), key(img_size=48), key(name="vit_small_patch16_224"), key(seed=1),
            key(weights=tmp_path / "a.safetensors"), key(weights=tmp_path / "b.safetensors"), key(crop_pct=None), key(depth=1)]
    assert len(set(keys)) == len(keys)
    assert key() == key() and key(weights=tmp_path / "a.safetensors") == key(weights=tmp_path / "a.safetensors")


def test_second_run_computes_nothing(tmp_path, tree, tiny):
    s1 = F.extract_features(tree, tmp_path / "cache", tiny, num_workers=0, progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in s1.root.glob("v*")}
    s2 = F.extract_features(tree, tmp_path / "cache", tiny, num_workers=0, progress=False)
    assert s2.computed == [] and len(s2) == 3
    assert {p: p.stat().st_mtime_ns for p in s2.root.glob("v*")} == mtimes


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
    assert store.videos == [calls[0]] and not list(store.root.glob(".*"))
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
dist.init_process_group("gloo")
idx = pd.read_csv(sys.argv[1])
model = F.load_backbone("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
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
    store = F.main([str(tmp_path / "aw"), "--cache-dir", str(tmp_path / "cache"), "--backbone", "vit_tiny_patch16_224",
                    "--no-pretrained", "--img-size", "32", "--num-workers", "0", "--batch-size", "2"])
    assert f"2 videos in {store.root} (2 computed" in capsys.readouterr().out
    assert store.videos == ["a", "b"] and store.load("b")[2].tolist() == [True, False, True]
    full = F.load_backbone("vit_tiny_patch16_224", pretrained=False, img_size=32)
    assert store.key == F.cache_key(full.cache_identity)
    paths = [tmp_path / "aw" / IMAGE_DIR / "a" / f"{f:05d}.jpg" for f in range(1, 5)]
    np.testing.assert_allclose(store.load("a")[0].astype(np.float32), direct(full, paths), atol=4e-3, rtol=2e-3)
    assert F.main([str(tmp_path / "aw"), "--cache-dir", str(tmp_path / "cache"), "--backbone", "vit_tiny_patch16_224",
                   "--no-pretrained", "--img-size", "32", "--num-workers", "0"]).computed == []
    with pytest.raises(SystemExit): F.main([str(tmp_path / "aw"), "--cache-dir", str(tmp_path / "c"), "--task", "expr", "--no-pretrained"])


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
