"""The batch loader against the reference it replaces: the same windows in the same order for the same seed, the same
tensors as `WindowDataset` + `DataLoader` (training and evaluation windows, every task, worker processes), the split in one
float16 array, and the streaming feature statistics against the stacked float64 computation."""
import tracemalloc
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from affect_nb.features import FeatureStore
from affect_nb.tasks import AU_NAMES, label_columns
from affect_nb.windows import (Videos, WindowDataset, eval_windows, feature_stats, load_videos, sample_frames, shard, to_device,
                               toy_videos, train_windows, window_loader)

SEQ_LEN = 24


def assert_same_batches(got, want):
    "Two sequences of batches (dicts of tensors) with the same keys, dtypes, shapes and values."
    got, want = list(got), list(want)
    assert len(got) == len(want) > 0
    for i, (g, w) in enumerate(zip(got, want)):
        g = to_device(g, "cpu")
        assert g.keys() == w.keys()
        for k in w: assert g[k].dtype == w[k].dtype and torch.equal(g[k], w[k]), (i, k)


def epoch_order(videos, seed, epoch, rank=0, world=1):
    "The windows and this process's order of an epoch as `train._train_epoch` draws them."
    rng = np.random.default_rng((seed, epoch))
    windows = train_windows(videos, SEQ_LEN, None, rng)
    return windows, shard(rng.permutation(len(windows)), rank, world)


@pytest.mark.parametrize("task", ["va", "expr", "au", "mtl"])
def test_training_batches_equal_window_dataset_for_the_same_seed(task):
    videos = toy_videos(task, n_videos=7, length=(5, 70), seed=3)  # several videos shorter than a window
    assert min(map(len, videos)) < SEQ_LEN
    for rank, world, batch_size in ((0, 1, 8), (1, 2, 5)):
        windows, order = epoch_order(videos, seed=0, epoch=2, rank=rank, world=world)
        again, _ = epoch_order(videos, seed=0, epoch=2, rank=rank, world=world)
        np.testing.assert_array_equal(windows, again)  # the same seed and epoch: the same windows
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        today = DataLoader(WindowDataset(videos, windows, SEQ_LEN, task), batch_sampler=batches)
        loader = window_loader(videos, windows, SEQ_LEN, task, order=order, batch_size=batch_size)
        assert_same_batches(loader, today)
    assert not np.array_equal(epoch_order(videos, 0, 3)[0], windows)  # another epoch: other offsets


@pytest.mark.parametrize("task", ["va", "mtl"])
def test_evaluation_batches_equal_window_dataset(task):
    videos = toy_videos(task, n_videos=5, length=(5, 90), seed=4)
    windows = eval_windows(videos, SEQ_LEN, 7)
    for rank, world in ((0, 1), (1, 3)):
        mine = np.arange(rank, len(windows), world)  # as predict_videos shares them out
        batches = [mine[i:i + 6] for i in range(0, len(mine), 6)]
        today = DataLoader(WindowDataset(videos, windows, SEQ_LEN, task), batch_sampler=batches)
        assert_same_batches(window_loader(videos, windows, SEQ_LEN, task, order=mine, batch_size=6), today)


def test_mtl_padding_and_valid():
    videos = toy_videos("mtl", n_videos=3, length=(10, 30), seed=5)
    b = to_device(next(iter(window_loader(videos, eval_windows(videos, 40), 40, "mtl", batch_size=3))), "cpu")
    n = len(videos[0])
    assert b["y"].shape == (3, 40, 15) and b["y"].dtype == torch.float32 and b["valid"].shape == (3, 40, 3)
    assert torch.equal(b["y"][0, n:, :2], torch.full((40 - n, 2), -5.0)) and torch.equal(b["y"][0, n:, 2:], torch.full((40 - n, 13), -1.0))
    assert not b["valid"][0, n:].any() and not b["missing"][0, n:].any() and b["pad"][0, n:].all() and not b["x"][0, n:].any()
    assert torch.equal(b["valid"][0, :n], torch.from_numpy(videos[0].valid))
    one = replace(videos[1], valid=np.zeros_like(videos[1].valid))
    one.valid[3, 1] = True  # one frame, labelled for one task only: its window is kept
    np.testing.assert_array_equal(train_windows([one], 8), [[0, 0, 8]])


def test_worker_processes_give_the_same_batches():
    videos = toy_videos("au", n_videos=4, length=(20, 80), seed=6)
    windows, order = epoch_order(videos, seed=1, epoch=1)
    alone = window_loader(videos, windows, SEQ_LEN, "au", order=order, batch_size=4)
    workers = window_loader(videos, windows, SEQ_LEN, "au", order=order, batch_size=4, num_workers=1)
    today = DataLoader(WindowDataset(videos, windows, SEQ_LEN, "au"), batch_sampler=[order[i:i + 4] for i in range(0, len(order), 4)])
    assert_same_batches(workers, today)
    assert_same_batches(alone, today)
    assert window_loader(videos, windows, SEQ_LEN, "au", device="cuda").pin_memory and not alone.pin_memory


def write_store(root, sizes: dict, dim: int, seed: int = 0) -> FeatureStore:
    "A feature store of random features, `sizes` video → frames, every 9th frame without an image, by the project's writer."
    store, rng = FeatureStore(root), np.random.default_rng(seed)
    for name, n in sizes.items(): store.write(name, rng.normal(size=(n, dim)).astype(np.float32), np.arange(n) % 9 != 4, "fp")
    return store


