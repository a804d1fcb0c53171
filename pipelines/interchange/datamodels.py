"""The datamodels release (MadryLab/datamodels-data): `train_masks_{PCT}pct.npy` (M, N) bool and
`{train,test}_margins_{PCT}pct.npy` (M, N) / (M, N_test) float16, read block by block with file reads and copied
into a margin-only `subsets.zarr` (masks, margins, done). A rerun continues at the first block not done.
Export writes the same three files back from such a store.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from attribution.store import ArraySpec, open_or_create, open_store
from pipelines.config import ConfigError

KIND = "subsets"
MARGIN_DTYPE = "float16"


class NpyRows:
    """Rows of a C-ordered .npy file read with plain file reads (no memory map, whose touched pages would count
    towards the process's memory): `shape`, `dtype`, `ndim` and `rows(start, stop)`."""

    def __init__(self, path: Path):
        if not path.exists():
            raise ConfigError(f"missing {path}: download it from the datamodels release next to the masks file")
        with open(path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)
                self.shape, fortran, self.dtype = header(f)
            except ValueError as exc:
                raise ConfigError(f"{path} is not a .npy file ({exc}): download it again") from exc
            self.offset = f.tell()
        if fortran:
            raise ConfigError(f"{path} is Fortran-ordered: save it C-ordered (np.save(np.ascontiguousarray(a)))")
        self.path, self.ndim = path, len(self.shape)
        self.row_items = int(np.prod(self.shape[1:], dtype=np.int64))
        expected = self.offset + self.shape[0] * self.row_items * self.dtype.itemsize
        if path.stat().st_size < expected:
            raise ConfigError(f"{path} is truncated ({path.stat().st_size} of {expected} bytes): download it again")

    def rows(self, start: int, stop: int) -> np.ndarray:
        count = (stop - start) * self.row_items
        out = np.fromfile(self.path, dtype=self.dtype, count=count,
                          offset=self.offset + start * self.row_items * self.dtype.itemsize)
        return out.reshape((stop - start,) + tuple(self.shape[1:]))


_load = NpyRows


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
    path = Path(run_dir) / "subsets.zarr"
    config = {"imported": "datamodels-release", "pct": pct, "n_models": m, "n_train": n, "n_targets": t,
              "block_size": block_size}
    arrays = {"masks": ArraySpec((m, n), "bool", (block_size, n), False),
              "margins": ArraySpec((m, t), MARGIN_DTYPE, (block_size, t), float("nan")),
              "done": ArraySpec((m,), "bool", (block_size,), False)}
    group = open_or_create(path, arrays, kind=KIND, config=config,
                           attrs={"n_train": n, "n_targets": t, "margin_only": True,
                                  "imported": "datamodels-release", "block_size": block_size})
    done = np.asarray(group["done"][:])
    for start in range(0, m, block_size):
        stop = min(m, start + block_size)
        if done[start:stop].all():
            continue
        group["masks"][start:stop] = masks.rows(start, stop)
        group["margins"][start:stop] = np.concatenate([train.rows(start, stop), test.rows(start, stop)], axis=1)
        group["done"][start:stop] = True  # last: a block counts only once its rows are written
    return path


def export_release(run_dir: str | Path, out: str | Path, pct: str | None = None) -> Path:
    """Write run_dir/subsets.zarr (margin-only, complete) as the release's three .npy files under `out`."""
    group = open_store(Path(run_dir) / "subsets.zarr", KIND)
    if "margins" not in group:
        raise ConfigError(f"{run_dir}/subsets.zarr has no margins: only a margin-only store exports to the release "
                          "layout")
    done = np.asarray(group["done"][:])
    if not done.all():
        raise ConfigError(f"{run_dir}/subsets.zarr has {int((~done).sum())} models not done: finish the import or "
                          "the subsets stage first")
    m, n = group["masks"].shape
    t = group["margins"].shape[1]
    pct = pct or str(group.attrs["config"].get("pct", "50"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"masks": np.lib.format.open_memmap(out / f"train_masks_{pct}pct.npy", "w+", np.bool_, (m, n)),
             "train": np.lib.format.open_memmap(out / f"train_margins_{pct}pct.npy", "w+", np.float16, (m, n)),
             "test": np.lib.format.open_memmap(out / f"test_margins_{pct}pct.npy", "w+", np.float16, (m, t - n))}
    block = group["masks"].chunks[0]
    for start in range(0, m, block):
        stop = min(m, start + block)
        files["masks"][start:stop] = group["masks"][start:stop]
        margins = group["margins"][start:stop]
        files["train"][start:stop] = margins[:, :n]
        files["test"][start:stop] = margins[:, n:]
    for f in files.values():
        f.flush()
    return out
