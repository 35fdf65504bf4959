"""timm and Hugging Face ViT weights in and out of minivit (minivit/pretrained/).

The claims, in the order the tests check them:

1. A safetensors file is 8 bytes of little-endian header length N, N bytes of JSON
   ({name: dtype, shape, data_offsets}, "__metadata__"), then the tensors' bytes, packed
   without gaps: minivit's writer lays them out so, 8-byte aligned
   (test_the_writer_lays_out_the_documented_format), and its reader gives back every
   dtype it writes (test_every_dtype_round_trips).
2. bfloat16 is the upper half of a float32: shifting its bits left by 16 is exact
   (test_bfloat16_loads_as_the_float32_of_the_same_value); bfloat16 and float16 files
   load into float32 models (test_half_precision_files_load_as_float32).
3. A PyTorch Conv2d of kernel and stride P, weight (D, C, P, P), is the patch embedding
   of Eq. 1 with minivit's kernel row u*P*C + v*C + c = W[:, c, u, v]
   (test_a_conv_weight_is_the_patch_embedding).
4. Weights saved by timm and by transformers (the committed goldens of
   tests/interop/make_goldens.py) give minivit logits equal to the libraries' own float64
   forward passes to 1e-10 relative: token and avg pooling, fc_norm before or after the
   mean, no_embed_class, qkv_bias=False, GELU in erf and tanh form, LayerNorm eps 1e-12
   (test_goldens_give_the_libraries_logits); their class names and normalisation come
   with them (test_goldens_bring_class_names_and_normalisation).
5. Loading and saving gives back the same tensors, byte for byte, and a second round the
   same files (test_load_then_save_gives_back_the_same_tensors).
6. Every format minivit writes loads back into the same model and logits
   (test_every_format_round_trips), with the format told from the path
   (test_the_format_is_told_from_the_path).
7. What the layouts leave out is an exact equivalence: a zero [CLS] position row for
   timm's no_embed_class, zero q/k/v biases in the official layout for qkv_bias=False
   (test_absent_parts_are_exact_zeros); fc_norm normalises the mean, not the tokens
   (test_fc_norm_normalises_the_mean); layer_norm_eps reaches every LayerNorm
   (test_layer_norm_eps_reaches_every_layer_norm); without q/k/v biases the model has
   3D fewer parameters a block (test_parameter_count_follows_the_new_fields).
8. Another image size resizes the position embeddings as the official code does, another
   number of classes starts a zero head (test_image_size_and_num_classes); weights
   without a head (ViTModel; pooler ignored) and sharded folders load
   (test_headless_and_sharded_folders).
9. examples/predict.py and examples/train_cifar.py take timm and Hugging Face weights
   (test_predict_reads_timm_and_hugging_face_weights,
   test_train_cifar_fine_tunes_timm_and_hugging_face_weights).
Then the errors, each saying what was expected and what came, and the dtypes and devices.
"""
import json
import pathlib
import shutil

import numpy as np
import pytest

import minivit as mv
from minivit import official
from minivit.nn.vit import ViTConfig, VisionTransformer
from minivit.ops.patch import patch_embed
from minivit.pretrained import (detect_format, from_pretrained, load_pretrained, safetensors,
                                save_pretrained)
from minivit.pretrained.common import conv_to_kernel

GOLDENS = pathlib.Path(__file__).parent / "interop" / "goldens"
MODELS = json.loads((GOLDENS / "goldens.json").read_text())["models"]
LIBRARY = {"timm": "timm", "transformers": "hf"}


def logits(model, x, device="cpu"):
    return model.to(device).eval()(mv.tensor(x, device=device)).numpy()


def golden_inputs():
    with np.load(GOLDENS / "logits.npz") as data:
        return data["inputs"].astype(np.float64), {k: data[k] for k in data.files}


def perturbed(seed=0, **fields):
    """A small model with every parameter moved off its initial value."""
    config = dict(image_size=16, patch_size=4, num_classes=3, hidden_size=16, depth=2,
                  num_heads=2, mlp_dim=32)
    model = VisionTransformer(ViTConfig(**{**config, **fields}), seed=seed)
    rng = np.random.default_rng(seed + 1)
    for p in model.parameters():
        p.data = p.data + (0.3 * rng.standard_normal(p.shape)).astype(np.float32)
    return model


