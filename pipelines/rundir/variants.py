"""Variants: a method with its hyperparameters, datamodel store and compute budget, one row of the report and one
store `unlearned/<forget set>/<store name>.zarr`. Their labels and store names, and each method's budget knob."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass

from pipelines.config import RunConfig
from unlearning import METHODS


DATAMODEL_METHODS = ("dm_direct", "dm_matching")


# Each method's budget knob, scaled by unlearn.budgets (the others have epochs; do_nothing and dm_direct none).
BUDGET_KEYS = {"mu_mis": "max_steps", "mu_mis_gap": "max_steps"}


# MU-Mis's reasons to stop (info["stopped_by"]), stored as their index; -1: not MU-Mis.
STOPPED_BY = ("delta", "max_steps", "non_finite", "gap_closed")


def budget_key(method: str) -> str | None:
    key = BUDGET_KEYS.get(method, "epochs")
    return key if key in METHODS[method].Hyperparameters.__dataclass_fields__ else None


@dataclass(frozen=True)
class Variant:
    """One row of the report: `method` with hyperparameter overrides `hparams`, reading datamodel store
    `datamodel` (the datamodel methods; else None), at `budget` times its tuned budget."""

    method: str
    hparams: dict
    datamodel: str | None = None
    budget: float = 1.0
    # the label's datamodel part is shown when the run compares datamodels or uses one other than LASSO
    show_datamodel: bool = False
    # the tune stage's grid point (None: an evaluated variant)
    grid_point: int | None = None

    @property
    def label(self) -> str:
        dm = f"[{self.datamodel}]" if self.show_datamodel else ""
        point = f"#{self.grid_point}" if self.grid_point is not None else ""
        return self.method + dm + (f"@{self.budget:g}x" if self.budget != 1 else "") + point

    @property
    def tuning_key(self) -> str:
        """The key of this variant's hyperparameters in tune.json: the method, and its datamodel where the label
        shows it (a datamodel method is tuned on each datamodel store it runs on)."""
        return self.method + (f"[{self.datamodel}]" if self.show_datamodel else "")

    @property
    def store_name(self) -> str:
        """The store's file name: the label in characters every object store and glob take literally."""
        dm = f"__{self.datamodel}" if self.show_datamodel else ""
        point = f"__g{self.grid_point}" if self.grid_point is not None else ""
        return self.method + dm + (f"__x{self.budget:g}" if self.budget != 1 else "") + point

    def describe(self) -> dict:
        return {"label": self.label, "method": self.method, "hparams": self.hparams, "datamodel": self.datamodel,
                "budget": self.budget}


def parse_store_name(name: str) -> tuple[str, str, float]:
    """(method, datamodel or "", budget) of a variant's store name: the inverse of `Variant.store_name`
    (dm_matching__trak__x3 -> (dm_matching, trak, 3.0)); a tuning grid point's __g<i> is ignored."""
    method, *parts = name.split("__")
    datamodel, budget = "", 1.0
    for part in parts:
        if re.fullmatch(r"x[0-9.e+-]+", part):
            budget = float(part[1:])
        elif not re.fullmatch(r"g[0-9]+", part):
            datamodel = part
    return method, datamodel, budget


def store_name_of(label: str) -> str:
    """A variant's store name from its label as the report shows it: the inverse of `Variant.label`
    (dm_matching[trak]@3x -> dm_matching__trak__x3)."""
    return re.sub(r"@([0-9.e+-]+)x$", r"__x\1", label).replace("[", "__").replace("]", "")


def scaled(method: str, hparams: dict, budget: float) -> dict:
    """`hparams` with the method's budget knob multiplied by `budget` (rounded, at least 1); SCRUB's max-steps
    stay within its epochs."""
    key = budget_key(method)
    if key is None or budget == 1:
        return dict(hparams)
    default = METHODS[method].Hyperparameters.__dataclass_fields__[key].default
    out = {**hparams, key: max(1, round(hparams.get(key, default) * budget))}
    if method == "scrub":
        steps = hparams.get("max_steps", METHODS[method].Hyperparameters.__dataclass_fields__["max_steps"].default)
        out["max_steps"] = min(steps, out["epochs"])
    return out


