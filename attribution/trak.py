"""TRAK datamodel scores (Park et al. 2023) through the `traker` package, for any classifier; and calibration.

Data flow: subset-model checkpoints + train/target tensors -> `trak_scores` (N, T[, C]), arbitrary scale ->
`calibrate` against held-out subset models (masks, outputs) -> weights in the units of LASSO datamodel
weights, stored like them in `datamodels/trak.zarr` (`weights` (N, T, C), `bias` (T, C)).
In bounded memory, chunk by chunk of targets: `TrakScorer` featurizes the train set once and scores one chunk
at a time; `calibration_sums` per chunk, `calibrate_from_sums` on all chunks' sums gives the one global scale,
then weights = scale * scores per chunk (pipelines/stages/trak.py).

Output functions (which gradients TRAK uses; docs/methods.md §2):
- Train side (featurizing) always uses the margin m = z_y - logsumexp_{k!=y} z_k with the out-to-loss term
  Q = 1 - p_y. Why: TRAK (paper §3) linearises the *training problem*: dropping train example i moves the
  parameters by (Phi^T Phi)^-1 phi_i Q_i, phi_i = grad f(z_i), Q_i = dLoss/df(z_i). That describes the
  training loss only when Loss_i is a function of f(z_i) alone. Cross-entropy is exactly log(1 + exp(-m)), so
  grad CE_i = -(1 - p_y) grad m_i: margin features with Q = 1 - p_y are the exact train-side pair. One logit
  is not (grad CE_i = sum_c (p_c - y_c) grad z_c involves every logit): "logit c on the train side" with
  Q = p_c - y_c would describe a different training problem.
- Target side (scoring) uses the output we want datamodels for: the margin ("margin") or each logit z_c
  ("logits"). The effect of train example i on target output g is grad g(x_j)^T (Phi^T Phi)^-1 phi_i Q_i,
  linear in grad g, so all C logits share one featurization; only the T*C target gradients are per class.
  Cost is proportional to K * (N + T*C) per-example gradients against K * (N + T) for the margin.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from trak import TRAKer
from trak.modelout_functions import AbstractModelOutput
from trak.projectors import AbstractProjector, BasicProjector, CudaProjector, ProjectionType

__all__ = ["TrainMarginOutput", "default_projector", "TrakScorer", "trak_scores", "calibrate",
           "calibration_sums", "calibrate_from_sums", "CALIBRATION_SUMS"]

# Marker in the per-row `which` tensor: -1 = the margin of the row's label; c >= 0 = the logit of class c.
_MARGIN = -1
# fast_jl projects only to multiples of 512 dimensions (its README as copied into TRAIS-Lab/dattri; unverified
# here: no GPU). Other proj_dim values fall back to BasicProjector, slower but correct.
_FAST_JL_DIM_MULTIPLE = 512
# Automatic batch size: one batch's per-example gradients take at most this many bytes, and this many rows.
_AUTO_BATCH_BYTES = 1 << 30
_MAX_AUTO_BATCH = 1024


class TrainMarginOutput(AbstractModelOutput):
    """TRAK output function: the margin on the train side; the margin or one logit per row on the target side.

    A batch is (x, y, which): `which` = -1 asks for the margin of label y, `which` = c for the logit z_c.
    Selecting per row with a tensor (not a Python flag) keeps one pure function for `torch.func.vmap`.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        # number of logits the model returns per example
        self.num_classes = num_classes

    def get_output(
        self, model: nn.Module, weights, buffers, x: Tensor, y: Tensor, which: Tensor
    ) -> Tensor:
        # One example (no batch dim): traker vmaps torch.func.grad of this over the batch.
        z = torch.func.functional_call(model, (weights, buffers), (x.unsqueeze(0),))[0]
        classes = torch.arange(z.shape[-1], device=z.device)
        is_label = classes == y
        # margin = z_y - logsumexp_{k != y} z_k (docs/methods.md §4); masked_fill keeps the graph vmap-friendly
        margin = (z * is_label).sum() - z.masked_fill(is_label, float("-inf")).logsumexp(-1)
        logit = (z * (classes == which.clamp(min=0))).sum()
        return torch.where(which < 0, margin, logit)

    def get_out_to_loss_grad(self, model: nn.Module, weights, buffers, batch) -> Tensor:
        # Q_i = -dCE/dm_i = 1 - p_y (module docstring); traker multiplies scores by its mean over checkpoints.
        x, y, _ = batch
        z = torch.func.functional_call(model, (weights, buffers), (x,))
        p_y = torch.softmax(z, dim=-1)[torch.arange(z.shape[0], device=z.device), y]
        return (1.0 - p_y).detach().unsqueeze(-1)


