"""Tests of attribution.trak: TRAK scores through `traker` and their calibration into datamodel units.

References: autograd of cross-entropy (the out-to-loss term), a direct re-computation of TRAK's formula
without projection, the chain rule from logit scores to margin scores, scikit-learn Lasso datamodels on
MNIST-1D subset models, and the closed-form / numpy least-squares fits for `calibrate`. Chunked scoring
(`TrakScorer`) and chunked calibration (`calibration_sums` + `calibrate_from_sums`) against the all-at-once
results.
"""

import json
import os
import tempfile
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr
from sklearn.linear_model import Lasso
from trak.projectors import BasicProjector, CudaProjector, NoOpProjector

from attribution.trak import (
    TrainMarginOutput,
    TrakScorer,
    calibrate,
    calibrate_from_sums,
    calibration_sums,
    default_projector,
    trak_scores,
)

# Small fixtures: a tiny MLP on MNIST-1D; many subset models trained at once (each weight tensor stacked over
# models on a leading axis), full-batch Adam on each model's own Bernoulli(0.5) subset (docs/methods.md §1).
N_TRAIN, N_TARGETS, HIDDEN, N_CLASSES = 200, 20, 32, 10
# subset models: the first 8 are TRAK's checkpoints, the next 100 calibrate, the remaining 342 fit LASSO
N_MODELS, N_CHECKPOINTS, N_CALIBRATION = 450, 8, 100


def mlp(d_in=40, hidden=HIDDEN, n_classes=N_CLASSES):
    nn = torch.nn
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))


@pytest.fixture(scope="module")
def mnist1d_small():
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    # 800 train / 200 test examples; make_dataset is local (get_dataset downloads)
    args.num_samples, args.seed = 1000, 0
    d = make_dataset(args)
    f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return (f32(d["x"][:N_TRAIN]), torch.tensor(d["y"][:N_TRAIN]).long(),
            f32(d["x_test"][:N_TARGETS]), torch.tensor(d["y_test"][:N_TARGETS]).long())


@pytest.fixture(scope="module")
def subset_models(mnist1d_small):
    """masks (M, N) bool, target logits (M, T, C), state dicts of the first N_CHECKPOINTS models."""
    x, y, xt, _ = mnist1d_small
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the team shares 2 cores; restored below
    try:
        return _train_subset_models(x, y, xt)
    finally:
        torch.set_num_threads(threads)


def _train_subset_models(x, y, xt):
    masks = np.random.default_rng(0).random((N_MODELS, N_TRAIN)) < 0.5
    g = torch.Generator().manual_seed(0)
    w1 = (torch.randn(N_MODELS, 40, HIDDEN, generator=g) / 40 ** 0.5).requires_grad_()
    b1 = torch.zeros(N_MODELS, 1, HIDDEN, requires_grad=True)
    w2 = (torch.randn(N_MODELS, HIDDEN, N_CLASSES, generator=g) / HIDDEN ** 0.5).requires_grad_()
    b2 = torch.zeros(N_MODELS, 1, N_CLASSES, requires_grad=True)
    opt = torch.optim.Adam([w1, b1, w2, b2], lr=1e-2)
    weight = torch.as_tensor(masks, dtype=torch.float32)
    weight = weight / weight.sum(1, keepdim=True)  # mean loss over each model's own subset
    for _ in range(100):
        z = torch.relu(x @ w1 + b1) @ w2 + b2  # (M, N, C)
        ce = F.cross_entropy(z.reshape(-1, N_CLASSES), y.repeat(N_MODELS), reduction="none")
        loss = (ce.reshape(N_MODELS, N_TRAIN) * weight).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = (torch.relu(xt @ w1 + b1) @ w2 + b2).numpy()
    checkpoints = [{"0.weight": w1[k].detach().T.contiguous(), "0.bias": b1[k, 0].detach(),
                    "2.weight": w2[k].detach().T.contiguous(), "2.bias": b2[k, 0].detach()}
                   for k in range(N_CHECKPOINTS)]
    return masks, logits, checkpoints


