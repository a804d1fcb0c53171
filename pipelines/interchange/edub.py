"""The Easy Data Unlearning Bench (EasyDUB, the successor of RoyRin/data-unlearning-bench): its forget sets and the
per-model margins of its full ("pretrain") models and of each forget set's oracles, copied into forget_sets.json
and a margin-only models.zarr that the report scores with KLOM; export writes a run back in the bench's layout.

The layout, as easydub/EasyDUB-code reads it (easydub/data.py: load_forget_indices, load_margins_array,
list_pretrain_model_paths; eval_pretrain.py; demo.py), under the dataset root SOURCE:

    forget_sets/cifar10/forget_set_{ID}.npy                                1-D integer training indices
    margins/cifar10/pretrain/retain/resnet9/id_{M}_epoch_23.npy            (N,) every training point, index order
    margins/cifar10/pretrain/val/resnet9/id_{M}_epoch_23.npy               (N_test,) every test point
    margins/cifar10/pretrain/forget_{ID}/resnet9/id_{M}_epoch_23.npy       (|F|,) the forget points, file order
    margins/cifar10/oracle/forget_{ID}/retain/resnet9/id_{M}_epoch_23.npy  (N - |F|,) training points outside F,
                                                                           increasing (np.setdiff1d, demo.py)
    margins/cifar10/oracle/forget_{ID}/forget/resnet9/id_{M}_epoch_23.npy  (|F|,) the forget points, file order
    margins/cifar10/oracle/forget_{ID}/val/resnet9/id_{M}_epoch_23.npy     (N_test,) every test point
    models/cifar10/pretrain/resnet9/id_{M}_epoch_23.pt                     ResNet-9 state dicts (optional)

(epoch 23 is the last of the bench's 24 training epochs; M runs 0..K-1). The index maps onto dmu's targets
(training points 0..N-1, then test points N..N+N_test-1) are explicit: `target_maps`. models.zarr (margin-only,
attr `margin_only`): `full/margins` (K, T) from pretrain retain + val, `full_forget/<fs>/margins` (K, |F|) the
bench's pretrain forget files as they are (scored for the forget split and exported unchanged), `oracle/<fs>/margins`
(K_o, T) scattered from the three oracle splits, and `done` flags per ensemble, written block by block.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from attribution.store import ArraySpec, open_or_create, open_store, read, write_text
from pipelines.config import ConfigError, load_config, to_dict
from pipelines.interchange.files import NpyRows
from pipelines.interchange.stores import progress
from pipelines.rundir.layout import MODELS_KIND, fingerprint, forget_sets_path, load_forget_sets, load_run_config
from pipelines.tasks import get_task
from unlearning.klom import margins as margins_of

DATASET, ARCH = "cifar10", "resnet9"
# the bench's checkpoints and margins are those of the last of 24 epochs (easydub/data.py: id_{M}_epoch_23)
EPOCH = 23
EPOCHS = EPOCH + 1
SPLITS = ("retain", "forget", "val")
# the config a run imported without one gets (config.json), for `dmu report RUN` and the unlearn stage
IMPORTED_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "cifar10_imported.yaml"

HINT = "download it again from the EasyDUB dataset (docs/public_stores.md)"


def model_file(m: int) -> str:
    return f"id_{m}_epoch_{EPOCH}.npy"


def forget_name(forget_id: int) -> str:
    """dmu's name of the bench's forget set ID (the file's stem)."""
    return f"forget_set_{forget_id}"


def margin_dirs(source: Path, forget_id: int) -> dict[str, Path]:
    """Every folder of per-model margin files for one forget set: pretrain retain / val / forget and the oracles'
    retain / forget / val."""
    base = source / "margins" / DATASET
    return {"pretrain/retain": base / "pretrain" / "retain" / ARCH,
            "pretrain/val": base / "pretrain" / "val" / ARCH,
            "pretrain/forget": base / "pretrain" / f"forget_{forget_id}" / ARCH,
            **{f"oracle/{s}": base / "oracle" / f"forget_{forget_id}" / s / ARCH for s in SPLITS}}


def target_maps(forget: np.ndarray, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    """Split -> dmu target index of each entry of the bench's file of that split (forget: the file's order)."""
    return {"retain": np.setdiff1d(np.arange(n_train), forget), "forget": np.asarray(forget, np.int64),
            "val": np.arange(n_train, n_train + n_test)}


# ----------------------------------------------------------------------------------------------------------
# checking the source


def forget_set_files(source: Path) -> dict[int, Path]:
    folder = source / "forget_sets" / DATASET
    found = {}
    for p in sorted(folder.glob("forget_set_*.npy")) if folder.is_dir() else ():
        match = re.fullmatch(r"forget_set_(\d+)\.npy", p.name)
        if match:
            found[int(match.group(1))] = p
    if not found:
        raise ConfigError(f"no forget sets in {folder} (forget_set_<ID>.npy): point SOURCE at the EasyDUB dataset "
                          "root (the folder holding forget_sets/ and margins/)")
    return dict(sorted(found.items()))


def model_ids(folder: Path) -> list[int]:
    if not folder.is_dir():
        raise ConfigError(f"missing {folder}: download that folder of the EasyDUB dataset")
    return sorted(int(m.group(1)) for p in folder.iterdir()
                  if (m := re.fullmatch(rf"id_(\d+)_epoch_{EPOCH}\.npy", p.name)))


def count_models(folders: dict[str, Path], kind: str) -> int:
    """K: the models every folder of `folders` holds, 0..K-1 without a gap; an incomplete model is an error."""
    ids = {name: set(model_ids(folder)) for name, folder in folders.items()}
    union = set().union(*ids.values())
    if not union:
        raise ConfigError(f"no {kind} margins (id_<M>_epoch_{EPOCH}.npy) in {next(iter(folders.values()))}: "
                          "download them")
    for name, have in ids.items():
        lacking = sorted(union - have)
        if lacking:
            raise ConfigError(f"incomplete {kind} models: {folders[name]} lacks {model_file(lacking[0])} "
                              f"({len(lacking)} missing) that another split has: download the missing files")
    gaps = sorted(set(range(max(union) + 1)) - union)
    if gaps:
        raise ConfigError(f"incomplete {kind} models: {model_file(gaps[0])} is missing in every split "
                          f"({len(gaps)} model ids missing below {max(union)}): download them")
    return max(union) + 1


def load_forget_set(path: Path) -> np.ndarray:
    try:
        idx = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ConfigError(f"{path} is not a readable .npy array ({exc or type(exc).__name__}): download it "
                          "again") from exc
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or idx.size == 0:
        raise ConfigError(f"{path} must be a non-empty 1-D integer array of training indices, got {idx.dtype} "
                          f"{idx.shape}: download it again")
    return idx.astype(np.int64)


def check_file(path: Path, size: int, dtype, what: str) -> NpyRows:
    """The header of one per-model margins file, checked: 1-D, `size` entries, the dtype of the others."""
    arr = NpyRows(path, HINT)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.floating):
        raise ConfigError(f"{path} must be a 1-D float array of margins, got {arr.dtype} {arr.shape}: download "
                          "it again")
    if arr.shape[0] != size:
        raise ConfigError(f"wrong split size: {path} holds {arr.shape[0]} margins, {what} has {size}: the files "
                          "belong to another forget set or dataset; download them again")
    if dtype is not None and arr.dtype != dtype:
        raise ConfigError(f"{path} holds {arr.dtype} margins, the other files {dtype}: download it again")
    return arr


def scan_source(source: Path, n_models: int | None) -> dict:
    """Every check of the source, before anything is written: forget sets, model counts and each file's size."""
    source = Path(source)
    if not source.is_dir():
        raise ConfigError(f"source {source} is not a folder: point it at the EasyDUB dataset root")
    files = forget_set_files(source)
    first = next(iter(files))
    full_dirs = margin_dirs(source, first)
    first_retain = NpyRows(_first_file(full_dirs["pretrain/retain"]), HINT)  # sets N and the margins' dtype
    n_train = first_retain.shape[0]
    n_test = NpyRows(_first_file(full_dirs["pretrain/val"]), HINT).shape[0]
    sets, oracles = {}, {}
    pretrain = {"retain": full_dirs["pretrain/retain"], "val": full_dirs["pretrain/val"]}
    for fid, path in files.items():
        idx = load_forget_set(path)
        bad = idx[(idx < 0) | (idx >= n_train)]
        if bad.size:
            raise ConfigError(f"{path} holds index {int(bad[0])} outside the {n_train} training points of the "
                              "margins: the forget sets and margins are of different datasets")
        if np.unique(idx).size != idx.size:
            raise ConfigError(f"{path} repeats a training index: download it again")
        sets[fid] = idx
        dirs = margin_dirs(source, fid)
        pretrain[f"forget_{fid}"] = dirs["pretrain/forget"]
        oracles[fid] = count_models({s: dirs[f"oracle/{s}"] for s in SPLITS}, f"forget set {fid}'s oracle")
    k = count_models(pretrain, "pretrain")
    if n_models is not None:
        counts = {"pretrain": k, **{f"forget set {f}'s oracle": o for f, o in oracles.items()}}
        if n_models < 1:
            raise ConfigError(f"--n-models must be at least 1, got {n_models}")
        for kind, have in counts.items():
            if have < n_models:
                raise ConfigError(f"--n-models {n_models}: the source holds {have} {kind} models; import at most "
                                  f"{have}")
        k, oracles = n_models, {f: n_models for f in oracles}
    dtype = first_retain.dtype
    for m in range(k):
        check_file(pretrain["retain"] / model_file(m), n_train, dtype, "the training set (pretrain retain)")
        check_file(pretrain["val"] / model_file(m), n_test, dtype, "the test set (pretrain val)")
        for fid, idx in sets.items():
            check_file(pretrain[f"forget_{fid}"] / model_file(m), idx.size, dtype, f"forget set {fid}")
    for fid, idx in sets.items():
        dirs = margin_dirs(source, fid)
        sizes = {"retain": n_train - idx.size, "forget": idx.size, "val": n_test}
        for m in range(oracles[fid]):
            for s in SPLITS:
                check_file(dirs[f"oracle/{s}"] / model_file(m), sizes[s], dtype,
                           f"forget set {fid}'s {s} split (forget set of {idx.size} of {n_train} training points)")
    return {"sets": sets, "k": k, "oracles": oracles, "n_train": n_train, "n_test": n_test, "dtype": dtype}


def _first_file(folder: Path) -> Path:
    ids = model_ids(folder)
    if not ids:
        raise ConfigError(f"no margins (id_<M>_epoch_{EPOCH}.npy) in {folder}: download them")
    return folder / model_file(ids[0])


def checkpoints(source: Path, k: int) -> dict:
    """The pretrain ResNet-9 checkpoints of the k models imported, where present (listed, not copied): their
    paths, and the model ids that have none."""
    folder = source.resolve() / "models" / DATASET / "pretrain" / ARCH
    paths = [folder / f"id_{m}_epoch_{EPOCH}.pt" for m in range(k)]
    return {"files": [str(p) for p in paths if p.exists()], "missing": [m for m, p in enumerate(paths)
                                                                         if not p.exists()]}


# ----------------------------------------------------------------------------------------------------------
# import


def import_edub(source: str | Path, run_dir: str | Path, n_models: int | None = None, block_size: int = 16) -> Path:
    """Copy the bench's forget sets and margins in `source` into run_dir (forget_sets.json, margin-only
    models.zarr), `block_size` models at a time, resuming at the first block not done; the first n_models full
    models and oracles per forget set (None: all). Returns the models store's path."""
    source, run_dir = Path(source), Path(run_dir)
    scan = scan_source(source, n_models)
    sets, k, n_train, n_test = scan["sets"], scan["k"], scan["n_train"], scan["n_test"]
    t, dtype = n_train + n_test, str(scan["dtype"])
    names = {fid: forget_name(fid) for fid in sets}
    write_forget_sets(run_dir, {names[f]: idx for f, idx in sets.items()}, source)
    b = block_size
    arrays = {"full/margins": ArraySpec((k, t), dtype, (b, t), float("nan"), compressed=False),
              "full/done": ArraySpec((k,), "bool", (b,), False)}
    for fid, idx in sets.items():
        ko = scan["oracles"][fid]
        arrays[f"full_forget/{names[fid]}/margins"] = ArraySpec((k, idx.size), dtype, (b, idx.size), float("nan"),
                                                                compressed=False)
        arrays[f"oracle/{names[fid]}/margins"] = ArraySpec((ko, t), dtype, (b, t), float("nan"), compressed=False)
        arrays[f"oracle/{names[fid]}/done"] = ArraySpec((ko,), "bool", (b,), False)
    config = {"imported": "edub", "n_train": n_train, "n_test": n_test, "k": k, "dtype": dtype,
              "oracles": {names[f]: o for f, o in scan["oracles"].items()},
              "forget_sets": {names[f]: fingerprint(idx) for f, idx in sets.items()}}
    attrs = {"k": k, "n_train": n_train, "n_targets": t, "num_classes": 10, "epochs": EPOCHS, "dataset": DATASET,
             "targets": {"train": [0, n_train], "test": [n_train, t]}, "margin_only": True, "imported": "edub",
             "om_oracles": 0, "om_target": "own", "floor_oracles": False, "tune_k": 0,
             "oracles": config["oracles"], "bench_forget_ids": {names[f]: f for f in sets},
             "source": str(source.resolve()), "checkpoints": checkpoints(source, k)}
    group = open_or_create(run_dir / "models.zarr", arrays, kind=MODELS_KIND, config=config, attrs=attrs)
    first = next(iter(sets))
    full_dirs = margin_dirs(source, first)
    done = np.asarray(group["full/done"][:])
    n_oracles = sum(scan["oracles"][fid] for fid in sets)
    finished = int(done.sum()) + sum(int(np.asarray(group[f"oracle/{names[f]}/done"][:]).sum()) for f in sets)
    bar = progress(k + n_oracles, finished, "importing bench models", "model")
    for start in range(0, k, b):
        stop = min(k, start + b)
        if done[start:stop].all():
            continue
        rows = np.stack([np.concatenate([_read(full_dirs["pretrain/retain"], m), _read(full_dirs["pretrain/val"], m)])
                         for m in range(start, stop)])
        group["full/margins"][start:stop] = rows
        for fid in sets:
            folder = margin_dirs(source, fid)["pretrain/forget"]
            group[f"full_forget/{names[fid]}/margins"][start:stop] = np.stack([_read(folder, m)
                                                                             for m in range(start, stop)])
        group["full/done"][start:stop] = True  # last: a block counts only once its rows are written
        bar.update(stop - start - int(done[start:stop].sum()))
    for fid, idx in sets.items():
        dirs, maps = margin_dirs(source, fid), target_maps(idx, n_train, n_test)
        name, ko = names[fid], scan["oracles"][fid]
        done = np.asarray(group[f"oracle/{name}/done"][:])
        for start in range(0, ko, b):
            stop = min(ko, start + b)
            if done[start:stop].all():
                continue
            rows = np.empty((stop - start, t), dtype=dtype)
            for i, m in enumerate(range(start, stop)):
                for s in SPLITS:
                    rows[i, maps[s]] = _read(dirs[f"oracle/{s}"], m)
            group[f"oracle/{name}/margins"][start:stop] = rows
            group[f"oracle/{name}/done"][start:stop] = True
            bar.update(stop - start - int(done[start:stop].sum()))
    bar.close()
    if not (run_dir / "config.json").exists():  # `dmu report RUN` and the unlearn stage read the run's config
        write_text(run_dir / "config.json", json.dumps(imported_config(run_dir, k), indent=2))
    return run_dir / "models.zarr"


def _read(folder: Path, m: int) -> np.ndarray:
    arr = NpyRows(folder / model_file(m), HINT)
    return arr.rows(0, arr.shape[0])


def imported_config(run_dir: Path, k: int) -> dict:
    """pipelines/configs/cifar10_imported.yaml for this run directory, with K the full models imported."""
    cfg = load_config(IMPORTED_CONFIG)
    data = to_dict(cfg)
    data.update(name=run_dir.name, run_dir=str(run_dir))
    data["models"]["k"] = k
    return data


def write_forget_sets(run_dir: Path, sets: dict[str, np.ndarray], source: Path) -> None:
    """forget_sets.json (pipelines.rundir.layout) of the imported sets; refuses to replace different ones."""
    stored = {"config": {"imported": "edub"}, "tuning": {},
              "sets": {name: {"indices": [int(i) for i in idx], "size": int(idx.size),
                              "how": f"the Easy Data Unlearning Bench's {name}.npy ({DATASET})"}
                       for name, idx in sets.items()}}
    path = forget_sets_path(run_dir)
    if path.exists():
        have = json.loads(path.read_text()).get("sets", {})
        if {n: s["indices"] for n, s in have.items()} != {n: s["indices"] for n, s in stored["sets"].items()}:
            raise ConfigError(f"{path} holds other forget sets than {source}: import into a new run directory")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(stored, indent=1))


