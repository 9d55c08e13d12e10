"""Tiny Aff-Wild2 trees for the tests: annotation files, JPEG crops and a split with videos that have no image."""
from pathlib import Path

from PIL import Image

from affect_nb.data import IMAGE_DIR, SPLITS, TASKS
from affect_nb.tasks import AU_NAMES, EXPR_CLASSES

VA_HEADER = "valence,arousal"
EXPR_HEADER = ",".join(EXPR_CLASSES)
AU_HEADER = ",".join(AU_NAMES)


def write(path, text, newline="\n"):
    "Write `text` (lines joined by \\n) to `path` with `newline` line endings, creating folders."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", newline).encode())
    return path


def ann(root, task, split, video, text, newline="\n"):
    "Write the annotation file of `video` for `task` in `split` under `root`."
    return write(Path(root) / TASKS[task] / SPLITS[split] / f"{video}.txt", text, newline)


def jpgs(root, video, frames):
    "Write tiny 112×112 JPEG crops `%05d.jpg` for `frames` of `video` under `root`."
    folder = Path(root) / IMAGE_DIR / video
    folder.mkdir(parents=True, exist_ok=True)
    for f in frames: Image.new("RGB", (112, 112), (f * 20 % 256, 80, 120)).save(folder / f"{f:05d}.jpg")


def imageless_tree(root):
    "A VA val split: `ok` with images of frames 1 and 3 of 3, and three videos without any image, one of each kind."
    for v in ("ok", "absent", "empty", "named"): ann(root, "va", "val", v, f"{VA_HEADER}\n0.1,0.2\n0.3,0.4\n0.5,0.6\n")
    jpgs(root, "ok", [1, 3])
    (root / IMAGE_DIR / "empty").mkdir(parents=True)
    (root / IMAGE_DIR / "named").mkdir()
    for f in (1, 2): Image.new("RGB", (8, 8)).save(root / IMAGE_DIR / "named" / f"frame_{f:05d}.jpg")


def save_tiny_vit(path, seed, **kw):
    "Write the weights of a seeded tiny timm ViT (32×32 input, 2 blocks unless `depth`) to `path` (.safetensors or torch); the model."
    import timm, torch
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=kw.pop("depth", 2), fc_norm=False, **kw).eval()
    sd = m.state_dict()
    save_file(sd, str(path)) if str(path).endswith(".safetensors") else torch.save(sd, path)
    return m


def extract_all(data, cache, backbone: dict):
    "Cache the features of every frame of every task and split of the tree `data` in `cache`, from the backbone settings `backbone`."
    import pandas as pd
    import torch
    from affect_nb.data import frame_index
    from affect_nb.features import extract_features
    torch.set_num_threads(1)
    index = pd.concat([frame_index(data, t, s) for t in TASKS for s in SPLITS])
    extract_features(index, cache, **backbone, num_workers=0, progress=False)