# The output function
def test_margin_output_and_out_to_loss_give_the_cross_entropy_gradient():
    # TRAK's train side needs grad CE_i = -Q_i * grad f(z_i); for the margin with Q = 1 - p_y this is exact.
    torch.manual_seed(0)
    model = mlp(6, 5, 4)
    x, y = torch.randn(7, 6), torch.randint(0, 4, (7,))
    out = TrainMarginOutput(num_classes=4)
    weights, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    which = torch.full((7,), -1)
    per_example_grad = torch.func.vmap(torch.func.grad(out.get_output, argnums=1),
                                       in_dims=(None, None, None, 0, 0, 0))
    grads = per_example_grad(model, weights, buffers, x, y, which)
    q = out.get_out_to_loss_grad(model, weights, buffers, (x, y, which))
    assert q.shape == (7, 1)
    for i in range(7):
        ce = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        ref = torch.autograd.grad(ce, list(weights.values()))
        for name, r in zip(weights, ref):
            torch.testing.assert_close(-q[i, 0] * grads[name][i], r, rtol=1e-5, atol=1e-6)
    # which = c selects the plain logit z_c
    c = torch.tensor([2] * 7)
    grads_c = per_example_grad(model, weights, buffers, x, y, c)
    ref = torch.autograd.grad(model(x[3:4])[0, 2], list(weights.values()))
    for name, r in zip(weights, ref):
        torch.testing.assert_close(grads_c[name][3], r, rtol=1e-5, atol=1e-6)


# trak_scores against independent computations
def _direct_trak(model, checkpoints, x, y, xt, yt, lambda_reg, outputs):
    """TRAK's estimator with per-example autograd, float64, no projection (Park et al. 2023 §3):
    tau = mean_k [Phi_k (Phi_k^T Phi_k + lam I)^-1 G_k^T] * mean_k Q_k, Phi = margin gradients / sqrt(P),
    with traker's normalisation of each inverse by its mean absolute entry."""
    model = model.double()
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)

    def flat_grad(scalar):
        grads = torch.autograd.grad(scalar, params, retain_graph=True)
        return torch.cat([g.reshape(-1) for g in grads]) / n_params ** 0.5

    def margin(z, label):
        others = torch.cat([z[:label], z[label + 1:]])
        return z[label] - torch.logsumexp(others, 0)

    total, q_sum = 0.0, 0.0
    for ckpt in checkpoints:
        model.load_state_dict({k: v.double() for k, v in ckpt.items()})
        phi = torch.stack([flat_grad(margin(model(x[i:i + 1].double())[0], y[i])) for i in range(len(x))])
        inv = torch.linalg.inv(phi.T @ phi + lambda_reg * torch.eye(n_params, dtype=torch.float64))
        inv = inv / inv.abs().mean()
        rows = []
        for t in range(len(xt)):
            z = model(xt[t:t + 1].double())[0]
            if outputs == "margin":
                rows.append(flat_grad(margin(z, yt[t])))
            else:
                rows.extend(flat_grad(z[c]) for c in range(z.shape[0]))
        total = total + (phi @ inv @ torch.stack(rows).T)
        with torch.no_grad():
            p = torch.softmax(model(x.double()), -1)[torch.arange(len(x)), y]
        q_sum = q_sum + (1 - p)
    k = len(checkpoints)
    return ((total / k) * (q_sum / k)[:, None]).detach().numpy()


