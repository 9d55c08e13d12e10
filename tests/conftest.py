"""Fixtures shared by the test files."""
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    "One torch thread: the suite runs in parallel on a few shared cores, where OpenMP threads waiting on each other are many times slower."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    "A tiny random-initialised ViT (2 blocks, 32×32 input), as `load_backbone` builds it."
    from affect_nb.backbone import load_backbone
    return load_backbone(name="vit_tiny_patch16_224", img_size=32, depth=2, pretrained=False)
