"""Batched LASSO: linear datamodels for many targets at once (docs/methods.md §1), solved on the masks themselves
(masks form) or on their N x N Gram (Gram form), whichever `choose_form` picks from the shapes, by one solver.

Data flow: subset masks (M, N) and the outputs of the subset models (M, T) from subsets.zarr ->
`LassoDatamodels` -> datamodel weights (N, T), bias and lambda per target, which the datamodels stage writes
to datamodels/lasso.zarr.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger("dmu")

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
# Sum of |coefficients| of an extrapolation above which, in float32, its state is recomputed rather than combined.
ANDERSON_FRESH = 10.0


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


def _parts_chunks(parts: Sequence[np.ndarray], rows: int, device: torch.device):
    """Row chunks of the row-wise concatenation of `parts`, as torch tensors (copies: inputs may be read-only,
    e.g. Ray's zero-copy arrays, which torch warns about); chunks do not straddle two parts."""
    for A in parts:
        for start in range(0, A.shape[0], rows):
            yield torch.tensor(A[start:start + rows], device=device)


def _chunk_rows(p: int) -> int:
    """Rows per chunk of an (M, p) array: 2**22 entries, 16 MB as float32, whatever p."""
    return max(1, (1 << 22) // p)


def _block_steps(W_b: torch.Tensor, g_b: torch.Tensor, G_b: torch.Tensor, step: float, lam: torch.Tensor):
    """INNER_STEPS proximal-gradient (soft-thresholding) steps on one block of coordinates, the others held fixed:
    g_b = the block's rows of XcᵀR/M, G_b its (k, k) block Gram. Returns the new weights of the block; g_b is
    used as scratch."""
    thr = lam * step
    for k in range(INNER_STEPS):
        z = W_b.add(g_b, alpha=step)
        W_new = z - torch.clamp(z, -thr, thr)  # soft-thresholding: the proximal map of λ‖·‖₁
        if k < INNER_STEPS - 1:
            g_b.addmm_(G_b, W_new - W_b, alpha=-1.0)
        W_b = W_new
    return W_b


def _step(G_b: torch.Tensor) -> float:
    """1/L for a block, L = its Gram's largest eigenvalue: the exact curvature bound of the block."""
    return 1.0 / max(float(torch.linalg.eigvalsh(G_b.double())[-1]), 1e-12)


class _Gram:
    """The problem in Gram form: the masks' centred Gram matrix G = XcᵀXc/M (p, p), shared by every target.

    With the intercept unpenalised, centring X and y eliminates it exactly (b = ȳ − x̄ᵀw), and scikit-learn's
    objective becomes (1/2)·wᵀGw − cᵀw + (1/2)·‖yc‖²/M + λ‖w‖₁ with c = Xcᵀyc/M. After this one O(M·p²)
    product, a sweep costs one product with G (p²·t), whatever the number of models M. The solver's state per
    target is the gradient g = c − Gw (p, t). Memory: 4·p² bytes (float32) for G, whatever the inputs.
    """

    form = "gram"
    check_every = 1  # sweeps between duality-gap checks: the gap costs no product here

    def __init__(self, parts: Sequence[np.ndarray], device: torch.device, dtype: torch.dtype,
                 sums: Sequence[MaskGram] = ()):
        self.parts = parts
        self.n, self.p = sum(A.shape[0] for A in parts), parts[0].shape[1]
        self.device, self.dtype = device, dtype
        self.row_chunk = _chunk_rows(self.p)
        G = torch.zeros(self.p, self.p, dtype=dtype, device=device)  # the only p x p array
        if sums:  # precomputed XᵀX of the parts' rows, read by whole chunks of rows (a zarr array's own chunks)
            self.x_mean = torch.as_tensor(sum(np.asarray(s.x_sum, np.float64) for s in sums), device=device) / self.n
            for s in sums:  # exact integer counts, also in float32 (below 2**24 rows)
                rows = getattr(s.xtx, "chunks", (self.row_chunk,))[0]
                for start in range(0, self.p, rows):
                    G[start:start + rows] += torch.tensor(np.asarray(s.xtx[start:start + rows]), device=device)
            for start in range(0, self.p, self.row_chunk):  # (XᵀX − n x̄x̄ᵀ)/n in float64, one rounding out
                b = slice(start, min(start + self.row_chunk, self.p))
                G[b] = G[b].to(torch.float64).div_(self.n).addr_(self.x_mean[b], self.x_mean, alpha=-1.0)
        else:
            self.x_mean = self._column_sums(parts) / self.n  # float64: the intercept is computed from it
            for Xc in self._centred_rows():  # row chunks: the centred masks never exist in full
                G.addmm_(Xc.T, Xc)
            G /= self.n
        self.G = G
        self.zero_columns = torch.diagonal(G) <= 0  # training points in every mask or in none: weight 0
        # Blocks of coordinates with their Gram block and step, in groups of GROUP_SIZE coordinates.
        blocks = []
        for start in range(0, self.p, BLOCK_SIZE):
            b = slice(start, min(start + BLOCK_SIZE, self.p))
            Gb = G[b, b].contiguous()
            blocks.append((b, Gb, _step(Gb)))
        per_group = max(1, GROUP_SIZE // BLOCK_SIZE)
        self.groups = [blocks[i:i + per_group] for i in range(0, len(blocks), per_group)]

    def _column_sums(self, parts: Sequence[np.ndarray]) -> torch.Tensor:
        total = torch.zeros(parts[0].shape[1], dtype=torch.float64, device=self.device)
        for chunk in _parts_chunks(parts, self.row_chunk, self.device):
            total += chunk.sum(0, dtype=torch.float64)
        return total

    def _centred_rows(self):
        x_mean = self.x_mean.to(self.dtype)
        for chunk in _parts_chunks(self.parts, self.row_chunk, self.device):
            yield chunk.to(self.dtype).sub_(x_mean)

    def targets(self, Y: Sequence[np.ndarray]):
        """The targets' data c = XcᵀYc/M (p, t), their means ȳ (t,) float64 and ‖Yc‖²/M (t,) float64; Y: one
        (m, t) array per part of the masks."""
        y_mean = self._column_sums(Y) / self.n
        c = torch.zeros(self.p, Y[0].shape[1], dtype=self.dtype, device=self.device)
        yy = torch.zeros(Y[0].shape[1], dtype=torch.float64, device=self.device)
        for Xc, Yc in zip(self._centred_rows(), _parts_chunks(Y, self.row_chunk, self.device)):
            Yc = Yc.to(torch.float64) - y_mean
            yy += (Yc * Yc).sum(0)
            c.addmm_(Xc.T, Yc.to(self.dtype))
        return c / self.n, y_mean, yy / self.n

    def intercept(self, W: torch.Tensor, y_mean: torch.Tensor) -> torch.Tensor:
        """b = ȳ − x̄ᵀw per column (float64)."""
        return y_mean - self.x_mean @ W.to(torch.float64)

    def state(self, c: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """g = c − GW (p, t)."""
        return c.clone() if not bool(W.any()) else c - self.G @ W

    def gradient(self, g: torch.Tensor) -> torch.Tensor:
        """XcᵀR/M (p, t) of a state: here the state itself."""
        return g

    def objective(self, W, g, c, yy, lam, *, gap: bool = True):
        """Primal objective and (gap=True) duality gap per column: scikit-learn's
        `enet_coordinate_descent_gram`, over M. The dual point is the residual rescaled to be feasible
        (scale = min(1, λ/‖g‖∞)); reductions run in float64."""
        f64 = torch.float64
        cw = (c * W).sum(0, dtype=f64)
        r2 = yy - cw - (g * W).sum(0, dtype=f64)  # ‖R‖²/M, using wᵀGw = cᵀw − gᵀw
        return _primal_and_gap(W, g, r2, yy - cw, lam, gap)  # Rᵀyc/M = ‖yc‖²/M − cᵀw

    def sweep(self, W: torch.Tensor, g: torch.Tensor, lam: torch.Tensor) -> None:
        """One Gauss-Seidel sweep over the coordinate blocks, in place on W and g = c − GW.

        Each block takes INNER_STEPS proximal-gradient steps on its own subproblem; g is then updated for the
        block's change, first only on the rows of its group of blocks (the next blocks need those), and once per
        group on all other rows by one (p × GROUP_SIZE) @ (GROUP_SIZE × t) product, so that g is streamed through
        memory once per group rather than once per block. Over a sweep the products add up to one G @ W, the
        whole cost for large t.
        """
        G, p = self.G, self.p
        for group in self.groups:
            s0, s1 = group[0][0].start, group[-1][0].stop
            g_group, W_before = g[s0:s1], W[s0:s1].clone()
            for b, Gb, step in group:
                W_b = W[b]
                Wb = _block_steps(W_b.clone(), g[b].clone(), Gb, step, lam)
                g_group.addmm_(G[s0:s1, b], Wb - W_b, alpha=-1.0)
                W_b.copy_(Wb)
            D = W[s0:s1] - W_before
            if s0 > 0:
                g[:s0].addmm_(G[:s0, s0:s1], D, alpha=-1.0)
            if s1 < p:
                g[s1:].addmm_(G[s1:, s0:s1], D, alpha=-1.0)


class _Masks:
    """The problem in masks form: the masks themselves, transposed (p, M) and kept as uint8 (bool masks) or in
    the solver's dtype (real features), never an p x p array.

    The solver's state per target is the residual R = yc − Xc·w (M, t), which stays centred. A sweep walks the
    blocks of BLOCK_SIZE coordinates: the block's masks are converted and centred (Xb, (k, M)), its gradient is
    g_b = Xb·R/M (k, t), INNER_STEPS proximal-gradient steps use the block's own Gram Xb·Xbᵀ/M (k, k, computed
    once), and R −= Xbᵀ·ΔW_b: 2·M·p·t multiply-adds per sweep against the Gram form's p²·t, and M·p bytes of
    masks against 4·p². The duality gap needs the whole gradient XcᵀR/M (one more pass over the masks), so it
    is checked every `check_every` sweeps.
    """

    form = "masks"
    check_every = 2  # sweeps between duality-gap checks: a check costs half a sweep

    def __init__(self, Xt: torch.Tensor, dtype: torch.dtype):
        self.Xt = Xt  # (p, M) uint8 or float
        self.p, self.n = Xt.shape
        self.device, self.dtype = Xt.device, dtype
        self.x_mean = torch.zeros(self.p, dtype=torch.float64, device=self.device)
        for start in range(0, self.p, BLOCK_SIZE):
            self.x_mean[start:start + BLOCK_SIZE] = Xt[start:start + BLOCK_SIZE].sum(1, dtype=torch.float64)
        self.x_mean /= self.n
        self._x_mean = self.x_mean.to(dtype)
        self.blocks, diagonal = [], []
        for start in range(0, self.p, BLOCK_SIZE):
            b = slice(start, min(start + BLOCK_SIZE, self.p))
            Xb = self.block(b)
            Gb = Xb @ Xb.T / self.n
            diagonal.append(torch.diagonal(Gb))
            self.blocks.append((b, Gb, _step(Gb)))
        self.zero_columns = torch.cat(diagonal) <= 0  # training points in every mask or in none: weight 0

    @staticmethod
    def transpose(parts: Sequence[np.ndarray], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The row-wise concatenation of `parts`, transposed (p, M), as uint8 for bool masks (never a float copy
        of the masks) or `dtype` for real features; filled by blocks of columns."""
        p, n = parts[0].shape[1], sum(A.shape[0] for A in parts)
        store = torch.uint8 if all(A.dtype == bool for A in parts) else dtype
        Xt = torch.empty(p, n, dtype=store, device=device)
        cols = max(1, (1 << 24) // max(n, 1))
        for start in range(0, p, cols):
            row = 0
            for A in parts:
                block = np.ascontiguousarray(A[:, start:start + cols].T)
                Xt[start:start + cols, row:row + A.shape[0]] = torch.from_numpy(block).to(store)
                row += A.shape[0]
        return Xt

    def block(self, b: slice) -> torch.Tensor:
        """The centred masks of the coordinates in b, (k, M) in the solver's dtype."""
        return self.Xt[b].to(self.dtype).sub_(self._x_mean[b, None])

    def targets(self, Y: Sequence[np.ndarray]):
        """The targets' data Yc (M, t) in the solver's dtype, their means ȳ (t,) float64 and ‖Yc‖²/M (t,)
        float64; Y: one (m, t) array per part of the masks, in the same order."""
        Y = torch.cat([torch.tensor(A, device=self.device).to(torch.float64) for A in Y])
        y_mean = Y.mean(0)
        Y -= y_mean
        return Y.to(self.dtype), y_mean, (Y * Y).sum(0) / self.n

    def intercept(self, W: torch.Tensor, y_mean: torch.Tensor) -> torch.Tensor:
        """b = ȳ − x̄ᵀw per column (float64)."""
        return y_mean - self.x_mean @ W.to(torch.float64)

    def state(self, Yc: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """R = Yc − Xc·W (M, t)."""
        R = Yc.clone()
        for b, _, _ in self.blocks:
            if bool(W[b].any()):
                R.addmm_(self.block(b).T, W[b], alpha=-1.0)
        return R

    def gradient(self, R: torch.Tensor) -> torch.Tensor:
        """XcᵀR/M (p, t): one pass over the masks."""
        g = torch.empty(self.p, R.shape[1], dtype=self.dtype, device=self.device)
        for b, _, _ in self.blocks:
            torch.mm(self.block(b), R, out=g[b])
        return g.div_(self.n)

    def objective(self, W, R, Yc, yy, lam, *, gap: bool = True):
        """Primal objective and (gap=True) duality gap per column, as the Gram form's."""
        f64 = torch.float64
        r2 = (R * R).sum(0, dtype=f64) / self.n
        ry = (R * Yc).sum(0, dtype=f64) / self.n
        return _primal_and_gap(W, self.gradient(R) if gap else None, r2, ry, lam, gap)

    def sweep(self, W: torch.Tensor, R: torch.Tensor, lam: torch.Tensor) -> None:
        """One Gauss-Seidel sweep over the coordinate blocks, in place on W and R = Yc − Xc·W."""
        for b, Gb, step in self.blocks:
            Xb = self.block(b)
            W_b = W[b]
            g_b = torch.mm(Xb, R).div_(self.n)
            Wb = _block_steps(W_b.clone(), g_b, Gb, step, lam)
            D = Wb - W_b
            if bool(D.any()):  # most blocks of a sparse solution stay at zero: no update of R
                R.addmm_(Xb.T, D, alpha=-1.0)
                W_b.copy_(Wb)


FORMS = ("auto", "gram", "masks")
# The Gram form is refused above this size of its p x p float32 matrix, whatever the sweep costs.
GRAM_MAX_BYTES = 8 << 30


def choose_form(n_models: int, n_features: int, form: str = "auto") -> tuple[str, str]:
    """The form of the problem for M = n_models rows (every model of the final fit) and p = n_features, and the
    reason. 'masks' when a masks-form sweep costs less (2·M·p multiply-adds per target against p², i.e.
    M < p/2) or when the Gram matrix would exceed GRAM_MAX_BYTES; else 'gram'. By shapes only, so that every
    work unit of a stage makes the same choice."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    if form != "auto":
        return form, "asked for"
    if 2 * n_models < n_features:
        return "masks", f"2·M = {2 * n_models:,} < N = {n_features:,}: a sweep over the masks costs less"
    if 4 * n_features ** 2 > GRAM_MAX_BYTES:
        return "masks", f"the N x N Gram ({4 * n_features ** 2 / 2**30:.1f} GiB) exceeds {GRAM_MAX_BYTES >> 30} GiB"
    return "gram", f"2·M = {2 * n_models:,} >= N = {n_features:,}: a sweep over the Gram costs less"


# ----------------------------------------------------------------------------------------------------
# Solver, over either form


def _primal_and_gap(W, g, r2, ry, lam, gap: bool = True):
    """Primal objective and duality gap per column, as scikit-learn's `enet_coordinate_descent_gram` over M:
    r2 = ‖R‖²/M, ry = Rᵀyc/M, g = XcᵀR/M. The dual point is the residual rescaled to be feasible (scale =
    min(1, λ/‖g‖∞)); reductions run in float64. gap=False: the primal only (g unused)."""
    primal = 0.5 * r2 + lam * W.abs().sum(0, dtype=torch.float64)
    if not gap:
        return primal, None
    scale = torch.clamp(lam / g.abs().amax(0).to(torch.float64), max=1.0)
    dual = -0.5 * scale * scale * r2 + scale * ry
    return primal, primal - dual


def _anderson(form, steps, W, S, c, yy, lam) -> None:
    """Replace (W, S) in place, per column, by the Anderson extrapolation of the last sweeps where it lowers
    the objective (Bertrand & Massias 2021, Algorithm 1). steps: the changes (ΔW, ΔS) of the last sweeps, oldest
    first, the last ending at (W, S); only the changes are kept, so the iterates cost no extra copies. The state
    S (g or R) is affine in w, so the extrapolated state costs no product."""
    U = [d[0] for d in steps]  # residuals of the fixed-point map "one sweep"
    K = len(U)
    C = torch.empty(W.shape[1], K, K, dtype=torch.float64, device=W.device)
    for i in range(K):
        for j in range(i + 1):
            C[:, i, j] = C[:, j, i] = (U[i] * U[j]).sum(0, dtype=torch.float64)
    ridge = 1e-10 * torch.diagonal(C, dim1=1, dim2=2).sum(-1).clamp(min=1e-300)
    C = C + ridge[:, None, None] * torch.eye(K, dtype=C.dtype, device=C.device)
    z = torch.linalg.solve(C, torch.ones(C.shape[:2], dtype=C.dtype, device=C.device))
    a = torch.nan_to_num(z / z.sum(-1, keepdim=True), nan=0.0).to(W.dtype)  # NaN: a column that did not move
    # Σ_k a_k·iterate_k with iterate_k = W − Σ_{i>k} ΔW_i and Σ_k a_k = 1: W − Σ_i (Σ_{k<i} a_k)·ΔW_i
    below = torch.cumsum(a, dim=-1)
    W_e, S_e = W.clone(), S.clone()
    for i in range(1, K):
        W_e.addcmul_(steps[i][0], below[:, i - 1], value=-1.0)
        S_e.addcmul_(steps[i][1], below[:, i - 1], value=-1.0)
    # Coefficients of large magnitude amplify the rounding of the iterates' states (float32: drift of the state
    # away from its W, which stalls the duality gap): there the extrapolated state is recomputed from W_e.
    fresh = ((a.abs().sum(-1) > ANDERSON_FRESH) & (W.dtype != torch.float64)).nonzero()[:, 0]
    if fresh.numel():
        S_e.index_copy_(1, fresh, form.state(c.index_select(1, fresh), W_e.index_select(1, fresh)))
    primal, _ = form.objective(W, S, c, yy, lam, gap=False)
    primal_e, _ = form.objective(W_e, S_e, c, yy, lam, gap=False)
    better = primal_e < primal
    W.copy_(torch.where(better, W_e, W))
    S.copy_(torch.where(better, S_e, S))


def _solve(form, c, yy, lam, W_init, tol: float, max_iter: int, S_init=None):
    """Minimise the LASSO objective of every target (column of c) at its own λ (lam (t,) float64), from W_init.

    form: `_Gram` or `_Masks`; c, yy: its `targets()`. S_init = form.state(c, W_init) when the caller has it
    (along a λ path it does not change with λ). Returns W (p, t), the state S, the sweeps used per column and the
    final duality gaps. A column stops when its gap is at most tol·‖yc‖²/M, scikit-learn's criterion; stopped
    columns leave the batch, so late sweeps are cheap.
    """
    t = c.shape[1]
    out = W_init.clone()
    if bool(out[form.zero_columns].any()):
        out[form.zero_columns] = 0
        S_init = None
    constant = yy <= 0  # a constant target: w = 0 at any λ, where its gap is exactly 0
    if bool(out[:, constant].any()):
        out[:, constant] = 0
        S_init = None
    out_S = form.state(c, out) if S_init is None else S_init.clone()
    sweeps = torch.zeros(t, dtype=torch.long, device=c.device)
    gaps = torch.full((t,), float("inf"), dtype=torch.float64, device=c.device)
    yy_all, thresh_all = yy, tol * yy
    cols = torch.arange(t, device=c.device)  # the columns still in the batch
    W, S, thresh, lam_w = out.clone(), out_S.clone(), thresh_all, lam.to(form.dtype)
    # The running state accumulates rounding over the sweeps: in float32, confirm convergence on a fresh one.
    confirm = form.dtype != torch.float64
    steps = [] if ANDERSON_DEPTH else None  # (ΔW, ΔS) of the sweeps since the last extrapolation
    for sweep in range(max_iter + 1):
        if sweep % form.check_every == 0 or sweep == max_iter:
            _, gap = form.objective(W, S, c, yy, lam)
            done = gap <= thresh
            if confirm and bool(done.any()):
                i = done.nonzero()[:, 0]
                W_i, c_i = W.index_select(1, i), c.index_select(1, i)
                S_i = form.state(c_i, W_i)
                S.index_copy_(1, i, S_i)
                gap[i] = form.objective(W_i, S_i, c_i, yy[i], lam[i])[1]
                done = gap <= thresh
            if sweep == max_iter:
                done = torch.ones_like(done)
            if bool(done.any()):
                i, keep = done.nonzero()[:, 0], (~done).nonzero()[:, 0]
                out.index_copy_(1, cols[i], W.index_select(1, i))
                out_S.index_copy_(1, cols[i], S.index_select(1, i))
                gaps[cols[i]] = gap[i]
                if keep.numel() == 0:
                    break
                W, S, c = W.index_select(1, keep), S.index_select(1, keep), c.index_select(1, keep)
                cols, yy, lam, lam_w, thresh = cols[keep], yy[keep], lam[keep], lam_w[keep], thresh[keep]
                if steps is not None:
                    steps = [(d[0].index_select(1, keep), d[1].index_select(1, keep)) for d in steps]
        before = (W.clone(), S.clone()) if steps is not None else None
        form.sweep(W, S, lam_w)
        sweeps[cols] += 1
        if steps is not None:
            steps.append((before[0].sub_(W).neg_(), before[1].sub_(S).neg_()))  # in place: W − W_before
            if len(steps) == ANDERSON_DEPTH:
                _anderson(form, steps, W, S, c, yy, lam)
                steps = []
    failed = int((gaps > thresh_all).sum())
    if failed:
        worst = float((gaps / yy_all.clamp(min=1e-300)).max())
        warnings.warn(f"LASSO: {failed} of {t} targets did not reach the duality gap tol·‖yc‖²/M (tol={tol}) "
                      f"in {max_iter} sweeps (largest gap / (‖yc‖²/M): {worst:.3g}); raise max_iter or tol",
                      RuntimeWarning, stacklevel=3)
    return out, out_S, sweeps, gaps


# ----------------------------------------------------------------------------------------------------
# Public API


def _build_form(name: str, parts: Sequence[np.ndarray], device: torch.device, dtype: torch.dtype,
                sums: Sequence[MaskGram] = ()):
    if name == "masks":
        return _Masks(_Masks.transpose(parts, device, dtype), dtype)
    return _Gram(parts, device, dtype, sums=sums)


def _predict(Xv: torch.Tensor, W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Xv·W (m, t) float64, by row chunks of Xv (bool masks or features) converted to `dtype`."""
    out = torch.empty(Xv.shape[0], W.shape[1], dtype=torch.float64, device=W.device)
    rows = _chunk_rows(Xv.shape[1])
    for start in range(0, Xv.shape[0], rows):
        out[start:start + rows] = Xv[start:start + rows].to(dtype) @ W
    return out


def fit_lasso(X, Y, lam, *, coef_init=None, tol: float = 1e-4, max_iter: int = 1000, device=None,
              dtype="float64", form: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Solve scikit-learn's `Lasso` for every column of Y at once.

    Per column j: minimise (1/2M)·‖Y[:, j] − X w − b‖² + lam[j]·‖w‖₁ over w (p,) and an unpenalised b.

    X: (M, p) masks (bool or 0/1) or any real features; Y: (M, t) outputs; lam: scalar or (t,), > 0.
    coef_init: (p, t) warm start. tol: stop a column when its duality gap is at most tol·‖yc‖²/M
    (scikit-learn's criterion and default). max_iter: sweeps over the coordinates. device: torch device (None:
    CUDA if present, else CPU). dtype: 'float64' (default, matches scikit-learn) or 'float32' (about 1.7x
    faster on a CPU). form: 'gram', 'masks' or 'auto' (`choose_form` by the shapes). Returns coef (p, t) and
    intercept (t,) as numpy arrays of `dtype`.
    """
    X = _as_matrix("X (masks)", X)
    Y = _as_matrix("Y (outputs)", Y, rows=X.shape[0])
    lam = _check_lam(lam, Y.shape[1])
    _check_solver_args(tol, max_iter)
    device, dtype = _device(device), _dtype(dtype)
    name, reason = choose_form(*X.shape, form)
    log.info("LASSO: %s form (%s)", name, reason)
    problem = _build_form(name, [X], device, dtype)
    c, y_mean, yy = problem.targets([Y])
    shape = (X.shape[1], Y.shape[1])
    if coef_init is None:
        W0 = torch.zeros(shape, dtype=dtype, device=device)
    else:
        coef_init = np.asarray(coef_init)
        if coef_init.shape != shape or not np.all(np.isfinite(coef_init)):
            raise ValueError(f"coef_init must be finite with shape {shape} (features, targets), got "
                             f"shape {coef_init.shape}")
        W0 = torch.as_tensor(coef_init, device=device).to(dtype)
    lam_t = torch.as_tensor(lam, device=device)
    W, _, _, _ = _solve(problem, c, yy, lam_t, W0, tol, int(max_iter))
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    return W.cpu().numpy().astype(np_dtype), problem.intercept(W, y_mean).cpu().numpy().astype(np_dtype)


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

    The problem is solved in Gram form (an N x N matrix, sweeps of N²·t) or in masks form (the masks as uint8,
    sweeps of 2·M·N·t), chosen by `choose_form` from the shapes (form='auto') or named; one code path
    (`_solve`) serves both.

    Fitted attributes: coef_ (p, t) datamodel weights, intercept_ (t,), lambda_ (t,) chosen λ, val_mse_ (t,)
    validation MSE at the chosen λ (of the model fit on X alone), path_lambdas_ (n_lambdas, t), path_val_mse_
    (n_lambdas, t; NaN where early stopping skipped the λ), lambda_index_ (t,) the chosen λ's index, form_
    ('gram' or 'masks').
    """

    def __init__(self, n_lambdas: int = 12, lambda_ratio: float = 1e-3, patience: int | None = 3,
                 tol: float = 1e-4, max_iter: int = 1000, device=None, dtype="float64", form: str = "auto"):
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
        # 'auto' (choose_form by the shapes), 'gram' or 'masks'
        self.form = form

    def fit(self, X, Y, X_val, Y_val, *, gram: MaskGram | None = None,
            gram_val: MaskGram | None = None) -> LassoDatamodels:
        """X (M, p) masks and Y (M, t) outputs to fit; X_val (M_val, p), Y_val (M_val, t) to choose λ.

        gram, gram_val: the `MaskGram` of X and of X_val when the caller has them (the datamodels stage computes
        them once for all its work units when its shapes choose the Gram form); they imply the Gram form.
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
            if self.form == "masks":
                raise ValueError("gram and gram_val serve the Gram form: drop them or use form='gram' or 'auto'")
            name, reason = choose_form(len(X) + len(X_val), X.shape[1], "gram")[0], "MaskGrams given"
        else:
            name, reason = choose_form(len(X) + len(X_val), X.shape[1], self.form)
        log.info("LASSO datamodels: %s form (%s)", name, reason)
        shared = (gram, gram_val) if gram is not None else ()

        # masks form: the fit and validation masks transposed once; the path's problem is a view of its columns
        Xt = _Masks.transpose([X, X_val], device, dtype) if name == "masks" else None
        problem = _Masks(Xt[:, :len(X)], dtype) if Xt is not None else _Gram([X], device, dtype, sums=shared[:1])
        c, y_mean, yy = problem.targets([Y])
        t, p = Y.shape[1], X.shape[1]
        W = torch.zeros(p, t, dtype=dtype, device=device)
        S = problem.state(c, W)
        lam_max = problem.gradient(S).abs().amax(0).to(torch.float64)
        lam_max = torch.where(lam_max > 0, lam_max, 1.0)  # constant target: weights are 0 at any λ
        exponents = torch.linspace(0, 1, self.n_lambdas, dtype=torch.float64, device=device)
        path = lam_max[None, :] * self.lambda_ratio ** exponents[:, None]
        path[0] = lam_max  # exactly λ_max, not a rounded power

        Xv = torch.tensor(X_val, device=device)  # a copy: inputs may be read-only (Ray)
        Yv = torch.as_tensor(Y_val, device=device).to(torch.float64)
        best_W = torch.zeros_like(W)
        path_mse = torch.full((self.n_lambdas, t), float("nan"), dtype=torch.float64, device=device)
        best_mse = torch.full((t,), float("inf"), dtype=torch.float64, device=device)
        since_best = torch.zeros(t, dtype=torch.long, device=device)  # λ steps since the best validation MSE
        running = torch.arange(t, device=device)  # targets still on their path
        for k in range(self.n_lambdas):
            r = running
            W_r, S_r, _, _ = _solve(problem, c.index_select(1, r), yy[r], path[k, r], W.index_select(1, r),
                                    self.tol, max_iter, S.index_select(1, r))
            W.index_copy_(1, r, W_r)
            S.index_copy_(1, r, S_r)
            pred = _predict(Xv, W_r, dtype) + problem.intercept(W_r, y_mean[r])
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

        del problem, c, S, W, W_r, S_r, Xv  # the path's problem and state go before the refit's are built
        problem = _Masks(Xt, dtype) if Xt is not None else _Gram([X, X_val], device, dtype, sums=shared)
        c_all, y_mean_all, yy_all = problem.targets([Y, Y_val])
        W, _, _, _ = _solve(problem, c_all, yy_all, lam, best_W, self.tol, max_iter)

        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        self.form_ = name
        self.coef_ = W.cpu().numpy().astype(np_dtype)
        self.intercept_ = problem.intercept(W, y_mean_all).cpu().numpy().astype(np_dtype)
        self.lambda_ = lam.cpu().numpy()
        self.lambda_index_ = index.cpu().numpy()
        self.val_mse_ = path_mse[index, cols].cpu().numpy()
        self.path_lambdas_ = path.cpu().numpy()
        self.path_val_mse_ = path_mse.cpu().numpy()
        return self
