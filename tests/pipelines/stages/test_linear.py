"""The linear-model experiment (seed Figure 3): closed forms against scikit-learn and first-order conditions,
gradients against finite differences, the seed's qualitative claims on 2 seeds, the CLI's JSON and what its
plot draws."""

import json

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from pipelines.report.plots import plot_linear

from pipelines.stages.linear import (
    LinearSettings,
    linear_experiment,
    main,
    make_problem,
    method_gradients,
    ridge_optimum,
    step_size,
)


@pytest.fixture(scope="module")
def two_seeds():
    # Defaults (3,000 iterations) on 2 seeds: about a second.
    return linear_experiment(seeds=(0, 1))


def test_ridge_optimum_matches_sklearn_and_zeroes_the_gradient():
    settings = LinearSettings()
    p = make_problem(settings, seed=0)
    x, y, r = p["x"], p["y"], p["retain"]
    lam = settings.l2
    theta_r = ridge_optimum(x[r], y[r], lam)
    # scikit-learn's Ridge minimises ||y - Xw||^2 + alpha ||w||^2: alpha = m * lambda gives our (1/m) loss.
    ref = Ridge(alpha=len(r) * lam, fit_intercept=False, solver="svd").fit(x[r], y[r]).coef_
    np.testing.assert_allclose(theta_r, ref, rtol=1e-8, atol=1e-10)
    grad = 2 * x[r].T @ (x[r] @ theta_r - y[r]) / len(r) + 2 * lam * theta_r
    assert np.linalg.norm(grad) < 1e-10 * np.linalg.norm(2 * x[r].T @ y[r] / len(r))
    theta_full = ridge_optimum(x, y, lam)
    grad_full = 2 * x.T @ (x @ theta_full - y) / len(y) + 2 * lam * theta_full
    assert np.linalg.norm(grad_full) < 1e-10 * np.linalg.norm(2 * x.T @ y / len(y))
    # Both optima lie in the row span of X, so their difference does too: OM on all points can reach theta_R.
    q, _ = np.linalg.qr(x.T)
    diff = theta_full - theta_r
    assert np.linalg.norm(diff - q @ (q.T @ diff)) < 1e-10 * np.linalg.norm(diff)
    # The method gradients vanish at theta_R where it is the optimum (GD retain, OM without lambda).
    grads = method_gradients(p, theta_r, settings)
    assert np.linalg.norm(grads["gd"](theta_r)) < 1e-9
    assert np.linalg.norm(grads["om"](theta_r)) < 1e-9
    assert np.linalg.norm(grads["om_retain"](theta_r)) < 1e-9


@pytest.mark.parametrize("om_l2", [False, True])
def test_method_gradients_match_finite_differences(om_l2):
    settings = LinearSettings(n=12, d=20, n_forget=3, ascent_weight=0.3, om_l2=om_l2)
    p = make_problem(settings, seed=3)
    x, y, f, r = p["x"], p["y"], p["forget"], p["retain"]
    lam, beta = settings.l2, settings.ascent_weight
    theta_r = ridge_optimum(x[r], y[r], lam)
    yhat = x @ theta_r
    om_lam = lam if om_l2 else 0.0

    def mse(rows, target, t):
        return np.mean((x[rows] @ t - target[rows]) ** 2)

    everything = np.arange(len(y))
    objectives = {
        "gd": lambda t: mse(r, y, t) + lam * t @ t,
        "gd_ga": lambda t: mse(r, y, t) + lam * t @ t - beta * mse(f, y, t),
        "om": lambda t: mse(everything, yhat, t) + om_lam * t @ t,
        "om_retain": lambda t: mse(r, yhat, t) + om_lam * t @ t,
    }
    grads = method_gradients(p, theta_r, settings)
    theta = np.random.default_rng(0).normal(size=settings.d)
    h = 1e-6
    for name, objective in objectives.items():
        numeric = np.array([(objective(theta + h * e) - objective(theta - h * e)) / (2 * h)
                            for e in np.eye(settings.d)])
        np.testing.assert_allclose(grads[name](theta), numeric, rtol=1e-6, atol=1e-6, err_msg=name)
    # The step is stable for every method: eta * (largest |Hessian eigenvalue|) <= 1.
    eta = step_size(p, settings)
    for name in objectives:
        zero = np.zeros(settings.d)
        hess = np.stack([grads[name](e) - grads[name](zero) for e in np.eye(settings.d)], axis=1)
        assert eta * np.abs(np.linalg.eigvalsh((hess + hess.T) / 2)).max() <= 1 + 1e-9, name


