"""The frozen backbone: pooling, weight files (that fit, that do not, that cannot be read), the hub offline, seeded random
initialisation, the cache key and the saved fixed random initialisation, on a tiny ViT; then any checkpoint in: both ViT
layouts (final norm, fc_norm) against timm's own forward, nested and prefixed checkpoints (facebookresearch/mae's among
them), keys that do not fit, and the other timm families (ConvNeXt, Swin, EfficientNet, DINOv2, CLIP)."""
import argparse
import time

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block

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


# --- any checkpoint in: both ViT layouts, nested and prefixed checkpoints, other timm families ---


def seeded(name, seed=0, **kw):
    "timm's own model `name` (headless unless `num_classes`), drawn from `seed`, in eval mode."
    torch.manual_seed(seed)
    return timm.create_model(name, **{"num_classes": 0, **kw}).eval()


def mae_decoder(dim=192, dec=64, patches=4, seed=0):
    "The decoder part of a facebookresearch/mae state dict (their key names), for an encoder of width `dim`."
    g = torch.Generator().manual_seed(seed)
    return {"decoder_embed.weight": torch.randn(dec, dim, generator=g), "decoder_embed.bias": torch.zeros(dec),
            "mask_token": torch.randn(1, 1, dec, generator=g), "decoder_pos_embed": torch.randn(1, 1 + patches, dec, generator=g),
            **{f"decoder_blocks.0.{k}": v for k, v in Block(dec, 2).state_dict().items()},
            "decoder_norm.weight": torch.ones(dec), "decoder_norm.bias": torch.zeros(dec),
            "decoder_pred.weight": torch.randn(16 * 16 * 3, dec, generator=g), "decoder_pred.bias": torch.zeros(16 * 16 * 3)}


def test_avg_pooled_fc_norm_vit_file_gives_timms_forward(tmp_path):
    ref = seeded("vit_tiny_patch16_224", 11, global_pool="avg", fc_norm=True, img_size=32, depth=2)
    assert any(k.startswith("fc_norm.") for k in ref.state_dict()) and not any(k.startswith("norm.") for k in ref.state_dict())
    save_file(ref.state_dict(), str(tmp_path / "gap.safetensors"))
    m = B.load_backbone(**TINY, weights=tmp_path / "gap.safetensors")
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        f = m(x)
        np.testing.assert_allclose(f.numpy(), ref(x).numpy(), atol=1e-6)
        # the pooling written out: LayerNorm (fc_norm, eps 1e-6) of the mean of the last block's patch tokens, no norm per token
        t = ref.patch_embed(x)
        t = torch.cat([ref.cls_token.expand(4, -1, -1), t], 1) + ref.pos_embed
        for blk in ref.blocks: t = blk(t)
        pooled = t[:, 1:].mean(1)
        mu, var = pooled.mean(-1, keepdim=True), pooled.var(-1, unbiased=False, keepdim=True)
        np.testing.assert_allclose(f.numpy(), ((pooled - mu) / torch.sqrt(var + 1e-6) * ref.fc_norm.weight + ref.fc_norm.bias).numpy(), atol=1e-5)
    assert m.cache_identity["layout"] == "fc_norm" and m.cache_identity["dim"] == 192
    with pytest.raises(ValueError, match=r"pooling 'token' does not fit weights file \S*gap\.safetensors: it is avg-pooled"):
        B.load_backbone(**TINY, weights=tmp_path / "gap.safetensors", pooling="token")
    # MAE's fine-tuned layout: {"model": ...} with fc_norm and a classifier head, in a .pth
    cls = seeded("vit_tiny_patch16_224", 12, global_pool="avg", fc_norm=True, img_size=32, depth=2, num_classes=7)
    torch.save({"model": cls.state_dict(), "epoch": 99}, tmp_path / "finetuned.pth")
    m2 = B.load_backbone(**TINY, weights=tmp_path / "finetuned.pth")
    with torch.inference_mode():
        np.testing.assert_allclose(m2(x).numpy(), cls.forward_head(cls.forward_features(x), pre_logits=True).numpy(), atol=1e-6)
    # the cls-token layout is untouched: the mean of the normalised patch tokens, and no layout entry in its identity
    plain = B.load_backbone(**TINY, pretrained=False)
    with torch.inference_mode(): np.testing.assert_allclose(plain(x).numpy(), plain.forward_features(x)[:, 1:].mean(1).numpy(), atol=1e-6)
    assert "layout" not in plain.cache_identity and isinstance(plain.fc_norm, torch.nn.Identity)
    # a random initialisation takes the avg-pooled layout when asked, and it is a cache of its own
    r = B.load_backbone(**TINY, pretrained=False, fc_norm=True)
    assert r.cache_identity["layout"] == "fc_norm" and B.cache_key(r.cache_identity) != B.cache_key(plain.cache_identity)


