"""The datamodels release (MadryLab/datamodels-data): `train_masks_{PCT}pct.npy` (M, N) bool and
`{train,test}_margins_{PCT}pct.npy` float16 to and from a margin-only subsets.zarr, block by block; its fitted
datamodels `{train,test}_{PCT}pct.pt` into the margin part of datamodels/<name>.zarr, by blocks of rows.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pipelines.config import ConfigError
from pipelines.interchange.files import NpyRows, PtTensors, write_npys
from pipelines.interchange.stores import KIND, subsets_blocks, write_margin_datamodels, write_subsets

# KIND and NpyRows stay importable from here for code written against the release importer
__all__ = ["KIND", "NpyRows", "export_release", "import_release", "import_weights"]

MARGIN_DTYPE = "float16"
RELEASE_HINT = "download it from the datamodels release next to the masks file"


def _load(path: Path) -> NpyRows:
    return NpyRows(path, RELEASE_HINT)



def release_files(source: Path) -> tuple[Path, Path, Path, str]:
    """The masks and margins files of the one percentage found in `source`."""
    found = sorted(source.glob("train_masks_*pct.npy"))
    if len(found) != 1:
        raise ConfigError(f"{source} must hold exactly one train_masks_{{PCT}}pct.npy, found {len(found)}: "
                          "point SOURCE at a folder with one release percentage")
    pct = re.fullmatch(r"train_masks_(.+)pct\.npy", found[0].name).group(1)
    return (found[0], source / f"train_margins_{pct}pct.npy", source / f"test_margins_{pct}pct.npy", pct)


def check_release(masks: NpyRows, train: NpyRows, test: NpyRows) -> None:
    if masks.dtype != np.bool_ or masks.ndim != 2:
        raise ConfigError(f"train masks must be a 2-D bool array, got {masks.dtype} {masks.shape}: "
                          "use the release's train_masks file")
    m, n = masks.shape
    for name, arr in (("train margins", train), ("test margins", test)):
        if arr.ndim != 2 or arr.dtype != np.float16:
            raise ConfigError(f"{name} must be a 2-D float16 array, got {arr.dtype} {arr.shape}: "
                              "use the release's margins files")
        if arr.shape[0] != m:
            raise ConfigError(f"{name} have {arr.shape[0]} models, the masks {m}: the files are of different "
                              "releases")
    if train.shape[1] != n:
        raise ConfigError(f"train margins have {train.shape[1]} points, the masks {n}: wrong split size")


def import_release(source: str | Path, run_dir: str | Path, block_size: int = 256) -> Path:
    """Copy the release in `source` into run_dir/subsets.zarr, `block_size` models at a time; returns its path."""
    masks_f, train_f, test_f, pct = release_files(Path(source))
    masks, train, test = _load(masks_f), _load(train_f), _load(test_f)
    check_release(masks, train, test)
    m, n = masks.shape
    t = n + test.shape[1]
    return write_subsets(
        run_dir, n_models=m, n_train=n, outputs=((t,), MARGIN_DTYPE), block_size=block_size,
        read_block=lambda a, b: (masks.rows(a, b), np.concatenate([train.rows(a, b), test.rows(a, b)], axis=1)),
        config={"imported": "datamodels-release", "pct": pct, "n_models": m, "n_train": n, "n_targets": t},
        attrs={"imported": "datamodels-release"})


def export_release(run_dir: str | Path, out: str | Path, pct: str | None = None) -> Path:
    """Write run_dir/subsets.zarr (complete; margins, or logits turned into margins) as the release's three .npy
    files under `out`, one stored block of models at a time."""
    group, blocks = subsets_blocks(run_dir)
    m, n = group["masks"].shape
    t = group.attrs["n_targets"]
    pct = pct or str(group.attrs["config"].get("pct", "50"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_npys({"masks": (out / f"train_masks_{pct}pct.npy", np.bool_, (m, n)),
                "train": (out / f"train_margins_{pct}pct.npy", np.float16, (m, n)),
                "test": (out / f"test_margins_{pct}pct.npy", np.float16, (m, t - n))},
               ({"masks": masks, "train": margins[:, :n], "test": margins[:, n:]} for _, _, masks, margins in blocks))
    return out


# ----------------------------------------------------------------------------------------------------------
# the release's fitted datamodels: {train,test}_{PCT}pct.pt


def weight_files(source: Path) -> tuple[Path, Path, str]:
    """The train and test datamodel files of the one percentage found in `source`."""
    found = sorted(source.glob("train_*pct.pt"))
    if len(found) != 1:
        raise ConfigError(f"{source} must hold exactly one train_{{PCT}}pct.pt, found {len(found)}: point SOURCE "
                          "at a folder with the datamodels of one release percentage")
    pct = re.fullmatch(r"train_(.+)pct\.pt", found[0].name).group(1)
    return found[0], source / f"test_{pct}pct.pt", pct


def check_datamodel(pt: PtTensors, n_features: int | None) -> tuple[int, int]:
    """(n_features, n_targets) of one datamodel file, its keys, shapes and dtypes checked."""
    missing = {"weight", "bias", "lam"} - set(pt.tensors)
    if missing:
        raise ConfigError(f"{pt.path} lacks {sorted(missing)}: a fitted datamodel holds 'weight', 'bias' and 'lam'")
    weight = pt.tensors["weight"]
    if len(weight.shape) != 2:
        raise ConfigError(f"{pt.path}: weight must be 2-D (training points, targets), got shape {weight.shape}")
    n, t = weight.shape
    for key in ("bias", "lam"):
        if pt.tensors[key].shape != (t,):
            raise ConfigError(f"{pt.path}: {key} has shape {pt.tensors[key].shape}, the weight has {t} targets: "
                              "the tensors are of different fits")
    if n_features is not None and n != n_features:
        raise ConfigError(f"{pt.path} has {n} training points, the train datamodels {n_features}: the files are "
                          "of different releases")
    return n, t


def import_weights(source: str | Path, run_dir: str | Path, name: str = "lasso") -> Path:
    """Copy the release's fitted datamodels (train targets, then test targets) into the margin part of
    run_dir/datamodels/<name>.zarr, 256 training points at a time; returns its path."""
    train_f, test_f, pct = weight_files(Path(source))
    hint = "download it from the datamodels release next to the train datamodels"
    train, test = PtTensors(train_f, hint), PtTensors(test_f, hint)
    n, t_train = check_datamodel(train, None)
    if t_train != n:
        raise ConfigError(f"{train_f} has {t_train} targets for {n} training points: its targets must be the "
                          "training points (a train_{PCT}pct.pt of the release)")
    t = n + check_datamodel(test, n)[1]
    both = (train, test)
    return write_margin_datamodels(
        run_dir, name, n_train=n, n_targets=t,
        read_rows=lambda a, b: np.concatenate([pt.rows("weight", a, b) for pt in both], axis=1),
        per_target={"margin_bias": np.concatenate([pt.whole("bias") for pt in both]),
                    "margin_lambda": np.concatenate([pt.whole("lam") for pt in both])},
        config={"imported": "datamodels-weights", "pct": pct, "n_train": n, "n_targets": t},
        attrs={"imported": "datamodels-weights", "pct": pct})