def images(n=2, size=16):
    return np.random.default_rng(5).standard_normal((n, 3, size, size)).astype(np.float32)


def copy_golden(name, tmp_path):
    return pathlib.Path(shutil.copytree(GOLDENS / name, tmp_path / name))


# --- 1, 2. the safetensors format -----------------------------------------------------

def test_the_writer_lays_out_the_documented_format(tmp_path):
    arrays = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array([7], np.int64),
              "c": np.ones((1,), np.float16)}
    path = safetensors.save(tmp_path / "t.safetensors", arrays, {"format": "pt"})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert n % 8 == 0 and header.pop("__metadata__") == {"format": "pt"}
    data, end = raw[8 + n:], 0
    for name in sorted(arrays):                      # name order, no gaps
        entry = header[name]
        begin, stop = entry["data_offsets"]
        assert begin == end and entry["shape"] == list(arrays[name].shape)
        assert data[begin:stop] == arrays[name].astype(arrays[name].dtype.newbyteorder("<")).tobytes()
        end = stop
    assert end == len(data)
    assert [header[k]["dtype"] for k in ("a", "b", "c")] == ["I64", "F32", "F16"]


def test_every_dtype_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {name: (rng.standard_normal((2, 3)) * 50).astype(name)
              for name in safetensors.NAMES if name != "bool"}
    arrays["bool"] = np.array([True, False])
    arrays["empty"] = np.zeros((0, 4), np.float32)
    back, metadata = safetensors.load(safetensors.save(tmp_path / "t.safetensors", arrays))
    assert metadata == {}
    for name, value in arrays.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value)


def raw_safetensors(path, entries, data):
    """A file written byte by byte from a header dict and the data bytes."""
    text = json.dumps(entries).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


def test_bfloat16_loads_as_the_float32_of_the_same_value(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 0.0, -0.0, 2.0 ** 100, np.inf], np.float32)
    upper = (values.view(np.uint32) >> 16).astype("<u2")         # exact: low halves are 0
    assert np.array_equal((upper.astype(np.uint32) << 16).view(np.float32), values)
    path = raw_safetensors(tmp_path / "bf16.safetensors", {
        "x": {"dtype": "BF16", "shape": [7], "data_offsets": [0, 14]}}, upper.tobytes())
    x = safetensors.load(path)[0]["x"]
    assert x.dtype == np.float32 and np.array_equal(x, values)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_files_load_as_float32(half, tmp_path):
    folder = copy_golden("timm_token", tmp_path)
    arrays, metadata = safetensors.load(folder / "model.safetensors")
    if half == "float16":
        safetensors.save(folder / "model.safetensors",
                         {k: v.astype(np.float16) for k, v in arrays.items()}, metadata)
        expected = {k: v.astype(np.float16).astype(np.float32) for k, v in arrays.items()}
    else:                                # truncate each float32 to its upper 16 bits
        entries, chunks, offset = {}, [], 0
        for k in sorted(arrays):
            bits = (arrays[k].astype(np.float32).view(np.uint32) >> 16).astype("<u2")
            entries[k] = {"dtype": "BF16", "shape": list(arrays[k].shape),
                          "data_offsets": [offset, offset + bits.nbytes]}
            chunks.append(bits.tobytes())
            offset += bits.nbytes
        raw_safetensors(folder / "model.safetensors", entries, b"".join(chunks))
        expected = {k: ((v.view(np.uint32) >> 16) << 16).view(np.float32)
                    for k, v in arrays.items()}
    model = from_pretrained(folder)
    assert all(p.dtype == np.float32 for p in model.parameters())
    np.testing.assert_array_equal(model.cls_token.numpy(), expected["cls_token"])
    np.testing.assert_array_equal(model.head.weight.numpy(), expected["head.weight"].T)


# --- 3. the conv layout ---------------------------------------------------------------

