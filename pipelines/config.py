"""Run configuration: YAML read into frozen, nested dataclasses.

Every stage reads its settings from here. An unknown or mistyped key is an error that names it (with the closest
known key), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from upath import UPath


# The datamodel estimators a config may name (pipelines.stages.datamodels.ESTIMATORS implements them).
DATAMODEL_ESTIMATORS = ("lasso", "trak")


class ConfigError(ValueError):
    """A configuration file or value is wrong; the message says which key and what to do."""


@dataclass(frozen=True)
class RecipeConfig:
    """Overrides of the task's training recipe; None keeps the task's default (see pipelines/tasks)."""

    # passes over each model's own training examples
    epochs: int | None = None
    # examples per minibatch, per model
    batch_size: int | None = None
    # peak learning rate
    lr: float | None = None
    # L2 weight decay (decoupled for adamw)
    weight_decay: float | None = None
    # adam | adamw | sgd
    optimizer: str | None = None
    # constant | onecycle (linear warm-up to the peak, then linear decay to 0)
    schedule: str | None = None
    # fraction of the steps spent warming up (onecycle)
    warmup: float | None = None
    # label smoothing of the cross-entropy
    label_smoothing: float | None = None


@dataclass(frozen=True)
class TaskConfig:
    # mnist1d (embedded default) | cifar10 | an import path to your own task, package.module:make_task
    name: str = "mnist1d"
    # architecture: cnn | mlp for mnist1d, resnet9 for cifar10 (None: the task's default, cnn / resnet9)
    arch: str | None = None
    # keep the first n training / test examples (None: all); smaller N makes datamodels cheaper
    n_train: int | None = None
    n_test: int | None = None
    recipe: RecipeConfig = field(default_factory=RecipeConfig)


@dataclass(frozen=True)
class SubsetsConfig:
    # number of subset models (rows of subsets.zarr)
    n_models: int = 256
    # Bernoulli probability of keeping each training example (docs/methods.md §1: 0.5 is the standard)
    alpha: float = 0.5
    # models per work unit = rows per Zarr chunk, so each unit owns whole chunks
    block_size: int = 32
    # keep the parameters of the first k models (the checkpoints TRAK needs); 0 keeps none
    keep_params: int = 0
    # stored precision of the logits: float32 | float16 (half the bytes; README "Store sizes" measures its effect)
    logits_dtype: str = "float32"


@dataclass(frozen=True)
class DatamodelsConfig:
    # which estimators to fit: lasso, trak
    methods: tuple[str, ...] = ("lasso",)
    # the last n_lds subset models are held out for LDS, the n_val before them for choosing lambda
    n_lds: int = 64
    n_val: int = 64
    # regularisation path: n_lambdas values from lambda_max down to lambda_max * lambda_ratio
    n_lambdas: int = 12
    lambda_ratio: float = 1e-3
    # targets per work unit (best a multiple of 128, the subsets store's chunk along targets); a LASSO unit holds
    # about (100 N + 60 M) * target_chunk * (C + 1) bytes of solver state per LASSO unit (docs/design.md)
    target_chunk: int = 512
    # stored precision of the datamodel weights: float32 | float16 (fits run in float32 either way)
    weights_dtype: str = "float32"
    # LDS curve: fit on these numbers of subset models (0 or empty: skip the curve)
    lds_curve: tuple[int, ...] = ()
    # TRAK: number of checkpoints (the first subset models), projection dimension, ridge term
    trak_checkpoints: int = 10
    trak_proj_dim: int = 512
    trak_lambda_reg: float = 1e-3
    # failed (diverged) subset models: refused (false; rerun the subsets stage, which retrains them), or dropped
    # from their split and recorded in the datamodel stores' attrs (true)
    drop_failed: bool = False


@dataclass(frozen=True)
class ForgetSetsConfig:
    # random forget sets of these sizes (training-set indices drawn without replacement)
    random_sizes: tuple[int, ...] = (10, 50)
    # independent draws of each random size: random_<size>, random_<size>_d1, ... (the report summarises a
    # method over the draws, the sampling of the forget set itself)
    draws: int = 1
    # forget every training example of this class (None: no full-class set)
    full_class: int | None = 0
    # sub-populations from the train x train margin-datamodel matrix (A2D, docs/methods.md §4): the top-k scores on
    # its first and second principal components (0: none) ...
    pc_top_k: int = 0
    # ... and n points from each end of PC1 and PC2 (0: none)
    pc_ends: int = 0


@dataclass(frozen=True)
class ModelsConfig:
    # K: full models, and oracles (retrained without the forget set) per forget set, for KLOM (docs/methods.md §4)
    k: int = 8
    # Oracle Matching's target (docs/methods.md §3): "own", each full model matches the logits of an oracle of its
    # own (K more oracles per forget set, distinct seeds: the paper's reading); "mean", every model matches the
    # mean logits of om_oracles oracles (collapses the models' spread). Either way they are kept apart from the
    # K oracles that KLOM compares against, so OM is never scored against its own targets.
    om_target: str = "own"
    # with om_target "mean": how many oracles per forget set are averaged
    om_oracles: int = 2
    # K more oracles per forget set for the report's oracle floor: KLOM of these fresh oracles against the K that
    # methods are scored against, K vs K like a method (off: the floor splits the K oracles, K/2 vs K/2, which
    # reads higher from sampling noise alone)
    floor_oracles: bool = True
    # models per work unit (= rows per Zarr chunk)
    block_size: int = 4


@dataclass(frozen=True)
class UnlearnConfig:
    # methods run on every full model for every forget set (unlearning.METHODS; retraining = the oracles)
    methods: tuple[str, ...] = ("do_nothing", "dm_direct", "dm_matching", "oracle_matching", "mu_mis",
                                "mu_mis_gap", "gradient_descent", "gradient_ascent", "neggrad_plus", "scrub")
    # the datamodel stores DM-Direct and DMM read (lasso | trak): each gets its own rows, e.g. dm_matching[trak]
    datamodels: tuple[str, ...] = ("lasso",)
    # hyperparameter overrides per method, e.g. {dm_matching: {epochs: 2}}; keys are checked against the
    # method's Hyperparameters dataclass. The tune stage's choice (tune.json), where it ran, replaces them.
    hparams: dict = field(default_factory=dict)
    # compute budgets: each method with an iterative budget (epochs; MU-Mis's max_steps) also runs at these
    # multiples of its tuned setting (rounded, at least 1), e.g. [0.33, 1, 3]; rows such as dm_matching@3x
    budgets: tuple[float, ...] = (1.0,)
    # unlearning quality against datamodel quality: DM-Direct and DMM also run on LASSO datamodels fit on the first
    # n subset models for each n of datamodels.lds_curve below the fit models (stores datamodels/lasso_n<n>.zarr),
    # with the hyperparameters tuned on the full LASSO store; the report plots KLOM against n
    datamodel_curve: bool = False


@dataclass(frozen=True)
class TuneConfig:
    """The tune stage: hyperparameters chosen by KLOM on tuning forget sets of the evaluated kinds,
    disjoint from every evaluated set and drawn from their own seed stream, against their own oracles."""

    # random tuning sets of these sizes (drawn from the points outside every evaluated set)
    random_sizes: tuple[int, ...] = (50,)
    # every training point of this class outside the evaluated sets (None: no class set; best another class
    # than forget_sets.full_class)
    full_class: int | None = None
    # the pc_top_k highest scores on PC3 of the margin-datamodel matrix, outside the evaluated sets (0: none)
    pc_top_k: int = 0
    # the tune stage's own full models (never evaluated), unlearned per tuning set and grid point, and the
    # reference oracles per tuning set
    k: int = 8
    # per method, values to try: {dm_matching: {lr: [1.0e-3, 5.0e-3]}}; every combination, over unlearn.hparams
    grid: dict = field(default_factory=dict)
    # times a numeric axis grows by one step beyond the end its choice sits at (0: the grid as given)
    widen: int = 2


@dataclass(frozen=True)
class ExecutorConfig:
    # ray (local cluster or --address / RAY_ADDRESS) | serial (in-process, for tests and debugging)
    kind: str = "ray"
    # CPUs of the local Ray instance (None: all); ignored when joining a cluster
    num_cpus: int | None = None
    # CPUs (= torch threads) per work unit
    cpus_per_unit: int = 1
    # GPUs per work unit where GPUs exist (None: 1 if the cluster has GPUs, else 0)
    gpus_per_unit: float | None = None
    # how often Ray reruns a unit whose worker died
    max_retries: int = 3


@dataclass(frozen=True)
class RunConfig:
    # run name; the run directory defaults to runs/<name>
    name: str = "run"
    # the one seed that fixes every mask, model and result
    seed: int = 0
    # where the stores go (None: runs/<name>): a local path, or an object-store URL (s3://bucket/runs/demo; gs://
    # with gcsfs) that every node of a cluster reaches, credentials and endpoint from the environment
    run_dir: str | None = None
    # other run directories (paths or URLs) whose stores this run reads, read-only, where their recorded config
    # equals this run's and they are complete (pipelines.rundir.reuse; `dmu run --reuse` appends)
    reuse: tuple[str, ...] = ()
    # stages run by `dmu run` when --stages is not given
    stages: tuple[str, ...] = ("subsets",)
    task: TaskConfig = field(default_factory=TaskConfig)
    subsets: SubsetsConfig = field(default_factory=SubsetsConfig)
    datamodels: DatamodelsConfig = field(default_factory=DatamodelsConfig)
    forget_sets: ForgetSetsConfig = field(default_factory=ForgetSetsConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def resolved_run_dir(self) -> UPath:
        """The run directory: a local path or an object-store URL (s3://bucket/runs/demo), as a UPath."""
        from attribution.store import as_path

        return as_path(self.run_dir if self.run_dir else Path("runs") / self.name)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _quoted(key: str) -> str:
    """A key in quotes for an error line; escaped where it holds line breaks or other unprintable characters
    (the CLI prints one line per line of the message)."""
    return f"'{key}'" if key.isprintable() else repr(key)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert lists to tuples and dicts to dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {_quoted(key)} must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {_quoted(key)} must be a list, got {value!r}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {_quoted(key)} must be a mapping, got {value!r}")
        _check_plain(value, key)
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool:
            raise ConfigError(f"config key {_quoted(key)} must be {tp.__name__}, got {value!r}")
        if not isinstance(value, tp):
            raise ConfigError(f"config key {_quoted(key)} must be {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"config key {_quoted(key)}: unsupported annotation {tp!r}")


def _check_plain(value: Any, key: str) -> None:
    """A free-form mapping holds what config.json can: string keys; strings, numbers, booleans, nulls, lists and
    mappings (not the dates or binary that YAML also reads)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"config key {_quoted(key)} has the key {k!r}: keys must be strings")
            _check_plain(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_plain(v, f"{key}[{i}]")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise ConfigError(f"config key {_quoted(key)} must be a number, string, boolean, list or mapping, "
                          f"got {value!r}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a dict; unknown keys and wrong types raise ConfigError naming the key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in names:  # YAML keys may be numbers, booleans or null
            close = difflib.get_close_matches(key, names, n=1) if isinstance(key, str) else []
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown config key {_quoted(f'{prefix}{key}')}{hint}")
        kwargs[key] = _convert(value, hints[key], prefix + key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """A plain JSON-able dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist: pass a YAML file such as pipelines/configs/demo.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:  # its message spans lines (the text with a caret): keep the problem and where
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"config file {path} is not valid YAML{where}: {' '.join(problem.split())}") from exc
    except (ValueError, TypeError, OverflowError) as exc:  # a value YAML parses but cannot build (date 0000-00-00)
        raise ConfigError(f"config file {path} holds a value YAML cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys at the top level")
    cfg = from_dict(RunConfig, data)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig, stages: tuple[str, ...] | list[str] | None = None) -> None:
    """Every check of a config that needs no data or store, so that a bad config fails before any stage runs
    (`load_config` calls it, and `run_stages` with the stages it is about to run; the checks that need the
    task's data run where the data is loaded). The datamodels stage's split of the subset models and TRAK's
    checkpoints are checked when `stages` (default: cfg.stages) includes it."""
    s = cfg.subsets
    if not 0.0 < s.alpha < 1.0:
        raise ConfigError(f"subsets.alpha must be in (0, 1), got {s.alpha}")
    if s.n_models < 1 or s.block_size < 1:
        raise ConfigError("subsets.n_models and subsets.block_size must be positive")
    if s.keep_params < 0 or s.keep_params > s.n_models:
        raise ConfigError(f"subsets.keep_params must be in [0, n_models={s.n_models}], got {s.keep_params}")
    for key, value in (("subsets.logits_dtype", s.logits_dtype), ("datamodels.weights_dtype",
                                                                   cfg.datamodels.weights_dtype)):
        if value not in ("float32", "float16"):
            raise ConfigError(f"{key} must be float32 or float16, got {value!r}")
    if cfg.datamodels.target_chunk < 1:
        raise ConfigError(f"datamodels.target_chunk must be positive, got {cfg.datamodels.target_chunk}")
    if cfg.executor.kind not in ("ray", "serial"):
        raise ConfigError(f"executor.kind must be 'ray' or 'serial', got {cfg.executor.kind!r}")
    if cfg.models.om_target not in ("own", "mean"):
        raise ConfigError(f"models.om_target must be 'own' (each model matches its own oracle) or 'mean', got "
                          f"{cfg.models.om_target!r}")
    u, t = cfg.unlearn, cfg.tune
    for dm in u.datamodels:
        if dm not in DATAMODEL_ESTIMATORS:
            raise ConfigError(f"unlearn.datamodels entries must be {' or '.join(DATAMODEL_ESTIMATORS)}, got {dm!r}")
    if not u.datamodels or len(set(u.datamodels)) != len(u.datamodels):
        raise ConfigError(f"unlearn.datamodels must name each datamodel store once, got {list(u.datamodels)}")
    if not u.budgets or any(not (b > 0 and b < float("inf")) for b in u.budgets) or 1.0 not in u.budgets:
        raise ConfigError(f"unlearn.budgets must be positive multiples that include 1 (the tuned setting), got "
                          f"{list(u.budgets)}")
    if t.k < 2:
        raise ConfigError(f"tune.k must be at least 2 (KLOM compares ensembles), got {t.k}")
    if cfg.forget_sets.draws < 1:
        raise ConfigError(f"forget_sets.draws must be >= 1 (draws of each random forget-set size), got "
                          f"{cfg.forget_sets.draws}")
    if t.widen < 0:
        raise ConfigError(f"tune.widen must be >= 0 (0: the grid as given), got {t.widen}")
    if any(size < 1 for size in t.random_sizes) or t.pc_top_k < 0:
        raise ConfigError("tune.random_sizes and tune.pc_top_k must be positive")
    _check_datamodels(cfg, "datamodels" in (cfg.stages if stages is None else stages))
    _check_methods(cfg)