@pytest.mark.parametrize("outputs", ["logits", "margin"])
def test_trak_scores_match_the_direct_formula_without_projection(outputs):
    torch.manual_seed(0)
    model = mlp(8, 6, 3)  # 75 parameters < 120 train examples: the unprojected Phi^T Phi is well posed
    x, y = torch.randn(120, 8), torch.randint(0, 3, (120,))
    xt, yt = torch.randn(5, 8), torch.randint(0, 3, (5,))
    checkpoints = [mlp(8, 6, 3).state_dict() for _ in range(2)]
    got = trak_scores(model, checkpoints, x, y, xt, yt, outputs=outputs, lambda_reg=1e-2, batch_size=32,
                      device="cpu", projector=NoOpProjector(device="cpu"))
    ref = _direct_trak(mlp(8, 6, 3), checkpoints, x, y, xt, yt, 1e-2, outputs)
    assert got.shape == ((120, 5, 3) if outputs == "logits" else (120, 5))
    # float32 against float64: measured max deviation 4e-6 of the largest score
    np.testing.assert_allclose(got.reshape(120, -1), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def _check_chain_rule(device, proj_dim, n_train, d_in=10, hidden=16, n_classes=4):
    # With one checkpoint, TRAK is linear in the target gradient and the margin's gradient is
    # sum_c dm/dz_c grad z_c, so margin scores = logit scores contracted with dm/dz, whatever the (fixed)
    # projection: both runs use the same seed and model_id, hence the same matrix.
    torch.manual_seed(1)
    model = mlp(d_in, hidden, n_classes).to(device)
    x, y = torch.randn(n_train, d_in), torch.randint(0, n_classes, (n_train,))
    xt, yt = torch.randn(6, d_in), torch.randint(0, n_classes, (6,))
    kw = dict(proj_dim=proj_dim, device=device, lambda_reg=1e-3)
    logit_scores = trak_scores(model, [model.state_dict()], x, y, xt, yt, outputs="logits", **kw)
    margin_scores = trak_scores(model, [model.state_dict()], x, y, xt, yt, outputs="margin", **kw)
    with torch.no_grad():
        z = model(xt.to(device)).double().cpu()
    onehot = F.one_hot(yt, n_classes).bool()
    # dm/dz: 1 at the label, -softmax over the other logits elsewhere
    dm_dz = -torch.softmax(z.masked_fill(onehot, float("-inf")), -1) + onehot.double()
    expect = np.einsum("ntc,tc->nt", logit_scores.astype(np.float64), dm_dz.numpy())
    np.testing.assert_allclose(margin_scores, expect, rtol=1e-4, atol=1e-5 * np.abs(expect).max())


def test_logit_scores_give_margin_scores_by_the_chain_rule():
    # proj_dim 64 <= 100 also exercises the single-block BasicProjector fix (docs/methods.md §2)
    _check_chain_rule("cpu", proj_dim=64, n_train=150)


def test_batchnorm_model_scores_do_not_depend_on_the_batch():
    # Per-example gradients are only per-example with BatchNorm in eval mode (running statistics); then the
    # scores cannot depend on how the examples are batched.
    torch.manual_seed(2)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(60, 6), torch.randint(0, 3, (60,))
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(32, 6) * 2 + 1)  # non-trivial running statistics
    ck = [model.state_dict()]
    one = trak_scores(model, ck, x, y, x[:4], y[:4], proj_dim=16, batch_size=1, device="cpu")
    many = trak_scores(model, ck, x, y, x[:4], y[:4], proj_dim=16, batch_size=64, device="cpu")
    np.testing.assert_allclose(one, many, rtol=1e-4, atol=1e-5 * np.abs(many).max())