def test_nested_and_prefixed_checkpoints_load(tmp_path):
    ref = seeded("vit_tiny_patch16_224", 21, global_pool="avg", fc_norm=False, img_size=32, depth=2)
    enc, x = ref.state_dict(), torch.randn(3, 3, 32, 32)
    with torch.inference_mode(): want = ref(x)
    ema = seeded("vit_tiny_patch16_224", 22, global_pool="avg", fc_norm=False, img_size=32, depth=2)
    files = {  # facebookresearch/mae's checkpoint of a DDP model: encoder and decoder under "model", with optimizer and args
        "mae.pth": {"model": {f"module.{k}": v for k, v in {**enc, **mae_decoder()}.items()}, "optimizer": {"state": {}, "param_groups": []},
                    "epoch": 399, "scaler": {"scale": 1024.0}, "args": argparse.Namespace(model="mae_vit_tiny", mask_ratio=0.75)},
        "lightning.ckpt": {"state_dict": {f"model.backbone.{k}": v for k, v in enc.items()} | {"model.head.weight": torch.randn(5, 192)},
                           "epoch": 3},
        "module.pth": {"module": {f"encoder.{k}": v for k, v in enc.items()}},
        "encoder.pth": {"encoder": enc, "predictor": {"w": torch.zeros(1)}},
        "compiled.pth": {f"_orig_mod.module.{k}": v for k, v in enc.items()},
        "ema.pth": {"state_dict": ema.state_dict(), "state_dict_ema": enc},  # EMA weights first, as timm takes them
    }
    for name, ckpt in files.items(): torch.save(ckpt, tmp_path / name)
    save_file({**{f"encoder.{k}": v for k, v in enc.items()}, **{f"decoder.{k}": v for k, v in mae_decoder().items()}},
              str(tmp_path / "encdec.safetensors"))
    for name in [*files, "encdec.safetensors"]:
        m = B.load_backbone(**TINY, weights=tmp_path / name, seed=5)
        with torch.inference_mode(): np.testing.assert_allclose(m(x).numpy(), want.numpy(), atol=1e-6, err_msg=name)
        assert m.cache_identity["weights"] == "sha256:" + B.file_sha256(tmp_path / name)
        assert "layout" not in m.cache_identity


def test_checkpoint_keys_that_do_not_fit_are_named(tmp_path):
    deep = seeded("vit_tiny_patch16_224", 1, img_size=32, depth=3).state_dict()
    torch.save({"model": {f"module.{k}": v for k, v in {**deep, **mae_decoder()}.items()}}, tmp_path / "mae3.pth")
    with pytest.raises(ValueError, match=r"^weights file \S*mae3\.pth does not fit 'vit_tiny_patch16_224': unexpected keys blocks\.2\.") as e:
        B.load_backbone(**TINY, weights=tmp_path / "mae3.pth")
    assert "decoder" not in str(e.value) and "mask_token" not in str(e.value) and "module." not in str(e.value)
    enc = seeded("vit_tiny_patch16_224", 1, img_size=32, depth=2).state_dict()
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in enc.items() if not k.startswith("norm.")}}, tmp_path / "nonorm.pth")
    with pytest.raises(ValueError, match=r"nonorm\.pth does not fit .*: missing keys norm\.weight, norm\.bias$"):
        B.load_backbone(**TINY, weights=tmp_path / "nonorm.pth")
    save_file({**{f"module.{k}": v for k, v in enc.items()}, "module.adapter.weight": torch.zeros(3)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"extra\.safetensors does not fit .*: unexpected keys adapter\.weight$"):
        B.load_backbone(**TINY, weights=tmp_path / "extra.safetensors")
    wide = seeded("vit_tiny_patch16_224", 1, img_size=32, depth=2, embed_dim=96, num_heads=3).state_dict()
    torch.save({"model": {**wide, **mae_decoder(dim=96)}}, tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"wide\.pth does not fit .*: shapes differ: cls_token \(file \[1, 1, 96\], model \[1, 1, 192\]\)"):
        B.load_backbone(**TINY, weights=tmp_path / "wide.pth")
    torch.save({"epoch": 1, "optimizer": {"lr": torch.tensor(0.1)}}, tmp_path / "nostate.pth")
    with pytest.raises(ValueError, match=r"nostate\.pth \(.*is not a readable torch checkpoint: entry 'epoch' is not a tensor"):
        B.load_backbone(**TINY, weights=tmp_path / "nostate.pth")


def test_img_size_none_takes_the_file_s_grid_and_another_resamples(tmp_path):
    ref = seeded("vit_tiny_patch16_224", 31, img_size=32, depth=2, global_pool="avg", fc_norm=False)
    save_file(ref.state_dict(), str(tmp_path / "w32.safetensors"))
    m = B.load_backbone("vit_tiny_patch16_224", weights=tmp_path / "w32.safetensors", depth=2)
    x = torch.randn(2, 3, 32, 32)
    assert m.data_config["input_size"] == (3, 32, 32) and m.cache_identity["img_size"] == [32, 32]
    with torch.inference_mode(): np.testing.assert_allclose(m(x).numpy(), ref(x).numpy(), atol=1e-6)
    big = B.load_backbone("vit_tiny_patch16_224", weights=tmp_path / "w32.safetensors", depth=2, img_size=48)
    torch.testing.assert_close(big.pos_embed, resample_abs_pos_embed(ref.pos_embed, new_size=(3, 3), num_prefix_tokens=1))


FAMILIES = [  # name, input size, a tiny configuration
    ("convnext_atto", 32, dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))),
    ("swin_tiny_patch4_window7_224", 32, dict(window_size=4, depths=(1, 1), num_heads=(1, 2), embed_dim=16)),
    ("efficientnet_b0", 32, {}),
    ("vit_small_patch14_dinov2", 28, dict(depth=2)),
    ("vit_small_patch14_reg4_dinov2", 28, dict(depth=2)),
    ("vit_base_patch16_clip_224", 32, dict(depth=1, embed_dim=64, num_heads=2)),
]


