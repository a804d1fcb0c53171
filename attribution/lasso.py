"""Batched LASSO: linear datamodels for many targets at once (docs/methods.md §1).

Data flow: subset masks (M, N) and the outputs of the subset models (M, T) from subsets.zarr ->
`LassoDatamodels` -> datamodel weights (N, T), bias and lambda per target, which the datamodels stage writes
to datamodels/lasso.zarr.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Solver settings, measured on a 2-core CPU at 4,000 models x 2,000 training points x 200-1,000 targets: a
# sweep of 64-coordinate blocks with 3 proximal-gradient steps each needs as many sweeps as exact coordinate
# descent (the block Grams of near-orthogonal masks have condition number ~1.7), at the cost of about one G @
# W product; blocks of 32 or 128 and 2 to 4 inner steps were within 5%. Proximal gradient (FISTA) on the whole
# G took about 4x longer: its step is set by G's largest eigenvalue (condition number ~30 at p/M = 1/2). Not
# tuned on a GPU.
BLOCK_SIZE = 64  # coordinates per block of the Gauss-Seidel sweep
INNER_STEPS = 3  # proximal-gradient steps on each block per sweep
GROUP_SIZE = 512  # coordinates per group of blocks, whose rows of the gradient are updated block by block
# Sweeps combined by one Anderson extrapolation (Bertrand & Massias 2021, "Anderson acceleration of coordinate
# descent", AISTATS): a third to a half fewer sweeps at the dense, small-λ end of the path; 0 turns it off.
ANDERSON_DEPTH = 5


# ----------------------------------------------------------------------------------------------------
# Input checks


def _as_matrix(name: str, a, *, rows: int | None = None, cols: int | None = None) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (one row per subset model), got shape {a.shape}; reshape a "
                         f"single target with .reshape(-1, 1)")
    if a.shape[0] == 0:
        raise ValueError(f"{name} has no rows: pass at least one subset model")
    if a.shape[1] == 0:
        raise ValueError(f"{name} has no columns")
    if rows is not None and a.shape[0] != rows:
        raise ValueError(f"{name} has {a.shape[0]} rows but its masks have {rows}: pass one row per subset "
                         f"model in both")
    if cols is not None and a.shape[1] != cols:
        raise ValueError(f"{name} has {a.shape[1]} columns, expected {cols} (the same training points / "
                         f"targets as the fitting data)")
    if a.dtype != bool and not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name} must be numeric or bool, got dtype {a.dtype}")
    if a.dtype != bool and not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf (e.g. a diverged subset model): drop or repair those "
                         f"rows")
    return a


def _check_lam(lam, t: int) -> np.ndarray:
    lam = np.asarray(lam, dtype=np.float64)
    if lam.ndim == 0:
        lam = np.full(t, float(lam))
    if lam.shape != (t,):
        raise ValueError(f"lam must be a scalar or one value per target (shape ({t},)), got shape "
                         f"{lam.shape}")
    if not np.all(np.isfinite(lam)) or np.any(lam <= 0):
        raise ValueError("lam must be finite and > 0; for plain least squares use numpy.linalg.lstsq")
    return lam


def _check_solver_args(tol: float, max_iter: int) -> None:
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    if int(max_iter) != max_iter or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter}")


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _dtype(dtype) -> torch.dtype:
    named = {"float32": torch.float32, "float64": torch.float64}
    if isinstance(dtype, str) and dtype in named:
        return named[dtype]
    if dtype in (torch.float32, torch.float64):
        return dtype
    raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")


# ----------------------------------------------------------------------------------------------------
# The problem in Gram form


@dataclass
class MaskGram:
    """What the Gram form needs of a set of masks, computed once and shared by every target (and every work unit
    of the datamodels stage): the uncentred products XᵀX (p, p), the column sums (p,) and the number of rows.

    For 0/1 masks XᵀX holds integer counts, exact in float32 below 2**24 rows whatever the order of summation, so
    sums over row blocks (or several sets of models) add up exactly. `xtx` may be any array that slices by rows
    (a zarr array): it is read one block of rows at a time.
    """

    xtx: object  # (p, p) array-like, float32 counts
    x_sum: np.ndarray  # (p,) float64
    n: int

    @classmethod
    def from_masks(cls, X, *, rows: slice = slice(None), device=None, row_chunk: int = 8192) -> MaskGram:
        """XᵀX[rows] (the Gram rows of the features in `rows`, against all features) and the column sums of X,
        in row chunks of X (float32 products: exact for masks)."""
        device = _device(device)
        X = np.asarray(X)
        cols = range(X.shape[1])[rows]
        xtx = torch.zeros(len(cols), X.shape[1], dtype=torch.float32, device=device)
        x_sum = torch.zeros(X.shape[1], dtype=torch.float64, device=device)
        for start in range(0, X.shape[0], row_chunk):
            chunk = torch.tensor(X[start:start + row_chunk], device=device).to(torch.float32)
            xtx.addmm_(chunk[:, rows].T, chunk)
            x_sum += chunk.sum(0, dtype=torch.float64)
        return cls(xtx.cpu().numpy(), x_sum.cpu().numpy(), X.shape[0])


def _check_gram(name: str, gram: MaskGram, X: np.ndarray) -> None:
    p = X.shape[1]
    if gram.n != X.shape[0] or tuple(gram.xtx.shape) != (p, p) or np.shape(gram.x_sum) != (p,):
        raise ValueError(f"{name} was computed on {gram.n} rows x {np.shape(gram.x_sum)} features, but X has shape "
                         f"{X.shape}: pass the MaskGram of these very masks")


class _Gram:
    """The masks' centred Gram matrix G = XcᵀXc/M, shared by every target.

    With the intercept unpenalised, centring X and y eliminates it exactly (b = ȳ − x̄ᵀw), and scikit-learn's
    objective becomes (1/2)·wᵀGw − cᵀw + (1/2)·‖yc‖²/M + λ‖w‖₁ with c = Xcᵀyc/M. After this one O(M·p²)
    product, a solver step costs products with G only, whatever the number of models M.
    """

    def __init__(self, X: np.ndarray, device: torch.device, dtype: torch.dtype, row_chunk: int = 8192,
                 sums: Sequence[MaskGram] = ()):
        self.X, self.row_chunk = X, row_chunk
        self.n, self.p = X.shape
        self.device, self.dtype = device, dtype
        if sums:  # precomputed XᵀX of X's row sets (e.g. fit + validation models): centre them block by block
            self.x_mean = torch.as_tensor(sum(np.asarray(s.x_sum, np.float64) for s in sums), device=device) / self.n
            G = torch.empty(self.p, self.p, dtype=dtype, device=device)
            rows = max(1, (1 << 24) // self.p)  # rows of XᵀX per step: 128 MB of float64 temporaries
            for start in range(0, self.p, rows):
                b = slice(start, min(start + rows, self.p))
                block = sum(torch.as_tensor(np.asarray(s.xtx[b], np.float64), device=device) for s in sums)
                # (XᵀX − n x̄x̄ᵀ)/n in float64: exact counts in, one rounding out
                G[b] = (block / self.n - self.x_mean[b, None] * self.x_mean[None, :]).to(dtype)
        else:
            self.x_mean = self._column_sums(X) / self.n  # float64: the intercept is computed from it
            G = torch.zeros(self.p, self.p, dtype=dtype, device=device)
            for Xc in self._centred_rows():  # row chunks: the centred masks never exist in full
                G.addmm_(Xc.T, Xc)
            G /= self.n
        self.G = G
        self.zero_columns = torch.diagonal(G) <= 0  # training points in every mask or in none: weight 0
        # Blocks of coordinates with their Gram block and step 1/L, L = the block Gram's largest eigenvalue
        # (the exact curvature bound of the block), in groups of GROUP_SIZE coordinates.
        blocks = []
        for start in range(0, self.p, BLOCK_SIZE):
            b = slice(start, min(start + BLOCK_SIZE, self.p))
            Gb = G[b, b].contiguous()
            blocks.append((b, Gb, 1.0 / max(float(torch.linalg.eigvalsh(Gb.double())[-1]), 1e-12)))
        per_group = max(1, GROUP_SIZE // BLOCK_SIZE)
        self.groups = [blocks[i:i + per_group] for i in range(0, len(blocks), per_group)]

    def _chunks(self, A: np.ndarray):
        for start in range(0, self.n, self.row_chunk):
            # a copy of the row chunk: inputs may be read-only (Ray's zero-copy arrays), which torch warns about
            yield torch.tensor(A[start:start + self.row_chunk], device=self.device)

    def _column_sums(self, A: np.ndarray) -> torch.Tensor:
        total = torch.zeros(A.shape[1], dtype=torch.float64, device=self.device)
        for chunk in self._chunks(A):
            total += chunk.to(torch.float64).sum(0)
        return total

    def _centred_rows(self):
        x_mean = self.x_mean.to(self.dtype)
        for chunk in self._chunks(self.X):
            yield chunk.to(self.dtype) - x_mean

    def targets(self, Y: np.ndarray):
        """c = XcᵀYc/M (p, t), the target means ȳ (t,) float64 and ‖Yc‖²/M (t,) float64."""
        y_mean = self._column_sums(Y) / self.n
        c = torch.zeros(self.p, Y.shape[1], dtype=self.dtype, device=self.device)
        yy = torch.zeros(Y.shape[1], dtype=torch.float64, device=self.device)
        for Xc, Yc in zip(self._centred_rows(), self._chunks(Y)):
            Yc = Yc.to(torch.float64) - y_mean
            yy += (Yc * Yc).sum(0)
            c.addmm_(Xc.T, Yc.to(self.dtype))
        return c / self.n, y_mean, yy / self.n

    def intercept(self, W: torch.Tensor, y_mean: torch.Tensor) -> torch.Tensor:
        """b = ȳ − x̄ᵀw per column (float64)."""
        return y_mean - self.x_mean @ W.to(torch.float64)


# ----------------------------------------------------------------------------------------------------
# Solver


def _primal_and_gap(W, g, c, yy, lam):
    """Primal objective and duality gap per column: scikit-learn's `enet_coordinate_descent_gram`, over M.

    g = c − Gw is the correlation of the residual with the centred masks (XcᵀR/M). The dual point is the
    residual rescaled to be feasible (scale = min(1, λ/‖g‖∞)); reductions run in float64.
    """
    f64 = torch.float64
    cw = (c * W).sum(0, dtype=f64)
    gw = (g * W).sum(0, dtype=f64)
    r2 = yy - cw - gw  # ‖R‖²/M, using wᵀGw = cᵀw − gᵀw
    ry = yy - cw  # Rᵀyc/M
    primal = 0.5 * r2 + lam * W.abs().sum(0, dtype=f64)
    scale = torch.clamp(lam / g.abs().amax(0).to(f64), max=1.0)
    dual = -0.5 * scale * scale * r2 + scale * ry
    return primal, primal - dual


def _sweep(gram: _Gram, W: torch.Tensor, g: torch.Tensor, lam: torch.Tensor) -> None:
    """One Gauss-Seidel sweep over the coordinate blocks, in place on W and g = c − GW.

    Each block takes INNER_STEPS proximal-gradient (soft-thresholding) steps on its own subproblem, the rest
    of w held fixed; g is then updated for the block's change, first only on the rows of its group of blocks
    (the next blocks need those), and once per group on all other rows by one (p × GROUP_SIZE) @ (GROUP_SIZE ×
    t) product, so that g is streamed through memory once per group rather than once per block. Over a sweep
    the products add up to one G @ W, the whole cost for large t.
    """
    G, p = gram.G, gram.p
    for group in gram.groups:
        s0, s1 = group[0][0].start, group[-1][0].stop
        g_group, W_before = g[s0:s1], W[s0:s1].clone()
        for b, Gb, step in group:
            W_b = W[b]
            Wb, gb = W_b.clone(), g[b].clone()
            thr = lam * step
            for k in range(INNER_STEPS):
                z = Wb.add(gb, alpha=step)
                W_new = z - torch.clamp(z, -thr, thr)  # soft-thresholding: the proximal map of λ‖·‖₁
                if k < INNER_STEPS - 1:
                    gb.addmm_(Gb, W_new - Wb, alpha=-1.0)
                Wb = W_new
            g_group.addmm_(G[s0:s1, b], Wb - W_b, alpha=-1.0)
            W_b.copy_(Wb)
        D = W[s0:s1] - W_before
        if s0 > 0:
            g[:s0].addmm_(G[:s0, s0:s1], D, alpha=-1.0)
        if s1 < p:
            g[s1:].addmm_(G[s1:, s0:s1], D, alpha=-1.0)


def _anderson(history, W, g, c, yy, lam) -> None:
    """Replace (W, g) in place, per column, by the Anderson extrapolation of the last sweeps where it lowers
    the objective (Bertrand & Massias 2021, Algorithm 1). g is affine in w, so the extrapolated g costs no
    product."""
    # Residuals of the fixed-point map "one sweep".
    U = [history[k + 1][0] - history[k][0] for k in range(len(history) - 1)]
    K = len(U)
    C = torch.empty(W.shape[1], K, K, dtype=torch.float64, device=W.device)
    for i in range(K):
        for j in range(i + 1):
            C[:, i, j] = C[:, j, i] = (U[i] * U[j]).sum(0, dtype=torch.float64)
    ridge = 1e-10 * torch.diagonal(C, dim1=1, dim2=2).sum(-1).clamp(min=1e-300)
    C = C + ridge[:, None, None] * torch.eye(K, dtype=C.dtype, device=C.device)
    z = torch.linalg.solve(C, torch.ones(C.shape[:2], dtype=C.dtype, device=C.device))
    a = torch.nan_to_num(z / z.sum(-1, keepdim=True), nan=0.0).to(W.dtype)  # NaN: a column that did not move
    W_e, g_e = history[1][0] * a[:, 0], history[1][1] * a[:, 0]
    for k in range(1, K):
        W_e.addcmul_(history[k + 1][0], a[:, k])
        g_e.addcmul_(history[k + 1][1], a[:, k])
    primal, _ = _primal_and_gap(W, g, c, yy, lam)
    primal_e, _ = _primal_and_gap(W_e, g_e, c, yy, lam)
    better = primal_e < primal
    W.copy_(torch.where(better, W_e, W))
    g.copy_(torch.where(better, g_e, g))


def _solve(gram: _Gram, c, yy, lam, W_init, tol: float, max_iter: int, g_init=None):
    """Minimise the LASSO objective of every column of c at its own λ (lam (t,) float64), from W_init.

    g_init = c − G·W_init when the caller has it (along a λ path it does not change with λ). Returns W (p, t),
    g = c − GW, the sweeps used per column and the final duality gaps. A column stops when its gap is at most
    tol·‖yc‖²/M, scikit-learn's criterion; stopped columns leave the batch, so late sweeps are cheap.
    """
    t, G = c.shape[1], gram.G
    out = W_init.clone()
    if bool(out[gram.zero_columns].any()):
        out[gram.zero_columns] = 0
        g_init = None
    out_g = c - G @ out if g_init is None else g_init.clone()
    sweeps = torch.zeros(t, dtype=torch.long, device=c.device)
    gaps = torch.full((t,), float("inf"), dtype=torch.float64, device=c.device)
    yy_all, thresh_all = yy, tol * yy
    cols = torch.arange(t, device=c.device)  # the columns still in the batch
    W, g, thresh, lam_w = out.clone(), out_g.clone(), thresh_all, lam.to(gram.dtype)
    # The running g accumulates rounding over the sweeps: in float32, confirm convergence on a fresh g.
    confirm = gram.dtype != torch.float64
    history = [(W.clone(), g.clone())] if ANDERSON_DEPTH else None
    for sweep in range(max_iter + 1):
        _, gap = _primal_and_gap(W, g, c, yy, lam)
        done = gap <= thresh
        if confirm and bool(done.any()):
            i = done.nonzero()[:, 0]
            W_i = W.index_select(1, i)
            g_i = c.index_select(1, i) - G @ W_i
            g.index_copy_(1, i, g_i)
            gap[i] = _primal_and_gap(W_i, g_i, c.index_select(1, i), yy[i], lam[i])[1]
            done = gap <= thresh
        if sweep == max_iter:
            done = torch.ones_like(done)
        if bool(done.any()):
            i, keep = done.nonzero()[:, 0], (~done).nonzero()[:, 0]
            out.index_copy_(1, cols[i], W.index_select(1, i))
            out_g.index_copy_(1, cols[i], g.index_select(1, i))
            gaps[cols[i]] = gap[i]
            if keep.numel() == 0:
                break
            W, g, c = W.index_select(1, keep), g.index_select(1, keep), c.index_select(1, keep)
            cols, yy, lam, lam_w, thresh = cols[keep], yy[keep], lam[keep], lam_w[keep], thresh[keep]
            if history is not None:
                history = [(h[0].index_select(1, keep), h[1].index_select(1, keep)) for h in history]
        _sweep(gram, W, g, lam_w)
        sweeps[cols] += 1
        if history is not None:
            history.append((W.clone(), g.clone()))
            if len(history) == ANDERSON_DEPTH + 1:
                _anderson(history, W, g, c, yy, lam)
                history = [(W.clone(), g.clone())]
    failed = int((gaps > thresh_all).sum())
    if failed:
        worst = float((gaps / yy_all.clamp(min=1e-300)).max())
        warnings.warn(f"LASSO: {failed} of {t} targets did not reach the duality gap tol·‖yc‖²/M (tol={tol}) "
                      f"in {max_iter} sweeps (largest gap / (‖yc‖²/M): {worst:.3g}); raise max_iter or tol",
                      RuntimeWarning, stacklevel=3)
    return out, out_g, sweeps, gaps


# ----------------------------------------------------------------------------------------------------
# Public API


def fit_lasso(X, Y, lam, *, coef_init=None, tol: float = 1e-4, max_iter: int = 1000, device=None,
              dtype="float64") -> tuple[np.ndarray, np.ndarray]:
    """Solve scikit-learn's `Lasso` for every column of Y at once.

    Per column j: minimise (1/2M)·‖Y[:, j] − X w − b‖² + lam[j]·‖w‖₁ over w (p,) and an unpenalised b.

    X: (M, p) masks (bool or 0/1) or any real features; Y: (M, t) outputs; lam: scalar or (t,), > 0.
    coef_init: (p, t) warm start. tol: stop a column when its duality gap is at most tol·‖yc‖²/M
    (scikit-learn's criterion and default). max_iter: sweeps over the coordinates. device: torch device (None:
    CUDA if present, else CPU). dtype: 'float64' (default, matches scikit-learn) or 'float32' (about 1.7x
    faster on a CPU). Returns coef (p, t) and intercept (t,) as numpy arrays of `dtype`.
    """
    X = _as_matrix("X (masks)", X)
    Y = _as_matrix("Y (outputs)", Y, rows=X.shape[0])
    lam = _check_lam(lam, Y.shape[1])
    _check_solver_args(tol, max_iter)
    device, dtype = _device(device), _dtype(dtype)
    gram = _Gram(X, device, dtype)
    c, y_mean, yy = gram.targets(Y)
    if coef_init is None:
        W0 = torch.zeros_like(c)
    else:
        coef_init = np.asarray(coef_init)
        if coef_init.shape != c.shape or not np.all(np.isfinite(coef_init)):
            raise ValueError(f"coef_init must be finite with shape {tuple(c.shape)} (features, targets), got "
                             f"shape {coef_init.shape}")
        W0 = torch.as_tensor(coef_init, device=device).to(dtype)
    lam_t = torch.as_tensor(lam, device=device)
    W, _, _, _ = _solve(gram, c, yy, lam_t, W0, tol, int(max_iter))
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    return W.cpu().numpy().astype(np_dtype), gram.intercept(W, y_mean).cpu().numpy().astype(np_dtype)


class LassoDatamodels:
    """Linear datamodels by LASSO with a regularisation path and λ chosen per target on held-out models.

    As MadryLab's `fast_l1` (docs/methods.md §1): for each target, λ runs from λ_max (the smallest λ with all
    weights zero, max|XcᵀYc|/M) down geometrically to λ_max·lambda_ratio over n_lambdas values, each solve
    warm-started from the last; λ is chosen by the MSE on the validation models; then the model is refit at
    the chosen λ on the fitting and validation models together (every subset model given to `fit` is used for
    the final weights). Weights are in units of the raw 0/1 masks: output change when a training point joins
    the subset.

    Early stopping, as fast_l1 (which stops a target once its validation MSE gets worse): a target leaves the
    path after `patience` consecutive λ values without a better validation MSE. The small-λ end of the path
    has the densest, slowest solves and is rarely chosen; with a validation curve that falls then rises, the
    choice is the same as over the whole path. patience=None runs the whole path.

    Fitted attributes: coef_ (p, t) datamodel weights, intercept_ (t,), lambda_ (t,) chosen λ, val_mse_ (t,)
    validation MSE at the chosen λ (of the model fit on X alone), path_lambdas_ (n_lambdas, t), path_val_mse_
    (n_lambdas, t; NaN where early stopping skipped the λ), lambda_index_ (t,) the chosen λ's index.
    """

    def __init__(self, n_lambdas: int = 12, lambda_ratio: float = 1e-3, patience: int | None = 3,
                 tol: float = 1e-4, max_iter: int = 1000, device=None, dtype="float64"):
        # number of λ values on the path
        self.n_lambdas = n_lambdas
        # smallest λ on the path as a fraction of λ_max
        self.lambda_ratio = lambda_ratio
        # stop a target's path after this many λ values without a better validation MSE (None: whole path)
        self.patience = patience
        # duality-gap tolerance relative to ‖yc‖²/M, scikit-learn's criterion
        self.tol = tol
        # most sweeps per λ
        self.max_iter = max_iter
        # torch device (None: CUDA if present, else CPU)
        self.device = device
        # 'float64' or 'float32' (faster, gap tolerance down to about 1e-6)
        self.dtype = dtype

    def fit(self, X, Y, X_val, Y_val, *, gram: MaskGram | None = None,
            gram_val: MaskGram | None = None) -> LassoDatamodels:
        """X (M, p) masks and Y (M, t) outputs to fit; X_val (M_val, p), Y_val (M_val, t) to choose λ.

        gram, gram_val: the `MaskGram` of X and of X_val when the caller has them (the datamodels stage computes
        them once for all its work units); otherwise they are computed here.
        """
        if int(self.n_lambdas) != self.n_lambdas or self.n_lambdas < 1:
            raise ValueError(f"n_lambdas must be a positive integer, got {self.n_lambdas}")
        if not 0 < self.lambda_ratio <= 1:
            raise ValueError(f"lambda_ratio must be in (0, 1], got {self.lambda_ratio}")
        if self.patience is not None and (int(self.patience) != self.patience or self.patience < 1):
            raise ValueError(f"patience must be a positive integer or None (whole path), got {self.patience}")
        _check_solver_args(self.tol, self.max_iter)
        X = _as_matrix("X (masks)", X)
        Y = _as_matrix("Y (outputs)", Y, rows=X.shape[0])
        if np.asarray(X_val).size == 0:
            raise ValueError("X_val is empty: choosing λ needs held-out subset models (X_val, Y_val)")
        X_val = _as_matrix("X_val (masks)", X_val, cols=X.shape[1])
        Y_val = _as_matrix("Y_val (outputs)", Y_val, rows=X_val.shape[0], cols=Y.shape[1])
        device, dtype = _device(self.device), _dtype(self.dtype)
        max_iter = int(self.max_iter)
        if (gram is None) != (gram_val is None):
            raise ValueError("pass both gram and gram_val (the MaskGrams of X and X_val), or neither")
        if gram is not None:
            _check_gram("gram", gram, X)
            _check_gram("gram_val", gram_val, X_val)
        shared = (gram, gram_val) if gram is not None else None

        gram = _Gram(X, device, dtype, sums=shared[:1] if shared else ())
        c, y_mean, yy = gram.targets(Y)
        lam_max = c.abs().amax(0).to(torch.float64)
        lam_max = torch.where(lam_max > 0, lam_max, 1.0)  # constant target: weights are 0 at any λ
        exponents = torch.linspace(0, 1, self.n_lambdas, dtype=torch.float64, device=device)
        path = lam_max[None, :] * self.lambda_ratio ** exponents[:, None]
        path[0] = lam_max  # exactly λ_max, not a rounded power

        Xv = torch.tensor(X_val, device=device).to(dtype)  # a copy: inputs may be read-only (Ray)
        Yv = torch.as_tensor(Y_val, device=device).to(torch.float64)
        t = Y.shape[1]
        W, g = torch.zeros_like(c), c.clone()
        best_W = torch.zeros_like(c)
        path_mse = torch.full((self.n_lambdas, t), float("nan"), dtype=torch.float64, device=device)
        best_mse = torch.full((t,), float("inf"), dtype=torch.float64, device=device)
        since_best = torch.zeros(t, dtype=torch.long, device=device)  # λ steps since the best validation MSE
        running = torch.arange(t, device=device)  # targets still on their path
        for k in range(self.n_lambdas):
            r = running
            W_r, g_r, _, _ = _solve(gram, c.index_select(1, r), yy[r], path[k, r], W.index_select(1, r),
                                    self.tol, max_iter, g.index_select(1, r))
            W.index_copy_(1, r, W_r)
            g.index_copy_(1, r, g_r)
            pred = (Xv @ W_r).to(torch.float64) + gram.intercept(W_r, y_mean[r])
            mse = ((Yv.index_select(1, r) - pred) ** 2).mean(0)
            path_mse[k, r] = mse
            better = mse < best_mse[r]  # strict: a tie keeps the larger λ, as np.argmin does
            best_mse[r] = torch.where(better, mse, best_mse[r])
            best_W.index_copy_(1, r, torch.where(better, W_r, best_W.index_select(1, r)))
            since_best[r] = torch.where(better, 0, since_best[r] + 1)
            if self.patience is not None:
                running = r[since_best[r] < self.patience]
                if running.numel() == 0:
                    break
        index = torch.nan_to_num(path_mse, nan=float("inf")).argmin(0)
        cols = torch.arange(t, device=device)
        lam = path[index, cols]

        del gram  # free the first Gram matrix before building the second
        gram_all = _Gram(np.concatenate([X, X_val]), device, dtype, sums=shared or ())
        c_all, y_mean_all, yy_all = gram_all.targets(np.concatenate([Y, Y_val]))
        W, _, _, _ = _solve(gram_all, c_all, yy_all, lam, best_W, self.tol, max_iter)

        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        self.coef_ = W.cpu().numpy().astype(np_dtype)
        self.intercept_ = gram_all.intercept(W, y_mean_all).cpu().numpy().astype(np_dtype)
        self.lambda_ = lam.cpu().numpy()
        self.lambda_index_ = index.cpu().numpy()
        self.val_mse_ = path_mse[index, cols].cpu().numpy()
        self.path_lambdas_ = path.cpu().numpy()
        self.path_val_mse_ = path_mse.cpu().numpy()
        return self