def show_datamodel(cfg: RunConfig, method: str) -> bool:
    """Whether `method`'s labels name their datamodel store: a datamodel method in a run that compares
    datamodels or uses one other than LASSO."""
    u = cfg.unlearn
    return method in DATAMODEL_METHODS and (len(u.datamodels) > 1 or u.datamodels != ("lasso",))


def curve_sizes(cfg: RunConfig) -> tuple[int, ...]:
    """The numbers of subset models of unlearn.datamodel_curve's LASSO stores: datamodels.lds_curve's sizes below
    the fit models (the largest point of the curve is the run's own LASSO store); () when the curve is off."""
    d = cfg.datamodels
    n_fit = cfg.subsets.n_models - d.n_val - d.n_lds
    return tuple(sorted({n for n in d.lds_curve if 0 < n < n_fit})) if cfg.unlearn.datamodel_curve else ()


def curve_store(n_models: int) -> str:
    """The datamodel store of LASSO fit on the first `n_models` subset models (datamodels/lasso_n<n>.zarr)."""
    return f"lasso_n{n_models}"


def curve_models(datamodel: str | None) -> int | None:
    """The number of subset models of a curve store's name (lasso_n96 -> 96); None for any other store."""
    match = re.fullmatch(r"lasso_n(\d+)", datamodel or "")
    return int(match.group(1)) if match else None


def variants(cfg: RunConfig, chosen: dict[str, dict]) -> list[Variant]:
    """Every method of the config at every budget (where it has a budget knob) and, for the datamodel methods,
    on every datamodel store; hyperparameters: the tune stage's choice for that method and datamodel
    (`Variant.tuning_key`) where it made one, else unlearn.hparams. With unlearn.datamodel_curve, the datamodel
    methods also run on each curve store (`curve_sizes`) with the hyperparameters chosen on the LASSO store."""
    u = cfg.unlearn
    out = []
    for method in u.methods:
        show = show_datamodel(cfg, method)
        for dm in u.datamodels if method in DATAMODEL_METHODS else (None,):
            hp = chosen.get(Variant(method, {}, dm, show_datamodel=show).tuning_key, u.hparams.get(method, {}))
            for b in sorted(u.budgets) if budget_key(method) else (1.0,):
                out.append(Variant(method, scaled(method, hp, b), dm, float(b), show))
        if method in DATAMODEL_METHODS:
            hp = chosen.get(Variant(method, {}, "lasso", show_datamodel=show).tuning_key, u.hparams.get(method, {}))
            out += [Variant(method, dict(hp), curve_store(n), 1.0, True) for n in curve_sizes(cfg)]
    return out


def grid_axes(cfg: RunConfig) -> dict[str, tuple[str, str | None, dict[str, list]]]:
    """The tune stage's grids by tuning key (`Variant.tuning_key`): (method, datamodel, tune.grid's values for
    the method). A datamodel method has one grid per store of unlearn.datamodels, tuned on that store."""
    out = {}
    for method, grid in cfg.tune.grid.items():
        show = show_datamodel(cfg, method)
        for dm in cfg.unlearn.datamodels if method in DATAMODEL_METHODS else (None,):
            out[Variant(method, {}, dm, show_datamodel=show).tuning_key] = (method, dm, {k: list(v) for k, v in
                                                                                  grid.items()})
    return out


def candidates(cfg: RunConfig, axes: dict[str, tuple[str, str | None, dict[str, list]]],
               numbering: dict[str, dict[str, int]]) -> dict[str, list[Variant]]:
    """Per tuning key of `axes` (`grid_axes`, perhaps widened), every combination of its values over
    unlearn.hparams, as grid points. `numbering` (key -> canonical hyperparameters -> grid point) is updated in
    place: a combination keeps its number as the grid grows, a new one takes the next, so a widened grid reuses
    the stores of the points already run."""
    out = {}
    for key, (method, dm, grid) in axes.items():
        base = cfg.unlearn.hparams.get(method, {})
        names = list(grid)
        numbers = numbering.setdefault(key, {})
        points = []
        for values in itertools.product(*(grid[n] for n in names)):
            hparams = {**base, **dict(zip(names, values))}
            i = numbers.setdefault(json.dumps(hparams, sort_keys=True), len(numbers))
            points.append(Variant(method, hparams, dm, show_datamodel=show_datamodel(cfg, method), grid_point=i))
        out[key] = points
    return out