def test_a_conv_weight_is_the_patch_embedding():
    rng = np.random.default_rng(0)
    B, C, P, D, g = 2, 3, 4, 5, 3
    x, w, b = rng.standard_normal((B, C, g * P, g * P)), rng.standard_normal((D, C, P, P)), \
        rng.standard_normal(D)
    conv = np.zeros((B, g, g, D))                    # torch's Conv2d, as explicit sums
    for i in range(g):
        for j in range(g):
            window = x[:, :, i * P:(i + 1) * P, j * P:(j + 1) * P]
            conv[:, i, j] = np.einsum("bcuv,dcuv->bd", window, w) + b
    out = patch_embed(mv.tensor(x), mv.tensor(conv_to_kernel(w)), mv.tensor(b), P).numpy()
    np.testing.assert_allclose(out, conv.reshape(B, g * g, D), rtol=1e-12)


# --- 4, 5. the goldens ----------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_goldens_give_the_libraries_logits(name):
    x, recorded = golden_inputs()
    loaded = load_pretrained(GOLDENS / name, dtype="float64")
    assert loaded.format == LIBRARY[MODELS[name]["library"]]
    expected = recorded[f"{name}/logits"]
    got = logits(loaded.model, x)
    assert got.dtype == np.float64
    assert np.abs(got - expected).max() <= 1e-10 * np.abs(expected).max()


def test_goldens_bring_class_names_and_normalisation():
    timm, hf = load_pretrained(GOLDENS / "timm_token"), load_pretrained(GOLDENS / "hf_gelu")
    assert timm.class_names == hf.class_names == ["apple", "bicycle", "cloud", "dune", "ember"]
    assert timm.normalization == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert hf.normalization is None                    # no preprocessor_config.json
    assert hf.model.config.layer_norm_eps == 1e-12 and timm.model.config.layer_norm_eps == 1e-6


def tensors(path):
    """{name: (dtype, shape, bytes)} of a .safetensors file."""
    header, _, start = safetensors.read_header(path)
    raw = pathlib.Path(path).read_bytes()
    return {k: (e["dtype"], e["shape"], raw[start + e["data_offsets"][0]:start + e["data_offsets"][1]])
            for k, e in header.items()}


@pytest.mark.parametrize("name", MODELS)
def test_load_then_save_gives_back_the_same_tensors(name, tmp_path):
    loaded = load_pretrained(GOLDENS / name)
    first = save_pretrained(loaded.model, tmp_path / "first", format=loaded.format,
                            class_names=loaded.class_names, normalization=loaded.normalization)
    assert tensors(first / "model.safetensors") == tensors(GOLDENS / name / "model.safetensors")
    again = load_pretrained(first)
    second = save_pretrained(again.model, tmp_path / "second", format=again.format,
                             class_names=again.class_names, normalization=again.normalization)
    for file in ("model.safetensors", "config.json"):
        assert (first / file).read_bytes() == (second / file).read_bytes()


# --- 6. every format ------------------------------------------------------------------

FORMAT_CASES = {
    "minivit": ("minivit", "m.npz", dict(classifier="gap", fc_norm=True, qkv_bias=False,
                                         layer_norm_eps=1e-12)),
    "official": ("official", "o.npz", dict(gelu="tanh")),
    "timm file": ("timm", "t.safetensors", dict(qkv_bias=False, gelu="tanh")),
    "timm folder": ("timm", "timm", dict(classifier="gap", fc_norm=True)),
    "timm gap": ("timm", "g.safetensors", dict(classifier="gap")),
    "hf": ("hf", "hf", dict(layer_norm_eps=1e-12, qkv_bias=False, gelu="tanh")),
}


@pytest.mark.parametrize("case", FORMAT_CASES)
def test_every_format_round_trips(case, tmp_path, device):
    format, name, fields = FORMAT_CASES[case]
    model = perturbed(**fields)
    path = model.save_pretrained(tmp_path / name, format=format, class_names=list("abc"))
    loaded = VisionTransformer.from_pretrained(path)
    assert loaded.config == model.config
    x = images()
    np.testing.assert_array_equal(logits(loaded, x, device), logits(model, x, device))