@pytest.mark.parametrize("name,size,kw", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_other_families_give_timms_forward(tmp_path, name, size, kw):
    vit = name.startswith("vit_")
    ref = seeded(name, 41, **kw, **({"img_size": size} if vit or "swin" in name else {}))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    x = torch.randn(2, 3, size, size)
    pooling = "token" if vit else "avg"  # timm's own pooling of the family: the cls token for these ViTs, the average for the others
    m = B.load_backbone(name, weights=tmp_path / "w.safetensors", img_size=size, pooling=pooling, **kw)
    drawn = B.load_backbone(name, pretrained=False, seed=41, img_size=size, pooling=pooling, **kw)
    with torch.inference_mode():
        want = ref(x)
        np.testing.assert_allclose(m(x).numpy(), want.numpy(), atol=1e-6)
        np.testing.assert_allclose(drawn(x).numpy(), want.numpy(), atol=1e-6)
        if vit:  # "avg" of the same weights: the mean of the normalised patch tokens, cls and register tokens left out
            a = B.load_backbone(name, weights=tmp_path / "w.safetensors", img_size=size, **kw)
            tokens = ref.forward_features(x)
            assert ref.num_prefix_tokens == (5 if "reg4" in name else 1)
            np.testing.assert_allclose(a(x).numpy(), tokens[:, ref.num_prefix_tokens:].mean(1).numpy(), atol=1e-6)
    assert m.cache_identity["dim"] == want.shape[1] and m.data_config["input_size"] == (3, size, size)
    if not vit:
        with pytest.raises(ValueError, match=f"pooling 'token' takes the class token, and '{name}' has none"):
            B.load_backbone(name, pretrained=False, img_size=size, pooling="token", **kw)


def test_families_and_layouts_key_their_own_caches(tmp_path):
    tiny_cnx = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
    keys = [B.cache_key(B.load_backbone(**TINY, pretrained=False).cache_identity),
            B.cache_key(B.load_backbone(**TINY, pretrained=False, fc_norm=True).cache_identity),
            B.cache_key(B.load_backbone("convnext_atto", pretrained=False, img_size=32, **tiny_cnx).cache_identity),
            B.cache_key(B.load_backbone("convnext_atto", pretrained=False, img_size=48, **tiny_cnx).cache_identity),
            B.cache_key(B.load_backbone("convnext_femto", pretrained=False, img_size=32, **tiny_cnx).cache_identity)]
    assert len(set(keys)) == len(keys)
    w = B.fixed_backbone(tmp_path / "cnx.safetensors", "convnext_atto", img_size=32, seed=2)  # any family's random init, saved
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        np.testing.assert_allclose(B.load_backbone("convnext_atto", weights=w, img_size=32)(x).numpy(),
                                   B.load_backbone("convnext_atto", pretrained=False, seed=2, img_size=32)(x).numpy(), atol=1e-6)


def test_hub_weights_in_the_avg_pooled_layout_load(monkeypatch, tmp_path):
    # timm's vit_base_patch16_rpn_224 is avg-pooled with fc_norm; its hub file, found in the (local) hub cache, loads in that layout
    import huggingface_hub
    kw = dict(depth=1, embed_dim=64, num_heads=2, img_size=32)
    ref = seeded("vit_base_patch16_rpn_224", 51, **kw)
    assert not isinstance(ref.fc_norm, torch.nn.Identity) and isinstance(ref.norm, torch.nn.Identity)
    save_file(ref.state_dict(), str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, filename, *a, **k:
                        str(tmp_path / filename) if (tmp_path / filename).is_file() else None)
    m = B.load_backbone("vit_base_patch16_rpn_224", **kw)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode(): np.testing.assert_allclose(m(x).numpy(), ref(x).numpy(), atol=1e-6)
    assert m.cache_identity["layout"] == "fc_norm" and m.cache_identity["weights"].startswith("hub:")