def _lasso_weights(masks, outputs, alpha=1e-2):
    # scikit-learn's Lasso per target output: the datamodel objective of docs/methods.md §1.
    flat = outputs.reshape(outputs.shape[0], -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings on a few hard columns do not matter here
        coef = [Lasso(alpha=alpha, precompute=True).fit(masks.astype(float), flat[:, j]).coef_
                for j in range(flat.shape[1])]
    return np.stack(coef, 1).reshape(masks.shape[1], *outputs.shape[1:])


def _check_against_lasso(scores, masks, logits):
    cal = slice(N_CHECKPOINTS, N_CHECKPOINTS + N_CALIBRATION)
    fit = slice(N_CHECKPOINTS + N_CALIBRATION, None)
    weights, info = calibrate(scores, masks[cal], logits[cal])
    lasso = _lasso_weights(masks[fit], logits[fit])
    per_output = [pearsonr(weights[:, t, c], lasso[:, t, c])[0]
                  for t in range(N_TARGETS) for c in range(N_CLASSES) if lasso[:, t, c].std() > 0]
    # measured: 0.35 mean (every output positive), 0.34 pooled; the same weights, train rows permuted: 0.01
    assert np.mean(per_output) > 0.15
    assert np.mean(np.array(per_output) > 0) > 0.8
    # pooled over all outputs: the calibrated weights share LASSO's units across targets and classes
    assert pearsonr(weights.ravel(), lasso.ravel())[0] > 0.15
    return weights, info


@pytest.mark.slow
def test_trak_on_cpu_end_to_end_agrees_with_lasso_datamodels(mnist1d_small, subset_models):
    x, y, xt, yt = mnist1d_small
    masks, logits, checkpoints = subset_models
    scores = trak_scores(mlp(), checkpoints, x, y, xt, yt, outputs="logits", proj_dim=64, device="cpu")
    assert scores.shape == (N_TRAIN, N_TARGETS, N_CLASSES) and scores.dtype == np.float32
    assert np.isfinite(scores).all()
    _check_against_lasso(scores, masks, logits)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trak_on_cuda_uses_fast_jl_when_present_and_agrees_with_lasso(mnist1d_small, subset_models):
    try:
        import fast_jl  # noqa: F401

        expected = CudaProjector
    except ImportError:
        expected = BasicProjector
    n_params = sum(p.numel() for p in mlp().parameters())
    assert isinstance(default_projector(n_params, 512, "cuda"), expected)
    # fast_jl projects only to multiples of 512 dimensions
    assert isinstance(default_projector(n_params, 64, "cuda"), BasicProjector)
    # the default projector at proj_dim 512 (fast_jl's when present), through the exact chain-rule identity
    _check_chain_rule("cuda", proj_dim=512, n_train=600, d_in=40, hidden=32, n_classes=10)
    x, y, xt, yt = mnist1d_small
    masks, logits, checkpoints = subset_models
    scores = trak_scores(mlp(), checkpoints, x, y, xt, yt, outputs="logits", proj_dim=64, device="cuda")
    assert scores.shape == (N_TRAIN, N_TARGETS, N_CLASSES) and np.isfinite(scores).all()
    _check_against_lasso(scores, masks, logits)


def test_trak_scores_leaves_the_model_alone_and_cleans_up(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = mlp(5, 4, 3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    other = mlp(5, 4, 3).state_dict()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the default save_dir goes under tmp_path
    trak_scores(model, [other], x, y, x[:3], y[:3], proj_dim=8, device="cpu")
    assert os.listdir(tmp_path) == []
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    kept = tmp_path / "kept"
    trak_scores(model, [other], x, y, x[:3], y[:3], proj_dim=8, device="cpu", save_dir=kept)
    assert (kept / "metadata.json").exists()


def test_trak_scores_rejects_bad_input(tmp_path):
    model = mlp(5, 4, 3)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    ck = [model.state_dict()]
    with pytest.raises(ValueError, match="proj_dim=40 must be smaller than the number of training"):
        trak_scores(model, ck, x, y, x[:3], y[:3], proj_dim=40, device="cpu")
    with pytest.raises(ValueError, match="lambda_reg must be > 0"):
        trak_scores(model, ck, x, y, x[:3], y[:3], proj_dim=8, lambda_reg=0.0, device="cpu")
    with pytest.raises(ValueError, match="outputs must be"):
        trak_scores(model, ck, x, y, x[:3], y[:3], proj_dim=8, outputs="loss", device="cpu")
    with pytest.raises(ValueError, match="target_y"):
        trak_scores(model, ck, x, y, x[:3], None, proj_dim=8, outputs="margin", device="cpu")
    with pytest.raises(ValueError, match="num_classes=5 but the model returns 3"):
        trak_scores(model, ck, x, y, x[:3], y[:3], proj_dim=8, num_classes=5, device="cpu")
    with pytest.raises(ValueError, match="checkpoints is empty"):
        trak_scores(model, [], x, y, x[:3], y[:3], proj_dim=8, device="cpu")
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / "metadata.json").write_text("{}")
    with pytest.raises(ValueError, match="not an empty directory"):
        trak_scores(model, ck, x, y, x[:3], y[:3], proj_dim=8, device="cpu",
                    save_dir=tmp_path / "stale")


# calibrate
def test_calibrate_recovers_known_per_target_scales_exactly():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 4, 3))
    masks = rng.random((30, 50)) < 0.5
    scale = rng.normal(size=(4, 3)) * 5  # some negative: least squares may flip a target's sign
    bias = rng.normal(size=(4, 3))
    outputs = bias + np.einsum("mn,ntc->mtc", masks.astype(float), scores) * scale
    weights, info = calibrate(scores, masks, outputs, scale="per_target")
    np.testing.assert_allclose(info["scale"], scale, rtol=1e-10)
    np.testing.assert_allclose(info["intercept"], bias, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(weights, scores * scale, rtol=1e-10)
    np.testing.assert_allclose(info["r2"], 1.0)
    # the datamodel (bias, weights) reproduces the outputs: outputs = b + masks @ weights
    predicted = info["intercept"] + np.einsum("mn,ntc->mtc", masks, weights)
    np.testing.assert_allclose(predicted, outputs, atol=1e-9)


def test_calibrate_matches_numpy_least_squares_with_noise():
    rng = np.random.default_rng(1)
    n, t, m = 40, 6, 25
    scores = rng.normal(size=(n, t))
    masks = rng.random((m, n)) < 0.5
    outputs = rng.normal(size=(t,)) + 0.7 * masks @ scores + rng.normal(size=(m, t))
    u = masks @ scores
    _, info = calibrate(scores, masks, outputs, scale="per_target")
    for j in range(t):
        slope, intercept = np.polyfit(u[:, j], outputs[:, j], 1)
        np.testing.assert_allclose([info["scale"][j], info["intercept"][j]], [slope, intercept], rtol=1e-8)
    # global: one shared slope column plus one intercept dummy per target, lstsq on the stacked system
    design = np.zeros((m * t, 1 + t))
    design[:, 0] = u.T.ravel()
    design[np.arange(m * t), 1 + np.repeat(np.arange(t), m)] = 1.0
    coef = np.linalg.lstsq(design, outputs.T.ravel(), rcond=None)[0]
    weights, info = calibrate(scores, masks, outputs, scale="global")
    np.testing.assert_allclose(info["scale"], coef[0], rtol=1e-8)
    np.testing.assert_allclose(info["intercept"], coef[1:], rtol=1e-8)
    np.testing.assert_allclose(weights, scores * coef[0], rtol=1e-8)


def test_calibrate_guards_ill_posed_fits():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(20, 3))
    masks = rng.random((10, 20)) < 0.5
    outputs = rng.normal(size=(10, 3))
    with pytest.raises(ValueError, match="needs at least 3 held-out subset models"):
        calibrate(scores, masks[:2], outputs[:2])
    with pytest.raises(ValueError, match="'per_target' needs at least 20"):
        calibrate(scores, masks, outputs, scale="per_target")
    with pytest.raises(ValueError, match="needs at least 8"):
        calibrate(scores, masks[:5], outputs[:5], min_models=8)
    with pytest.raises(ValueError, match="outputs must have shape"):
        calibrate(scores, masks, outputs[:, :2])
    with pytest.raises(ValueError, match="masks must be"):
        calibrate(scores, masks[:, :5], outputs)
    with pytest.raises(ValueError, match="does not vary"):
        calibrate(scores, np.ones((10, 20), bool), outputs)
    zero = scores.copy()
    zero[:, 1] = 0.0  # a target with all-zero scores has no identifiable scale
    weights, info = calibrate(zero, masks, outputs, scale="per_target", min_models=3)
    assert info["degenerate"].tolist() == [False, True, False]
    assert info["scale"][1] == 0.0 and np.all(weights[:, 1] == 0.0)
    np.testing.assert_allclose(info["intercept"][1], outputs[:, 1].mean())


