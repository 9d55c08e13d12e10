"""The frozen backbone: pooling, weight files (that fit, that do not, that cannot be read), the hub offline, seeded random
initialisation, the cache key and the saved fixed random initialisation, on a tiny ViT."""
import time

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from affect_nb import backbone as B

from trees import save_tiny_vit

TINY = dict(name="vit_tiny_patch16_224", img_size=32, depth=2)





def test_weights_file_loads_that_model(tmp_path, tiny):
    ref = save_tiny_vit(tmp_path / "w.safetensors", seed=7, num_classes=0, global_pool="avg")
    m = B.load_backbone(**TINY, weights=tmp_path / "w.safetensors")
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        np.testing.assert_array_equal(m(x).numpy(), ref(x).numpy())
        assert (m(x) - tiny(x)).abs().max() > 0.1
    assert m.cache_identity["weights"] == "sha256:" + B.file_sha256(tmp_path / "w.safetensors") and m.cache_identity["pretrained"]
    # a checkpoint with a classifier head (.pth) loads into the headless feature model
    ref2 = save_tiny_vit(tmp_path / "w.pth", seed=8, num_classes=5, global_pool="avg")
    m2 = B.load_backbone(**TINY, weights=tmp_path / "w.pth")
    with torch.inference_mode(): np.testing.assert_allclose(m2(x).numpy(), ref2.forward_head(ref2.forward_features(x), pre_logits=True).numpy(), atol=1e-6)


def test_weights_that_do_not_fit_are_an_error(tmp_path):
    save_tiny_vit(tmp_path / "deep.safetensors", seed=1, depth=3, num_classes=0)
    with pytest.raises(ValueError, match=r"weights file \S*deep\.safetensors does not fit.*unexpected keys blocks\.2\..*more"):
        B.load_backbone(**TINY, weights=tmp_path / "deep.safetensors")
    save_tiny_vit(tmp_path / "shallow.safetensors", seed=1, depth=1, num_classes=0)
    with pytest.raises(ValueError, match=r"weights file \S*shallow\.safetensors does not fit.*missing keys blocks\.1\."):
        B.load_backbone(**TINY, weights=tmp_path / "shallow.safetensors")
    save_tiny_vit(tmp_path / "wide.safetensors", seed=1, embed_dim=96, num_heads=3, num_classes=0)
    with pytest.raises(ValueError, match=r"wide\.safetensors does not fit.*shapes differ: cls_token \(file \[1, 1, 96\], model \[1, 1, 192\]"):
        B.load_backbone(**TINY, weights=tmp_path / "wide.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        B.load_backbone(**TINY, weights=tmp_path / "nope.safetensors")


def test_weights_resized_to_another_img_size(tmp_path):
    save_tiny_vit(tmp_path / "w.safetensors", seed=3, num_classes=0)
    m = B.load_backbone(**{**TINY, "img_size": 48}, weights=tmp_path / "w.safetensors")
    assert m.pos_embed.shape == (1, 1 + 9, 192) and m.data_config["input_size"] == (3, 48, 48)


def test_pretrained_without_hub_or_file_fails_fast(monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(RuntimeError, match=r"weights=PATH.*pretrained=False"):
        B.load_backbone("vit_base_patch16_224.orig_in21k")
    assert time.time() - t < 30, "offline, the error must come at once, not after the hub's retries"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(B, "_reachable", lambda url, timeout=3.0: False)
    with pytest.raises(RuntimeError, match="cannot be reached"):
        B.load_backbone("vit_tiny_patch16_224", img_size=32)
    with pytest.raises(ValueError, match="unknown timm model"):
        B.load_backbone("no_such_vit")


def test_random_init_is_seeded():
    x = torch.randn(2, 3, 32, 32)
    a, b, c = (B.load_backbone(**TINY, pretrained=False, seed=s) for s in (0, 0, 1))
    with torch.inference_mode():
        assert torch.equal(a(x), b(x)) and not torch.allclose(a(x), c(x))


def test_cache_key_changes_with_every_setting(tmp_path):
    save_tiny_vit(tmp_path / "a.safetensors", seed=1, num_classes=0)
    save_tiny_vit(tmp_path / "b.safetensors", seed=2, num_classes=0)
    key = lambda **kw: B.cache_key(B.load_backbone(**{**TINY, "pretrained": False, **kw}).cache_identity)
    keys = [key(), key(pooling="token"), key(img_size=48), key(name="vit_small_patch16_224"), key(seed=1),
            key(weights=tmp_path / "a.safetensors"), key(weights=tmp_path / "b.safetensors"), key(crop_pct=None), key(depth=1)]
    assert len(set(keys)) == len(keys)
    assert key() == key() and key(weights=tmp_path / "a.safetensors") == key(weights=tmp_path / "a.safetensors")


def test_unreadable_weight_files_are_an_error_naming_the_file(tmp_path):
    save_tiny_vit(tmp_path / "ok.safetensors", seed=1, num_classes=0)
    save_tiny_vit(tmp_path / "ok.pth", seed=1, num_classes=0)
    good = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[:len(good) // 2])
    (tmp_path / "stub.safetensors").write_bytes(good[:5])
    (tmp_path / "cut.pth").write_bytes((tmp_path / "ok.pth").read_bytes()[:3000])
    (tmp_path / "junk.pth").write_bytes(bytes(range(256)) * 16)
    (tmp_path / "pointer.bin").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 1234\n")
    (tmp_path / "notes.safetensors").write_text("these are notes, not weights\n")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    cases = {"cut.safetensors": "safetensors checkpoint: SafetensorError", "stub.safetensors": "header too small",
             "cut.pth": "torch checkpoint: RuntimeError", "junk.pth": "neither a zip archive nor a pickle",
             "pointer.bin": "(it is text: 'version https://git-lfs", "notes.safetensors": "(it is text: 'these are notes",
             "meta.pth": "entry 'epoch' is not a tensor"}
    for name, why in cases.items():
        with pytest.raises(ValueError) as e: B.load_backbone(**TINY, weights=tmp_path / name)
        msg = str(e.value)
        assert msg.startswith(f"weights file {tmp_path / name} (") and "is not a readable" in msg and why in msg and "\n" not in msg, msg


def test_fixed_backbone_is_the_seeded_random_init_saved_once(tmp_path):
    w = B.fixed_backbone(tmp_path / "vit.safetensors", "vit_tiny_patch16_224", img_size=32, seed=5)
    x = torch.rand(2, 3, 32, 32)
    saved = B.load_backbone("vit_tiny_patch16_224", weights=w, img_size=32)
    drawn = B.load_backbone("vit_tiny_patch16_224", pretrained=False, img_size=32, seed=5)
    with torch.inference_mode(): np.testing.assert_allclose(saved(x).numpy(), drawn(x).numpy(), atol=1e-6)
    before = w.read_bytes()
    assert B.fixed_backbone(w, "vit_small_patch16_224") == w and w.read_bytes() == before  # an existing file is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.safetensors"]  # no temporary file left