def _check_methods(cfg: RunConfig) -> None:
    """Unknown methods or hyperparameters of unlearn and tune."""
    from unlearning import METHODS  # the methods' registry (torch): imported when a config is checked
    for name in cfg.unlearn.methods:
        if name not in METHODS:
            raise ConfigError(f"unknown unlearn.methods entry {name!r}; known: {', '.join(sorted(METHODS))}")
        if name == "retrain":
            raise ConfigError("unlearn.methods: 'retrain' is the oracle ensemble of the models stage; remove it")
    for name, overrides in cfg.unlearn.hparams.items():
        if name not in METHODS:
            raise ConfigError(f"unlearn.hparams has unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
        if not isinstance(overrides, dict):
            raise ConfigError(f"unlearn.hparams.{name} must be a mapping of hyperparameters, e.g. {{epochs: 2}}, "
                              f"got {overrides!r}")
        fields = METHODS[name].Hyperparameters.__dataclass_fields__
        for key in overrides:
            if key not in fields:
                raise ConfigError(f"unknown config key {f'unlearn.hparams.{name}.{key}'!r}; {name} has: "
                                  f"{', '.join(fields) or 'no hyperparameters'}")
    for name, grid in cfg.tune.grid.items():
        if name not in cfg.unlearn.methods:
            raise ConfigError(f"tune.grid names {name!r}, which is not among unlearn.methods "
                              f"({', '.join(cfg.unlearn.methods)}): tune the methods the run evaluates")
        fields = METHODS[name].Hyperparameters.__dataclass_fields__
        if not isinstance(grid, dict) or not grid:
            raise ConfigError(f"tune.grid.{name} must map hyperparameters to lists of values, e.g. "
                              f"{{lr: [1.0e-3, 5.0e-3]}}, got {grid!r}")
        for key, values in grid.items():
            if key not in fields:
                raise ConfigError(f"unknown config key {f'tune.grid.{name}.{key}'!r}; {name} has: "
                                  f"{', '.join(fields) or 'no hyperparameters'}")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"tune.grid.{name}.{key} must be a non-empty list of values, got {values!r}")