# Chunks of targets: one featurization, many experiments; sums per chunk, one scale from all of them
def _check_chunks(tmp_path, device, n_checkpoints, proj_dim, n_train=200, d_in=10, hidden=16, n_classes=4,
                  rtol=1e-5, atol=1e-6):
    torch.manual_seed(3)
    model = mlp(d_in, hidden, n_classes)
    x, y = torch.randn(n_train, d_in), torch.randint(0, n_classes, (n_train,))
    xt, yt = torch.randn(11, d_in), torch.randint(0, n_classes, (11,))
    checkpoints = [mlp(d_in, hidden, n_classes).state_dict() for _ in range(n_checkpoints)]
    kw = {"proj_dim": proj_dim, "lambda_reg": 1e-3, "device": device, "batch_size": 64}
    whole = trak_scores(model, checkpoints, x, y, xt, yt, outputs="logits", **kw)
    whole_margin = trak_scores(model, checkpoints, x, y, xt, yt, outputs="margin", **kw)
    chunks = [slice(0, 4), slice(4, 9), slice(9, 11)]
    with TrakScorer(model, checkpoints, x, y, save_dir=tmp_path / "features", **kw) as scorer:
        for rows in chunks:
            logits, margin = scorer.logit_and_margin_scores(xt[rows], yt[rows])
            # TRAK is linear per target: a chunk is its slice of the whole, up to float rounding (on the CPU
            # measured: the same bits)
            np.testing.assert_allclose(logits, whole[:, rows], rtol=rtol, atol=atol * np.abs(whole).max())
            np.testing.assert_allclose(margin, whole_margin[:, rows], rtol=rtol,
                                       atol=atol * np.abs(whole_margin).max())
            np.testing.assert_allclose(scorer.scores(xt[rows], yt[rows], outputs="margin"), margin,
                                       rtol=rtol, atol=atol * np.abs(margin).max())
            assert scorer.scores(xt[rows], outputs="logits").shape == (n_train, rows.stop - rows.start,
                                                                       n_classes)
        # every experiment's target gradients and scores are gone: disk holds only the features
        features = tmp_path / "features"
        left = sorted(str(p.relative_to(features)) for p in features.rglob("*.mmap"))
        assert left == sorted(f"{m}/{f}.mmap" for m in range(n_checkpoints)
                              for f in ("_is_featurized", "features", "out_to_loss"))
        assert json.loads((features / "experiments.json").read_text()) == {}
    assert (features / "metadata.json").exists()  # a given save_dir is kept