# ----------------------------------------------------------------------------------------------------------
# export


def export_edub(run_dir: str | Path, out: str | Path, labels: np.ndarray | None = None) -> Path:
    """Write a run's forget sets and the margins of its full models and oracles in the bench's layout under
    `out`, a block of models at a time: a margin-only store's margins as stored (every oracle), else margins
    computed from the logits (unlearning.klom.margins) with `labels` (default: the run's task's target labels)
    for the K full models and the K reference oracles (KLOM's). Forget sets named forget_set_<ID> keep their ID;
    the others are numbered after the largest (out/forget_sets/cifar10/names.json maps them). Returns `out`."""
    run_dir, out = Path(run_dir), Path(out)
    models = open_store(run_dir / "models.zarr", MODELS_KIND)
    sets = load_forget_sets(run_dir)
    margin_only = bool(models.attrs.get("margin_only", False))
    n_train, t, k = int(models.attrs["n_train"]), int(models.attrs["n_targets"]), int(models.attrs["k"])
    if not margin_only and labels is None:
        labels = get_task(load_run_config(run_dir).task).load_data().y_targets.numpy()
    array = "margins" if margin_only else "logits"
    counts = {"full": k, **{f"oracle/{fs}": models[f"oracle/{fs}/{array}"].shape[0] if margin_only else k
                            for fs in sets}}
    for name, count in counts.items():
        done = np.asarray(models[f"{name}/done"][:count])
        if not done.all():
            raise ConfigError(f"{run_dir}/models.zarr has {int((~done).sum())} of the first {count} {name} models "
                              "not done: finish the import or the models stage first")
    ids = bench_ids(sets, models.attrs.get("bench_forget_ids", {}))
    folder = out / "forget_sets" / DATASET
    folder.mkdir(parents=True, exist_ok=True)
    for fs, idx in sets.items():
        np.save(folder / f"forget_set_{ids[fs]}.npy", idx.astype(np.int64))
    write_text(folder / "names.json", json.dumps({str(ids[fs]): fs for fs in sets}, indent=1))
    dirs = {fs: margin_dirs(out, ids[fs]) for fs in sets}
    for d in {p for paths in dirs.values() for p in paths.values()}:
        d.mkdir(parents=True, exist_ok=True)
    store = run_dir / "models.zarr"

    def blocks(name: str):
        """(first model, margins (b, T)) of `name`'s models, one stored block at a time."""
        arr = models[f"{name}/{array}"]
        for start in range(0, counts[name], arr.chunks[0]):
            rows = read(arr, slice(start, min(counts[name], start + arr.chunks[0])), store=store)
            yield start, rows if margin_only else margins_of(rows, labels).astype(np.float32)

    full_dirs = next(iter(dirs.values()))
    for start, rows in blocks("full"):
        kept = {fs: read(models[f"full_forget/{fs}/margins"], slice(start, start + len(rows)), store=store)
                for fs in sets if margin_only and f"full_forget/{fs}/margins" in models}
        for i, row in enumerate(rows):
            np.save(full_dirs["pretrain/retain"] / model_file(start + i), row[:n_train])
            np.save(full_dirs["pretrain/val"] / model_file(start + i), row[n_train:t])
            for fs, idx in sets.items():
                forget = kept[fs][i] if fs in kept else row[idx]
                np.save(dirs[fs]["pretrain/forget"] / model_file(start + i), forget)
    for fs, idx in sets.items():
        maps = target_maps(idx, n_train, t - n_train)
        for start, rows in blocks(f"oracle/{fs}"):
            for i, row in enumerate(rows):
                for s in SPLITS:
                    np.save(dirs[fs][f"oracle/{s}"] / model_file(start + i), row[maps[s]])
    return out


def bench_ids(sets: dict[str, np.ndarray], known: dict) -> dict[str, int]:
    """The bench's forget-set ID of every set: forget_set_<ID> keeps its ID, the others follow the largest."""
    ids = {}
    for fs in sets:
        match = re.fullmatch(r"forget_set_(\d+)", fs)
        if fs in known or match:
            ids[fs] = int(known.get(fs, match.group(1) if match else 0))
    nxt = max(ids.values(), default=0)
    for fs in sets:
        if fs not in ids:
            nxt += 1
            ids[fs] = nxt
    return ids

