"""TRAK scores saved by the `traker` package (its save_dir: `metadata.json`, `experiments.json`,
`scores/<experiment>.mmap`, an (N_train, n_targets) .npy file) into the margin part of a run's
datamodels/trak.zarr, 256 training points at a time. The scores are traker's, uncalibrated (attrs `calibrated`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipelines.config import ConfigError
from pipelines.interchange.files import NpyRows
from pipelines.interchange.stores import write_margin_datamodels

HINT = "run traker's finalize_scores for that experiment, or copy the whole save_dir"


def read_json(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"missing {path}: point SOURCE at traker's save_dir (it holds metadata.json, "
                          "experiments.json and scores/)")
    try:
        return dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not traker's JSON ({exc}): copy the save_dir again") from exc


def experiment_names(experiments: dict, experiment: str | None, path: Path) -> list[str]:
    """The experiments to import, in order: `experiment` (comma-separated names) or the only one there is."""
    if experiment is None:
        if len(experiments) != 1:
            raise ConfigError(f"{path} holds experiments {sorted(experiments)}: name them with --experiment "
                              "A,B (their targets are concatenated in this order)")
        return list(experiments)
    names = experiment.split(",")
    for name in names:
        if name not in experiments:
            raise ConfigError(f"{path} has no experiment {name!r} (it has {sorted(experiments)}): check "
                              "--experiment")
        if int(experiments[name].get("scores_finalized", 0)) != 1:
            raise ConfigError(f"experiment {name!r} is not finalized in {path}: {HINT}")
    return names


def import_scores(source: str | Path, run_dir: str | Path, experiment: str | None = None,
                  name: str = "trak") -> Path:
    """Copy traker's scores of `experiment` (default: the save_dir's only experiment; several, comma-separated:
    their targets concatenated) into run_dir/datamodels/<name>.zarr as margin weights (N, T); returns its path.
    margin_bias and margin_lambda stay NaN: TRAK fits neither."""
    source = Path(source)
    n = int(read_json(source / "metadata.json").get("train set size", -1))
    experiments = read_json(source / "experiments.json")
    names = experiment_names(experiments, experiment, source / "experiments.json")
    if experiment is None and int(experiments[names[0]].get("scores_finalized", 0)) != 1:
        raise ConfigError(f"experiment {names[0]!r} is not finalized in {source / 'experiments.json'}: {HINT}")
    scores = []
    for exp in names:
        arr = NpyRows(source / "scores" / f"{exp}.mmap", HINT)
        targets = int(experiments[exp].get("num_targets", -1))
        if arr.ndim != 2 or arr.dtype.name not in ("float16", "float32") or arr.shape != (n, targets):
            raise ConfigError(f"{arr.path} is {arr.dtype} {arr.shape}, metadata.json and experiments.json declare "
                              f"float16/float32 ({n}, {targets}): the files are of different save_dirs")
        scores.append(arr)
    t = sum(arr.shape[1] for arr in scores)
    return write_margin_datamodels(
        run_dir, name, n_train=n, n_targets=t,
        read_rows=lambda a, b: np.concatenate([arr.rows(a, b) for arr in scores], axis=1),
        per_target={}, config={"imported": "trak-scores", "experiments": names, "n_train": n, "n_targets": t},
        attrs={"imported": "trak-scores", "calibrated": False,
               "units": "traker scores, uncalibrated: their scale is not a change of margin; calibrate them "
                        "against held-out subset models (attribution.trak.calibrate) before reading them as "
                        "effects (docs/public_stores.md)"})