@pytest.mark.parametrize("n_checkpoints, proj_dim", [(1, 16), (3, 150)])
def test_scorer_chunks_equal_the_all_targets_scores(tmp_path, n_checkpoints, proj_dim):
    # (1, 16): a single-block BasicProjector and one model_id, whose matrix traker never regenerates;
    # (3, 150): two blocks regenerated per batch, and every experiment restarts at model_id 0.
    _check_chunks(tmp_path, "cpu", n_checkpoints, proj_dim)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_scorer_chunks_equal_the_all_targets_scores_on_cuda(tmp_path):
    # the default CUDA projector at proj_dim 512 (fast_jl's where present); tolerance as the chain-rule check
    _check_chunks(tmp_path, "cuda", 3, 512, n_train=600, d_in=40, hidden=32, n_classes=10, rtol=1e-4,
                  atol=1e-5)


def test_scorer_cleans_up_its_temporary_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    torch.manual_seed(0)
    model = mlp(5, 4, 3)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    with TrakScorer(model, [model.state_dict()], x, y, proj_dim=8, device="cpu") as scorer:
        assert os.listdir(tmp_path) != []
        scorer.scores(x[:3], y[:3], outputs="margin")
        with pytest.raises(ValueError, match=r"target_y must hold labels in \[0, 3\)"):
            scorer.scores(x[:3], torch.tensor([0, 3, 1]), outputs="margin")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="num_classes=5"):  # a failed featurization leaves nothing either
        TrakScorer(model, [model.state_dict()], x, y, proj_dim=8, num_classes=5, device="cpu")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("scale", ["global", "per_target"])
@pytest.mark.parametrize("shape", [(60, 13, 3), (60, 13)])
def test_calibrate_from_chunk_sums_equals_calibrate(scale, shape):
    rng = np.random.default_rng(4)
    scores = rng.normal(size=shape)
    scores[:, 2] = 0.0  # a degenerate target output
    m = 25
    masks = rng.random((m, shape[0])) < 0.5
    outputs = (rng.normal(size=shape[1:]) + 0.3 * np.einsum("mn,n...->m...", masks.astype(float), scores)
               + rng.normal(size=(m, *shape[1:])))
    weights, info = calibrate(scores, masks, outputs, scale=scale, min_models=3)
    chunks = [slice(0, 5), slice(5, 6), slice(6, 13)]
    sums = [calibration_sums(scores[:, c], masks, outputs[:, c]) for c in chunks]
    s, b, r2, degenerate = calibrate_from_sums(sums, scale=scale, min_models=3)
    for got, want in ((s, info["scale"]), (b, info["intercept"]), (r2, info["r2"])):
        assert got.shape == shape[1:]
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(degenerate, info["degenerate"])
    assert degenerate[2].all() and not degenerate[3:].any()
    # weights chunk by chunk: the one pooled scale times each chunk's scores
    for c in chunks:
        np.testing.assert_allclose(scores[:, c] * s[c], weights[:, c], rtol=1e-10, atol=1e-12)
    # one chunk: exactly calibrate
    one = calibrate_from_sums(calibration_sums(scores, masks, outputs), scale=scale, min_models=3)
    np.testing.assert_array_equal(one[0], info["scale"])
    np.testing.assert_array_equal(one[1], info["intercept"])


def test_calibrate_from_sums_refuses_mixed_or_too_few_models():
    rng = np.random.default_rng(5)
    scores, masks = rng.normal(size=(20, 4)), rng.random((10, 20)) < 0.5
    outputs = rng.normal(size=(10, 4))
    a = calibration_sums(scores[:, :2], masks, outputs[:, :2])
    b = calibration_sums(scores[:, 2:], masks[:6], outputs[:6, 2:])
    with pytest.raises(ValueError, match="different numbers of models"):
        calibrate_from_sums([a, b])
    with pytest.raises(ValueError, match="'per_target' needs at least 20"):
        calibrate_from_sums(a, scale="per_target")
    with pytest.raises(ValueError, match="outputs must have shape"):
        calibration_sums(scores, masks, outputs[:, :2])
