"""Shared types and plumbing of the unlearning methods: the training data, the forget-set checks, the result
and cost.

Data flow: the pipeline hands a trained model, its training set (`UnlearnData`) and forget-set indices to a
method in `unlearning.METHODS`; every method returns an `UnlearnResult` holding a new model (the input is
never mutated) and its `Cost`. This module holds nothing method-specific; it imports neither `attribution` nor
`pipelines`.

Writing a method: decorate a body `name(req: UnlearnRequest, *, <inputs>) -> (model, example passes, info)`
with `@unlearning_method(NameHyperparameters)`. The decorator gives it the interface of every METHODS entry,
`name(model, data, forget_idx, *, <inputs>, seed=0, hparams=None, **overrides) -> UnlearnResult`: it resolves
the hyperparameters, checks the forget set, then times the body and runs it under `seeded(seed)`. The body
copies the model itself (`copy_model(req.model)`) and never mutates `req.model`.

A fine-tuning method is written once for G models at a time (`@unlearning_method(Hp, packs=True)`, body
`name(req: PackRequest, *, <inputs>) -> (example passes per model, [info per model])`): it trains `req.pack`
in place, model g drawing its minibatches from `req.generators[g]` and its loss a sum over models of per-model
losses, so that each model follows exactly its own gradient (Adam and SGD act elementwise). The entry runs it
on one model (a `ModulePack` of a copy) and, through `entry.packed(models, forward, ...)`, on G models as one
computation (a `StackedPack` over a packed forward): the same draws for every model either way, so the same
models up to floating-point rounding.

Cost convention (used by every method): one forward + backward of one example = 1 example pass; a forward
alone counts 1/3 pass (the backward costs about twice the forward). Double-backward steps (MU-Mis) are counted
in `mumis.py`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import stack_module_state

# Forward-only passes cost a third of a forward + backward pass (module docstring).
FORWARD_PASS = 1.0 / 3.0


def as_tensor(value: Any, **kwargs: Any) -> torch.Tensor:
    """torch.as_tensor, copying a read-only numpy array first (arrays from Ray's object store and zarr reads often
    are): torch cannot share memory it may not write, and warns "The given NumPy array is not writable"."""
    if isinstance(value, np.ndarray) and not value.flags.writeable:
        value = np.array(value)
    return torch.as_tensor(value, **kwargs)


@dataclass(frozen=True)
class Cost:
    """What an unlearning run cost: wall-clock seconds and example passes (1 = forward + backward of one
    example)."""

    seconds: float
    example_passes: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.seconds + other.seconds, self.example_passes + other.example_passes)


@dataclass(frozen=True)
class UnlearnResult:
    """A method's output: `model` is a new nn.Module in eval mode (for dm_direct a `DatamodelPredictor`),
    `cost` what it took, `info` method-specific diagnostics (e.g. MU-Mis steps and why it stopped; the retain
    points OM sampled)."""

    model: Any
    cost: Cost
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class UnlearnData:
    """The training set the model was trained on: inputs `x` (N, ...) and integer labels `y` (N,).

    Row i is training example i, i.e. datamodel target i in the project's target indexing (training examples
    first, then test examples). numpy arrays are accepted and turned into tensors (labels into int64)."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        x = as_tensor(self.x)
        y = as_tensor(self.y)
        if x.ndim < 1 or y.ndim != 1:
            raise ValueError(
                f"UnlearnData needs x of shape (N, ...) and y of shape (N,); got x {tuple(x.shape)}, "
                f"y {tuple(y.shape)}."
            )
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"UnlearnData: x has {x.shape[0]} rows but y has {y.shape[0]}; "
                "they must be the same examples."
            )
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise ValueError(f"UnlearnData: labels y must be integers (class ids), got dtype {y.dtype}.")
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y.to(torch.int64))

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: torch.Tensor) -> UnlearnData:
        """The examples at `idx` (a 1-D index tensor), in that order."""
        idx = as_tensor(idx, dtype=torch.int64, device=self.x.device)
        return UnlearnData(self.x[idx], self.y[idx.to(self.y.device)])


