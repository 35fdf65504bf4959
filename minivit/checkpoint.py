"""Saving and loading minivit checkpoints.

A checkpoint is one .npz file read with allow_pickle=False, so loading one can never
run code: the model's parameters under "model/<dotted name>", the optimiser's state
under "optim/<slot>/<index>", and everything else (the model config, the epoch, the
training settings, the data normalisation, class names) as JSON text under "meta".

Files are written atomically: to a temporary file in the same folder, flushed to
disk, then renamed over the old one, so an interrupted save never leaves a half
written checkpoint where a good one was.
"""
import json
import os
import pathlib
import re
import tempfile
import zipfile

from minivit import backend

FORMAT = "minivit-checkpoint-1"


class CheckpointError(ValueError):
    """A file that is not a readable minivit checkpoint (damaged, truncated, another format)."""


def _np():
    return backend.module_for("cpu")


def atomic_write(path, write):
    """Call write(file) on a temporary file next to `path` (.NAME.XXXXXXXX.tmp, mkstemp's
    8 random characters), then rename it to `path`.  An error while writing (a full disk)
    names `path`."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)       # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)          # "No space left on device" says where
        raise
    return path


def remove_stale_temporaries(folder, names):
    """Delete the temporary files that an interrupted atomic_write(folder / NAME) left, for
    each NAME in `names` (a process killed mid-write cannot clean up after itself): exactly
    .NAME.XXXXXXXX.tmp, nothing else a user may keep there.  Returns their paths.  Call it
    only where no other process is writing, e.g. in a run's own locked folder."""
    ours = re.compile("(" + "|".join(re.escape(f".{name}.") for name in names)
                      + r")[a-z0-9_]{8}\.tmp")
    removed = []
    for tmp in sorted(pathlib.Path(folder).glob(".*.tmp")):
        if ours.fullmatch(tmp.name) and tmp.is_file():
            tmp.unlink()
            removed.append(tmp)
    return removed


def save_npz(path, arrays, meta):
    """Arrays and a JSON-able dict of metadata into one .npz, atomically."""
    np = _np()
    payload = {name: backend.to_numpy(a) for name, a in arrays.items()}
    payload["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    return atomic_write(path, lambda f: np.savez(f, **payload))


def load_npz(path):
    """(arrays, meta) from a file written by save_npz; no pickles are ever loaded."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with open(path, "rb") as f:
        if f.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):
            raise CheckpointError(f"{path} is not a minivit checkpoint: not an .npz (zip) file")
    try:
        with _np().load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files if name != "meta"}
            if "meta" not in data.files:
                raise CheckpointError(f"{path} is not a minivit checkpoint (it has no 'meta' "
                                      "entry)")
            meta = json.loads(data["meta"].tobytes().decode())
    except CheckpointError:
        raise
    except ValueError as e:
        if "Object arrays" not in str(e):
            raise CheckpointError(f"{path} is damaged or truncated ({type(e).__name__}: {e}); "
                                  "it cannot be loaded") from None
        raise CheckpointError(f"{path} holds Python objects (pickled arrays), refused: loading "
                              "them could run code; a checkpoint holds only numbers") from None
    except (OSError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged or truncated ({type(e).__name__}: {e}); "
                              "it cannot be loaded") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its 'meta' entry is not a JSON object")
    return arrays, meta


def check_finite(arrays, path):
    """Refuse weights with NaN or infinity in them (a diverged run's), naming the first array:
    a model made from them only answers NaN."""
    for name, a in arrays.items():
        if a.dtype.kind in "fc" and not bool(_np().isfinite(a).all()):
            raise CheckpointError(f"{path}: its array {name} holds non-finite values (NaN or "
                                  "infinity), from a run that diverged; refused")


def save_checkpoint(path, model, optimizer=None, **meta):
    """Model parameters, optimiser state and `meta` (e.g. epoch=, settings=) in one file."""
    from dataclasses import asdict
    arrays = {f"model/{name}": value for name, value in model.state_dict().items()}
    meta = dict(meta, format=FORMAT, config=asdict(model.config))
    if optimizer is not None:
        state = optimizer.state_dict()
        meta["optimizer"] = {"type": type(optimizer).__name__, "lr": state.pop("lr"),
                             "steps": state.pop("steps"), "slots": sorted(state)}
        for slot, values in state.items():
            meta["optimizer"][f"{slot}_present"] = [v is not None for v in values]
            arrays.update({f"optim/{slot}/{i}": v for i, v in enumerate(values) if v is not None})
    return save_npz(path, arrays, meta)


def load_checkpoint(path):
    """A dict with "model" (name -> array), "optimizer" (a state for load_state_dict, or
    None) and the metadata saved with it ("config", "epoch", ...)."""
    arrays, meta = load_npz(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r}, "
                              f"expected {FORMAT!r}")
    check_finite(arrays, path)
    try:
        return _unpack(arrays, meta)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is incomplete: its entry {e} is missing or malformed") from None


def _unpack(arrays, meta):
    out = dict(meta)
    out["model"] = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    out["optimizer"] = None
    if "optimizer" in meta:
        info = meta["optimizer"]
        state = {"lr": info["lr"], "steps": info["steps"]}
        for slot in info["slots"]:
            state[slot] = [arrays[f"optim/{slot}/{i}"] if present else None
                           for i, present in enumerate(info[f"{slot}_present"])]
        out["optimizer"] = state
    return out


def model_from_checkpoint(checkpoint, seed=0):
    """A VisionTransformer with the config and weights of a loaded checkpoint."""
    from minivit.nn.vit import VisionTransformer, ViTConfig
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = load_checkpoint(checkpoint)
    model = VisionTransformer(ViTConfig(**checkpoint["config"]), seed=seed)
    model.load_state_dict(checkpoint["model"])
    return model
