"""Bad inputs of training and prediction fail early with a message naming what is wrong: video names that are paths, damaged
checkpoints, read-only or full output folders, wrong settings, videos in both splits, wrong experiment-notebook parameters."""
import contextlib, json, os, shutil, subprocess, sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from affect_nb.data import frame_index, list_videos
from affect_nb.features import extract_features
from affect_nb.config import load_checkpoint
from affect_nb.predict import predict
from affect_nb.synth import make_synthetic
from affect_nb.train import train
from affect_nb.windows import image_index, load_split

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NB = ROOT / "nbs" / "experiments" / "train.ipynb"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
BACKBONE = dict(backbone="vit_tiny_patch16_224", pretrained=False, img_size=32, pooling="avg")
TINY = dict(seq_len=8, batch_size=4, epochs=1, lr=3e-3, patience=2, d_model=16, n_heads=2, n_layers=1, d_ff=32, dropout=0.1, mask_p=0.3)


def cli_args(config: dict) -> list[str]:
    return [a for k, v in config.items() for a in (f"--{k.replace('_', '-')}", str(v).lower() if isinstance(v, bool) else str(v))]


def run_cli(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / script), *map(str, args)], env=ENV, capture_output=True, text=True, timeout=300)


def one_error_line(r: subprocess.CompletedProcess, prog: str) -> str:
    "The single stderr line of a console script that refused its input with status 2."
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), r.stderr[-2000:]
    return lines[0]