def test_seed_claims_hold_on_two_seeds(two_seeds):
    m = two_seeds["methods"]
    om, gd = m["om"]["iters_to_tol"], m["gd"]["iters_to_tol"]
    # OM reaches 1% of the initial distance in tens of iterations (condition number ~9 on the span of X) ...
    assert all(v is not None and v <= 60 for v in om)
    # ... GD on the retain set converges too (the seed: both are guaranteed to), but far later.
    assert all(g is not None and g >= 20 * o for g, o in zip(gd, om))
    # OM on retain points only makes negligible progress; GD + GA never gets there.
    assert m["om_retain"]["iters_to_tol"] == [None, None]
    assert min(m["om_retain"]["min_relative"]) > 0.99
    assert m["gd_ga"]["iters_to_tol"] == [None, None]
    assert min(m["gd_ga"]["min_relative"]) > 0.02
    # OM's optimum on span(X) is exactly theta_R: it ends at round-off distance.
    for curve, d0 in zip(m["om"]["per_seed"], two_seeds["initial_distance"]):
        assert curve[-1] < 1e-10 * d0
    # The mean curve is the mean of the per-seed curves.
    np.testing.assert_allclose(m["gd"]["mean"], np.mean(m["gd"]["per_seed"], axis=0), rtol=1e-5)


def test_ridge_term_in_om_biases_its_optimum():
    result = linear_experiment(seeds=(0,), iters=400, om_l2=True)
    om = result["methods"]["om"]
    assert om["iters_to_tol"] == [None]
    assert 1e-2 < om["min_relative"][0] < 0.1


def test_main_prints_json(capsys, tmp_path):
    png = tmp_path / "linear.png"
    assert main(["--json", "--seeds", "2", "--iters", "50", "--out", str(png)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["seeds"] == [0, 1]
    assert result["tolerance"] == 0.01
    assert set(result["methods"]) == {"gd", "gd_ga", "om", "om_retain"}
    for entry in result["methods"].values():
        assert {"label", "mean", "per_seed", "iters_to_tol", "min_relative"} <= set(entry)
        assert len(entry["mean"]) == 51 and len(entry["per_seed"]) == 2
        assert len(entry["iters_to_tol"]) == 2
    assert png.stat().st_size > 0


def test_plot_draws_each_methods_geometric_mean_over_seeds(two_seeds, tmp_path):
    """Per method, per iteration: the distance to theta_R relative to the first one, per seed (floored at 1e-16,
    float64's round-off, for the log axis); the line is their geometric mean (of two seeds: its square is their
    product), the band spans the lower and the higher seed."""
    drawn = plot_linear(two_seeds, tmp_path / "linear.png")
    assert drawn["tolerance"] == two_seeds["tolerance"] == 0.01
    assert set(drawn["methods"]) == set(two_seeds["methods"])
    for name, entry in two_seeds["methods"].items():
        a, b = (np.maximum(np.array(curve) / d0, 1e-16)
                for curve, d0 in zip(entry["per_seed"], two_seeds["initial_distance"]))
        line = drawn["methods"][name]
        assert len(line["center"]) == len(entry["mean"]) == 3001
        np.testing.assert_allclose(np.square(line["center"]), a * b, rtol=1e-9)
        np.testing.assert_array_equal(line["low"], np.minimum(a, b))
        np.testing.assert_array_equal(line["high"], np.maximum(a, b))
        assert line["center"][0] == pytest.approx(1.0)


def test_plot_and_table_survive_a_diverged_method(tmp_path, capsys):
    # A large ascent weight makes GD + GA blow up within the budget: its curve ends in None (valid JSON),
    # and the table and plot still render.
    result = linear_experiment(seeds=(0,), iters=200, ascent_weight=0.2)
    assert result["methods"]["gd_ga"]["per_seed"][0][-1] is None
    json.dumps(result, allow_nan=False)
    drawn = plot_linear(result, tmp_path / "linear.png")["methods"]["gd_ga"]["center"]
    diverged = result["methods"]["gd_ga"]["per_seed"][0].index(None)
    assert np.isfinite(drawn[:diverged]).all() and np.isnan(drawn[diverged:]).all()  # a gap where it diverged
    png = tmp_path / "d.png"
    assert main(["--seeds", "1", "--iters", "200", "--ascent-weight", "0.2", "--out", str(png)]) == 0
    table = capsys.readouterr().out
    assert "diverged" in table and "OM (all points)" in table
    assert png.is_file()


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="n_forget"):
        linear_experiment(n=10, n_forget=10, iters=5)
    with pytest.raises(ValueError, match="l2"):
        linear_experiment(l2=0.0, iters=5)