def frame_table(sizes: dict, task: str, seed: int = 0) -> pd.DataFrame:
    "A hand-made frame index of `task` over the frames 1..n of each video of `sizes`, rows shuffled, labels random."
    rng = np.random.default_rng(seed)
    frames = np.concatenate([np.arange(1, n + 1) for n in sizes.values()])
    df = pd.DataFrame(dict(video=np.repeat(list(sizes), list(sizes.values())), frame=frames))
    for c in label_columns(task): df[c] = rng.integers(0, 2, len(df)) if c in ("expr", *AU_NAMES) else rng.uniform(-1, 1, len(df))
    for c in (["valid_va", "valid_expr", "valid_au"] if task == "mtl" else []): df[c] = rng.random(len(df)) > 0.3
    df["valid"] = rng.random(len(df)) > 0.1
    return df.sample(frac=1, random_state=seed)


def test_load_videos_fills_one_float16_array_of_views(tmp_path):
    sizes = {f"v{i:02d}": 300 + 37 * i for i in range(12)}
    store = write_store(tmp_path / "key", sizes, dim=256)
    index = frame_table(sizes, "va")
    index = index[~((index.video == "v03") & index.frame.isin([5, 6, 7]))]  # gaps: the row-by-row path
    index = pd.concat([index, pd.DataFrame(dict(video="v05", frame=[sizes["v05"] + 1], valence=0.0, arousal=0.0, valid=True))])
    index = index[(index.video != "v07") | (index.frame > 10)]  # frames 11..n: read from the middle of the file
    tracemalloc.start()
    split = load_videos(index, store, "va")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert isinstance(split, Videos) and split.x.dtype == np.float16 and split.x.shape == (len(index), 256)
    assert all(a.flags.c_contiguous for a in (split.x, split.y, split.valid, split.has_image))  # rows gathered without a copy
    assert peak < 1.3 * split.x.nbytes, (peak, split.x.nbytes)  # the array once, not a second copy
    assert [v.name for v in split] == sorted(sizes)
    for v in split:
        x, has = store.features_for(v.name, v.frames)
        np.testing.assert_array_equal(v.x, x); np.testing.assert_array_equal(v.has_image, has)
        assert np.shares_memory(v.x, split.x) and (np.diff(v.frames) > 0).all()
        rows = index[index.video == v.name].sort_values("frame")
        np.testing.assert_array_equal(v.y, rows[["valence", "arousal"]].to_numpy(np.float32))
        np.testing.assert_array_equal(v.valid, rows.valid.to_numpy(bool))
    assert not split[5].has_image[-1] and not split[5].x[-1].any()  # a frame past the store's: zeros, no image
    assert split[7].frames[0] == 11 and len(split[7]) == sizes["v07"] - 10


def test_load_videos_mtl(tmp_path):
    sizes = {"b": 40, "a": 25}
    store = write_store(tmp_path / "key", sizes, dim=8)
    index = frame_table(sizes, "mtl")
    split = load_videos(index, store, "mtl")
    assert split.y.shape == (65, 15) and split.y.dtype == np.float32 and split.valid.shape == (65, 3) and split.valid.dtype == bool
    assert split.y.flags.c_contiguous and split.valid.flags.c_contiguous
    rows = index[index.video == "b"].sort_values("frame")
    np.testing.assert_array_equal(split[1].valid, rows[["valid_va", "valid_expr", "valid_au"]].to_numpy(bool))
    np.testing.assert_array_equal(split[1].y, rows[label_columns("mtl")].to_numpy(np.float32))
    windows = train_windows(split, 16)
    assert_same_batches(window_loader(split, windows, 16, "mtl", batch_size=3),
                        DataLoader(WindowDataset(split, windows, 16, "mtl"), batch_size=3))


def test_feature_stats_equal_the_stacked_float64_reference(tmp_path):
    sizes = {f"v{i}": 200 + 51 * i for i in range(6)}
    split = load_videos(frame_table(sizes, "va"), write_store(tmp_path / "key", sizes, dim=32, seed=2), "va")
    toys = toy_videos("expr", n_videos=5, dim=12)
    for videos in (split, toys, list(split)):
        stacked = np.concatenate([np.asarray(v.x[v.has_image], np.float64) for v in videos])  # SequenceModel's computation today
        for chunk in (1, 17, 4096):
            mean, std = feature_stats(videos, chunk)
            assert mean.dtype == std.dtype == np.float64
            np.testing.assert_allclose(mean, stacked.mean(0), rtol=1e-12, atol=0)
            np.testing.assert_allclose(std, stacked.std(0), rtol=1e-12, atol=0)


def test_sample_frames_picks_what_the_stacked_permutation_picks(tmp_path):
    sizes = {f"v{i}": 150 + 40 * i for i in range(5)}
    split = load_videos(frame_table(sizes, "va"), write_store(tmp_path / "key", sizes, dim=16, seed=3), "va")
    keep = [v.valid & v.has_image for v in split]
    x_all = np.concatenate([v.x[k] for v, k in zip(split, keep)]).astype(np.float32)  # report.linear_probe's selection today
    y_all = np.concatenate([v.y[k] for v, k in zip(split, keep)])
    for max_frames, seed in ((100, 0), (333, 5), (10**6, 1)):
        pick = np.sort(np.random.default_rng(seed).permutation(len(x_all))[:max_frames])
        x, y = sample_frames(split, keep, max_frames, seed)
        np.testing.assert_array_equal(x, x_all[pick]); np.testing.assert_array_equal(y, y_all[pick])
