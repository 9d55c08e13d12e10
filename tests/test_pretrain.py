"""Masked-autoencoder pretraining: masking, the loss against its formula, a few steps on a synthetic tree, the encoder file in
load_backbone, resume after a kill (bit for bit), torchrun with 2 processes, a folder of images, and clear errors."""
import json, os, signal, subprocess, sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from affect_nb.backbone import load_backbone
from affect_nb.pretrain import FaceCrops, MaskedAutoencoder, face_images, keep_count, main_pretrain, mae_loss, patchify, pretrain
from affect_nb.pretrain import random_masking
from affect_nb.synth import make_synthetic

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TINY = dict(img_size=32, steps=10, batch_size=8, lr=2e-3, save_every=3, decoder_dim=32, decoder_heads=2, model_kwargs={"depth": 2})
ARGS = ["--img-size", "32", "--steps", "10", "--batch-size", "8", "--lr", "2e-3", "--save-every", "3", "--decoder-dim", "32",
        "--decoder-heads", "2", "--model-kwargs", '{"depth": 2}']
KILL_AT_STEP = """
import os, signal, sys
import affect_nb.pretrain as P
inner = P._train_step
def step(run, imgs, step):
    if step == {step}: os.kill(os.getpid(), signal.SIGKILL)
    return inner(run, imgs, step)
P._train_step = step
sys.exit(P.main_pretrain(sys.argv[1:]))
"""


