"""The public stores' files read and written by blocks of rows with plain file reads and writes (no memory map,
whose touched pages would count towards the process): `.npy` files (`NpyRows`, `write_npys`) and torch.save zip
files of float tensors (`PtTensors`). Every importer and exporter of pipelines/interchange reads through these.
"""

from __future__ import annotations

import collections
import contextlib
import pickle
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.config import ConfigError


class NpyRows:
    """Rows of a C-ordered .npy file read with plain file reads (no memory map, whose touched pages would count
    towards the process's memory): `shape`, `dtype`, `ndim`, `rows(start, stop)` and `take(rows)`."""

    def __init__(self, path: Path, missing: str):
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
        if (module, name) == ("torch._utils", "_rebuild_parameter"):  # an nn.Parameter: its data
            return lambda data, *_: data
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
