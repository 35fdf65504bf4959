"""Official ViT checkpoints (google-research/vision_transformer) in and out of minivit.

The layout.  An official checkpoint is an .npz whose keys are the '/'-joined paths of the
Flax parameters of vit_jax/models_vit.py (block names as pre-Linen Flax numbered them):

    embedding/kernel (P, P, C, D), embedding/bias (D,)   nn.Conv(D, P x P, stride P) on NHWC
    cls (1, 1, D)                                          only for classifier "token"
    Transformer/posembed_input/pos_embedding (1, N(+1), D)
    Transformer/encoderblock_i/LayerNorm_0/{scale,bias}                  (D,)
    Transformer/encoderblock_i/MultiHeadDotProductAttention_1/
        {query,key,value}/kernel (D, H, d), .../bias (H, d),  out/kernel (H, d, D), out/bias (D,)
    Transformer/encoderblock_i/LayerNorm_2/{scale,bias}                  (D,)
    Transformer/encoderblock_i/MlpBlock_3/Dense_0/{kernel (D, M), bias (M,)}
    Transformer/encoderblock_i/MlpBlock_3/Dense_1/{kernel (M, D), bias (D,)}
    Transformer/encoder_norm/{scale,bias} (D,)
    pre_logits/{kernel (D, R), bias (R,)}                  only with a representation layer
    head/{kernel (R or D, K), bias (K,)}

and the forward pass the official code computes from them, which `official_forward` below
writes out with explicit formulas (the reference every loaded model must match):

    patch (i, j):  e_ij = sum_{u,v,c} x[iP+u, jP+v, c] K[u, v, c, :] + b      (a P x P conv)
    z_0 = [cls; e_00; e_01; ...; e_(g-1)(g-1)] + E_pos                      (row-major grid)
    per block:  y = LN_0(z),  q_h = y Wq[:, h, :] + bq[h]  (same for k, v),
                z = z + sum_h softmax(q_h k_h^T / sqrt(d)) v_h Wout[h] + bout
                z = z + GELU_tanh(LN_2(z) W0 + b0) W1 + b1
    y = encoder_norm(z)[0] ("token") or its mean over tokens ("gap"),
    y = tanh(y Wpre + bpre) when there is a pre-logits layer,  logits = y Whead + bhead,
    LN(x) = (x - mean) / sqrt(var + 1e-6) * scale + bias,
    GELU_tanh(x) = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))  (Flax's nn.gelu).

Hybrids (Sec. 3.1).  A ResNet stem of width w runs first, its arrays at the top level of
the file (models_vit.py names them conv_root, gn_root, block{i}/unit{j}/...; older files
store GroupNorm scale/bias as (1, 1, 1, n)), and the embedding reads its feature map.  On
NHWC x, as Flax computes it:

    StdConv(x, K, S)[r, s] = sum_{i,j} x[S r + i - top, S s + j - left] W[i, j]   (0 outside),
        W = (K - mean(K)) / (std(K) + 1e-5) over (kh, kw, c_in), per output channel,
        top = p // 2, p = max((ceil(H/S) - 1) S + kh - H, 0)  (TensorFlow's "SAME"; left alike)
    GN(x) = (x - mean) / sqrt(var + 1e-6) * scale + bias, mean and var over (h, w) and the
        channels of each of 32 groups of consecutive channels
    root:  maxpool_3x3/2,SAME(ReLU(GN(StdConv(x, conv_root, 2))))   (pool padding never wins)
    unit:  ReLU(r + GN3(StdConv(ReLU(GN2(StdConv(ReLU(GN1(StdConv(x, conv1, 1))), conv2, S))),
                                conv3, 1))),  r = x or GN_proj(StdConv(x, conv_proj, S))

`official_resnet` below writes this with explicit loops over the output grid.

The resize.  To fine-tune at another resolution the official code keeps the [CLS] row and
zooms the g x g grid of patch embeddings with scipy.ndimage.zoom(order=1).  With the
default grid_mode=False scipy aligns the corners: output index i reads the input at

    c_i = i (g_old - 1) / (g_new - 1)

and blends rows floor(c_i) and floor(c_i) + 1 with weights 1 - frac(c_i) and frac(c_i)
(the same along columns: bilinear).  So a grid that is linear in row and column,
E[r, c] = a r + b c + e, comes out as exactly a c_i + b c_j + e, which the tests check
without scipy; where scipy is installed the result must also equal its output.
"""
import numpy as np
import pytest

