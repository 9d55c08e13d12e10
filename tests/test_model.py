"The temporal model: padding, positions, determinism, gradients and saving, on tiny configurations."
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from affect_nb.losses import CCCLoss
from affect_nb.model import TemporalTransformer, sinusoidal_positions, task_head

TINY = dict(d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=40)


def tiny(task="va", seed=0, **kw):
    torch.manual_seed(seed)
    return TemporalTransformer.for_task(task, 6, **{**TINY, **kw})


@pytest.mark.parametrize("pos", ["sinusoidal", "learned"])
@pytest.mark.parametrize("fast", [True, False])
def test_padded_batch_equals_each_sequence_alone(pos, fast):
    m = tiny("au", pos=pos).eval()
    lengths = [12, 7, 1, 3]
    xs = [torch.randn(n, 6) for n in lengths]
    x = torch.full((4, 12, 6), float("nan"))
    pad = torch.arange(12)[None] >= torch.tensor(lengths)[:, None]
    for i, s in enumerate(xs): x[i, : len(s)] = s
    x[1, 7:] = 1e6
    with torch.set_grad_enabled(not fast):
        out = m(x, pad)
        for i, s in enumerate(xs):
            torch.testing.assert_close(out[i, : len(s)], m(s[None])[0], atol=1e-5, rtol=1e-5)
    assert out.isfinite().all() and (out[pad] == 0).all()


def test_outputs_shapes_and_va_range():
    for task in ("va", "expr", "au"):
        m = tiny(task).eval()
        out = m(torch.randn(3, 10, 6))
        assert out.shape == (3, 10, task_head(task).n_out)
    out = tiny("va").eval()(50 * torch.randn(8, 10, 6))
    assert out.min() >= -1 and out.max() <= 1 and out.abs().max() > 0.5
    logits = tiny("expr").eval()(50 * torch.randn(8, 10, 6))
    assert logits.abs().max() > 1, "expr and au give raw logits"


def test_fully_padded_row_has_finite_gradients():
    m = tiny("va").train()
    x = torch.randn(3, 10, 6)
    pad = torch.zeros(3, 10, dtype=torch.bool); pad[1] = True; pad[2, 4:] = True
    out = m(x, pad)
    target = torch.rand(3, 10, 2) * 2 - 1
    CCCLoss()(out, target, ~pad).backward()
    assert out.isfinite().all() and (out[1] == 0).all()
    assert all(p.grad.isfinite().all() for p in m.parameters() if p.grad is not None)



@pytest.mark.parametrize("fast", [True, False])
def test_unseen_frames_are_not_read_but_predicted(fast):
    m = tiny("va").eval()
    x = torch.randn(3, 10, 6)
    pad = torch.zeros(3, 10, dtype=torch.bool); pad[1, 7:] = True
    unseen = torch.zeros(3, 10, dtype=torch.bool); unseen[0, [2, 5]] = True; unseen[1, 5:] = True; unseen[2] = True
    with torch.set_grad_enabled(not fast):
        out = m(x, pad, unseen)
        garbage = x.clone(); garbage[unseen] = float("nan"); garbage[0, 2] = float("inf")
        torch.testing.assert_close(m(garbage, pad, unseen), out, atol=0, rtol=0)
        # trailing unseen frames leave the others as if the sequence stopped before them (padding would do the same)
        torch.testing.assert_close(out[1, :5], m(x[1:2, :5])[0], atol=1e-5, rtol=1e-5)
        # a frame's output moves with its neighbours, whether it is unseen or not
        nudged = x.clone(); nudged[0, 3] += 1.0; nudged[2, 3] += 1.0
        moved = (m(nudged, pad, unseen) - out).abs()
    assert out.isfinite().all() and (out[pad] == 0).all() and (out[unseen & ~pad].abs() > 0).all()
    assert moved[0, 2].max() > 1e-4 and moved[0, 5].max() > 1e-4
    assert moved[2].max() == 0, "a row with every frame unseen reads no input: its outputs come from the positions alone"


