"""The reproducible mode: a tiny training under environments with different CPU kernels gives one P in it; each run records its machine."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from affect_nb.registry import load_registry
from affect_nb.sweep import RunOptions, execute_run
from affect_nb.utils import KERNEL_VARS, THREAD_VARS, reproducible_env

ROOT = Path(__file__).resolve().parents[1]
PINS = (*KERNEL_VARS, *THREAD_VARS)
MACHINE = ["cpu", "cpu_capability", "blas", "onednn", "threads", "thread_vars", "reproducible", "pinned", "gpu", "cuda", "cudnn"]

TRAIN = '''
import json
from pathlib import Path
from affect_nb.config import TrainConfig
from affect_nb.report import run_metrics
from affect_nb.train import fit
from affect_nb.windows import toy_videos
cfg = TrainConfig(task="va", seq_len=16, batch_size=8, epochs=2, lr=3e-3, patience=2, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                  mask_p=0.2, seed=seed)
result = fit(cfg, toy_videos("va", 8, seed=1), toy_videos("va", 3, seed=2), out_dir, progress=False)
metrics = run_metrics(result, dict(seed=seed, out_dir=out_dir, data_dir=data_dir), data_dir=data_dir)
Path(out_dir, "metrics.json").write_text(json.dumps(metrics, indent=1))
'''


def _has_avx2() -> bool:
    try: return bool(re.search(r"^flags\s*:.*\bavx2\b", Path("/proc/cpuinfo").read_text(), re.M))
    except OSError: return False


pytestmark = pytest.mark.skipif(not _has_avx2(), reason="the reproducible mode needs an x86-64 CPU with AVX2")


def train_notebook(path: Path) -> Path:
    "The tiny training as an experiment notebook: `seed`, `out_dir` and `data_dir` (only recorded) are its parameters."
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "python3", "language": "python"}})
    p = nbformat.v4.new_code_cell("seed: int = 0\nout_dir: str = 'out'\ndata_dir: str = 'data/synthetic'")
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell(TRAIN)]
    nbformat.write(nb, path)
    return path


def plain_env(**set_vars) -> dict:
    "This environment without any variable of the mode, one thread, and `set_vars`."
    env = {k: v for k, v in os.environ.items() if k not in PINS}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **set_vars}


def test_the_mode_gives_one_P_whatever_the_kernels_of_the_environment_and_every_run_records_its_machine(tmp_path, monkeypatch):
    data_dir = str(ROOT / "data" / "synthetic")  # an absolute path inside the repository: recorded relative to it
    outside = {}
    for name, env in (("native", plain_env()), ("default", plain_env(ATEN_CPU_CAPABILITY="default"))):  # outside the mode, at once
        (tmp_path / name).mkdir()
        code = f"seed, out_dir, data_dir = 0, {str(tmp_path / name)!r}, {data_dir!r}\n{TRAIN}"
        outside[name] = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)

    nb, registry = train_notebook(tmp_path / "train.ipynb"), tmp_path / "registry.csv"
    mode = RunOptions(reproducible=True, progress=False)
    for k in PINS: monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")  # the mode must override what the environment holds
    rows = [execute_run(nb, tmp_path / "mode-from-default", dict(seed=0, data_dir=data_dir), "a", "t", registry, mode)]
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    rows.append(execute_run(nb, tmp_path / "mode-from-native", dict(seed=0, data_dir=data_dir), "b", "t", registry, mode))
    assert [r["status"] for r in rows] == ["ok", "ok"], [r["error"] for r in rows]

    metrics = {d: json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("mode-from-default", "mode-from-native")}
    a, b = metrics.values()
    assert a["P"] == b["P"], "the reproducible mode gave two P for environments that differ only in ATEN_CPU_CAPABILITY"
    for m in metrics.values():
        assert list(m["machine"]) == MACHINE
        assert (m["machine"]["cpu_capability"], m["machine"]["threads"], m["machine"]["reproducible"]) == ("AVX2", 1, True)
        assert m["machine"]["pinned"] == " ".join(f"{k}={reproducible_env()[k]}" for k in KERNEL_VARS)
        assert m["machine"]["cpu"] and m["machine"]["blas"]
        assert m["params"]["data_dir"] == m["data_dir"] == "data/synthetic"
    for d in metrics:
        text = (tmp_path / d / "metrics.json").read_text()
        assert str(ROOT) not in text, f"{d}/metrics.json holds an absolute path of the repository"

    reg = load_registry(registry)
    assert reg.P.tolist() == [a["P"], a["P"]] and reg.machine_of.tolist() == ["run", "run"]
    assert reg.cpu_capability.tolist() == ["AVX2", "AVX2"] and reg.reproducible.tolist() == [True, True]
    assert reg.threads.tolist() == [1, 1] and reg.cpu[0] == a["machine"]["cpu"] and reg.blas[0] == a["machine"]["blas"]
    assert set(reg.gpu.isna()) == {a["machine"]["gpu"] is None}
    for d, m in metrics.items():
        run = json.loads((tmp_path / d / "run.json").read_text())
        assert run["machine"] == {**m["machine"], "machine_of": "run"}

    for name, proc in outside.items(): assert proc.wait(timeout=120) == 0, proc.stderr.read()
    native, default = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("native", "default"))
    assert default["machine"]["cpu_capability"] == "DEFAULT" and not default["machine"]["reproducible"]
    assert native["machine"]["cpu_capability"] in ("AVX2", "AVX512")
    assert native["P"] != default["P"], "outside the mode these environments should run different kernels (else the check above is empty)"