def check_forget_idx(forget_idx: Any, n_train: int) -> torch.Tensor:
    """Validate forget-set indices into a training set of `n_train` examples; return them as a CPU int64
    tensor.

    Errors (ValueError): not integers (boolean masks included), not 1-D, empty, out of [0, n_train),
    duplicated."""
    if isinstance(forget_idx, torch.Tensor):
        arr = forget_idx.detach().cpu().numpy()
    else:
        arr = np.asarray(forget_idx)
    if arr.dtype == np.bool_:
        raise ValueError(
            "forget_idx is a boolean mask; pass the indices of the forget set instead "
            "(e.g. np.flatnonzero(mask))."
        )
    if arr.size > 0 and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"forget_idx must hold integer indices into the training set, got dtype {arr.dtype}; "
            "cast whole-number floats with .astype(int) if that is what you meant."
        )
    if arr.ndim != 1:
        raise ValueError(f"forget_idx must be a 1-D array of indices, got shape {arr.shape}.")
    if arr.size == 0:
        raise ValueError("forget_idx is empty: there is nothing to unlearn; use do_nothing for a no-op.")
    bad = arr[(arr < 0) | (arr >= n_train)]
    if bad.size:
        raise ValueError(
            f"forget_idx has {bad.size} index(es) out of range [0, {n_train}) for a training set of "
            f"{n_train} examples, e.g. {bad[:5].tolist()}; forget-set ids index the training examples "
            "(targets 0..N-1)."
        )
    uniq, counts = np.unique(arr, return_counts=True)
    if uniq.size != arr.size:
        raise ValueError(
            f"forget_idx has duplicated indices {uniq[counts > 1][:5].tolist()}; each training example can "
            "be forgotten once: pass np.unique(forget_idx)."
        )
    return torch.as_tensor(arr.astype(np.int64))


def retain_indices(n_train: int, forget_idx: torch.Tensor) -> torch.Tensor:
    """The training indices not in the forget set, ascending (CPU int64)."""
    keep = torch.ones(n_train, dtype=torch.bool)
    keep[forget_idx] = False
    return torch.nonzero(keep).flatten()


def resolve_hyperparameters(cls: type, hparams: Any, overrides: dict[str, Any]) -> Any:
    """Build a method's frozen hyperparameter dataclass: defaults (or `hparams`) with keyword `overrides` on
    top.

    An unknown keyword is an error that lists the method's hyperparameters, so a typo never passes
    silently."""
    if hparams is None:
        hparams = cls()
    elif not isinstance(hparams, cls):
        raise ValueError(f"hparams must be a {cls.__name__}, got {type(hparams).__name__}.")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(
            f"unknown argument(s) {unknown} for {cls.__name__}; its hyperparameters are {sorted(names)}."
        )
    return dataclasses.replace(hparams, **overrides)


def model_device(model: nn.Module) -> torch.device:
    """The device the model's parameters (or buffers) live on; CPU for a parameterless module."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy, so that methods train on their own parameters and never mutate the caller's model."""
    return copy.deepcopy(model)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when enabled; nothing on CPU, where it does not pay for these small models.

    bf16 keeps fp32's exponent range, so no gradient scaler is needed."""
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[torch.Generator]:
    """Run a method under `seed`: yields a CPU generator for sampling and shuffling (same draws on every
    device), and seeds torch's global RNG inside a fork (for dropout), leaving the caller's RNG state
    untouched."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if (
        device.type == "cuda"
    ) else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


class Stopwatch:
    """Wall-clock seconds of a method, synchronising CUDA so that queued kernels are counted."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._sync()
        self.start = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def seconds(self) -> float:
        self._sync()
        return time.perf_counter() - self.start


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: torch.Tensor, batch_size: int = 1024, amp: bool = False
) -> torch.Tensor:
    """The model's logits on `x` in eval mode (BatchNorm running statistics, no dropout), as float32 on the
    model's device. The model's train/eval mode is restored afterwards."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        out = []
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size].to(device, non_blocking=True)
            with autocast(device, amp):
                out.append(model(xb).float())
        return torch.cat(out)
    finally:
        model.train(was_training)


def as_float_tensor(name: str, value: Any, shape: tuple, device: torch.device) -> torch.Tensor:
    """Turn an input array (numpy or tensor) into a float32 tensor on `device`, checking its shape (None =
    any) and that every entry is finite."""
    t = as_tensor(value)
    if not (t.dtype.is_floating_point or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must be a numeric array, got dtype {t.dtype}.")
    if t.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {want}.")
    t = t.to(device=device, dtype=torch.float32)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return t


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch of minibatch positions 0..n-1 in a seeded random order (CPU tensors)."""
    order = torch.randperm(n, generator=generator)
    return list(order.split(batch_size))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a method may update: those that require gradients in the caller's model."""
    return [p for p in model.parameters() if p.requires_grad]