def snapshot(*folders) -> dict:
    "Every file and folder under `folders` with its size and modification time."
    return {p: (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns) for f in folders if f.exists() for p in [f, *f.rglob("*")]}


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "256k", read_only: bool = False):
    "A tmpfs of `size` mounted at `path` (read-only if asked), unmounted afterwards; the test is skipped where mounting fails."
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode: pytest.skip(f"cannot mount a tmpfs at {path}: {r.stderr.strip()}")
    try:
        if read_only: subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)
        yield path
    finally: subprocess.run(["umount", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    "A synthetic tree of 6 short videos, its VA features from a tiny random ViT, and one trained VA run."
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("inputs")
    data, cache, run = base / "data", base / "features", base / "run"
    make_synthetic(data, n_videos=6, n_frames=30, progress=False)
    assert list_videos(data, "va", "train") and list_videos(data, "va", "val")
    index = pd.concat([frame_index(data, "va", s) for s in ("train", "val")])
    extract_features(index, cache, **BACKBONE, num_workers=0, progress=False)
    train(data, "va", run, cache_dir=cache, **BACKBONE, progress=False, feature_workers=0, **TINY)
    return base, data, cache, run


def train_kw(cache, **over):
    return dict(cache_dir=cache, **BACKBONE, progress=False, feature_workers=0, **{**TINY, **over})


def test_predict_refuses_video_names_that_are_paths(tiny, tmp_path):
    base, data, cache, run = tiny
    victim = base / "outside" / "victimdir"  # what data/cropped_aligned/../../outside/victimdir points at
    victim.mkdir(parents=True, exist_ok=True)
    first = sorted(list_videos(data, "va", "val"))[0]
    for f in sorted((data / "cropped_aligned" / first).glob("*.jpg"))[:3]: shutil.copy2(f, victim)
    before = snapshot(base / "outside", cache, data)
    names = tmp_path / "videos.txt"
    names.write_text(f"{first}\n../../outside/victimdir\n")
    out = tmp_path / "sub" / "test.csv"
    line = one_error_line(run_cli("affect-predict", run, data, "--split", "test", "--videos", names, "--out", out), "affect-predict")
    assert f"video list {names} line 2: video '../../outside/victimdir' is not a single file or folder name" in line
    for bad in (str(victim), "../../outside/victimdir"):
        with pytest.raises(ValueError, match=f"video '{bad}' is not a single file or folder name"):
            predict(run, data, "test", videos=[first, bad], progress=False)
        with pytest.raises(ValueError, match=f"video '{bad}'"): image_index(data, "va", [first, bad])
        with pytest.raises(ValueError, match=f"video '{bad}'"): load_split(data, "va", "test", cache, BACKBONE, videos=[bad])
        with pytest.raises(ValueError, match=f"video '{bad}'"): load_split(data, "va", "val", cache, BACKBONE, videos=[bad])
    assert snapshot(base / "outside", cache, data) == before  # nothing read into the cache, nothing written anywhere
    assert not out.parent.exists() and not list(cache.rglob("victimdir*"))


def test_damaged_checkpoints_name_the_file(tiny, tmp_path):
    base, data, cache, run = tiny
    ck = tmp_path / "ck"
    shutil.copytree(run / "checkpoint", ck)
    weights, config = ck / "model.safetensors", ck / "config.json"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 3])
    with pytest.raises(ValueError, match=f"checkpoint {weights} is not a readable safetensors file .*truncated"): load_checkpoint(ck)
    line = one_error_line(run_cli("affect-predict", ck, data, "--out", tmp_path / "x.csv"), "affect-predict")
    assert f"checkpoint {weights} is not a readable safetensors file" in line and not (tmp_path / "x.csv").exists()
    weights.write_bytes(good)
    cfg = json.loads(config.read_text())
    config.write_text(json.dumps({**cfg, "d_model": 32, "n_heads": 2}))
    with pytest.raises(ValueError, match=rf"checkpoint {weights} does not fit {config}: temporal\.\S+ \(16, \d+\) in the file, \(32, \d+\) by the config"):
        load_checkpoint(ck)
    config.write_text(json.dumps(cfg)[:-5])
    with pytest.raises(ValueError, match=f"checkpoint config {config} is not JSON"): load_checkpoint(ck)
    config.write_text(json.dumps({**cfg, "mask_p": 2}))
    with pytest.raises(ValueError, match=rf"checkpoint config {config}: mask_p must be in \[0, 1\], got 2"): load_checkpoint(ck)
    # an unreadable last.pt (the resume state) is named too
    rerun = tmp_path / "rerun"
    shutil.copytree(run, rerun)
    last = (rerun / "last.pt").read_bytes()
    (rerun / "last.pt").write_bytes(last[: len(last) // 2])
    with pytest.raises(ValueError, match=f"cannot resume from {rerun / 'last.pt'}"): train(data, "va", rerun, **train_kw(cache))


def test_read_only_output_folder_fails_before_any_feature(tiny, tmp_path):
    base, data, cache, run = tiny
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        fresh = tmp_path / "fresh-cache"
        r = run_cli("affect-train", data, "--task", "va", "--out-dir", ro / "run", "--cache-dir", fresh, *cli_args(BACKBONE), *cli_args(TINY))
        line = one_error_line(r, "affect-train")
        assert f"output folder {ro / 'run'} is not writable: Read-only file system" in line, line
        assert not fresh.exists()  # refused before the features were extracted
        with pytest.raises(OSError, match=f"feature cache folder {ro / 'cache'} is not writable"):
            train(data, "va", tmp_path / "out", **train_kw(ro / "cache"))


def test_full_disk_names_the_file_being_written(tiny, tmp_path):
    base, data, cache, run = tiny
    with tmpfs(tmp_path / "small", size="256k") as small:
        st = os.statvfs(small)
        (small / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 8192))  # 8 KiB left: less than the weights
        with pytest.raises(OSError) as e: train(data, "va", small / "run", **train_kw(cache))
        assert e.value.errno == 28 and f"cannot write {small / 'run' / 'checkpoint' / 'model.safetensors'}" in str(e.value), e.value
        assert [p.name for p in small.rglob("*") if p.is_file()] == ["filler"]  # no temporary file left behind


def test_written_files_get_the_umask_mode(tiny):
    base, data, cache, run = tiny
    umask = os.umask(0); os.umask(umask)
    files = [run / "checkpoint" / "model.safetensors", run / "checkpoint" / "config.json", run / "last.pt", run / "history.csv"]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(0o666 & ~umask) for f in files}


