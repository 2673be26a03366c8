"""Student's t without SciPy at run time, checked against SciPy (a test dependency)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats as scipy_stats

from sparseopt.stats import paired_difference, t_cdf, t_quantile


@given(t=st.floats(-50, 50), df=st.integers(1, 60))
def test_cdf_matches_scipy(t, df):
    assert t_cdf(t, df) == pytest.approx(float(scipy_stats.t.cdf(t, df)), abs=1e-12)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 19, 39])
@pytest.mark.parametrize("p", [0.5, 0.9, 0.95, 0.975, 0.995, 0.025])
def test_quantile_matches_scipy(p, df):
    assert t_quantile(p, df) == pytest.approx(float(scipy_stats.t.ppf(p, df)), rel=1e-9, abs=1e-12)


def test_paired_difference_matches_scipy_ttest():
    a = [0.91, 0.92, 0.90, 0.93, 0.915]
    b = [0.93, 0.925, 0.92, 0.95, 0.93]
    d = paired_difference(a, b)
    ref = scipy_stats.ttest_rel(b, a)
    assert d.n == 5 and d.t == pytest.approx(float(ref.statistic))
    low, high = ref.confidence_interval(0.95)
    assert (d.low, d.high) == pytest.approx((float(low), float(high)))
    assert paired_difference([1.0], [2.0]).t is None
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1.0], [])