@dataclass(frozen=True)
class UnlearnRequest:
    """One deletion request as a method body sees it, once `unlearning_method` has checked it."""

    model: nn.Module  # the caller's model: read it or copy it, never train it
    data: UnlearnData  # the training set
    forget: torch.Tensor  # the checked forget-set indices (CPU int64)
    hp: Any  # the method's resolved hyperparameters
    seed: int  # for a body that hands it on (retrain's train_fn)
    device: torch.device  # where the model lives
    generator: torch.Generator  # seeded CPU generator for sampling and shuffling (see `seeded`)

    @property
    def retain(self) -> torch.Tensor:
        """The training indices not in the forget set, ascending (CPU int64)."""
        return retain_indices(len(self.data), self.forget)

    def examples(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels of the training examples `idx`, on the model's device."""
        subset = self.data.subset(idx)
        return subset.x.to(self.device), subset.y.to(self.device)


def run_timed(
    model: nn.Module, seed: int, body: Callable[[torch.device, torch.Generator], tuple[Any, float, dict]]
) -> UnlearnResult:
    """Run `body(device, generator)` on the device of `model`, under `seeded(seed)` and timed; it returns (the
    unlearned model, example passes, info), which become the UnlearnResult."""
    device = model_device(model)
    watch = Stopwatch(device)
    with seeded(seed, device) as generator:
        unlearned, passes, info = body(device, generator)
    return UnlearnResult(unlearned, Cost(watch.seconds(), passes), info)


# ----------------------------------------------------------------------------------------------------------
# packs: G models fine-tuned as one computation (module docstring)

# A packed forward: (stacked parameters {name: (G, ...)}, inputs (G, b, ...)) -> logits (G, b, C).
PackedForward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


class ModulePack:
    """One model as a pack of G = 1: `pack(x)` maps inputs (1, b, ...) to logits (1, b, C) through the module
    itself (its BatchNorm and dropout behave as usual). The module is trained in place."""

    size = 1

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x[0]).unsqueeze(0)

    def parameters(self) -> list[nn.Parameter]:
        return trainable_parameters(self.model)

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def frozen(self) -> ModulePack:
        """A copy in eval mode that takes no gradients (SCRUB's teacher)."""
        teacher = copy_model(self.model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return ModulePack(teacher)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1024, amp: bool = False) -> torch.Tensor:
        """Eval-mode logits (1, n, C) float32 on the inputs x (n, ...)."""
        return predict_logits(self.model, x, batch_size, amp).unsqueeze(0)

    def modules(self) -> list[nn.Module]:
        return [self.model]