def test_the_format_is_told_from_the_path(tmp_path):
    model = perturbed()
    for format, name in [("minivit", "m.npz"), ("official", "o.npz"), ("timm", "t.safetensors"),
                         ("timm", "tf"), ("hf", "hf")]:
        path = save_pretrained(model, tmp_path / name, format=format)
        assert detect_format(path) == format
    assert detect_format(tmp_path / "hf" / "model.safetensors") == "hf"
    assert detect_format(GOLDENS / "timm_token" / "model.safetensors") == "timm"
    # format= forces one: a timm folder read as hf fails on its config
    with pytest.raises(ValueError, match="model_type None is not a ViT"):
        from_pretrained(tmp_path / "tf", format="hf")


# --- 7. exact equivalences ------------------------------------------------------------

def test_absent_parts_are_exact_zeros(tmp_path):
    loaded = from_pretrained(GOLDENS / "timm_no_embed_class_gelu_tanh")
    pos = loaded.pos_embed.numpy()
    assert not pos[0, 0].any() and pos.shape[1] == loaded.config.num_patches + 1
    no_bias = perturbed(qkv_bias=False, gelu="tanh")
    assert no_bias.blocks[0].attn.qkv.bias is None
    path = official.save_official(no_bias, tmp_path / "o.npz")
    with np.load(path) as data:
        assert not data["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/bias"].any()
    back = official.load_official(path)
    assert back.config.qkv_bias
    np.testing.assert_array_equal(logits(back, images()), logits(no_bias, images()))


def test_fc_norm_normalises_the_mean():
    model = perturbed(classifier="gap", fc_norm=True).eval()
    x = mv.tensor(images())
    z = model.embed(x)
    for block in model.blocks:
        z = block(z)
    expected = mv.layer_norm(z.mean(axis=1), model.norm.scale, model.norm.bias, 1e-6)
    np.testing.assert_allclose(model.features(x).numpy(), expected.numpy(), rtol=1e-6)
    other = perturbed(classifier="gap").eval()       # the same weights, norm first
    assert not np.allclose(other.features(x).numpy(), model.features(x).numpy())


def test_layer_norm_eps_reaches_every_layer_norm():
    model = perturbed(layer_norm_eps=1e-12)
    norms = [model.norm] + [n for b in model.blocks for n in (b.norm1, b.norm2)]
    assert [n.eps for n in norms] == [1e-12] * 5
    assert perturbed().norm.eps == 1e-6


def test_parameter_count_follows_the_new_fields():
    from minivit.nn.vit import count_parameters
    for fields in (dict(qkv_bias=False), dict(classifier="gap", fc_norm=True),
                   dict(layer_norm_eps=1e-12)):
        model = perturbed(**fields)
        assert count_parameters(model.config) == model.num_parameters()
    assert perturbed().num_parameters() - perturbed(qkv_bias=False).num_parameters() == 2 * 3 * 16


# --- 8. fine-tuning starts, headless and sharded folders ------------------------------

@pytest.mark.parametrize("name", ["timm_token", "timm_no_embed_class_gelu_tanh", "hf_gelu"])
def test_image_size_and_num_classes(name):
    original = from_pretrained(GOLDENS / name)
    loaded = load_pretrained(GOLDENS / name, num_classes=3, image_size=48)
    model = loaded.model
    assert model.config.image_size == 48 and model.config.num_classes == 3
    assert loaded.class_names is None                 # they named the old classes
    assert not model.head.weight.numpy().any() and model.head.weight.shape == (32, 3)
    expected = official.resize_position_embedding(original.pos_embed.numpy(), 6, True)
    np.testing.assert_array_equal(model.pos_embed.numpy(), expected)


