"Measures against independent references: CCC written out in NumPy, F1 from scikit-learn, over many random draws."
import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from affect_nb.metrics import au_score, ccc, expr_score, score, tune_au_thresholds, va_score


def ccc_reference(x, y):
    "CCC with population moments, term by term."
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    vx = sum((a - mx) ** 2 for a in x) / n
    vy = sum((b - my) ** 2 for b in y) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y)) / n
    return 2 * cov / (vx + vy + (mx - my) ** 2)


@pytest.mark.parametrize("seed", range(10))
def test_ccc_matches_formula(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    y = rng.normal(rng.normal(), rng.uniform(0.1, 2), n)
    x = rng.uniform(-1, 1) * y + rng.normal(rng.normal(), rng.uniform(0.1, 2), n)
    assert ccc(x, y) == pytest.approx(ccc_reference(list(x), list(y)), rel=1e-9, abs=1e-12)
    assert ccc(torch.tensor(x, dtype=torch.float32), torch.tensor(y)) == pytest.approx(ccc(x, y), abs=1e-5)
    assert -1 <= ccc(x, y) <= 1


def test_ccc_is_symmetric_and_bounded_by_pearson():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=100), rng.normal(size=100) + 0.5
    assert ccc(x, y) == pytest.approx(ccc(y, x))
    assert abs(ccc(x, y)) <= abs(np.corrcoef(x, y)[0, 1]) + 1e-12


def test_va_excludes_rows_with_any_minus_five():
    rng = np.random.default_rng(1)
    t = rng.uniform(-1, 1, (200, 2))
    p = 0.8 * t + rng.normal(0, 0.2, t.shape)
    t[5:20, 1] = -5  # arousal invalid only: the whole row goes
    t[40:50] = -5
    keep = np.ones(200, bool); keep[5:20] = keep[40:50] = False
    s = va_score(p, t)
    assert s["valence"] == pytest.approx(ccc_reference(list(p[keep, 0]), list(t[keep, 0])))
    assert s["arousal"] == pytest.approx(ccc_reference(list(p[keep, 1]), list(t[keep, 1])))
    p2 = p.copy(); p2[~keep] = rng.normal(0, 100, ((~keep).sum(), 2))
    assert va_score(p2, t) == s
    assert va_score(p[keep], t[keep]) == s


@pytest.mark.parametrize("seed", range(8))
def test_expr_f1_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 500))
    present = rng.choice(8, size=int(rng.integers(1, 9)), replace=False)  # some classes absent from the targets
    t = rng.choice(present, n)
    p = np.where(rng.random(n) < 0.6, t, rng.integers(0, 8, n))
    t_marked = np.where(rng.random(n) < 0.1, -1, t)
    v = t_marked != -1
    if not v.any(): return
    s = expr_score(p, t_marked)
    np.testing.assert_allclose(s["f1"], f1_score(t[v], p[v], labels=range(8), average=None, zero_division=0))
    assert s["P"] == pytest.approx(f1_score(t[v], p[v], labels=range(8), average="macro", zero_division=0))
    junk = p.copy(); junk[~v] = rng.integers(0, 8, (~v).sum())
    assert expr_score(junk, t_marked) == s
    onehot_scores = np.eye(8)[p] + rng.uniform(0, 0.5, (n, 8))
    assert expr_score(torch.tensor(onehot_scores), torch.tensor(t_marked)) == s


@pytest.mark.parametrize("seed", range(8))
def test_au_f1_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    t = (rng.random((n, 12)) < rng.uniform(0, 0.7, 12)).astype(int)
    probs = np.clip(rng.uniform(0, 0.6) * t + rng.random((n, 12)) * 0.7, 0, 1)
    bad = rng.random(n) < 0.15
    t_marked = t.copy(); t_marked[bad, rng.integers(0, 12)] = -1
    v = ~bad
    if not v.any(): return
    for thr in (0.5, 0.3, rng.uniform(0.1, 0.9, 12)):
        s = au_score(probs, t_marked, threshold=thr)
        np.testing.assert_allclose(s["f1"], f1_score(t[v], probs[v] >= thr, average=None, zero_division=0))
        assert s["P"] == pytest.approx(f1_score(t[v], probs[v] >= thr, average="macro", zero_division=0))
    junk = probs.copy(); junk[bad] = rng.random((bad.sum(), 12))
    assert au_score(junk, t_marked) == au_score(probs, t_marked)


@pytest.mark.parametrize("seed", range(6))
def test_tuned_thresholds_never_worse_than_half(seed):
    rng = np.random.default_rng(seed)
    t = (rng.random((300, 12)) < rng.uniform(0.02, 0.5, 12)).astype(int)
    probs = 1 / (1 + np.exp(-(2 * t - 2.5 + rng.normal(0, 1.2, t.shape))))
    r = tune_au_thresholds(probs, t)
    fixed = au_score(probs, t)
    assert all(a >= b - 1e-12 for a, b in zip(r["f1_tuned"], fixed["f1"]))
    assert r["P_tuned"] >= fixed["P"]
    for j, thr in enumerate(r["thresholds"]):
        assert r["f1_tuned"][j] == pytest.approx(f1_score(t[:, j], probs[:, j] >= thr, zero_division=0))
    assert set(r) == {"thresholds", "P_tuned", "f1_tuned"}  # never mistaken for au_score's "P"


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no valid frames"): expr_score(np.zeros(3), -np.ones(3))
    with pytest.raises(ValueError, match="no valid frames"): au_score(np.zeros((2, 12)), -np.ones((2, 12)))
    with pytest.raises(ValueError, match="same number of frames"): expr_score(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="labels"): expr_score(np.array([0.5, 1.0]), np.zeros(2))
    with pytest.raises(ValueError, match="unknown task"): score("arousal", np.zeros((2, 2)), np.zeros((2, 2)))


def test_results_are_plain_python():
    import json
    rng = np.random.default_rng(0)
    t = rng.integers(0, 2, (50, 12))
    out = [score("va", rng.normal(size=(50, 2)), rng.uniform(-1, 1, (50, 2))),
           score("expr", rng.normal(size=(50, 8)), rng.integers(0, 8, 50)),
           score("au", rng.random((50, 12)), t), tune_au_thresholds(rng.random((50, 12)), t)]
    assert json.loads(json.dumps(out)) == out
