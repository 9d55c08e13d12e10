"The statistics across seeds against scipy: the t interval, paired tests and the Holm adjustment."
import numpy as np
import pandas as pd
from scipy import stats

from affect_nb.stats import holm, mean_ci, paired_test, summarize_runs


def test_mean_ci_matches_scipy_t_interval():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 10):
        x = rng.normal(0.4, 0.05, n)
        m, lo, hi = mean_ci(x)
        np.testing.assert_allclose((lo, hi), stats.t.interval(0.95, n - 1, loc=x.mean(), scale=stats.sem(x)))
        np.testing.assert_allclose(m, x.mean())
    np.testing.assert_allclose(mean_ci([0.1, np.nan, 0.3])[:1], [0.2])


def test_summary_and_paired_test_against_scipy():
    rng = np.random.default_rng(1)
    seeds, base = np.arange(5), rng.normal(0.5, 0.05, 5)
    eff = {"ref": 0.0, "small": 0.002, "big": 0.05}
    runs = pd.DataFrame([dict(task=t, cond=c, seed=s, P=base[s] + e + rng.normal(0, 0.005) + (0.1 if t == "au" else 0), status="ok")
                         for t in ("va", "au") for c, e in eff.items() for s in seeds])
    runs.loc[len(runs)] = dict(task="va", cond="big", seed=9, P=np.nan, status="failed")
    s = summarize_runs(runs, "cond", within="task")
    assert s.n.tolist() == [5] * 6
    g = runs[(runs.task == "va") & (runs.cond == "big") & (runs.status == "ok")].P
    row = s[(s.task == "va") & (s.cond == "big")].iloc[0]
    np.testing.assert_allclose((row.ci_low, row.ci_high), stats.t.interval(0.95, 4, loc=g.mean(), scale=stats.sem(g)))
    pt = paired_test(runs, "cond", "ref", within="task")
    assert pt[["task", "cond"]].values.tolist() == [["au", "big"], ["au", "small"], ["va", "big"], ["va", "small"]]
    for t in ("va", "au"):
        r = runs[runs.task == t].pivot_table(index="seed", columns="cond", values="P")
        got = pt[pt.task == t].set_index("cond")
        p = [stats.ttest_rel(r[c], r["ref"]).pvalue for c in ("big", "small")]
        np.testing.assert_allclose(got.p_t[["big", "small"]], p)
        np.testing.assert_allclose(got.p_holm[["big", "small"]], np.minimum(1, np.maximum.accumulate(np.sort(p) * [2, 1]))[np.argsort(np.argsort(p))])
        np.testing.assert_allclose(got.delta["big"], (r["big"] - r["ref"]).mean())
        np.testing.assert_allclose(got.p_wilcoxon["big"], stats.wilcoxon(r["big"] - r["ref"]).pvalue)
    assert pt.set_index(["task", "cond"]).significant.to_dict() == {("au", "big"): True, ("au", "small"): False, ("va", "big"): True, ("va", "small"): False}


def test_holm_against_its_definition():
    p = np.array([0.04, 0.001, 0.03, 0.2, 0.012])
    order = np.argsort(p)
    adj = np.empty(5)
    adj[order] = np.minimum(1, np.maximum.accumulate([(5 - i) * p[j] for i, j in enumerate(order)]))
    np.testing.assert_allclose(holm(p), adj)
    np.testing.assert_allclose(holm(p), [0.09, 0.005, 0.09, 0.2, 0.048])
