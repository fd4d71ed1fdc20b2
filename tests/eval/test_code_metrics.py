"""pass@k (Chen et al. 2021) against its combinatorial definition, and the repetition-loop detector."""
import itertools
import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from qnpu.eval.code.metrics import distribution, mean_pass_at_k, pass_at_k, repetition_loop, report_ks


@st.composite
def nck(draw, max_n=30):
    n = draw(st.integers(1, max_n))
    return n, draw(st.integers(0, n)), draw(st.integers(1, n))


@given(nck())
def test_pass_at_k_is_the_combinatorial_definition(args):
    n, c, k = args
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


@given(nck(max_n=8))
def test_pass_at_k_is_the_fraction_of_k_subsets_holding_a_correct_sample(args):
    n, c, k = args
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)


@given(nck())
def test_pass_at_k_is_monotone_in_c_and_k_and_bounded(args):
    n, c, k = args
    value = pass_at_k(n, c, k)
    assert 0.0 <= value <= 1.0
    if c < n:
        assert pass_at_k(n, c + 1, k) >= value - 1e-12
    if k < n:
        assert pass_at_k(n, c, k + 1) >= value - 1e-12


@given(st.integers(1, 200).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))))
def test_pass_at_1_is_the_fraction_correct(args):
    n, c = args
    assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-12)
    assert pass_at_k(n, 0, n) == 0.0 and pass_at_k(n, n, 1) == 1.0


def test_pass_at_k_stays_finite_for_large_n():
    value = pass_at_k(1000, 3, 100)  # C(1000, 100) overflows a float; the product does not
    assert value == pytest.approx(1 - math.comb(997, 100) / math.comb(1000, 100), rel=1e-9)


@pytest.mark.parametrize("n, c, k, what", [(0, 0, 1, "n must be"), (3, 4, 1, "c (correct"), (3, 1, 4, "pass@4 needs"),
                                           (3, -1, 1, "c must be"), (3, 1, 0, "k must be"), (True, 1, 1, "n must")])
def test_pass_at_k_refuses_bad_counts(n, c, k, what):
    with pytest.raises(ValueError, match=what.replace("(", r"\(")):
        pass_at_k(n, c, k)


def test_mean_pass_at_k_and_reported_ks():
    assert mean_pass_at_k([(2, 1), (2, 0)], 1) == pytest.approx(0.25)
    assert mean_pass_at_k([], 1) is None
    assert report_ks(1) == [1] and report_ks(10) == [1, 2, 5, 10]


def test_distribution_summary():
    d = distribution([1, 2, 3, 4, 10], bins=3)
    assert (d["count"], d["mean"], d["median"], d["max"], d["min"]) == (5, 4.0, 3.0, 10.0, 1.0)
    assert d["p90"] == pytest.approx(7.6)  # linear interpolation between 4 and 10
    assert sum(d["histogram"]["counts"]) == 5 and len(d["histogram"]["edges"]) == 4
    assert distribution([])["mean"] is None


# -- repetition loops -------------------------------------------------------------------------------

@st.composite
def loop_to_limit(draw):
    """A generation: a random prefix, then a unit of period p repeated up to the token limit over at
    least the detector's window (96 tokens, or the whole generation when it is shorter)."""
    p = draw(st.integers(1, 32))
    unit = draw(st.lists(st.integers(0, 999), min_size=p, max_size=p))
    limit = draw(st.integers(3 * p, 300))
    prefix = draw(st.lists(st.integers(0, 999), max_size=limit - min(96, limit)))
    body = (unit * (limit // p + 2))[: limit - len(prefix)]
    return prefix + body, limit, p


def _periodic(tail, p):
    return all(tail[i] == tail[i + p] for i in range(len(tail) - p))


@given(loop_to_limit())
def test_a_loop_running_to_the_limit_is_detected(case):
    tokens, limit, p = case
    found = repetition_loop(tokens, limit)
    assert found is not None and found <= p
    assert _periodic(tokens[-min(96, len(tokens)):], found)


@given(loop_to_limit())
def test_a_generation_that_stopped_early_is_no_failure(case):
    tokens, limit, _ = case
    assert repetition_loop(tokens[:-1], limit) is None  # one token short: it stopped on EOS


@given(st.integers(7, 300))
def test_distinct_tokens_are_no_loop(limit):
    assert repetition_loop(list(range(limit)), limit) is None


@given(loop_to_limit(), st.integers(1, 10_000))
def test_relabelling_tokens_changes_nothing(case, shift):
    tokens, limit, _ = case
    assert repetition_loop([t * 7 + shift for t in tokens], limit) == repetition_loop(tokens, limit)


@given(st.lists(st.integers(0, 50), min_size=200, max_size=300), st.lists(st.integers(0, 50), min_size=1, max_size=50))
def test_tokens_before_the_window_change_nothing(tokens, other):
    assume(len(other) <= len(tokens) - 96)
    changed = other + tokens[len(other):]
    assert repetition_loop(changed, len(tokens)) == repetition_loop(tokens, len(tokens))


def test_repetition_examples():
    assert repetition_loop([5] * 16, 16) == 1
    assert repetition_loop([1, 2] * 8, 16) == 2
    assert repetition_loop([1, 2, 3, 4, 5, 6] * 2 + [1, 2, 3, 4], 16) is None  # fewer than 3 full periods
    assert repetition_loop([1, 2] * 8, 17) is None                             # below the limit
    with pytest.raises(ValueError, match="max_new_tokens"):
        repetition_loop([1], 0)