def default_projector(
    grad_dim: int, proj_dim: int, device: str, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> AbstractProjector:
    """JL projector for `device`: fast_jl's CudaProjector where CUDA and fast_jl work, else BasicProjector.

    BasicProjector regenerates its random matrix block by block for every batch (slow but exact, docs/methods.md
    §2); on the CPU it draws a normal matrix (traker's own CPU choice: CPU bernoulli_ lacks some dtypes).
    """
    if device.startswith("cuda") and proj_dim % _FAST_JL_DIM_MULTIPLE == 0:
        try:
            import fast_jl  # noqa: F401  (optional CUDA extension)

            # fast_jl indexes grad_dim * batch with uint32; 32 is traker's default projection batch
            if grad_dim * 32 < np.iinfo(np.uint32).max:
                return CudaProjector(
                    grad_dim=grad_dim, proj_dim=proj_dim, seed=seed, proj_type=ProjectionType.rademacher,
                    device=device, max_batch_size=32, dtype=dtype,
                )
        except (ImportError, ModuleNotFoundError, RuntimeError):
            pass
    proj_type = ProjectionType.rademacher if device.startswith("cuda") else ProjectionType.normal
    return BasicProjector(
        grad_dim=grad_dim, proj_dim=proj_dim, seed=seed, proj_type=proj_type, device=device, dtype=dtype
    )


def _as_tensor(a, name: str, dtype: torch.dtype | None = None) -> Tensor:
    if a is None:
        raise ValueError(f"{name} is required")
    t = torch.as_tensor(a)
    return t.to(dtype) if dtype is not None else t


def _device_string(device, model: nn.Module) -> str:
    # traker compares device == "cpu" as a string: a torch.device takes its CUDA path, fails in pin_memory.
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else "cpu"
    dev = str(device)
    if not (dev == "cpu" or dev.startswith("cuda")):
        raise ValueError(f"device must be 'cpu' or 'cuda[:k]', got {device!r}")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={dev!r} but CUDA is not available; pass device='cpu'")
    return dev


def _check_targets(target_x, target_y, need_labels: bool) -> tuple[Tensor, Tensor]:
    """Targets as tensors; labels are needed for margins, otherwise zeros stand in for them."""
    target_x = _as_tensor(target_x, "target_x")
    n_targets = target_x.shape[0]
    if need_labels:
        target_y = _as_tensor(target_y, "target_y (for outputs='margin')", torch.long)
    else:
        target_y = (torch.zeros(n_targets, dtype=torch.long) if target_y is None
                    else _as_tensor(target_y, "target_y", torch.long))
    if target_y.shape != (n_targets,):
        raise ValueError(f"target_y must have shape ({n_targets},) like target_x, "
                         f"got {tuple(target_y.shape)}")
    if n_targets < 1:
        raise ValueError("need at least 1 target, got none")
    return target_x, target_y


class TrakScorer:
    """TRAK featurized once for a set of checkpoints, then scoring any number of chunks of targets.

    Featurizing (projected train gradients of every checkpoint, then Phi (Phi^T Phi + lambda I)^-1) is the
    expensive, target-independent half of TRAK; traker keeps its result in memory maps under `save_dir`
    (4 * k * N * proj_dim bytes on disk for k checkpoints; the train gradients are deleted once finalized).
    Every `scores` / `logit_and_margin_scores` call is a new traker experiment over those features that
    returns that chunk's scores only and then deletes the experiment's files. TRAK is linear per target, so
    chunked scores equal one all-targets run up to float rounding. Memory per call: about three times the
    chunk's (N, rows) float32 scores while traker finalizes them (accumulator, matmul product and its copy,
    the averaged result; measured 3.0x on the CPU), rows = t*C (logits), t (margin) or t*(C+1) (both).

    Use it as a context manager (or call `close`): the temporary `save_dir` is removed on exit (or when the
    scorer is garbage collected).
    Args: as `trak_scores` (which is `scores` of a scorer used once).
    """

    def __init__(
        self,
        model: nn.Module,
        checkpoints: Sequence[dict[str, Tensor]],
        train_x: Tensor,
        train_y: Tensor,
        *,
        num_classes: int | None = None,
        proj_dim: int = 512,
        lambda_reg: float = 1e-3,
        batch_size: int | None = None,
        device: str | None = None,
        save_dir: str | os.PathLike | None = None,
        half_precision: bool = False,
        projector_seed: int = 0,
        projector: AbstractProjector | None = None,
    ) -> None:
        if len(checkpoints) == 0:
            raise ValueError("checkpoints is empty: pass at least one state dict of a trained subset model")
        if not lambda_reg > 0:
            raise ValueError(f"lambda_reg must be > 0 (docs/methods.md §2), got {lambda_reg}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        dev = _device_string(device, model)

        train_x = _as_tensor(train_x, "train_x")
        train_y = _as_tensor(train_y, "train_y", torch.long)
        n_train = train_x.shape[0]
        if train_y.shape != (n_train,):
            raise ValueError(f"train_y must have shape ({n_train},) like train_x, got {tuple(train_y.shape)}")
        if n_train < 2:
            raise ValueError(f"need at least 2 train examples, got N={n_train}")

        # A private copy: traker loads every checkpoint into the model and switches it to eval mode (BatchNorm
        # then uses its running statistics, so per-example gradients do not mix examples).
        work = copy.deepcopy(model).to(dev).eval()
        n_params = sum(p.numel() for p in work.parameters())
        if batch_size is None:
            batch_size = int(min(_MAX_AUTO_BATCH, max(1, _AUTO_BATCH_BYTES // (4 * n_params))))
        with torch.no_grad():
            work.load_state_dict(checkpoints[0])
            out_dim = work(train_x[:1].to(dev)).shape[-1]
        if num_classes is None:
            num_classes = out_dim
        elif num_classes != out_dim:
            raise ValueError(f"num_classes={num_classes} but the model returns {out_dim} logits per example")
        if num_classes < 2:
            raise ValueError(f"TRAK's margin needs at least 2 classes, the model returns {num_classes}")
        if int(train_y.min()) < 0 or int(train_y.max()) >= num_classes:
            raise ValueError(f"train_y must hold labels in [0, {num_classes}), got range "
                             f"[{int(train_y.min())}, {int(train_y.max())}]")

        dtype = torch.float16 if half_precision else torch.float32
        if projector is None:
            if proj_dim >= n_train:
                raise ValueError(
                    f"proj_dim={proj_dim} must be smaller than the number of training examples N={n_train}: "
                    "with proj_dim >= N, Phi^T Phi is singular and the ridge term dominates (docs/methods.md §8 "
                    f"measured LDS 0.24 instead of 0.48). Pass proj_dim <= {max(1, n_train // 2)} or so."
                )
            if proj_dim > n_params:
                raise ValueError(f"proj_dim={proj_dim} exceeds the model's {n_params} parameters; "
                                 f"pass proj_dim <= {n_params}")
            projector = default_projector(n_params, proj_dim, dev, seed=projector_seed, dtype=dtype)
        elif (projector.proj_dim or n_params) >= n_train:  # NoOpProjector reports proj_dim 0: no projection
            raise ValueError(f"the projector's output dimension {projector.proj_dim or n_params} must be "
                             f"smaller than N={n_train} (docs/methods.md §8)")

        self.n_train, self.num_classes, self.device = n_train, num_classes, dev
        self._checkpoints = list(checkpoints)
        self._batch_size = batch_size
        self._n_experiments = 0
        self._owns_dir = save_dir is None
        if self._owns_dir:
            save_dir = tempfile.mkdtemp(prefix="dmu_trak_")
        elif os.path.exists(save_dir) and (not os.path.isdir(save_dir) or os.listdir(save_dir)):
            raise ValueError(f"save_dir {os.fspath(save_dir)!r} is not an empty directory; traker would "
                             "silently reuse features stored there. Pass a new or empty directory, or None "
                             "for a temporary one.")
        self.save_dir = os.fspath(save_dir)
        self._cleanup = None
        if self._owns_dir:  # at close, or when the scorer is garbage collected unclosed
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.save_dir, ignore_errors=True)
        try:
            self._traker = TRAKer(
                model=work, task=TrainMarginOutput(num_classes), train_set_size=n_train,
                save_dir=self.save_dir, device=dev, projector=projector, proj_dim=proj_dim,
                use_half_precision=half_precision, lambda_reg=lambda_reg, projector_seed=projector_seed,
                logging_level=logging.WARNING,
            )
            # Featurize: the same model_id (= checkpoint index) is used for scoring; traker pairs train
            # features and target gradients by model_id and silently mismatches otherwise (docs/methods.md §2).
            train_which = torch.full((n_train,), _MARGIN)
            for model_id, ckpt in enumerate(self._checkpoints):
                self._traker.load_checkpoint(ckpt, model_id=model_id)
                for b in self._batches(train_x, train_y, train_which):
                    self._traker.featurize(batch=b, num_samples=b[0].shape[0])
            # scoring reads only the finalized features: the raw train gradients go (half the disk)
            self._traker.finalize_features(del_grads=True)
            # traker frees the projection matrix in finalize_features; a single-block BasicProjector
            # (proj_dim <= 100) regenerates it only when the model_id changes, never with one checkpoint
            # (docs/methods.md §2). With several checkpoints every experiment starts at model_id 0, not the
            # last one, so it regenerates there.
            single_block = isinstance(projector, BasicProjector) and projector.num_blocks == 1
            if single_block and not projector.proj_matrix_available:
                projector.generate_sketch_matrix(projector.generator_states[0])
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "TrakScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the temporary save_dir (a given save_dir is kept, with its features)."""
        if self._cleanup is not None:
            self._cleanup()  # runs once

    def _batches(self, x: Tensor, y: Tensor, which: Tensor):
        for s in range(0, x.shape[0], self._batch_size):
            rows = slice(s, s + self._batch_size)
            yield x[rows].to(self.device), y[rows].to(self.device), which[rows].to(self.device)

    def scores(self, target_x, target_y=None, *,
               outputs: Literal["logits", "margin"] = "logits") -> np.ndarray:
        """TRAK scores of every train example for these targets: float32 (N, t, C) logits or (N, t) margins
        (target_y needed for margins); as `trak_scores`."""
        if outputs not in ("logits", "margin"):
            raise ValueError(f"outputs must be 'logits' or 'margin', got {outputs!r}")
        x, y = _check_targets(target_x, target_y, need_labels=outputs == "margin")
        t, c = x.shape[0], self.num_classes
        if outputs == "margin":
            self._check_labels(y)
            [scores] = self._score_rows(x, y, torch.full((t,), _MARGIN), [slice(None)])
            return scores
        # t-major rows: row j*C + c is logit c of target j
        rows_which = torch.arange(c).repeat(t)
        [scores] = self._score_rows(x.repeat_interleave(c, dim=0), y.repeat_interleave(c), rows_which,
                                    [slice(None)])
        return scores.reshape(self.n_train, t, c)

    def logit_and_margin_scores(self, target_x, target_y) -> tuple[np.ndarray, np.ndarray]:
        """(N, t, C) logit and (N, t) margin scores of these targets from one traker experiment (one pass over
        the stored features instead of two); equal to `scores` with each `outputs`."""
        x, y = _check_targets(target_x, target_y, need_labels=True)
        self._check_labels(y)
        t, c = x.shape[0], self.num_classes
        rows_x = torch.cat([x.repeat_interleave(c, dim=0), x])
        rows_y = torch.cat([y.repeat_interleave(c), y])
        rows_which = torch.cat([torch.arange(c).repeat(t), torch.full((t,), _MARGIN)])
        logit_scores, margin_scores = self._score_rows(rows_x, rows_y, rows_which,
                                                       [slice(0, t * c), slice(t * c, None)])
        return logit_scores.reshape(self.n_train, t, c), margin_scores

    def _check_labels(self, y: Tensor) -> None:
        if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
            raise ValueError(f"target_y must hold labels in [0, {self.num_classes}), got range "
                             f"[{int(y.min())}, {int(y.max())}]")

    def _score_rows(self, x: Tensor, y: Tensor, which: Tensor, parts: Sequence[slice]) -> list[np.ndarray]:
        """One traker experiment over these rows; float32 copies of the score columns `parts`."""
        traker = self._traker
        exp_name = f"targets_{self._n_experiments}"
        self._n_experiments += 1
        try:
            for model_id, ckpt in enumerate(self._checkpoints):
                traker.start_scoring_checkpoint(exp_name=exp_name, checkpoint=ckpt, model_id=model_id,
                                                num_targets=x.shape[0])
                for b in self._batches(x, y, which):
                    traker.score(batch=b, num_samples=b[0].shape[0])
            scores = traker.finalize_scores(exp_name=exp_name)  # (N, rows) memory map
            out = [np.array(scores[:, part], dtype=np.float32) for part in parts]  # copies off the memmap
            del scores
        finally:
            self._drop_experiment(exp_name)
        if not all(np.isfinite(a).all() for a in out):
            raise FloatingPointError("TRAK produced non-finite scores; use half_precision=False or a larger "
                                     "lambda_reg")
        return out

    def _drop_experiment(self, exp_name: str) -> None:
        # traker keeps every experiment's target gradients and scores on disk and in experiments.json; a
        # chunked run would otherwise grow them with every chunk.
        saver = self._traker.saver
        for key in (f"{exp_name}_grads", f"{exp_name}_scores"):
            saver.current_store.pop(key, None)
        self._traker.scores = None
        saver.experiments.pop(exp_name, None)
        with open(saver.experiments_file, "w") as f:
            json.dump(saver.experiments, f)
        for model_id in range(len(self._checkpoints)):
            (saver.save_dir / str(model_id) / f"{exp_name}_grads.mmap").unlink(missing_ok=True)
        (saver.save_dir / "scores" / f"{exp_name}.mmap").unlink(missing_ok=True)


def trak_scores(
    model: nn.Module,
    checkpoints: Sequence[dict[str, Tensor]],
    train_x: Tensor,
    train_y: Tensor,
    target_x: Tensor,
    target_y: Tensor | None = None,
    *,
    outputs: Literal["logits", "margin"] = "logits",
    num_classes: int | None = None,
    proj_dim: int = 512,
    lambda_reg: float = 1e-3,
    batch_size: int | None = None,
    device: str | None = None,
    save_dir: str | os.PathLike | None = None,
    half_precision: bool = False,
    projector_seed: int = 0,
    projector: AbstractProjector | None = None,
) -> np.ndarray:
    """TRAK scores of every train example for every target output, averaged over `checkpoints`.

    One `TrakScorer` used once: featurize, score all targets, clean up. To score many chunks of targets
    against one featurization, use `TrakScorer` itself.

    Args:
        model: the architecture; each checkpoint is loaded into a private copy (the model is never mutated).
        checkpoints: state dicts of models trained on random subsets (more than ~10 for a useful estimate,
            docs/methods.md §2/§8).
        train_x, train_y: the N training examples (inputs, integer labels) the scores attribute to.
        target_x, target_y: the T target examples; target_y is needed only for outputs="margin".
        outputs: "logits" -> scores (N, T, C), one output function per logit; "margin" -> (N, T).
        num_classes: C; inferred from one forward pass when None, else checked against it.
        proj_dim: JL dimension; below N (docs/methods.md §8: proj_dim >= N ruined LDS) and at most #params.
        lambda_reg: ridge added to Phi^T Phi before inversion; must be > 0 (docs/methods.md §2).
        batch_size: rows per featurize / score call; None -> as many as fit in ~1 GiB of float32 per-example
            gradients, at most 1024 (BasicProjector regenerates its matrix for every call, so small models
            gain from large batches: N=1000 MNIST-1D CNN, 10 checkpoints, 1024 rows ran 2x faster than 128).
        device: "cpu" or "cuda"; None -> the device of the model's parameters.
        save_dir: where traker keeps its memory maps; None -> a temporary directory removed afterwards. A
            given directory must be empty or absent (traker silently reuses stale features found there); kept.
        half_precision: float16 features (traker's default); float32 here for exactness on small problems.
        projector_seed: seed of the JL matrices (each checkpoint gets its own matrix derived from it).
        projector: a traker projector to use instead of `default_projector` (tests swap in NoOpProjector).

    Returns:
        float32 array (N, T, C) or (N, T); positive = including the train example raises the target output.
        The scale is arbitrary (traker normalises its inverse); use `calibrate` for datamodel units.
    """
    if outputs not in ("logits", "margin"):
        raise ValueError(f"outputs must be 'logits' or 'margin', got {outputs!r}")
    _check_targets(target_x, target_y, need_labels=outputs == "margin")  # before the expensive featurizing
    with TrakScorer(model, checkpoints, train_x, train_y, num_classes=num_classes, proj_dim=proj_dim,
                    lambda_reg=lambda_reg, batch_size=batch_size, device=device, save_dir=save_dir,
                    half_precision=half_precision, projector_seed=projector_seed,
                    projector=projector) as scorer:
        return scorer.scores(target_x, target_y, outputs=outputs)


# Per-target sufficient statistics of `calibrate`, in this order where they are stacked into one array.
CALIBRATION_SUMS = ("u_mean", "y_mean", "suu", "suy", "syy", "uu")
# float64 temporaries of calibration_sums stay below this many bytes (column blocks of the scores)
_F64_BLOCK_BYTES = 1 << 27


def _check_calibration_inputs(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray) -> None:
    if scores.ndim not in (2, 3):
        raise ValueError(f"scores must be (N, T) or (N, T, C), got shape {scores.shape}")
    if masks.ndim != 2 or masks.shape[1] != scores.shape[0]:
        raise ValueError(f"masks must be (m, N={scores.shape[0]}), got shape {masks.shape}")
    if masks.dtype != bool and not np.isin(masks, (0, 1)).all():
        raise ValueError("masks must be boolean (or 0/1) training-set indicators")
    m = masks.shape[0]
    if outputs.shape != (m, *scores.shape[1:]):
        raise ValueError(f"outputs must have shape {(m, *scores.shape[1:])} (models, targets[, classes]) "
                         f"to match masks and scores, got {outputs.shape}")


def _min_models(scale: str, min_models: int | None, m: int) -> None:
    """Refuse an unknown mode, or fewer than min_models held-out models (default 3 global, 20 per target)."""
    if scale not in ("per_target", "global"):
        raise ValueError(f"scale must be 'per_target' or 'global', got {scale!r}")
    if min_models is None:
        min_models = 3 if scale == "global" else 20
    min_models = max(3, min_models)
    if m < min_models:
        raise ValueError(f"calibration with scale={scale!r} needs at least {min_models} held-out subset "
                         f"models, got {m}: slopes fitted to fewer points fit noise (use scale='global', or "
                         "more models)")


def calibration_sums(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray) -> dict:
    """`calibrate`'s sufficient statistics of one chunk of targets, pooled over chunks by calibrate_from_sums.

    For every target output k with u_k = masks @ scores[:, k] and y_k = outputs[:, k] (float64): means
    "u_mean", "y_mean", centred sums "suu" = sum (u - mean u)^2, "suy", "syy", and "uu" = sum u^2 (for the
    degeneracy test), each shaped like scores.shape[1:]; plus "n_models" = m. Arguments as `calibrate`.
    The float64 copy of the scores is made in column blocks of at most 128 MiB.
    """
    scores, masks, outputs = np.asarray(scores), np.asarray(masks), np.asarray(outputs)
    _check_calibration_inputs(scores, masks, outputs)
    if not (np.isfinite(scores).all() and np.isfinite(outputs).all()):
        raise ValueError("scores and outputs must be finite")
    m, tail = masks.shape[0], scores.shape[1:]
    s2 = scores.reshape(scores.shape[0], -1)
    mf = masks.astype(np.float64)  # raw 0/1 masks: the predicted effect of each subset
    u = np.empty((m, s2.shape[1]))
    step = max(1, _F64_BLOCK_BYTES // (8 * s2.shape[0]))
    for c0 in range(0, s2.shape[1], step):
        u[:, c0:c0 + step] = mf @ s2[:, c0:c0 + step].astype(np.float64)
    y = outputs.reshape(m, -1).astype(np.float64)
    u_mean, y_mean = u.mean(0), y.mean(0)
    uc, yc = u - u_mean, y - y_mean
    sums = {"u_mean": u_mean, "y_mean": y_mean, "suu": (uc * uc).sum(0), "suy": (uc * yc).sum(0),
            "syy": (yc * yc).sum(0), "uu": (u * u).sum(0)}
    return {**{k: v.reshape(tail) for k, v in sums.items()}, "n_models": m}


def calibrate_from_sums(
    sums: Mapping | Sequence[Mapping],
    *,
    scale: Literal["global", "per_target"] = "global",
    min_models: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`calibrate`'s fit from `calibration_sums`: of one chunk, or of several chunks (a sequence, pooled as
    if concatenated along the target axis, which must be the first). Two passes in bounded memory: sums per
    chunk, then one global scale from all of them, then weights = scale * scores chunk by chunk.

    Returns (scale, intercept, r2, degenerate), shaped like the (concatenated) sums; `calibrate` documents
    them, the modes and `min_models`.
    """
    if isinstance(sums, Mapping):
        sums = [sums]
    if len(sums) == 0:
        raise ValueError("no calibration sums given")
    counts = {int(s["n_models"]) for s in sums}
    if len(counts) != 1:
        raise ValueError(f"calibration sums of different numbers of models {sorted(counts)} cannot be pooled")
    m = counts.pop()
    _min_models(scale, min_models, m)
    pooled = {k: np.concatenate([np.asarray(s[k], dtype=np.float64).reshape(np.shape(s[k]) or (1,))
                                 for s in sums]) for k in CALIBRATION_SUMS}
    shape = pooled["suu"].shape
    u_mean, y_mean, suu, suy, syy, uu = (pooled[k].reshape(-1) for k in CALIBRATION_SUMS)
    # u_k constant across models (a zero score column, or identical masks): no slope can be identified.
    degenerate = suu <= 1e-12 * np.maximum(1.0, uu)
    if degenerate.all():
        raise ValueError("masks @ scores does not vary across the held-out models (identical masks or "
                         "all-zero scores): the scale cannot be fitted")
    if scale == "per_target":
        s = np.where(degenerate, 0.0, suy / np.where(degenerate, 1.0, suu))
    else:
        s = np.full(suu.shape, suy[~degenerate].sum() / suu[~degenerate].sum())
        s[degenerate] = 0.0
    b = y_mean - s * u_mean
    # residual sum of squares sum (yc - s uc)^2, expanded; rounding may take it a hair below 0
    rss = np.maximum(syy - 2.0 * s * suy + s * s * suu, 0.0)
    r2 = np.where(syy > 0, 1.0 - rss / np.where(syy > 0, syy, 1.0), 0.0)
    return s.reshape(shape), b.reshape(shape), r2.reshape(shape), degenerate.reshape(shape)


def calibrate(
    scores: np.ndarray,
    masks: np.ndarray,
    outputs: np.ndarray,
    *,
    scale: Literal["global", "per_target"] = "global",
    min_models: int | None = None,
) -> tuple[np.ndarray, dict]:
    """Rescale TRAK scores into datamodel weights: effects on the outputs, in the units of LASSO weights.

    Least squares against held-out subset models (docs/methods.md §2: TRAK's scale is arbitrary): for every
    target output k (a target, or a (target, class) pair) with u_k = masks @ scores[:, k],
        outputs[:, k] ~ b_k + s   * u_k      (scale="global": one s for all k, its own intercept per k)
        outputs[:, k] ~ b_k + s_k * u_k      (scale="per_target").
    Closed form: s_k = cov(u_k, y_k) / var(u_k), b_k = mean(y_k) - s_k mean(u_k); the global s pools the
    centred sums over k. The weights s * scores[:, k] with bias b_k form a datamodel:
    outputs ~ b + masks @ weights. All scores at once; for chunks of targets use `calibration_sums` per chunk
    and `calibrate_from_sums` on all of them (this function is those two on one chunk).

    Why "global" by default. Measured on MNIST-1D CNN subset models (N=1000, 100 test targets, proj_dim 512):
    held-out R^2 on 128 further subset models, pooled over targets; K = TRAK checkpoints, m = calibration
    models.
        m                         5      10     20     50     128
        K=10 margin  per_target  -0.57  -0.07   0.04   0.12   0.14
                     global      -0.12   0.05   0.08   0.13   0.14
        K=50 margin  per_target  -1.12   0.01   0.13   0.20   0.21
                     global      -0.03   0.11   0.14   0.19   0.21
        K=50 logits  per_target  -0.40  -0.02   0.09   0.14   0.16
                     global       0.03   0.11   0.12   0.15   0.16
    (intercept only: below 0 at every m). One scale matches per-target scales from ~100 models on and is much
    better below ~50, where per-target slopes fit noise; "per_target" therefore demands 20 models by default.

    Args:
        scores: (N, T) or (N, T, C) TRAK scores.
        masks: (m, N) bool (or 0/1) training-set indicators of held-out subset models (not the checkpoints).
        outputs: (m, T) or (m, T, C) outputs of those models on the targets (the scores' output function).
        scale: "global" fits one s; "per_target" fits s_k per target output.
        min_models: fewer held-out models is an error; None -> 3 for "global" (2 points always fit a line
            exactly), 20 for "per_target" (see the table).

    Returns:
        (weights like scores, info) with info = {"scale" (T[, C]), "intercept" (T[, C]) (the datamodel bias),
        "r2" (T[, C]) in-sample R^2 of the fit, "degenerate" (T[, C]) bool: u_k did not vary (s_k = 0),
        "mode", "n_models"}.
    """
    scores = np.asarray(scores)
    masks = np.asarray(masks)
    outputs = np.asarray(outputs)
    _check_calibration_inputs(scores, masks, outputs)
    _min_models(scale, min_models, masks.shape[0])  # before the finiteness check in calibration_sums
    s, b, r2, degenerate = calibrate_from_sums(calibration_sums(scores, masks, outputs), scale=scale,
                                               min_models=min_models)
    out_dtype = scores.dtype if scores.dtype.kind == "f" else np.float64
    weights = (scores.reshape(scores.shape[0], -1).astype(np.float64) * s.reshape(-1)).reshape(scores.shape)
    info = {"scale": s, "intercept": b, "r2": r2, "degenerate": degenerate, "mode": scale,
            "n_models": masks.shape[0]}
    return weights.astype(out_dtype), info