class StackedPack:
    """G models of one architecture as one computation: their parameters stacked ({name: (G, ...)}) and run
    through a packed forward. For models without buffers or random layers (no BatchNorm statistics, no
    dropout), so train and eval mode are the same. The input modules are never mutated: `modules()` returns
    copies holding the pack's current weights."""

    def __init__(self, models: Sequence[nn.Module], forward: PackedForward) -> None:
        if any(True for m in models for _ in m.buffers()):
            raise ValueError("StackedPack needs models without buffers (BatchNorm statistics): unlearn them one "
                             "at a time")
        self.size = len(models)
        self._models = list(models)
        self.forward = forward
        self.params, _ = stack_module_state(self._models)  # copies: leaf tensors (G, ...) that take gradients

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(self.params, x)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def train(self, mode: bool = True) -> None:
        pass  # no BatchNorm, no dropout (class docstring)

    def frozen(self) -> StackedPack:
        teacher = copy.copy(self)
        teacher.params = {name: p.detach().clone() for name, p in self.params.items()}
        return teacher

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1024, amp: bool = False) -> torch.Tensor:
        """Logits (G, n, C) float32 of every model on the inputs x (n, ...), in batches of about batch_size rows
        in all (G models x rows) on a CPU, where larger activations leave the cache."""
        device = self.params[next(iter(self.params))].device
        rows = batch_size if device.type == "cuda" else max(1, batch_size // self.size)
        out = []
        for xb in x.split(rows):
            xb = xb.to(device, non_blocking=True)
            with autocast(device, amp):
                out.append(self(xb.expand(self.size, *xb.shape)).float())
        return torch.cat(out, dim=1)

    def modules(self) -> list[nn.Module]:
        out = []
        with torch.no_grad():
            for g, model in enumerate(self._models):
                model = copy_model(model)
                for name, p in model.named_parameters():
                    p.copy_(self.params[name][g])
                out.append(model.eval())
        return out


ModelPack = ModulePack | StackedPack


@dataclass(frozen=True)
class PackRequest:
    """One deletion request on G models as a packed method body sees it (module docstring)."""

    pack: ModelPack  # the models being unlearned: the body trains it in place
    data: UnlearnData  # the training set
    forget: torch.Tensor  # the checked forget-set indices (CPU int64), the same for every model
    hp: Any  # the method's resolved hyperparameters
    device: torch.device  # where the pack lives
    generators: list[torch.Generator]  # model g's seeded CPU generator for sampling and shuffling

    @property
    def size(self) -> int:
        return len(self.generators)

    @property
    def retain(self) -> torch.Tensor:
        return retain_indices(len(self.data), self.forget)

    def examples(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels of the training examples `idx` (any shape), on the device."""
        idx = as_tensor(idx, dtype=torch.int64)
        return (self.data.x[idx.to(self.data.x.device)].to(self.device),
                self.data.y[idx.to(self.data.y.device)].to(self.device))

    def batches(self, n: int, batch_size: int) -> list[torch.Tensor]:
        """One epoch of minibatch positions 0..n-1 for every model, (G, b) each on the device: row g in model g's
        own seeded order (`shuffled_batches` with its generator, so one model draws the same alone or packed)."""
        per_model = [shuffled_batches(n, batch_size, g) for g in self.generators]
        return [torch.stack(step).to(self.device) for step in zip(*per_model)]


def gather_rows(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """values (G, n, ...) at per-model positions (G, b): (G, b, ...), row g from values[g]."""
    rows = torch.arange(values.shape[0], device=values.device).unsqueeze(1)
    return values[rows, positions.to(values.device)]


def per_model_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(G,) each model's mean cross-entropy over its batch: logits (G, b, C), labels (G, b)."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
    return ce.view(labels.shape).mean(1)


def unlearning_method(hyperparameters: type, *, packs: bool = False,
                      per_model: tuple[str, ...] = ()) -> Callable[[Callable], Callable[..., UnlearnResult]]:
    """Decorator that turns a method body into a METHODS entry (module docstring).

    The body's keyword-only parameters are the method's `inputs` (e.g. `oracle_logits`); every other keyword
    is a hyperparameter override. The entry carries `.Hyperparameters` and `.inputs`; its signature is the
    public one. packs: the body takes a `PackRequest` (module docstring) and the entry gets `.packed`;
    per_model: the inputs that differ between models (one array per model in `.packed`, a list to the body)."""

    def decorate(body: Callable[..., tuple]) -> Callable[..., UnlearnResult]:
        keyword_only = [p for p in inspect.signature(body).parameters.values() if p.kind is p.KEYWORD_ONLY]
        inputs = tuple(p.name for p in keyword_only)

        def resolve(data, forget_idx, hparams, kwargs) -> tuple[dict, Any, torch.Tensor]:
            given = {name: kwargs.pop(name) for name in inputs if name in kwargs}
            hp = resolve_hyperparameters(hyperparameters, hparams, kwargs)
            return given, hp, check_forget_idx(forget_idx, len(data))

        @functools.wraps(body)
        def method(model, data, forget_idx, *, seed=0, hparams=None, **kwargs) -> UnlearnResult:
            given, hp, forget = resolve(data, forget_idx, hparams, kwargs)

            def run(device: torch.device, generator: torch.Generator) -> tuple:
                if not packs:
                    return body(UnlearnRequest(model, data, forget, hp, seed, device, generator), **given)
                pack = ModulePack(copy_model(model))
                one = {name: [v] if name in per_model and v is not None else v for name, v in given.items()}
                passes, infos = body(PackRequest(pack, data, forget, hp, device, [generator]), **one)
                return pack.model, passes, infos[0]

            return run_timed(model, seed, run)

        def packed(models: Sequence[nn.Module], forward: PackedForward, data, forget_idx, *, seeds: Sequence[int],
                   hparams=None, **kwargs) -> list[UnlearnResult]:
            """The method on G models (no buffers) as one computation through `forward`; model g under seeds[g],
            each result as `method(models[g], ..., seed=seeds[g])` gives it up to rounding. Per-model inputs
            are sequences of G arrays. Seconds: the pack's, shared equally."""
            if len(seeds) != len(models):
                raise ValueError(f"got {len(seeds)} seeds for {len(models)} models")
            given, hp, forget = resolve(data, forget_idx, hparams, kwargs)
            for name in per_model:
                if given.get(name) is not None and len(given[name]) != len(models):
                    raise ValueError(f"{name} has {len(given[name])} entries for {len(models)} models")
            device = model_device(models[0])
            watch = Stopwatch(device)
            with seeded(seeds[0], device):
                pack = StackedPack(models, forward)
                generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
                passes, infos = body(PackRequest(pack, data, forget, hp, device, generators), **given)
                unlearned = pack.modules()
            cost = Cost(watch.seconds() / len(models), passes)
            return [UnlearnResult(m, cost, info) for m, info in zip(unlearned, infos)]

        P = inspect.Parameter
        positional = [P(name, P.POSITIONAL_OR_KEYWORD) for name in ("model", "data", "forget_idx")]
        settings = [P("seed", P.KEYWORD_ONLY, default=0), P("hparams", P.KEYWORD_ONLY, default=None)]
        overrides = P("overrides", P.VAR_KEYWORD)
        method.__signature__ = inspect.Signature(
            [*positional, *keyword_only, *settings, overrides], return_annotation=UnlearnResult
        )
        method.Hyperparameters = hyperparameters
        method.inputs = inputs
        method.per_model = per_model
        method.packed = packed if packs else None
        return method

    return decorate