BAD_SETTINGS = [("mask_p", 1.5, "mask_p must be in [0, 1], got 1.5"), ("mask_mode", "block", "mask_mode must be one of ['frame', 'element']"),
                ("pos", "rotary", "pos must be one of ['sinusoidal', 'learned'], got 'rotary'"),
                ("n_heads", 3, "n_heads must divide d_model: d_model 16 is not a multiple of n_heads 3"),
                ("lr", 0.0, "lr must be greater than 0, got 0.0"), ("lr", float("nan"), "lr must be greater than 0, got nan"),
                ("weight_decay", -0.1, "weight_decay must be at least 0, got -0.1"), ("dropout", 1.0, "dropout must be in [0, 1), got 1.0"),
                ("stride", -1, "stride must be at least 1 (or None), got -1"), ("eval_stride", 0, "eval_stride must be at least 1 (or None)"),
                ("seq_len", 0, "seq_len must be at least 1, got 0"), ("seq_len", "abc", "seq_len must be an int, got 'abc'"),
                ("d_ff", 0, "d_ff must be at least 1"), ("n_layers", 0, "n_layers must be at least 1"), ("d_model", -16, "d_model must be at least 1"),
                ("batch_size", 0, "batch_size must be at least 1"), ("epochs", 0, "epochs must be at least 1"),
                ("patience", 0, "patience must be at least 1"), ("num_workers", -1, "num_workers must be at least 0, got -1"),
                ("device", "gpu", "device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'gpu'"),
                ("device", "cuda:x", "got 'cuda:x'"), ("max_videos", 0, "max_videos must be at least 1"),
                ("feature_batch_size", 0, "feature_batch_size must be at least 1"), ("pooling", "max", "unknown pooling 'max': expected one of"),
                ("on_missing_images", "keep", "unknown on_missing_images 'keep': expected one of 'error', 'skip'"),
                ("sq_len", 5, "unknown setting(s) sq_len")]


@pytest.mark.parametrize("name,value,message", BAD_SETTINGS, ids=[f"{n}={v!r}" for n, v, _ in BAD_SETTINGS])
def test_bad_setting_fails_before_any_work(tiny, tmp_path, name, value, message):
    base, data, cache, run = tiny
    kw = {**train_kw(tmp_path / "cache"), name: value}
    with pytest.raises(ValueError) as e: train(data, "va", tmp_path / "out", **kw)
    assert message in str(e.value), str(e.value)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_bad_setting_on_the_command_line(tiny, tmp_path):
    base, data, cache, run = tiny
    r = run_cli("affect-train", data, "--task", "va", "--out-dir", tmp_path / "out", "--cache-dir", tmp_path / "cache",
                *cli_args(BACKBONE), *cli_args({**TINY, "stride": -1}))
    assert one_error_line(r, "affect-train") == "affect-train: error: stride must be at least 1 (or None), got -1"
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_video_in_both_splits_is_refused(tiny, tmp_path):
    base, data, cache, run = tiny
    tree = tmp_path / "tree"
    shutil.copytree(data, tree)
    va = tree / "VA_Estimation_Challenge"
    both = sorted((va / "Validation_Set").glob("*.txt"))[0]
    shutil.copy(both, va / "Train_Set")
    with pytest.raises(ValueError, match=f"1 video\\(s\\) of task 'va' are annotated in both Train_Set and Validation_Set .*: {both.stem}; "):
        train(tree, "va", tmp_path / "out", **train_kw(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_on_missing_images_reaches_the_frame_index(tiny, tmp_path):
    "A validation video without any image: an error naming it by default; `--on-missing-images skip` trains without it (status 0)."
    base, data, cache, run = tiny
    tree = tmp_path / "tree"
    shutil.copytree(data, tree)  # copy2 keeps the listings (and so the cached features) valid
    gone = sorted(list_videos(tree, "va", "val"))[0]
    shutil.rmtree(tree / "cropped_aligned" / gone)
    with pytest.raises(FileNotFoundError, match=f"have no image for any annotated frame:\n  {gone}: no folder"):
        train(tree, "va", tmp_path / "err", **train_kw(cache))
    r = run_cli("affect-train", tree, "--task", "va", "--out-dir", tmp_path / "run", "--cache-dir", cache, "--on-missing-images", "skip",
                *cli_args(BACKBONE), *cli_args(TINY))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = pd.read_csv(tmp_path / "run" / "val_predictions.csv")
    assert len(rows) and not rows.image_location.str.startswith(f"{gone}/").any()


def test_experiment_notebook_names_a_wrong_parameter(tiny, tmp_path):
    import papermill as pm
    base, data, cache, run = tiny
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "papermill", str(NB), str(tmp_path / "a.ipynb"), "-p", "seq_len", "abc",
                        "-p", "data_dir", str(data), "-p", "out_dir", str(out), "--cwd", str(NB.parent), "-k", "python3"],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "parameter seq_len must be an int, got 'abc'" in r.stderr + r.stdout, r.stderr[-3000:]
    with pytest.raises(pm.PapermillExecutionError, match=r"mask_p must be in \[0, 1\], got 1.5"):
        pm.execute_notebook(str(NB), str(tmp_path / "b.ipynb"), parameters=dict(mask_p=1.5, data_dir=str(data), out_dir=str(out)),
                            cwd=str(NB.parent), kernel_name="python3", progress_bar=False, log_output=False)
    assert not out.exists()  # refused before the run folder was made