import minivit as mv
from minivit import checkpoint, official
from minivit.nn import VisionTransformer, ViTConfig

from reference import loop_conv2d

POS = "Transformer/posembed_input/pos_embedding"
ATTN = "MultiHeadDotProductAttention_1"
C, P, D, HEADS, M, DEPTH = 3, 4, 8, 2, 16, 2
HD = D // HEADS


# --- official arrays and the official forward, written from the formulas above ---------

def official_arrays(rng, image=8, classes=5, token=True, representation=None, pos=True):
    """Random (non-zero) arrays in the official naming for a tiny ViT."""
    def r(*shape, scale=0.3):
        return (scale * rng.standard_normal(shape)).astype(np.float32)
    N = (image // P) ** 2
    a = {"embedding/kernel": r(P, P, C, D), "embedding/bias": r(D)}
    if token:
        a["cls"] = r(1, 1, D)
    if pos:
        a[POS] = r(1, N + token, D)
    for i in range(DEPTH):
        b = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            a[f"{b}{ln}/scale"], a[f"{b}{ln}/bias"] = 1 + r(D), r(D)
        for name in ("query", "key", "value"):
            a[f"{b}{ATTN}/{name}/kernel"], a[f"{b}{ATTN}/{name}/bias"] = r(D, HEADS, HD), r(HEADS, HD)
        a[f"{b}{ATTN}/out/kernel"], a[f"{b}{ATTN}/out/bias"] = r(HEADS, HD, D), r(D)
        a[f"{b}MlpBlock_3/Dense_0/kernel"], a[f"{b}MlpBlock_3/Dense_0/bias"] = r(D, M), r(M)
        a[f"{b}MlpBlock_3/Dense_1/kernel"], a[f"{b}MlpBlock_3/Dense_1/bias"] = r(M, D), r(D)
    a["Transformer/encoder_norm/scale"], a["Transformer/encoder_norm/bias"] = 1 + r(D), r(D)
    width = D
    if representation:
        a["pre_logits/kernel"], a["pre_logits/bias"] = r(D, representation), r(representation)
        width = representation
    a["head/kernel"], a["head/bias"] = r(width, classes), r(classes)
    return a


def layer_norm(x, scale, bias):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * scale + bias


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def std_conv(x, kernel, stride):
    """Flax's StdConv, padding "SAME", on NHWC x: the loop convolution of tests/reference.py."""
    w = kernel - kernel.mean(axis=(0, 1, 2))
    w = w / (w.std(axis=(0, 1, 2)) + 1e-5)
    return loop_conv2d(x.transpose(0, 3, 1, 2), w, None, stride, "SAME").transpose(0, 2, 3, 1)


def group_norm(x, scale, bias, groups=32):
    """Flax's GroupNorm on NHWC x; scale and bias (C,) or the older (1, 1, 1, C)."""
    B, H, W, C = x.shape
    g = x.reshape(B, H, W, groups, C // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) * scale + bias


def max_pool(x):
    """nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME"): the largest pixel of each
    window, the padding (top/left p // 2) taking no part."""
    B, H, W, C = x.shape
    oh, ow = -(-H // 2), -(-W // 2)
    top, left = max((oh - 1) * 2 + 3 - H, 0) // 2, max((ow - 1) * 2 + 3 - W, 0) // 2
    y = np.zeros((B, oh, ow, C))
    for r in range(oh):
        for s in range(ow):
            rows = slice(max(2 * r - top, 0), 2 * r - top + 3)
            cols = slice(max(2 * s - left, 0), 2 * s - left + 3)
            y[:, r, s] = x[:, rows, cols].max(axis=(1, 2))
    return y


def official_resnet(a, x):
    """The hybrid's stem, from the raw arrays, on NHWC x."""
    relu = lambda t: np.maximum(t, 0)                                   # noqa: E731
    x = max_pool(relu(group_norm(std_conv(x, a["conv_root/kernel"], 2),
                                 a["gn_root/scale"], a["gn_root/bias"])))
    i = 1
    while f"block{i}/unit1/conv1/kernel" in a:
        j = 1
        while f"block{i}/unit{j}/conv1/kernel" in a:
            u = f"block{i}/unit{j}/"
            stride = 2 if i > 1 and j == 1 else 1

            def gn(name, t, u=u):
                return group_norm(t, a[u + name + "/scale"], a[u + name + "/bias"])
            residual = x
            if u + "conv_proj/kernel" in a:
                residual = gn("gn_proj", std_conv(x, a[u + "conv_proj/kernel"], stride))
            y = relu(gn("gn1", std_conv(x, a[u + "conv1/kernel"], 1)))
            y = relu(gn("gn2", std_conv(y, a[u + "conv2/kernel"], stride)))
            y = gn("gn3", std_conv(y, a[u + "conv3/kernel"], 1))
            x = relu(residual + y)
            j += 1
        i += 1
    return x


def official_forward(arrays, images_nchw):
    """The official model's logits, in float64, from the raw official arrays."""
    a = {k: v.astype(np.float64) for k, v in arrays.items()}
    x = images_nchw.transpose(0, 2, 3, 1).astype(np.float64)        # NHWC, as Flax reads it
    if "conv_root/kernel" in a:                                        # a hybrid
        x = official_resnet(a, x)
    B, H, W, _ = x.shape
    K = a["embedding/kernel"]
    p = K.shape[0]
    tokens = [np.einsum("buvc,uvcd->bd", x[:, i * p:(i + 1) * p, j * p:(j + 1) * p], K)
              + a["embedding/bias"] for i in range(H // p) for j in range(W // p)]
    z = np.stack(tokens, axis=1)
    if "cls" in a:
        z = np.concatenate([np.repeat(a["cls"], B, axis=0), z], axis=1)
    if POS in a:
        z = z + a[POS]
    for i in range(DEPTH):
        b = f"Transformer/encoderblock_{i}/"
        y = layer_norm(z, a[b + "LayerNorm_0/scale"], a[b + "LayerNorm_0/bias"])
        q, k, v = (np.einsum("btd,dhe->bthe", y, a[f"{b}{ATTN}/{n}/kernel"])
                   + a[f"{b}{ATTN}/{n}/bias"] for n in ("query", "key", "value"))
        out = a[f"{b}{ATTN}/out/bias"] + 0 * z
        for h in range(HEADS):
            weights = softmax(q[:, :, h] @ k[:, :, h].transpose(0, 2, 1) / np.sqrt(HD))
            out = out + (weights @ v[:, :, h]) @ a[f"{b}{ATTN}/out/kernel"][h]
        z = z + out
        y = layer_norm(z, a[b + "LayerNorm_2/scale"], a[b + "LayerNorm_2/bias"])
        hidden = gelu_tanh(y @ a[b + "MlpBlock_3/Dense_0/kernel"] + a[b + "MlpBlock_3/Dense_0/bias"])
        z = z + hidden @ a[b + "MlpBlock_3/Dense_1/kernel"] + a[b + "MlpBlock_3/Dense_1/bias"]
    z = layer_norm(z, a["Transformer/encoder_norm/scale"], a["Transformer/encoder_norm/bias"])
    y = z[:, 0] if "cls" in a else z.mean(axis=1)
    if "pre_logits/kernel" in a:
        y = np.tanh(y @ a["pre_logits/kernel"] + a["pre_logits/bias"])
    return y @ a["head/kernel"] + a["head/bias"]


def write(path, arrays):
    np.savez(path, **arrays)
    return path


def images(n, size, seed=1):
    return np.random.default_rng(seed).standard_normal((n, C, size, size)).astype(np.float32)


def logits(model, x, device):
    return model.to(device).eval()(mv.tensor(x, device=device)).numpy()


# --- loading: the model computes what the official code computes ----------------------

CASES = {"token": dict(image=8, token=True),
         "gap": dict(image=12, token=False),
         "token+pre_logits": dict(image=8, token=True, representation=6),
         "gap+pre_logits": dict(image=12, token=False, representation=6)}


@pytest.mark.parametrize("case", CASES)
def test_loaded_model_matches_the_official_forward(case, tmp_path, device):
    spec = CASES[case]
    arrays = official_arrays(np.random.default_rng(0), **spec)
    model = official.load_official(write(tmp_path / "vit.npz", arrays))
    c = model.config
    assert (c.image_size, c.patch_size, c.in_channels, c.hidden_size, c.depth, c.num_heads,
            c.mlp_dim, c.num_classes) == (spec["image"], P, C, D, DEPTH, HEADS, M, 5)
    assert c.classifier == ("token" if spec["token"] else "gap")
    assert c.representation_size == spec.get("representation")
    assert c.gelu == "tanh" and c.pos_embed == "learned"
    x = images(3, spec["image"])
    np.testing.assert_allclose(logits(model, x, device), official_forward(arrays, x),
                               rtol=1e-4, atol=1e-5)


def test_is_official_tells_the_formats_apart(tmp_path):
    path = write(tmp_path / "vit.npz", official_arrays(np.random.default_rng(0)))
    assert official.is_official(path)
    ours = checkpoint.save_checkpoint(tmp_path / "ours.npz", VisionTransformer(
        image_size=8, patch_size=4, num_classes=3, hidden_size=8, depth=1, num_heads=2, mlp_dim=8))
    assert not official.is_official(ours)
    (tmp_path / "text.npz").write_text("not a zip")
    assert not official.is_official(tmp_path / "text.npz")
    assert not official.is_official(tmp_path / "missing.npz")


# --- saving: minivit -> official -> minivit gives the same logits ----------------------

def perturbed(config, seed=0):
    """A model with every parameter moved off its initial value (the head starts at 0)."""
    model = VisionTransformer(config, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for p in model.parameters():
        p.data = p.data + (0.3 * rng.standard_normal(p.shape)).astype(np.float32)
    return model


ROUND_TRIPS = {
    "token, tanh": dict(),
    "gap with pre-logits": dict(classifier="gap", representation_size=5, image_size=12),
    "erf GELU": dict(gelu="erf"),
    "sincos2d": dict(pos_embed="sincos2d"),
    "no position embedding": dict(pos_embed="none"),
}


@pytest.mark.parametrize("case", ROUND_TRIPS)
def test_save_then_load_gives_identical_logits(case, tmp_path, device):
    fields = dict(image_size=8, patch_size=P, in_channels=C, num_classes=4, hidden_size=D,
                  depth=DEPTH, num_heads=HEADS, mlp_dim=M, gelu="tanh")
    fields.update(ROUND_TRIPS[case])
    config = ViTConfig(**fields)
    model = perturbed(config).to(device)
    path = official.save_official(model, tmp_path / "out.npz")
    assert official.is_official(path)
    kwargs = {"gelu": config.gelu}                       # the file does not say which GELU
    if config.pos_embed == "none":                       # nor, without E_pos, the image size
        kwargs["image_size"] = config.image_size
    loaded = official.load_official(path, **kwargs)
    # The config comes back whole, except that a fixed sincos2d table comes back as a
    # (learned) pos_embedding array, which is what the official model would add.
    expected = config if config.pos_embed != "sincos2d" else ViTConfig(**{**fields, "pos_embed": "learned"})
    assert loaded.config == expected
    x = images(2, config.image_size)
    np.testing.assert_array_equal(logits(loaded, x, device), logits(model, x, device))
    # and the file itself is what the official code would compute (tanh GELU):
    if config.gelu == "tanh":
        with np.load(path) as data:
            arrays = dict(data)
        np.testing.assert_allclose(official_forward(arrays, x), logits(model, x, device),
                                   rtol=1e-4, atol=1e-5)


def test_an_erf_model_reloads_as_tanh_by_default(tmp_path):
    fields = dict(image_size=8, patch_size=P, num_classes=4, hidden_size=D, depth=1,
                  num_heads=HEADS, mlp_dim=M)
    model = perturbed(ViTConfig(**fields, gelu="erf"))
    loaded = official.load_official(official.save_official(model, tmp_path / "erf.npz"))
    assert loaded.config == ViTConfig(**fields, gelu="tanh")


def test_save_refuses_what_is_not_a_vision_transformer(tmp_path):
    with pytest.raises(TypeError, match="expected a minivit VisionTransformer, got Linear"):
        official.save_official(mv.nn.Linear(2, 3, np.random.default_rng(0)), tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


# --- fine-tuning starts: a new head, a new image size ---------------------------------

def test_new_num_classes_gives_a_zero_head_and_drops_pre_logits(tmp_path, device):
    arrays = official_arrays(np.random.default_rng(0), representation=6)
    path = write(tmp_path / "vit.npz", arrays)
    model = official.load_official(path, num_classes=10)
    assert model.config.num_classes == 10 and model.config.representation_size is None
    assert model.pre_logits is None
    assert model.head.weight.shape == (D, 10) and model.head.bias.shape == (10,)
    assert not model.head.weight.numpy().any() and not model.head.bias.numpy().any()
    np.testing.assert_array_equal(logits(model, images(2, 8), device), np.zeros((2, 10)))
    # everything below the head is the checkpoint's
    np.testing.assert_array_equal(model.pos_embed.numpy(), arrays[POS])

    kept = official.load_official(path, num_classes=10, keep_pre_logits=True)
    assert kept.config.representation_size == 6 and kept.head.weight.shape == (6, 10)
    np.testing.assert_array_equal(kept.pre_logits.weight.numpy(), arrays["pre_logits/kernel"])
    assert not kept.head.weight.numpy().any()

    same = official.load_official(path, num_classes=5)          # the checkpoint's own count
    np.testing.assert_array_equal(same.head.weight.numpy(), arrays["head/kernel"])


@pytest.mark.parametrize("token", [True, False])
def test_new_image_size_resizes_the_position_embeddings(token, tmp_path, device):
    arrays = official_arrays(np.random.default_rng(0), image=8, token=token)   # 2 x 2 grid
    model = official.load_official(write(tmp_path / "vit.npz", arrays), image_size=16)
    assert model.config.image_size == 16
    assert model.pos_embed.shape == (1, 16 + token, D)                          # 4 x 4 grid
    np.testing.assert_array_equal(
        model.pos_embed.numpy(), official.resize_position_embedding(arrays[POS], 4, token))
    out = logits(model, images(2, 16), device)
    assert out.shape == (2, 5) and np.isfinite(out).all()
    # the resized table plugged into the official forward gives the same logits
    resized = dict(arrays, **{POS: official.resize_position_embedding(arrays[POS], 4, token)})
    np.testing.assert_allclose(out, official_forward(resized, images(2, 16)), rtol=1e-4, atol=1e-5)


# --- the resize ------------------------------------------------------------------------

def with_cls(grid, cls_row):
    g = grid.shape[0]
    return np.concatenate([cls_row[None], grid.reshape(g * g, -1)])[None]


def test_resize_to_the_same_grid_is_the_identity():
    pos = np.random.default_rng(0).standard_normal((1, 10, 4)).astype(np.float32)
    out = official.resize_position_embedding(pos, 3, has_cls=True)
    np.testing.assert_array_equal(out, pos)
    assert out is not pos and out.dtype == np.float32


@pytest.mark.parametrize("old,new", [(3, 5), (4, 7), (5, 3), (14, 24), (7, 12), (8, 26)])
def test_a_linear_grid_is_reproduced_at_the_zoom_sample_points(old, new, device):
    a, b, e = np.array([1.0, -2.0, 0.5]), np.array([3.0, 0.25, -1.0]), np.array([0.0, 1.0, 2.0])
    r, c = np.meshgrid(np.arange(old), np.arange(old), indexing="ij")
    grid = a * r[..., None] + b * c[..., None] + e                       # (old, old, 3)
    cls_row = np.array([7.0, 8.0, 9.0])
    pos = mv.backend.to_device(with_cls(grid, cls_row), device)
    out = mv.backend.to_numpy(official.resize_position_embedding(pos, new, has_cls=True))
    assert out.shape == (1, new * new + 1, 3)
    np.testing.assert_array_equal(out[0, 0], cls_row)                   # [CLS] untouched
    s = np.arange(new) * (old - 1) / (new - 1)                           # c_i, corners aligned
    expected = a * s[:, None, None] + b * s[None, :, None] + e
    np.testing.assert_allclose(out[0, 1:].reshape(new, new, 3), expected, rtol=1e-12, atol=1e-12)


def test_resize_without_cls_and_to_a_single_patch():
    grid = np.arange(2 * 2 * 3, dtype=np.float64).reshape(2, 2, 3)
    out = official.resize_position_embedding(grid.reshape(1, 4, 3), 1, has_cls=False)
    np.testing.assert_array_equal(out, grid[None, :1, 0])    # scipy's factor 1: the corner (0, 0)
    one = official.resize_position_embedding(grid[:1, :1].reshape(1, 1, 3), 3, has_cls=False)
    np.testing.assert_array_equal(one[0], np.repeat(grid[0, 0][None], 9, axis=0))


@pytest.mark.parametrize("old,new", [(3, 5), (4, 7), (5, 3), (14, 24), (7, 12), (24, 14), (2, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_resize_equals_scipy_zoom(old, new, dtype):
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(old * 100 + new)
    grid = rng.standard_normal((old, old, 6)).astype(dtype)
    cls_row = rng.standard_normal(6).astype(dtype)
    out = official.resize_position_embedding(with_cls(grid, cls_row), new, has_cls=True)
    zoomed = ndimage.zoom(grid, (new / old, new / old, 1), order=1)      # vit_jax/checkpoint.py
    assert out.dtype == dtype
    np.testing.assert_array_equal(out[0, 0], cls_row)
    np.testing.assert_array_equal(out[0, 1:].reshape(new, new, 6), zoomed)


def test_where_scipy_zeroes_an_edge_by_round_off_the_edge_is_kept():
    """8 -> 26: 25 * (7/25) = 7.000000000000001 lies past the last input row, and scipy's
    default mode="constant" returns cval = 0 for the whole last row and column (scipy
    issues #6713, #8930).  minivit clamps to the edge, like mode="nearest"."""
    ndimage = pytest.importorskip("scipy.ndimage")
    grid = np.random.default_rng(0).standard_normal((8, 8, 3))
    out = official.resize_position_embedding(grid.reshape(1, 64, 3), 26, has_cls=False)
    out = out[0].reshape(26, 26, 3)
    constant = ndimage.zoom(grid, (26 / 8, 26 / 8, 1), order=1)
    assert (constant[-1] == 0).all() and (constant[:, -1] == 0).all()
    np.testing.assert_array_equal(out[:-1, :-1], constant[:-1, :-1])
    nearest = ndimage.zoom(grid, (26 / 8, 26 / 8, 1), order=1, mode="nearest")
    np.testing.assert_allclose(out, nearest, rtol=1e-12, atol=1e-12)


def test_resize_rejects_bad_input():
    with pytest.raises(ValueError, match=r"shape \(1, T, D\), got \(10, 4\)"):
        official.resize_position_embedding(np.zeros((10, 4)), 3, True)
    with pytest.raises(ValueError, match="8 patch rows .* do not form a square grid"):
        official.resize_position_embedding(np.zeros((1, 9, 4)), 3, True)
    with pytest.raises(ValueError, match="new_grid must be a positive int, got 0"):
        official.resize_position_embedding(np.zeros((1, 10, 4)), 0, True)


# --- what is refused, and how ----------------------------------------------------------

def test_missing_extra_and_misshapen_keys_are_all_listed_in_one_error(tmp_path):
    arrays = official_arrays(np.random.default_rng(0))
    del arrays["Transformer/encoderblock_1/LayerNorm_2/scale"]
    del arrays["embedding/bias"]
    arrays["Transformer/encoderblock_0/extra/kernel"] = np.zeros(3, np.float32)
    arrays["head/bias"] = np.zeros(7, np.float32)
    arrays[f"Transformer/encoderblock_1/{ATTN}/out/kernel"] = np.zeros((HEADS, HD, D + 1), np.float32)
    with pytest.raises(ValueError) as info:
        official.load_official(write(tmp_path / "bad.npz", arrays))
    message = str(info.value)
    for text in ("missing keys", "'Transformer/encoderblock_1/LayerNorm_2/scale'", "'embedding/bias'",
                 "unexpected keys", "'Transformer/encoderblock_0/extra/kernel'",
                 "wrong shapes", "head/bias: (7,), expected (5,)",
                 f"encoderblock_1/{ATTN}/out/kernel: (2, 4, 9), expected (2, 4, 8)", "bad.npz"):
        assert text in message, text


def test_an_incomplete_hybrid_lists_what_is_missing(tmp_path):
    arrays = official_arrays(np.random.default_rng(0))
    arrays["conv_root/kernel"] = np.zeros((7, 7, 3, 64), np.float32)
    arrays["block1/unit1/conv1/kernel"] = np.zeros((1, 1, 64, 64), np.float32)
    with pytest.raises(ValueError) as info:
        official.load_official(write(tmp_path / "r50.npz", arrays))
    message = str(info.value)
    for text in ("read as a ResNet stem (1,) of width_factor 1.0", "missing keys",
                 "'gn_root/scale'", "'block1/unit1/conv2/kernel'", "'block1/unit1/gn_proj/bias'",
                 "embedding/kernel: (4, 4, 3, 8), expected (4, 4, 256, 8)"):
        assert text in message, text


def test_files_that_are_not_official_checkpoints_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        official.load_official(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="is not an .npz file of arrays that can be read"):
        official.load_official(tmp_path / "text.npz")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(ValueError, match="single array, an .npy"):
        official.load_official(tmp_path / "one.npy")
    np.savez(tmp_path / "pickled.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"pickled.npz holds Python objects \(pickled arrays\), "
                                         r"refused"):
        official.load_official(tmp_path / "pickled.npz")
    ours = checkpoint.save_checkpoint(tmp_path / "ours.npz", VisionTransformer(
        image_size=8, patch_size=4, num_classes=3, hidden_size=8, depth=1, num_heads=2, mlp_dim=8))
    with pytest.raises(ValueError, match="it is a minivit checkpoint: load it with "
                                         "minivit.checkpoint.load_checkpoint"):
        official.load_official(ours)


def test_position_embeddings_that_are_not_a_square_grid_are_refused(tmp_path):
    arrays = official_arrays(np.random.default_rng(0))
    arrays[POS] = np.zeros((1, 6, D), np.float32)
    with pytest.raises(ValueError, match="has 6 rows: with classifier 'token' that is 5 patches, "
                                         "not a square grid"):
        official.load_official(write(tmp_path / "vit.npz", arrays))


def test_without_position_embeddings_the_image_size_must_be_given(tmp_path, device):
    arrays = official_arrays(np.random.default_rng(0), pos=False)
    path = write(tmp_path / "vit.npz", arrays)
    with pytest.raises(ValueError, match="no position embeddings, so it does not record its "
                                         "image size: pass image_size="):
        official.load_official(path)
    model = official.load_official(path, image_size=12)
    assert model.config.pos_embed == "none" and model.config.image_size == 12
    x = images(2, 12)
    np.testing.assert_allclose(logits(model, x, device), official_forward(arrays, x),
                               rtol=1e-4, atol=1e-5)


# --- hybrids: a ResNet stem before the embedding (Sec. 3.1) -----------------------------

def hybrid_arrays(rng, layers=(), width=32, image=16, patch=1, token=True, old_gn=False,
                  dtype=np.float32):
    """Random arrays in the official naming for a tiny hybrid: the ViT of official_arrays
    on the feature map of a ResNet stem with `layers` units per stage."""
    def r(*shape, scale=0.3):
        return (scale * rng.standard_normal(shape)).astype(dtype)
    size = -(-image // 4)                                      # the root: conv /2, pool /2
    a = {"conv_root/kernel": r(7, 7, C, width)}
    gns = {"gn_root": width}
    channels = width
    for i, units in enumerate(layers):
        f = width * 2 ** i
        size = size if i == 0 else -(-size // 2)
        for j in range(units):
            u = f"block{i + 1}/unit{j + 1}/"
            a.update({u + "conv1/kernel": r(1, 1, channels, f), u + "conv2/kernel": r(3, 3, f, f),
                      u + "conv3/kernel": r(1, 1, f, 4 * f)})
            gns.update({u + "gn1": f, u + "gn2": f, u + "gn3": 4 * f})
            if j == 0:                              # the first unit changes the channels
                a[u + "conv_proj/kernel"] = r(1, 1, channels, 4 * f)
                gns[u + "gn_proj"] = 4 * f
            channels = 4 * f
    for name, n in gns.items():
        shape = (1, 1, 1, n) if old_gn else (n,)
        a[name + "/scale"] = (1 + r(n)).reshape(shape)
        a[name + "/bias"] = r(n).reshape(shape)
    vit = {k: v.astype(dtype) for k, v in official_arrays(rng, token=token).items()}
    vit["embedding/kernel"] = r(patch, patch, channels, D)
    vit[POS] = r(1, (size // patch) ** 2 + token, D)
    return {**a, **vit}


HYBRIDS = {"root alone, 2x2 patches": dict(layers=(), patch=2),
           "two stages, 1x1 patches": dict(layers=(1, 2), patch=1),
           "gap, three stages": dict(layers=(1, 1, 1), image=32, token=False),
           "older GroupNorm shapes": dict(layers=(1,), old_gn=True)}


@pytest.mark.parametrize("case", HYBRIDS)
def test_loaded_hybrid_matches_the_official_forward(case, tmp_path, device):
    spec = HYBRIDS[case]
    arrays = hybrid_arrays(np.random.default_rng(0), **spec)
    model = official.load_official(write(tmp_path / "hybrid.npz", arrays))
    c = model.config
    # the image size from the position embeddings: grid x P x the stem's downsampling
    assert (c.resnet_layers, c.width_factor, c.in_channels, c.image_size, c.patch_size) == \
        (spec["layers"], 0.5, C, spec.get("image", 16), spec.get("patch", 1))
    x = images(2, c.image_size)
    np.testing.assert_allclose(logits(model, x, device), official_forward(arrays, x),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hybrid", [False, True])
def test_a_float64_file_loads_exactly(hybrid, tmp_path, device):
    """dtype="float64": every array is kept to the last bit, so the logits equal the
    official forward computed from the raw arrays up to float64 rounding."""
    rng = np.random.default_rng(0)
    arrays = (hybrid_arrays(rng, layers=(1, 1), dtype=np.float64) if hybrid
              else {k: v.astype(np.float64) for k, v in official_arrays(rng).items()})
    model = official.load_official(write(tmp_path / "f64.npz", arrays), dtype="float64")
    assert all(p.dtype == np.float64 for p in model.parameters())
    state = model.state_dict()
    np.testing.assert_array_equal(state["patch_embed.kernel"],
                                  arrays["embedding/kernel"].reshape(-1, D))
    if hybrid:
        np.testing.assert_array_equal(state["resnet.stages.1.units.0.conv_proj.kernel"],
                                      arrays["block2/unit1/conv_proj/kernel"])
    x = np.random.default_rng(1).standard_normal((2, C, model.config.image_size,
                                                  model.config.image_size))
    np.testing.assert_allclose(logits(model, x, device), official_forward(arrays, x),
                               rtol=1e-11, atol=1e-12)


def test_released_files_load_as_float32_by_default(tmp_path):
    arrays = hybrid_arrays(np.random.default_rng(0), dtype=np.float64)
    model = official.load_official(write(tmp_path / "f64.npz", arrays))
    assert all(p.dtype == np.float32 for p in model.parameters())


def test_save_then_load_a_hybrid_gives_identical_logits(tmp_path, device):
    config = ViTConfig(image_size=16, patch_size=1, num_classes=4, hidden_size=D, depth=DEPTH,
                       num_heads=HEADS, mlp_dim=M, gelu="tanh", resnet_layers=(1, 1),
                       width_factor=0.5)
    model = perturbed(config).to(device)
    path = official.save_official(model, tmp_path / "hybrid.npz")
    with np.load(path) as data:
        arrays = dict(data)
    assert arrays["conv_root/kernel"].shape == (7, 7, C, 32)
    assert arrays["block2/unit1/conv_proj/kernel"].shape == (1, 1, 128, 256)
    assert "block1/unit1/conv_proj/kernel" in arrays and "block2/unit2/conv1/kernel" not in arrays
    loaded = official.load_official(path)
    assert loaded.config == config
    x = images(2, 16)
    np.testing.assert_array_equal(logits(loaded, x, device), logits(model, x, device))
    np.testing.assert_allclose(official_forward(arrays, x), logits(model, x, device),
                               rtol=1e-4, atol=1e-5)


def test_a_hybrid_fine_tuning_start(tmp_path, device):
    """A new head and a new image size: the position embeddings are resized over the
    grid of the feature map (16 px: 4 x 4 after the root, 32 px: 8 x 8)."""
    arrays = hybrid_arrays(np.random.default_rng(0), layers=(), patch=1)
    model = official.load_official(write(tmp_path / "r.npz", arrays), num_classes=7,
                                   image_size=32)
    assert model.config.grid_size == 8 and model.pos_embed.shape == (1, 65, D)
    np.testing.assert_array_equal(model.pos_embed.numpy(),
                                  official.resize_position_embedding(arrays[POS], 8, True))
    assert logits(model, images(2, 32), device).shape == (2, 7)