def _check_datamodels(cfg: RunConfig, fitting: bool) -> None:
    d, s = cfg.datamodels, cfg.subsets
    unknown = [m for m in d.methods if m not in DATAMODEL_ESTIMATORS]
    if unknown:
        raise ConfigError(f"unknown datamodels.methods {unknown}: use {' and/or '.join(DATAMODEL_ESTIMATORS)}")
    if d.n_val < 1 or d.n_lds < 1:
        raise ConfigError(f"datamodels.n_val and datamodels.n_lds must be >= 1 (held-out models to choose λ and "
                          f"measure LDS), got {d.n_val} and {d.n_lds}")
    n_fit = s.n_models - d.n_val - d.n_lds
    if fitting and n_fit < 2:
        raise ConfigError(f"subsets.n_models = {s.n_models} leaves {n_fit} models to fit after n_val = {d.n_val} "
                          f"and n_lds = {d.n_lds}: train more subset models or hold out fewer")
    if fitting and "trak" in d.methods and s.keep_params < d.trak_checkpoints:
        raise ConfigError(f"TRAK needs the parameters of {d.trak_checkpoints} subset models "
                          f"(datamodels.trak_checkpoints) but subsets.keep_params = {s.keep_params}: raise "
                          "keep_params (this retrains the subset store in a new run directory) or lower "
                          "trak_checkpoints")
    u = cfg.unlearn
    if u.datamodel_curve:
        needs = [what for what, ok in (
            ("'lasso' in datamodels.methods and unlearn.datamodels", "lasso" in d.methods and "lasso" in u.datamodels),
            ("dm_direct or dm_matching in unlearn.methods", {"dm_direct", "dm_matching"} & set(u.methods)),
            (f"a datamodels.lds_curve size below the {n_fit} fit models", any(0 < n < n_fit for n in d.lds_curve)),
        ) if not ok]
        if needs:
            raise ConfigError(f"unlearn.datamodel_curve needs {' and '.join(needs)}: add them or set it to false")
    if "oracle_matching" in cfg.unlearn.methods and cfg.models.om_target == "mean" and cfg.models.om_oracles < 1:
        raise ConfigError("oracle_matching with models.om_target mean needs models.om_oracles >= 1 (the oracles "
                          "whose mean it matches)")
