"""The datamodels release (MadryLab/datamodels-data) and what every importer shares. The release's
`train_masks_{PCT}pct.npy` (M, N) bool and `{train,test}_margins_{PCT}pct.npy` float16 are copied block by block
into a margin-only `subsets.zarr`; its fitted datamodels `{train,test}_{PCT}pct.pt` into a margin-only
`datamodels/<name>.zarr`. Shared: `NpyRows` / `PtTensors` (rows by plain file reads), `write_subsets`,
`subsets_blocks`, `write_npys` and `write_margin_datamodels` (block loops), `dm_direct_margins`.
"""

from __future__ import annotations

import collections
import contextlib
import pickle
import re
import struct
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from attribution.store import ArraySpec, open_or_create, open_store, read
from pipelines.config import ConfigError

# Modules that import torch (about 0.5 GB resident) are imported inside the functions that need them, so that
# copying masks and margins runs in a small process.
KIND = "subsets"
DATAMODELS_KIND = "datamodels"
MARGIN_DTYPE = "float16"
TARGET_CHUNK = 512  # targets per chunk of an imported datamodel store (the datamodels stage's default)
RELEASE_HINT = "download it from the datamodels release next to the masks file"


class NpyRows:
    """Rows of a C-ordered .npy file read with plain file reads (no memory map, whose touched pages would count
    towards the process's memory): `shape`, `dtype`, `ndim`, `rows(start, stop)` and `take(rows)`."""

    def __init__(self, path: Path, missing: str = RELEASE_HINT):
        if not path.exists():
            raise ConfigError(f"missing {path}: {missing}")
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

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The increasing `rows`, one file read per run of consecutive rows."""
        runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)
        parts = [self.rows(int(r[0]), int(r[-1]) + 1) for r in runs if len(r)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def write_npys(files: dict[str, tuple[Path, np.dtype, tuple[int, ...]]],
               blocks: Iterator[dict[str, np.ndarray]]) -> None:
    """Write .npy files `files` {name: (path, dtype, shape)} from consecutive blocks of rows {name: rows}, each
    appended with a plain file write after the header (no memory map: written pages stay out of the process)."""
    with contextlib.ExitStack() as stack:
        out = {}
        for name, (path, dtype, shape) in files.items():
            out[name] = stack.enter_context(open(path, "wb"))
            np.lib.format.write_array_header_1_0(out[name], {
                "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                "shape": tuple(int(s) for s in shape)})
        for block in blocks:
            for name, rows in block.items():
                np.ascontiguousarray(rows, dtype=files[name][1]).tofile(out[name])


_load = NpyRows


# torch's typed storages as they appear in a torch.save pickle
_STORAGES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64}


@dataclass(frozen=True)
class _Tensor:
    key: str  # the storage's record, <prefix>/data/<key>
    dtype: np.dtype
    offset: int  # in elements, from the storage's start
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _TensorUnpickler(pickle.Unpickler):
    """A torch.save pickle of plain tensors, rebuilt as `_Tensor` descriptions (no data read, no code run)."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, shape, stride, *_: _Tensor(storage[1], storage[0], offset, tuple(shape),
                                                                      tuple(stride))
        if module == "torch" and name in _STORAGES:
            return np.dtype(_STORAGES[name])
        raise ConfigError(f"{self.path} holds {module}.{name}, not float tensors: save the datamodel as "
                          "{'weight', 'bias', 'lam'} float32 tensors")

    def persistent_load(self, pid):
        return pid[1], pid[2]  # ('storage', dtype, key, location, numel)