def test_unseen_frames_get_no_gradient_and_finite_ones_elsewhere():
    m = tiny("au").train()
    x = torch.randn(3, 10, 6, requires_grad=True)
    pad = torch.zeros(3, 10, dtype=torch.bool); pad[1, 8:] = True
    unseen = torch.zeros(3, 10, dtype=torch.bool); unseen[0, 4] = True; unseen[1, :8] = True; unseen[2] = True
    out = m(x, pad, unseen)
    out.sum().backward()
    assert out.isfinite().all() and (out[1, 8:] == 0).all()
    assert (x.grad[unseen | pad] == 0).all() and (x.grad[0, [3, 5]].abs() > 0).all()
    assert all(p.grad.isfinite().all() for p in m.parameters() if p.grad is not None)


def test_no_unseen_frame_is_the_same_as_no_unseen_mask():
    m = tiny("expr").eval()
    x, pad = torch.randn(2, 9, 6), torch.zeros(2, 9, dtype=torch.bool)
    pad[0, 6:] = True
    assert torch.equal(m(x, pad, torch.zeros_like(pad)), m(x, pad))
    assert torch.equal(m(x, unseen_mask=pad)[1], m(x)[1])

def test_sinusoidal_table_formula():
    d, T = 10, 30
    pe = sinusoidal_positions(T, d)
    for t in (0, 1, 17, 29):
        for i in range(d // 2):
            angle = t / 10000 ** (2 * i / d)
            assert pe[t, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[t, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_positions_make_the_model_order_aware():
    m = tiny("au", dropout=0.0).eval()
    x = torch.randn(1, 8, 6)
    perm = torch.randperm(8)
    assert not torch.allclose(m(x)[0, perm], m(x[:, perm])[0], atol=1e-4)


def test_learned_positions_are_trained_and_saved():
    m = tiny("va", pos="learned")
    assert "pos.table" in m.state_dict() and "pos.table" not in tiny("va").state_dict()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    before = m.pos.table.detach().clone()
    m(torch.randn(2, 5, 6)).sum().backward(); opt.step()
    assert not torch.equal(before[:5], m.pos.table[:5]) and torch.equal(before[5:], m.pos.table[5:])


def test_determinism_and_safetensors_round_trip(tmp_path):
    x = torch.randn(2, 9, 6)
    a, b = tiny("expr", seed=3), tiny("expr", seed=3)
    torch.manual_seed(11); ya = a(x)
    torch.manual_seed(11); yb = b(x)
    assert torch.equal(ya, yb)
    save_file(a.state_dict(), tmp_path / "m.safetensors")
    c = tiny("expr", seed=4)
    c.load_state_dict(load_file(tmp_path / "m.safetensors"))
    assert torch.equal(a.eval()(x), c.eval()(x))


def test_errors():
    m = tiny("va")
    with pytest.raises(ValueError, match="longer than max_len=40"): m(torch.randn(1, 41, 6))
    with pytest.raises(ValueError, match="in_dim=6"): m(torch.randn(1, 5, 7))
    with pytest.raises(ValueError, match="padding_mask must be a bool tensor"): m(torch.randn(1, 5, 6), torch.zeros(1, 5))
    with pytest.raises(ValueError, match=r"unseen_mask must be a bool tensor of shape \(B, T\) = \(1, 5\)"):
        m(torch.randn(1, 5, 6), unseen_mask=torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown task"): task_head("valence")
    with pytest.raises(ValueError, match="pos must be one of"): TemporalTransformer(6, 2, **{**TINY, "pos": "rotary"})
    with pytest.raises(ValueError, match="activation"): TemporalTransformer(6, 2, activation="sigmoid", **TINY)


def test_defaults_are_the_papers_configuration():
    m = TemporalTransformer.for_task("va")
    layer = m.encoder.layers[0]
    assert (m.in_dim, m.head.in_features, len(m.encoder.layers)) == (768, 768, 6)
    assert layer.self_attn.num_heads == 8 and layer.dropout.p == 0.2 and m.pos.kind == "sinusoidal"
    assert m.activation == "tanh" and m.head.out_features == 2