def test_headless_and_sharded_folders(tmp_path):
    folder = copy_golden("hf_gelu", tmp_path)
    arrays, metadata = safetensors.load(folder / "model.safetensors")
    x = golden_inputs()[0].astype(np.float32)
    reference = from_pretrained(folder)
    # shards: two files and the index transformers writes
    first = sorted(arrays)[:10]
    safetensors.save(folder / "a.safetensors", {k: arrays[k] for k in first}, metadata)
    safetensors.save(folder / "b.safetensors", {k: arrays[k] for k in arrays if k not in first},
                     metadata)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        k: "a.safetensors" if k in first else "b.safetensors" for k in arrays}}))
    np.testing.assert_array_equal(logits(from_pretrained(folder), x), logits(reference, x))
    # a ViTModel: no "vit." prefix, no classifier, a pooler that is not used
    headless = {k[len("vit."):]: v for k, v in arrays.items() if k.startswith("vit.")}
    headless["pooler.dense.weight"] = np.ones((32, 32), np.float32)
    headless["pooler.dense.bias"] = np.ones(32, np.float32)
    for f in ("a.safetensors", "b.safetensors", "model.safetensors.index.json"):
        (folder / f).unlink()
    safetensors.save(folder / "model.safetensors", headless, metadata)
    with pytest.raises(ValueError, match="has no classification head.*pass num_classes="):
        from_pretrained(folder)
    model = from_pretrained(folder, num_classes=7)
    np.testing.assert_array_equal(model.features(mv.tensor(x)).numpy(),
                                  reference.features(mv.tensor(x)).numpy())


# --- 9. the programs ------------------------------------------------------------------

@pytest.mark.usefixtures("keep_default_backend")
@pytest.mark.parametrize("name", ["timm_token", "hf_gelu"])
def test_predict_reads_timm_and_hugging_face_weights(name, tmp_path, capsys):
    from PIL import Image
    from conftest import load_example
    predict = load_example("predict")
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(image)
    predict.main([str(image), "--checkpoint", str(GOLDENS / name), "--top", "5"])
    out, err = capsys.readouterr()
    assert all(label in out for label in ["apple", "bicycle", "cloud", "dune", "ember"])
    assert ("stores no normalisation" in err) == (name == "hf_gelu")    # no preprocessor config


@pytest.mark.usefixtures("keep_default_backend")
@pytest.mark.parametrize("name", ["timm_avg_fc_norm_no_qkv_bias", "hf_gelu"])
def test_train_cifar_fine_tunes_timm_and_hugging_face_weights(name, tmp_path):
    from conftest import load_example
    from test_data import write_cifar
    from minivit import checkpoint
    write_cifar(tmp_path / "data", n=8)
    load_example("train_cifar").main([
        "--preset", "finetune", "--pretrained", str(GOLDENS / name), "--image-size", "40",
        "--epochs", "1", "--batch-size", "16", "--data-dir", str(tmp_path / "data"),
        "--no-download", "--no-progress", "--out", str(tmp_path / "ft")])
    saved = checkpoint.load_checkpoint(tmp_path / "ft" / "checkpoint.npz")
    original = from_pretrained(GOLDENS / name).config
    assert saved["config"]["num_classes"] == 10 and saved["config"]["image_size"] == 40
    for field in ("layer_norm_eps", "qkv_bias", "fc_norm", "gelu", "classifier"):
        assert saved["config"][field] == getattr(original, field)


# --- errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pth", "weights.pt"])
def test_pickle_files_are_refused_without_unpickling(name, tmp_path):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04\x95 never unpickled")
    for call in (lambda: from_pretrained(path), lambda: safetensors.load(path)):
        with pytest.raises(ValueError, match=r"PyTorch pickle file; minivit never unpickles.*"
                                             r"Convert it to safetensors"):
            call()
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(path, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin is a PyTorch pickle file"):
        from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="pytorch_model.bin is a PyTorch pickle file"):
        from_pretrained(folder)
    renamed = tmp_path / "weights"                    # no suffix: the bytes tell
    shutil.copy(path, renamed)
    with pytest.raises(ValueError, match="PyTorch pickle file"):
        from_pretrained(renamed)


