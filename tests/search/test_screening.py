"""The screening choice (search/screening.py): pure functions, no model."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from slmsearch.search.screening import (
    OPTIMISM, PRIOR, Point, choose, fallback, family_residuals, fit_correction, hypervolume, plan_features,
    predicted_front, predicted_ppl, step_neighbours, weighted_features,
)


def _brute_hv(points, ref, steps=40):
    """Hypervolume by counting cells of a regular grid (the exact answer for points on the grid)."""
    dims = len(ref)
    cell = [r / steps for r in ref]
    count = 0
    for index in itertools.product(range(steps), repeat=dims):
        centre = [(i + 0.5) * c for i, c in zip(index, cell)]
        if any(all(p[d] <= centre[d] for d in range(dims)) for p in points):
            count += 1
    return count * math.prod(cell)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_hypervolume_matches_counting_cells(dims):
    rng = random.Random(dims)
    for _ in range(5):
        points = [tuple(rng.randrange(0, 40) / 40 for _ in range(dims)) for _ in range(6)]
        assert hypervolume(points, (1.0,) * dims) == pytest.approx(_brute_hv(points, (1.0,) * dims), abs=1e-9)


def test_hypervolume_ignores_points_outside_the_reference_box():
    assert hypervolume([(0.5, 0.5), (2.0, 0.0)], (1.0, 1.0)) == pytest.approx(0.25)
    assert hypervolume([], (1.0, 1.0)) == 0.0


def test_plan_features_name_what_the_proxy_leaves_out():
    plan = {"stages": [{"stage": "depth", "drop": 2}, {"stage": "lora", "rank": 8}, {"stage": "gptq", "bits": 3},
                       {"stage": "eora", "rank": 0}, {"stage": "kv_cache", "bits": 4}]}
    assert plan_features(plan) == ("lora", "gptq3")
    assert plan_features({"stages": []}) == ()


def test_a_widened_plan_is_corrected_by_the_share_of_layers_at_each_width():
    """The 128 MB study of the eleventh session promoted drop2 ... w3+18 (18 of 28 layers 4-bit)
    with the whole 3-bit correction (predicted 21.4, below the dense model's 31) over a 4/8-bit
    anchor; weighted by layer shares its correction is mostly the 4-bit one."""
    plan = {"stages": [{"stage": "depth", "drop": 2}, {"stage": "lora", "rank": 4},
                       {"stage": "gptq", "bits": 3, "wider_layers": 18}, {"stage": "eora", "rank": 16}]}
    names, weights = weighted_features(plan, n_layers=30)
    assert dict(zip(names, weights)) == pytest.approx({"lora": 1.0, "gptq4": 18 / 28, "gptq3": 10 / 28, "eora": 1.0})
    assert weighted_features(plan) == (("lora", "gptq3", "eora"), (1.0, 1.0, 1.0))  # layer count unknown
    explicit = {"stages": [{"stage": "gptq", "bits": 3, "layer_bits": [3, 4, 4, 16]}]}
    assert weighted_features(explicit, n_layers=4) == (("gptq3", "gptq4"), (0.25, 0.5))
    widened = Point("w", 67.4, names, (), weights=weights)
    whole = Point("w", 67.4, plan_features(plan), ())
    correction = predicted_ppl(widened, PRIOR) / 67.4
    assert math.exp(PRIOR["gptq3"] + PRIOR["lora"] + PRIOR["eora"]) < correction
    assert correction == pytest.approx(math.exp(10 / 28 * PRIOR["gptq3"] + 18 / 28 * PRIOR["gptq4"] - 0.1))
    assert predicted_ppl(whole, PRIOR) < predicted_ppl(widened, PRIOR)


def test_weighted_fit_recovers_per_width_residuals():
    """Plans mixing two widths in known shares: the fit finds each width's residual."""
    true = {"gptq3": -1.0, "gptq4": -0.2}
    points = []
    for share in (0.0, 0.25, 0.5, 0.75, 1.0):
        feats = {"gptq3": 1 - share, "gptq4": share}
        names = tuple(f for f, w in feats.items() if w > 0)
        weights = tuple(feats[f] for f in names)
        residual = sum(true[f] * feats[f] for f in names)
        points.append(Point(f"p{share}", 50.0 * math.exp(residual), names, (), proxy_ppl=50.0, weights=weights))
    theta = fit_correction(points * 100, prior={"gptq3": 0.0, "gptq4": 0.0}, weight=1.0)  # the prior pulls by ~1/190
    assert theta["gptq3"] == pytest.approx(-1.0, abs=0.02) and theta["gptq4"] == pytest.approx(-0.2, abs=0.02)


def test_correction_starts_at_the_prior_and_learns_each_feature_from_the_evaluated_plans():
    assert fit_correction([]) == pytest.approx(dict(PRIOR))
    # 3-bit plans measured 0.5 nats better than their proxy, 4-bit ones 0.1 nats worse
    evaluated = [Point(f"a{i}", 100 * math.exp(-0.5), ("gptq3",), (1.0,), proxy_ppl=100) for i in range(20)]
    evaluated += [Point(f"b{i}", 40 * math.exp(0.1), ("gptq4",), (2.0,), proxy_ppl=40) for i in range(20)]
    theta = fit_correction(evaluated)
    assert theta["gptq3"] == pytest.approx((PRIOR["gptq3"] + 20 * -0.5) / 21, rel=1e-6)
    assert theta["gptq4"] == pytest.approx((PRIOR["gptq4"] + 20 * 0.1) / 21, rel=1e-6)
    assert theta["lora"] == PRIOR["lora"]  # no evaluated LoRA plan: still the prior
    # an evaluated plan that was never screened (no proxy) teaches nothing
    assert fit_correction([Point("c", 10.0, ("gptq3",), (1.0,))]) == pytest.approx(dict(PRIOR))


def test_two_features_of_one_plan_are_told_apart():
    rows = [Point(f"x{i}", 50 * math.exp(-1.0), ("gptq3",), (1,), proxy_ppl=50) for i in range(30)]
    rows += [Point(f"y{i}", 50 * math.exp(-1.4), ("lora", "gptq3"), (1,), proxy_ppl=50) for i in range(30)]
    theta = fit_correction(rows, weight=1e-6)
    assert theta["gptq3"] == pytest.approx(-1.0, abs=1e-3) and theta["lora"] == pytest.approx(-0.4, abs=1e-3)


def test_choose_promotes_the_candidate_that_adds_most_to_the_front():
    theta = {"gptq3": 0.0, "gptq4": 0.0}
    evaluated = [Point("e", 40.0, ("gptq4",), (2.0,))]
    dominated = Point("d", 60.0, ("gptq4",), (2.5,))  # worse in both: adds nothing
    assert choose([dominated], evaluated, theta) is None
    small = Point("s", 41.0, ("gptq4",), (1.99,))  # barely better latency
    big = Point("b", 45.0, ("gptq3",), (1.0,))  # much faster, slightly worse
    assert choose([dominated, small, big], evaluated, theta).key == "b"
    # what the correction predicts decides: the 3-bit candidate predicted past the pruning limit
    # (here 6 x the best evaluated) is not chosen, however fast
    assert choose([small, big], evaluated, {"gptq3": 5.0, "gptq4": 0.0}, broken_ppl=240.0).key == "s"


def test_a_candidate_predicted_broken_is_never_chosen():
    evaluated = [Point("e", 40.0, ("gptq4",), (2.0,))]
    broken = Point("x", 5000.0, ("gptq2",), (0.1,))
    assert choose([broken], evaluated, {"gptq2": 0.0}, broken_ppl=1000.0) is None
    assert choose([broken], evaluated, {"gptq2": -3.0}, broken_ppl=1000.0).key == "x"  # 5000 e^-3 = 249
    assert fallback([broken], {"gptq2": 0.0}, broken_ppl=1000.0) is None


def test_fallback_is_the_best_predicted_quality():
    cands = [Point("a", 50.0, ("gptq4",), (1.0,)), Point("b", 80.0, ("gptq3",), (0.5,))]
    assert fallback(cands, {"gptq3": -1.0, "gptq4": 0.0}).key == "b"  # 80 e^-1 = 29 < 50
    assert predicted_ppl(cands[1], {"gptq3": -1.0}) == pytest.approx(80 * math.exp(-1))


def test_the_first_promotion_is_a_knee_the_second_the_best_predicted_model_then_the_front_grows():
    theta = {"gptq3": -1.0, "gptq4": 0.0}
    slow_good = Point("g", 150.0, ("gptq3",), (3.0,))  # predicted 150 e^-1 = 55: the best, the slowest
    fast = Point("f", 90.0, ("gptq4",), (1.0,))  # predicted 90, a third of the latency
    middle = Point("m", 70.0, ("gptq4",), (2.0,))
    # nothing evaluated: the largest predicted box (normalized over the candidates: the middle plan)
    assert choose([fast, middle, slow_good], [], theta).key == "m"
    # one evaluated: the best predicted model, when it is predicted better than that one
    evaluated = [Point("m", 72.0, ("gptq4",), (2.0,), proxy_ppl=70.0)]
    assert choose([fast, slow_good], evaluated, theta).key == "g"
    # ... and when it is not (the middle plan measured 50: the slow one is dominated), the hypervolume decides
    better = [Point("m", 50.0, ("gptq4",), (2.0,), proxy_ppl=70.0)]
    assert choose([fast, slow_good], better, theta).key == "f"
    # from the second evaluated plan on, the hypervolume decides
    both = evaluated + [Point("g", 56.0, ("gptq3",), (3.0,), proxy_ppl=150.0)]
    assert choose([fast], both, theta).key == "f"
    # a best-predicted candidate over the pruning limit is not the second pick
    assert choose([fast, slow_good], evaluated, {"gptq3": 3.0}, broken_ppl=100.0).key == "f"
    # with nothing evaluated, a candidate the pruning rule would prune once the best predicted one
    # is evaluated (here over 2 x 55) is no knee, and does not stretch the scale the boxes are measured on
    wild = Point("w", 1000.0, ("gptq4",), (0.5,))
    assert choose([fast, middle, slow_good, wild], [], theta).key == "f"
    assert choose([fast, middle, slow_good, wild], [], theta, prune_ratio=6.0).key == "m"
    assert choose([fast, middle, slow_good, wild], [], theta, prune_ratio=1.5).key == "m"  # 90 > 82.5: f is out


def test_a_measured_sibling_replaces_the_fitted_correction():
    theta = {"gptq3": -1.0}
    evaluated = [Point("a-kv4", 100.0, ("gptq3",), (1.0,), proxy_ppl=400.0, family="a"),
                 Point("a-kv8", 90.0, ("gptq3",), (1.1,), proxy_ppl=400.0, family="a"),
                 Point("solo", 50.0, ("gptq3",), (2.0,), proxy_ppl=100.0)]  # no family: never shared
    measured = family_residuals(evaluated)
    assert measured == {"a": pytest.approx((math.log(0.25) + math.log(0.225)) / 2)}
    sibling = Point("a-kv16", 380.0, ("gptq3",), (1.2,), family="a")
    stranger = Point("b", 380.0, ("gptq3",), (1.2,), family="b")
    assert predicted_ppl(sibling, theta, measured) == pytest.approx(380.0 * math.exp(measured["a"]))
    assert predicted_ppl(stranger, theta, measured) == pytest.approx(380.0 * math.exp(-1.0))
    assert predicted_ppl(sibling, theta) == pytest.approx(380.0 * math.exp(-1.0))  # nothing measured given


def test_an_unmeasured_family_is_credited_optimism_a_measured_one_is_not():
    evaluated = [Point("e", 100.0, (), (1.0,), proxy_ppl=100.0, family="e")]
    # predicted 103 at a higher latency: dominated, unless its correction may be off by OPTIMISM
    assert 103.0 < 100.0 * math.exp(OPTIMISM)
    unknown = Point("u", 103.0, (), (1.05,), family="u")
    known = Point("k", 103.0, (), (1.05,), family="e")
    assert choose([unknown], evaluated, {}).key == "u"
    assert choose([known], evaluated, {}) is None
    # never past the pruning limit, optimism or not
    assert choose([unknown], evaluated, {}, broken_ppl=102.0) is None


def test_the_predicted_front_mixes_measured_and_predicted_points():
    theta = {"gptq3": -1.0}
    evaluated = [Point("e", 100.0, ("gptq3",), (1.0,), proxy_ppl=300.0)]
    a = Point("a", 80.0 * math.e, ("gptq3",), (2.0,))  # predicted 80, slower: on the front
    b = Point("b", 120.0 * math.e, ("gptq3",), (1.5,))  # predicted 120, slower than e: dominated
    c = Point("c", 150.0 * math.e, ("gptq3",), (0.5,))  # predicted 150, fastest: on the front
    assert [p.key for p in predicted_front([a, b, c], evaluated, theta)] == ["a", "e", "c"]


def test_step_neighbours_move_one_parameter_one_step():
    params = {"bits": 3, "drop": 0.1, "pattern": "x", "free": 0.37}
    choices = {"bits": [2, 3, 4], "drop": [0.0, 0.05, 0.1], "pattern": ["x"], "free": []}
    assert step_neighbours(params, choices) == [
        {**params, "bits": 2}, {**params, "bits": 4}, {**params, "drop": 0.05}]
    assert step_neighbours({"bits": 5}, choices) == []  # a value outside its choices stays


def test_param_choices_order_what_a_step_moves_along():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from slmsearch.search.screen_runner import param_choices

    assert param_choices(CategoricalDistribution([4, 2, 3])) == [2, 3, 4]
    assert param_choices(CategoricalDistribution(["unstructured", "structured"])) == ["unstructured", "structured"]
    assert param_choices(IntDistribution(0, 6, step=2)) == [0, 2, 4, 6]
    assert param_choices(FloatDistribution(0.0, 0.2, step=0.05)) == [0.0, 0.05, 0.1, 0.15, 0.2]
    assert param_choices(FloatDistribution(0.0, 1.0)) == []
