"""A small reader and writer of the safetensors format, on NumPy alone.

A .safetensors file (huggingface/safetensors, docs "Format") is three parts:

    8 bytes         N, the header's length, an unsigned 64-bit little-endian integer
    N bytes         a JSON object, UTF-8, maybe padded with spaces:
                        {"<name>": {"dtype": "F32", "shape": [3, 4], "data_offsets": [b, e]},
                         ...,
                         "__metadata__": {"<key>": "<string value>", ...}}   (optional)
    the rest        the tensors' bytes, little-endian, row-major; tensor <name> is bytes
                    [b, e) of this part, e - b = prod(shape) * itemsize, and the tensors
                    cover it without gaps or overlaps.

Nothing in a file is code: reading one is parsing JSON and viewing bytes as arrays.  The
dtypes read are F64, F32, F16, BF16 and the integer and bool types; bfloat16 has no NumPy
dtype, so it is read as float32: a bfloat16 number is the upper 16 bits of a float32, so
shifting its uint16 bits left by 16 gives the float32 of the same value, exactly.
PyTorch's pickle files (.bin, .pth, .pt) are refused: unpickling runs code.
"""
import json
import pathlib

from minivit import backend
from minivit.checkpoint import atomic_write

# safetensors dtype -> NumPy dtype (little-endian); BF16 is converted separately
DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
          "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
         "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16",
         "uint8": "U8", "bool": "BOOL"}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".pkl", ".ckpt")
MAX_HEADER = 100 * 2 ** 20        # the reference implementation's limit


def _np():
    return backend.module_for("cpu")


def pickle_refusal(path):
    """The message for a PyTorch pickle file: minivit does not unpickle, convert it."""
    return (f"{path} is a PyTorch pickle file; minivit never unpickles (that can run code). "
            f"Convert it to safetensors first, in Python with torch and safetensors: "
            f"safetensors.torch.save_file(torch.load('{path}', weights_only=True), "
            f"'model.safetensors')")


def looks_like_pickle(head):
    """True for the first bytes of a pickle (protocol 2+) or of PyTorch's zipped pickle."""
    return head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"


def read_header(path):
    """(header {name: entry}, metadata {str: str}, data start) of a .safetensors file,
    after checking every entry; the tensors' bytes are not read."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no safetensors file at {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if path.suffix in PICKLE_SUFFIXES:
            raise ValueError(pickle_refusal(path))
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file: {size} bytes, fewer than the "
                             f"8 of the header length")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER) and looks_like_pickle(head):
            raise ValueError(pickle_refusal(path))
        if n > min(size - 8, MAX_HEADER):
            raise ValueError(f"{path} is not a safetensors file (or is truncated): its header "
                             f"length says {n} bytes, the file has {size - 8} after it")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header must be a JSON object, got "
                         f"{type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: __metadata__ must map strings to strings, got {metadata!r}")
    data_size, spans = size - 8 - n, []
    for name, entry in header.items():
        what = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{what}: expected an entry with dtype, shape and data_offsets, "
                             f"got {entry!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in ITEMSIZE:
            raise ValueError(f"{what}: dtype {dtype!r} is not one minivit reads "
                             f"({', '.join(sorted(ITEMSIZE))})")
        if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
            raise ValueError(f"{what}: shape must be a list of sizes >= 0, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"{what}: data_offsets must be [begin, end], got {offsets!r}")
        count = 1
        for s in shape:
            count *= s
        if offsets[1] - offsets[0] != count * ITEMSIZE[dtype]:
            raise ValueError(f"{what}: {dtype} {shape} needs {count * ITEMSIZE[dtype]} bytes, "
                             f"its data_offsets {offsets} span {offsets[1] - offsets[0]}")
        if offsets[1] > data_size:
            raise ValueError(f"{path} is truncated: tensor {name!r} ends at byte {offsets[1]} "
                             f"of the data, which has {data_size}")
        spans.append(offsets)
    spans.sort()
    position = 0
    for begin, end in spans:
        if begin != position:
            raise ValueError(f"{path}: the tensors' bytes {'overlap' if begin < position else 'leave a gap'} "
                             f"at byte {min(begin, position)} of the data")
        position = end
    return header, metadata, 8 + n


def load(path, names=None):
    """({name: NumPy array}, metadata) of a .safetensors file; `names` picks some tensors.
    BF16 tensors come as float32 (exact), every other dtype as stored."""
    np = _np()
    header, metadata, start = read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    arrays = {}
    for name in header if names is None else names:
        entry = header[name]
        begin, end = (start + o for o in entry["data_offsets"])
        raw = data[begin:end]
        if entry["dtype"] == "BF16":
            bits = raw.view("<u2").astype(np.uint32) << 16
            array = bits.view(np.float32)
        else:                           # little-endian bytes -> the machine's own order
            little = DTYPES[entry["dtype"]]
            array = raw.view(little).astype(little.lstrip("<"), copy=False)
        arrays[name] = np.array(array.reshape(entry["shape"]))      # a copy off the file
    del data
    return arrays, metadata


def keys(path):
    """The tensor names of a .safetensors file (its header alone is read)."""
    return list(read_header(path)[0])


def save(path, arrays, metadata=None):
    """Write {name: NumPy array} (and {str: str} metadata) as a .safetensors file, atomically.
    Tensors are laid out in name order; the header is padded with spaces to a multiple of 8
    bytes, so every tensor starts 8-byte aligned as the reference writer keeps them."""
    np = _np()
    header, blobs, position = {}, [], 0
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        dtype = NAMES.get(array.dtype.name)
        if dtype is None:
            raise ValueError(f"safetensors: cannot write tensor {name!r} of dtype {array.dtype}; "
                             f"the dtypes written are {sorted(NAMES)}")
        blob = array.astype(DTYPES[dtype], copy=False).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [position, position + len(blob)]}
        blobs.append(blob)
        position += len(blob)
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"safetensors: metadata must map strings to strings, got {metadata!r}")
        header = {"__metadata__": dict(metadata), **header}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)

    def write(f):
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for blob in blobs:
            f.write(blob)
    return atomic_write(path, write)