def test_damaged_safetensors_files_are_refused(tmp_path):
    good = safetensors.save(tmp_path / "good.safetensors", {"x": np.ones((2, 2), np.float32)})
    raw = good.read_bytes()
    cases = {
        "short": (raw[:5], "fewer than the 8 of the header length"),
        "long header": ((10 ** 9).to_bytes(8, "little") + raw[8:], "its header length says"),
        "not json": (raw[:8] + b"{" * (len(raw) - 8), "its header is not JSON"),
        "truncated": (raw[:-4], "is truncated: tensor 'x' ends at byte 16 of the data, which has 12"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=message):
            safetensors.load(path)
    bad_entries = {
        "F8_E4M3": ({"x": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}},
                    "dtype 'F8_E4M3' is not one minivit reads"),
        "size": ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
                 r"F32 \[2\] needs 8 bytes, its data_offsets \[0, 4\] span 4"),
        "overlap": ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                     "y": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}},
                    "the tensors' bytes overlap"),
        "gap": ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
                "the tensors' bytes leave a gap at byte 0"),
        "entry": ({"x": [1, 2]}, "expected an entry with dtype, shape and data_offsets"),
    }
    for name, (entries, message) in bad_entries.items():
        path = raw_safetensors(tmp_path / f"{name}.safetensors", entries, bytes(8))
        with pytest.raises(ValueError, match=message):
            safetensors.load(path)
    with pytest.raises(FileNotFoundError, match="no safetensors file at"):
        safetensors.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="cannot write tensor 'z' of dtype complex128"):
        safetensors.save(tmp_path / "c.safetensors", {"z": np.zeros(2, complex)})


def timm_arrays():
    return safetensors.load(GOLDENS / "timm_token" / "model.safetensors")[0]


def write_timm(tmp_path, arrays, model_args=None, name="t.safetensors"):
    metadata = {"model_args": json.dumps({"num_heads": 4, **(model_args or {})})}
    return safetensors.save(tmp_path / name, arrays, metadata)


def test_timm_options_minivit_does_not_build_are_refused_by_name(tmp_path):
    arrays = timm_arrays()
    D = 32
    extras = {
        "reg_token": ({"reg_token": np.zeros((1, 4, D), np.float32)}, "register tokens"),
        "dist_token": ({"dist_token": np.zeros((1, 1, D), np.float32)},
                       "DeiT's distillation token"),
        "LayerScale": ({"blocks.0.ls1.gamma": np.ones(D, np.float32)}, "LayerScale"),
        "qk_norm": ({"blocks.0.attn.q_norm.weight": np.ones(8, np.float32)}, "QK-norm"),
        "pre_norm": ({"norm_pre.weight": np.ones(D, np.float32)}, "pre_norm=True"),
        "map": ({"attn_pool.latent": np.ones((1, 1, D), np.float32)}, "attention pooling"),
    }
    for name, (extra, message) in extras.items():
        path = write_timm(tmp_path, {**arrays, **extra}, name=f"{name}.safetensors")
        with pytest.raises(ValueError, match=f"does not have.*\n.*{message}"):
            from_pretrained(path)
    cases = {
        "avg with a class token": ({**arrays, "fc_norm.weight": arrays.pop("norm.weight"),
                                    "fc_norm.bias": arrays.pop("norm.bias")}, {},
                                   "global_pool='avg' with a class token"),
        "no final norm": ({k: v for k, v in timm_arrays().items() if not k.startswith("norm.")},
                          {}, r"neither norm.\* nor fc_norm.\*"),
        "act_layer": (timm_arrays(), {"act_layer": "quick_gelu"},
                      "act_layer='quick_gelu': minivit's MLP runs GELU only"),
        "global_pool": (timm_arrays(), {"global_pool": "max"}, "global_pool='max'"),
        "norm_layer": (timm_arrays(), {"norm_layer": "rmsnorm"}, "norm_layer='rmsnorm'"),
        "reg_tokens arg": (timm_arrays(), {"reg_tokens": 4}, "reg_tokens=4"),
    }
    for name, (tensors_, args, message) in cases.items():
        path = write_timm(tmp_path, tensors_, args, name=f"{name}.safetensors")
        with pytest.raises(ValueError, match=message):
            from_pretrained(path)