def cli(tree: Path, out: Path, *more, kill_at: int = 0) -> subprocess.CompletedProcess:
    "`affect-pretrain TREE --out OUT` with the tiny settings in a fresh interpreter, killed with SIGKILL at step `kill_at` (0: never)."
    return subprocess.run([sys.executable, "-c", KILL_AT_STEP.format(step=kill_at), str(tree), "--out", str(out), *ARGS, *more],
                          env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    "A synthetic Aff-Wild2 of 2 short videos."
    root = tmp_path_factory.mktemp("pretrain") / "tree"
    make_synthetic(root, n_videos=2, n_frames=10, progress=False)
    return root


@pytest.fixture(scope="module")
def full(tree, tmp_path_factory):
    "An uninterrupted 10-step run of the command line (one process, no loader workers)."
    out = tmp_path_factory.mktemp("full") / "run"
    done = cli(tree, out, "--num-workers", "0")
    assert done.returncode == 0, done.stderr
    return out


def test_masking_keeps_round_share_and_restores_order():
    g = torch.Generator().manual_seed(0)
    for n, r in [(4, 0.75), (49, 0.75), (49, 0.6), (196, 0.75), (196, 0.9), (10, 0.25)]:
        k = keep_count(r, n)
        assert k == round((1 - r) * n)
        x = torch.randn(6, n, 5, generator=g)
        keep, restore, mask = random_masking(torch.rand(6, n, generator=g), k)
        assert keep.shape == (6, k) and (mask.sum(1) == n - k).all()
        for b in range(6):  # the visible patches are exactly those the mask leaves, each once
            assert sorted(keep[b].tolist()) == sorted(np.flatnonzero(~mask[b].numpy()).tolist())
        visible = torch.stack([x[b, keep[b]] for b in range(6)])
        hidden = torch.stack([x[b, np.flatnonzero(mask[b].numpy())] for b in range(6)])  # any order of the hidden ones
        order = torch.cat([keep, torch.stack([torch.from_numpy(np.flatnonzero(mask[b].numpy())) for b in range(6)])], 1)
        seq = torch.cat([visible, hidden], 1)
        back = torch.stack([seq[b, order[b].argsort()] for b in range(6)])
        assert torch.equal(back, x)
        assert torch.equal(torch.stack([torch.cat([x[b, keep[b]], x[b, restore[b].argsort()[k:]]])[restore[b]] for b in range(6)]), x)


def test_loss_on_a_fixed_batch_equals_the_formula():
    "The model's loss: mean over hidden patches of the mean squared error against the per-patch normalised pixels (unbiased variance)."
    torch.manual_seed(3)
    enc = load_backbone("vit_tiny_patch16_224", pretrained=False, img_size=48, depth=1).train().requires_grad_(True)
    mae = MaskedAutoencoder(enc, 0.75, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    imgs, noise = torch.rand(2, 3, 48, 48) * 2 - 1, torch.rand(2, 9)
    loss, pred, mask = mae(imgs, noise)
    x, p, terms = imgs.numpy().astype(np.float64), pred.detach().numpy().astype(np.float64), []
    for b in range(2):
        order = np.argsort(noise[b].numpy(), kind="stable")
        for patch in order[keep_count(0.75, 9):]:  # the 7 hidden patches: largest noise
            i, j = divmod(int(patch), 3)
            y = x[b, :, 16 * i:16 * i + 16, 16 * j:16 * j + 16].transpose(1, 2, 0).reshape(-1)  # pixels (row, column, channel)
            t = (y - y.mean()) / np.sqrt(((y - y.mean()) ** 2).sum() / (y.size - 1) + 1e-6)
            terms.append(((p[b, patch] - t) ** 2).mean())
    assert mask.sum() == 14 and np.isclose(loss.item(), np.mean(terms), rtol=1e-5, atol=1e-6)
    assert mae_loss(pred, patchify(imgs, 16), mask).item() == loss.item()
    assert mae_loss(pred, patchify(imgs, 16), torch.ones_like(mask)).item() != loss.item()  # the visible patches do not count


def test_a_few_steps_lower_the_loss_and_the_encoder_loads_in_load_backbone(tree, tmp_path):
    run = pretrain(tree, tmp_path / "run", **{**TINY, "steps": 30, "save_every": 10}, warmup=0.1, num_workers=0, progress=False)
    loss = run.history["loss"].to_numpy()
    assert len(loss) == 30 and loss[-5:].mean() < 0.9 * loss[:5].mean(), loss
    # on a fixed batch of whole crops with fixed masks, the trained model beats an untrained one of the same architecture
    names = face_images(tree)
    imgs = torch.stack([FaceCrops(tree, names, run.model.encoder.data_config, augment=False)[(i, 0)] for i in range(len(names))])
    x, noise = (imgs.float() / 255 - 0.5) / 0.5, torch.rand(len(names), 4, generator=torch.Generator().manual_seed(5))
    fresh = MaskedAutoencoder(load_backbone("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2), 0.75, 32, 2, 2).eval()
    with torch.no_grad(): assert run.model(x, noise)[0] < 0.9 * fresh(x, noise)[0]
    # the file: timm's own key names, the encoder alone, metadata; load_backbone gives the trained encoder's pooled features
    file = tmp_path / "run" / "backbone.safetensors"
    assert run.backbone_file == file
    timm_keys = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=2).state_dict().keys()
    assert set(load_file(file)) == set(timm_keys)
    with safe_open(str(file), "pt") as f: meta = f.metadata()
    assert (meta["backbone"], meta["img_size"], meta["steps"], meta["mask_ratio"]) == ("vit_tiny_patch16_224", "32", "30", "0.75")
    loaded = load_backbone("vit_tiny_patch16_224", weights=file, img_size=32, depth=2)
    with torch.no_grad():
        feats = loaded(x)
        assert torch.equal(feats, run.model.encoder.forward_features(x)[:, 1:].mean(1))  # mean of the patch tokens, cls left out
        assert (feats - fresh.encoder(x)).abs().max() > 1e-3
    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    assert hist.columns.tolist() == ["step", "loss", "lr"] and hist["loss"].tolist() == pytest.approx(loss.tolist(), rel=1e-12)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["images"] == len(names) and cfg["mask_ratio"] == 0.75 and cfg["data_dir"] == str(tree.resolve())


def test_a_killed_run_resumes_to_the_same_weights(tree, full, tmp_path, capsys):
    "Killed in step 8 (after the checkpoint of step 6), resumed with loader workers: the same weights, bit for bit, and history."
    run = tmp_path / "run"
    killed = cli(tree, run, "--num-workers", "0", kill_at=8)
    assert killed.returncode == -signal.SIGKILL
    assert pd.read_csv(run / "history.csv")["step"].tolist() == list(range(1, 7))
    resumed = cli(tree, run, "--num-workers", "1")
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(full / "backbone.safetensors"), load_file(run / "backbone.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pd.testing.assert_frame_equal(pd.read_csv(full / "history.csv"), pd.read_csv(run / "history.csv"))
    assert not list(run.rglob("*.tmp"))
    # a finished run says so and changes nothing; other settings are refused, naming them
    before = (run / "backbone.safetensors").stat().st_mtime_ns
    assert main_pretrain([str(tree), "--out", str(run), *ARGS, "--num-workers", "0"]) == 0
    assert "done already" in capsys.readouterr().out and (run / "backbone.safetensors").stat().st_mtime_ns == before
    with pytest.raises(SystemExit) as e: main_pretrain([str(tree), "--out", str(run), *ARGS, "--mask-ratio", "0.5"])
    assert e.value.code == 2 and "holds a run with other settings (mask_ratio: 0.75 → 0.5)" in capsys.readouterr().err


def test_torchrun_two_processes_match_one(tree, full, tmp_path):
    "2 processes (gloo) of the console script share each batch: the same images, crops and masks as one process, so the same weights."
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(BIN / "affect-pretrain"), str(tree), "--out", str(tmp_path / "two"), *ARGS, "--num-workers", "0"],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_file(full / "backbone.safetensors"), load_file(tmp_path / "two" / "backbone.safetensors")
    for k in a: torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)  # float sums in another order, through Adam
    la, lb = (pd.read_csv(d / "history.csv")["loss"] for d in (full, tmp_path / "two"))
    np.testing.assert_allclose(lb, la, rtol=1e-4)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world"] == 2


def test_a_plain_folder_of_images(tmp_path):
    "Every image of a folder and its subfolders, whatever its name; other files are left alone."
    rng = np.random.default_rng(0)
    for i, where in enumerate(["a.png", "sub/b.jpg", "sub/deeper/c.JPEG", "sub/readme.txt"]):
        (tmp_path / "imgs" / where).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40 + i, 36, 3), dtype=np.uint8)).save(tmp_path / "imgs" / where, format="PNG")
    run = pretrain(tmp_path / "imgs", tmp_path / "run", **{**TINY, "steps": 2, "batch_size": 4}, num_workers=0, progress=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["images"] == 3 and len(run.history) == 2


@pytest.mark.parametrize("args, message", [
    (["--mask-ratio", "1.5"], "argument --mask-ratio: mask_ratio must be in [0, 1), got 1.5"),
    (["--mask-ratio", "0.9"], "mask_ratio 0.9 keeps 0 of the 4 patches of an image"),
    (["--steps", "0"], "argument --steps: steps must be at least 1, got 0"),
    (["--batch-size", "many"], "argument --batch-size: invalid literal for int() with base 10: 'many'"),
    (["--lr", "-1"], "argument --lr: lr must be positive, got -1.0"),
    (["--img-size", "40"], "img_size 40 is not a multiple of 16"),
    (["--backbone", "convnext_tiny"], "backbone 'convnext_tiny' is not a timm ViT"),
    (["--device", "gpu"], "device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'gpu'"),
    (["--model-kwargs", "[2]"], "model_kwargs must be a dict, got [2]"),
    (["--model-kwargs", "{depth"], "argument --model-kwargs: invalid loads value: '{depth'"),
    (["--decoder-dim", "30"], "decoder_dim 30 must be a multiple of 4"),
    (["--weights", "nowhere.safetensors"], "weight file nowhere.safetensors does not exist"),
])
def test_bad_options_are_clear_errors(tree, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e: main_pretrain([str(tree), "--out", str(tmp_path / "run"), *ARGS, "--num-workers", "0", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_bad_data_folders_are_clear_errors(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    for folder, message in [(tmp_path / "nowhere", "does not exist"), (tmp_path / "empty", "no images in"),
                            (tmp_path / "empty" / "notes.txt", "is not a folder")]:
        with pytest.raises(SystemExit): main_pretrain([str(folder), "--out", str(tmp_path / "run"), *ARGS])
        assert f"affect-pretrain: error: " in (err := capsys.readouterr().err) and message in err and str(folder) in err
    with pytest.raises(TypeError, match="bogus"): pretrain(tmp_path / "empty", tmp_path / "run", bogus=1)
