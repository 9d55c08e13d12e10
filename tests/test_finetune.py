"""Fine-tuning from the command line (`affect-train --tune-blocks K`) on a tiny synthetic Aff-Wild2: only the last blocks learn, the
checkpoint holds them, `affect-predict` on it gives the run's own validation predictions, and bad fine-tuning settings are refused."""
import json, subprocess, sys

import pytest
import torch

from affect_nb.backbone import load_backbone
from affect_nb.cli import main_predict, main_train
from affect_nb.config import read_weights
from affect_nb.synth import make_synthetic

BACKBONE = dict(backbone="vit_tiny_patch16_224", pretrained=False, img_size=32, pooling="avg")
TINY = dict(seq_len=16, batch_size=4, epochs=2, lr=3e-3, patience=10, d_model=16, n_heads=2, n_layers=1, d_ff=32, mask_p=0.3)


def options(config: dict) -> list[str]:
    return [a for k, v in config.items() for a in (f"--{k.replace('_', '-')}", str(v).lower() if isinstance(v, bool) else str(v))]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    data = tmp_path_factory.mktemp("ft") / "data"
    make_synthetic(data, n_videos=6, n_frames=40, progress=False)
    return data


def block_names(names) -> set[str]:
    "The blocks (blocks.<i>) and other top-level modules the weight names belong to."
    return {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks.") else "") for n in names}


def test_tune_blocks_on_the_command_line(tree, tmp_path):
    run = tmp_path / "run"
    main_train([str(tree), "--task", "expr", "--out-dir", str(run), "--cache-dir", str(tmp_path / "cache"), *options(BACKBONE),
                *options(TINY), "--tune-blocks", "1", "--backbone-lr", "1e-3", "--frame-step", "2"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["config"]["features"]["finetune"]["tune_blocks"] == 1
    config = json.loads((run / "checkpoint/config.json").read_text())
    assert config["features"]["weights"] == "backbone.safetensors"  # a file of the checkpoint folder, by name
    tuned = read_weights(run / "checkpoint/backbone.safetensors")[0]
    start = load_backbone(BACKBONE["backbone"], pretrained=False, img_size=32).state_dict()
    assert set(tuned) == set(start)
    assert block_names(k for k in start if not torch.equal(start[k], tuned[k])) == {"blocks.11", "norm"}
    # the checkpoint predicts through its own tuned backbone what the run predicted in memory
    out = tmp_path / "predicted.csv"
    main_predict([str(run), str(tree), "--split", "val", "--out", str(out)])
    assert out.read_text() == (run / "val_predictions.csv").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--tune-blocks", "13"], "tune_blocks must be at most the 12 blocks of vit_tiny_patch16_224, got 13"),
    (["--tune-blocks", "-1"], "tune_blocks must be at least 0, got -1"),
    (["--frame-step", "2"], "frame_step 2 needs tune_blocks > 0"),
    (["--tune-blocks", "1", "--backbone-lr", "0"], "backbone_lr must be greater than 0, got 0"),
])
def test_bad_fine_tuning_settings_are_refused_by_name(tree, tmp_path, extra, message):
    code = "import sys; from affect_nb.cli import main_train; sys.exit(main_train(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, str(tree), "--task", "va", "--out-dir", str(tmp_path / "run"),
                        "--cache-dir", str(tmp_path / "cache"), *options(BACKBONE), *options(TINY), *extra],
                       capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "run" / "checkpoint").exists()