def test_timm_layouts_that_do_not_fit_are_listed(tmp_path):
    arrays = timm_arrays()
    unknown_width = safetensors.save(tmp_path / "bare.safetensors", arrays)
    with pytest.raises(ValueError, match="number of heads is not stored.*width 32 is not one of "
                                         "timm's standard widths.*config.json"):
        from_pretrained(unknown_width)
    broken = dict(arrays, **{"blocks.1.mlp.fc1.bias": np.zeros(3, np.float32),
                             "blocks.0.extra": np.zeros(1, np.float32)})
    del broken["blocks.0.attn.proj.bias"]
    with pytest.raises(ValueError, match=r"not a valid timm ViT state dict.*\n.*missing keys: "
                                         r"\['blocks.0.attn.proj.bias'\]\n.*unexpected keys: "
                                         r"\['blocks.0.extra'\]\n.*wrong shapes: "
                                         r"\['blocks.1.mlp.fc1.bias: \(3,\), expected \(64,\)'\]"):
        from_pretrained(write_timm(tmp_path, broken))
    rows = dict(arrays, pos_embed=np.zeros((1, 15, 32), np.float32))
    with pytest.raises(ValueError, match="pos_embed has 15 rows: not a square grid"):
        from_pretrained(write_timm(tmp_path, rows, name="rows.safetensors"))
    no_pos = {k: v for k, v in arrays.items() if k != "pos_embed"}
    with pytest.raises(ValueError, match="no pos_embed.*pass image_size="):
        from_pretrained(write_timm(tmp_path, no_pos, name="nopos.safetensors"))
    model = from_pretrained(write_timm(tmp_path, no_pos, name="nopos.safetensors"), image_size=32)
    assert model.config.pos_embed == "none"
    headless = {k: v for k, v in arrays.items() if not k.startswith("head.")}
    with pytest.raises(ValueError, match="no classification head"):
        from_pretrained(write_timm(tmp_path, headless, name="headless.safetensors"))
    with pytest.raises(ValueError, match="not a timm ViT state dict: expected "
                                         r"patch_embed.proj.weight of shape \(D, C, P, P\)"):
        from_pretrained(write_timm(tmp_path, {"patch_embed.proj.weight": np.zeros((2, 2))},
                                   name="flat.safetensors"), format="timm")


def test_hf_configs_minivit_does_not_run_are_refused_by_name(tmp_path):
    folder = copy_golden("hf_gelu", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    cases = {
        "activation": ({"hidden_act": "quick_gelu"}, "hidden_act 'quick_gelu' is not GELU"),
        "deit": ({"model_type": "deit"}, "model_type 'deit' is not a ViT.*distillation token"),
        "rectangle": ({"image_size": [32, 64]}, r"image_size \[32, 64\]: minivit's ViT takes "
                                                "square images"),
        "shapes": ({"intermediate_size": 48}, r"do not match config.json.*\n.*wrong shapes: "
                                              r"\['vit.encoder.layer.0.intermediate.dense.bias"),
    }
    for name, (change, message) in cases.items():
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config))
    arrays, metadata = safetensors.load(folder / "model.safetensors")
    arrays["vit.embeddings.distillation_token"] = np.zeros((1, 1, 32), np.float32)
    safetensors.save(folder / "model.safetensors", arrays, metadata)
    with pytest.raises(ValueError, match="DeiT's distillation token"):
        from_pretrained(folder)
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(GOLDENS / "hf_gelu" / "model.safetensors", lone / "model.safetensors")
    with pytest.raises(ValueError, match="need their config.json beside them"):
        from_pretrained(lone / "model.safetensors")