class PtTensors:
    """The tensors of a torch.save file (zip format), read by rows with plain file reads like `NpyRows`: the
    pickle gives each tensor's storage record, offset and strides; a stored (uncompressed) record's bytes start
    after its zip local header. `tensors`: name -> description; `rows(name, start, stop)`; `whole(name)`."""

    def __init__(self, path: Path, missing: str):
        if not path.exists():
            raise ConfigError(f"missing {path}: {missing}")
        self.path = path
        try:
            with zipfile.ZipFile(path) as z:
                infos = {i.filename: i for i in z.infolist()}
                pkl = [n for n in infos if n.endswith("/data.pkl")]
                if len(pkl) != 1:
                    raise zipfile.BadZipFile("no data.pkl record")
                self.prefix = pkl[0][:-len("data.pkl")]
                order = z.read(self.prefix + "byteorder").decode() if self.prefix + "byteorder" in infos else "little"
                with z.open(pkl[0]) as f:
                    self.tensors = _TensorUnpickler(f, path).load()
        except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError) as exc:
            raise ConfigError(f"{path} is not a torch.save zip file ({exc}): download it again, or load it and "
                              "save it with torch.save (torch >= 1.6)") from exc
        if order != "little" or not isinstance(self.tensors, dict):
            raise ConfigError(f"{path} is not a little-endian dict of tensors: save it with torch.save on x86/ARM")
        self.start = {}
        with open(path, "rb") as f:
            for name, t in self.tensors.items():
                info = infos.get(f"{self.prefix}data/{t.key}") if isinstance(t, _Tensor) else None
                if info is None or info.compress_type != zipfile.ZIP_STORED:
                    raise ConfigError(f"{path}: '{name}' is not a stored tensor: save the datamodel with torch.save")
                f.seek(info.header_offset + 26)
                name_len, extra_len = struct.unpack("<HH", f.read(4))
                self.start[name] = info.header_offset + 30 + name_len + extra_len + t.offset * t.dtype.itemsize
                contiguous = tuple(int(np.prod(t.shape[i + 1:], dtype=np.int64)) for i in range(len(t.shape)))
                if t.shape and t.stride != contiguous and int(np.prod(t.shape)) > 1:
                    raise ConfigError(f"{path}: '{name}' is stored transposed: save it as tensor.contiguous()")

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        t = self.tensors[name]
        row = int(np.prod(t.shape[1:], dtype=np.int64))
        out = np.fromfile(self.path, dtype=t.dtype, count=(stop - start) * row,
                          offset=self.start[name] + start * row * t.dtype.itemsize)
        return out.reshape((stop - start,) + t.shape[1:])

    def whole(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return self.rows(name, 0, t.shape[0]) if t.shape else self.rows(name, 0, 1).reshape(())


# ----------------------------------------------------------------------------------------------------------
# subsets.zarr: masks and margins (or logits) of M models, written and read B models at a time


def write_subsets(run_dir: str | Path, *, n_models: int, n_train: int, outputs: tuple[tuple[int, ...], str],
                  read_block: Callable[[int, int], tuple[np.ndarray, np.ndarray]], config: dict, attrs: dict,
                  block_size: int, extra: dict[str, np.ndarray] | None = None) -> Path:
    """Create (or resume) run_dir/subsets.zarr with `masks` (M, N), `done` (M,) and `margins` (M, T) when
    `outputs` is ((T,), dtype), else `logits` (M, T, C); fill every block not done with `read_block(start, stop)`
    -> (masks, outputs), writing its done flags last. `extra`: small (M,) arrays written at creation."""
    shape, dtype = outputs
    name = "margins" if len(shape) == 1 else "logits"
    t = shape[0]
    fill = float("nan")
    arrays = {"masks": ArraySpec((n_models, n_train), "bool", (block_size, n_train), False),
              name: ArraySpec((n_models, *shape), dtype, (block_size, *shape), fill),
              "done": ArraySpec((n_models,), "bool", (block_size,), False)}
    for key, values in (extra or {}).items():
        arrays[key] = ArraySpec(values.shape, values.dtype.name, (block_size,), 0)

    def initialise(group: zarr.Group) -> None:
        for key, values in (extra or {}).items():
            group[key][:] = values

    path = Path(run_dir) / "subsets.zarr"
    group = open_or_create(path, arrays, kind=KIND, config={**config, "block_size": block_size},
                           attrs={"n_train": n_train, "n_targets": t, "margin_only": name == "margins",
                                  "block_size": block_size, **attrs}, initialise=initialise)
    done = np.asarray(group["done"][:])
    for start in range(0, n_models, block_size):
        stop = min(n_models, start + block_size)
        if done[start:stop].all():
            continue
        masks, values = read_block(start, stop)
        group["masks"][start:stop] = masks
        group[name][start:stop] = values
        group["done"][start:stop] = True  # last: a block counts only once its rows are written
    return path


def run_labels(run_dir: str | Path) -> np.ndarray:
    """(T,) labels of a run's targets, from its task (for the margins of a logits store)."""
    from pipelines.rundir.layout import load_run_config
    from pipelines.tasks import get_task

    return get_task(load_run_config(run_dir).task).load_data(None).y_targets.numpy()


def subsets_blocks(run_dir: str | Path, labels: np.ndarray | None = None
                   ) -> tuple[zarr.Group, Iterator[tuple[int, int, np.ndarray, np.ndarray]]]:
    """A complete run_dir/subsets.zarr and its blocks (start, stop, masks, margins), one stored block of models
    at a time; the margins of a logits store are computed with `labels` (default: the run's task's labels)."""
    group = open_store(Path(run_dir) / "subsets.zarr", KIND)
    done = np.asarray(group["done"][:])
    if not done.all():
        raise ConfigError(f"{run_dir}/subsets.zarr has {int((~done).sum())} models not done: finish the import or "
                          "the subsets stage first")
    if "margins" not in group and labels is None:
        labels = run_labels(run_dir)
    from unlearning.klom import margins as margins_of

    def blocks():
        m, block = group["masks"].shape[0], group["masks"].chunks[0]
        for start in range(0, m, block):
            stop = min(m, start + block)
            if "margins" in group:
                margins = read(group["margins"], slice(start, stop))
            else:
                margins = margins_of(read(group["logits"], slice(start, stop)), labels)
            yield start, stop, read(group["masks"], slice(start, stop)), margins

    return group, blocks()


# ----------------------------------------------------------------------------------------------------------
# the release's masks and margins


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
# datamodels/<name>.zarr, margin part: weights (N, T), bias and lambda (T,)


def margin_arrays(n_train: int, n_targets: int) -> dict[str, ArraySpec]:
    """The margin part of the datamodels stage's schema (`store_arrays`): margin_weights (N, T) in chunks of
    (256 rows, TARGET_CHUNK), margin_bias / margin_lambda / margin_val_mse / margin_lds (T,), done per chunk."""
    from pipelines.stages.datamodel_io import store_arrays

    arrays = store_arrays(n_train, n_targets, 1, min(TARGET_CHUNK, n_targets))
    return {name: spec for name, spec in arrays.items() if name.startswith("margin_") or name == "done"}


def write_margin_datamodels(run_dir: str | Path, name: str, *, n_train: int, n_targets: int,
                            read_rows: Callable[[int, int], np.ndarray], per_target: dict[str, np.ndarray],
                            config: dict, attrs: dict) -> Path:
    """Create (or resume) run_dir/datamodels/<name>.zarr as a margin-only datamodel store and copy the weights
    256 training points (one chunk row) at a time with `read_rows(start, stop)` -> (rows, T); attrs
    `imported_rows` counts the rows written, so a rerun continues there; then `per_target` (margin_bias,
    margin_lambda) and every done flag."""
    path = Path(run_dir) / "datamodels" / f"{name}.zarr"
    group = open_or_create(path, margin_arrays(n_train, n_targets), kind=DATAMODELS_KIND, config=config,
                           attrs={"n_train": n_train, "n_targets": n_targets, "margin_only": True,
                                  "imported_rows": 0, **attrs})
    weights = group["margin_weights"]
    rows = weights.chunks[0]  # the stage's ROW_CHUNK: whole chunks written
    for start in range(int(group.attrs["imported_rows"]), n_train, rows):
        stop = min(n_train, start + rows)
        weights[start:stop] = read_rows(start, stop).astype(weights.dtype, copy=False)
        group.attrs["imported_rows"] = stop  # after the rows: a rerun rewrites at most this block
    for key, values in per_target.items():
        group[key][:] = values
    group["done"][:] = True
    return path


def dm_direct_margins(store: str | Path, forget_idx: np.ndarray, original_margins: np.ndarray) -> np.ndarray:
    """DM-Direct (unlearning.datamodel) on a margin-only datamodel store: the original model's margins (T,) minus
    the summed margin weights of the forget points (read in blocks of the store's row chunk)."""
    import torch

    from unlearning.datamodel import datamodel_direct_logits

    group = open_store(store, DATAMODELS_KIND)
    if not np.asarray(group["done"][:]).all():
        raise ConfigError(f"{store} is not complete: rerun the import or the datamodels stage")
    weights = group["margin_weights"]
    rows = np.unique(np.asarray(forget_idx, dtype=np.int64))
    total = np.zeros(weights.shape[1], np.float64)
    for i in range(0, len(rows), weights.chunks[0]):
        total += read(weights, (rows[i:i + weights.chunks[0]], slice(None))).astype(np.float64).sum(0)
    original = np.asarray(original_margins, np.float32)[:, None]
    return datamodel_direct_logits(torch.from_numpy(original), torch.from_numpy(total[None, :, None]), 1).numpy()[:, 0]


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