def test_saving_what_a_format_cannot_represent_is_refused(tmp_path):
    cases = [
        ("timm", dict(layer_norm_eps=1e-12), "LayerNorm eps 1e-12: timm's ViT runs 1e-6"),
        ("timm", dict(representation_size=8), "a pre-logits layer"),
        ("timm", dict(mlp_dim=30, hidden_size=18, num_heads=2), None),
        ("hf", dict(classifier="gap"), "classifier 'gap'"),
        ("hf", dict(representation_size=8), "a pre-logits layer"),
        ("official", dict(layer_norm_eps=1e-12), "eps 1e-6; this model uses layer_norm_eps=1e-12"),
        ("official", dict(classifier="gap", fc_norm=True), "fc_norm=True"),
    ]
    for format, fields, message in cases:
        model = perturbed(**fields)
        if message is None:                           # an mlp_ratio that round-trips: fine
            save_pretrained(model, tmp_path / "ok.safetensors", format=format)
            continue
        with pytest.raises(ValueError, match=message):
            save_pretrained(model, tmp_path / "x", format=format)
    hybrid = VisionTransformer("cifar-hybrid", depth=1)
    for format in ("timm", "hf"):
        with pytest.raises(ValueError, match="a ResNet stem"):
            save_pretrained(hybrid, tmp_path / "h", format=format)
    with pytest.raises(ValueError, match="must be a folder"):
        save_pretrained(perturbed(), tmp_path / "x.safetensors", format="hf")
    with pytest.raises(ValueError, match="2 class names for a model with 3 classes"):
        save_pretrained(perturbed(), tmp_path / "n", format="hf", class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"format must be one of \('minivit', 'official', "
                                         r"'timm', 'hf'\), got 'onnx'"):
        save_pretrained(perturbed(), tmp_path / "x", format="onnx")


def test_unknown_paths_and_formats_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no pretrained weights at"):
        from_pretrained(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="cannot tell its format.*pass format="):
        from_pretrained(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="format must be one of"):
        from_pretrained(tmp_path / "notes.txt", format="keras")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="needs config.json or model.safetensors"):
        from_pretrained(empty)
    other = safetensors.save(tmp_path / "other.safetensors", {"w": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="neither a timm ViT.*nor a transformers ViT"):
        from_pretrained(other)


def test_config_checks_of_the_new_fields():
    with pytest.raises(ValueError, match="fc_norm .* needs classifier 'gap', got 'token'"):
        ViTConfig(fc_norm=True)
    with pytest.raises(ValueError, match="layer_norm_eps must be positive, got 0"):
        ViTConfig(layer_norm_eps=0)


def test_zipped_files_are_told_apart_by_their_entries(tmp_path):
    import zipfile
    torch_file = tmp_path / "weights"                  # PyTorch's zip: a pickle inside
    with zipfile.ZipFile(torch_file, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02never unpickled")
    with pytest.raises(ValueError, match="PyTorch pickle file"):
        from_pretrained(torch_file)
    ours = save_pretrained(perturbed(), tmp_path / "m.npz")
    ours.rename(tmp_path / "checkpoint")
    assert detect_format(tmp_path / "checkpoint") == "minivit"


# --- dtypes and devices ---------------------------------------------------------------

def test_dtype_default_and_float64(tmp_path, device):
    assert all(p.dtype == np.float32 for p in from_pretrained(GOLDENS / "hf_gelu").parameters())
    model = from_pretrained(GOLDENS / "hf_gelu", dtype="float64").to(device)
    assert all(p.dtype == np.float64 for p in model.parameters())
    path = model.save_pretrained(tmp_path / "hf64", format="hf")        # saved from the device
    assert {e[0] for e in tensors(path / "model.safetensors").values()} == {"F64"}
    x = golden_inputs()[0]
    np.testing.assert_array_equal(logits(from_pretrained(path, dtype="float64"), x, device),
                                  logits(model, x, device))



@pytest.mark.parametrize("name", ["timm_token", "hf_gelu"])
def test_weights_with_nan_or_infinity_are_refused_naming_the_first(name, tmp_path):
    """A diverged model answers only NaN: such weights are refused, as minivit's and the
    official checkpoints are, with the name of the first non-finite tensor."""
    folder = tmp_path / name
    shutil.copytree(GOLDENS / name, folder)
    arrays, metadata = safetensors.load(folder / "model.safetensors")
    first = sorted(k for k in arrays if arrays[k].ndim == 2)[0]
    arrays[first][0, 0] = np.nan
    safetensors.save(folder / "model.safetensors", arrays, metadata)
    with pytest.raises(mv.checkpoint.CheckpointError, match=rf"its array {first} holds non-finite"):
        from_pretrained(folder)
