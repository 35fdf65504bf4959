"""The hybrid (paper Sec. 3.1): a ResNet stem whose feature map is cut into the tokens.

The stem is described in minivit/nn/resnet.py (after the official models_resnet.py and
models_vit.py), width w = int(64 * width_factor):

    root:  StdConv 7x7/2 (w) -> GroupNorm -> ReLU -> max pool 3x3/2        ("SAME" padding)
    unit:  y = GN3(conv3(ReLU(GN2(conv2(ReLU(GN1(conv1(x)))))))),  out = ReLU(r(x) + y),
           r(x) = x, or GN_proj(conv_proj(x)) when the unit changes the channels or the size.

Each of its operations has its own derivation and test (test_conv.py, test_ops_basic.py);
here they are composed, written with the loop references of tests/reference.py.  These
tests check, in order:

1. A bottleneck unit is that formula, with and without a projection, at stride 1 and 2
   (test_bottleneck_unit_matches_the_formulas); gn3's scale starts at 0, so a fresh unit
   is ReLU(r(x)), the residual path alone (test_a_fresh_unit_passes_its_residual).
2. The stem is the root followed by the units (test_the_stem_matches_the_formulas).
3. The backward of a unit is the chain rule summed over its two paths: with
   m = 1[r(x) + y > 0], dx = dr/dx^T (m g) + dy/dx^T (m g); gradient checks of a unit and
   of a whole tiny hybrid pass (test_gradcheck_a_bottleneck_unit,
   test_gradcheck_a_tiny_hybrid).
4. A hybrid is a ViT whose image is the feature map
   (test_a_hybrid_is_a_vit_whose_image_is_the_feature_map).
5. "SAME" halves a side rounding up: at 224 px the root ends at 56 and R50's stages at
   56 / 28 / 14, 196 tokens of 1x1 patches (test_feature_size_rounds_up_like_same_padding,
   test_the_feature_map_and_the_token_grid); cifar-hybrid has as many tokens as
   cifar-tiny (test_cifar_hybrid_has_as_many_tokens_as_cifar_tiny).
6. The parameter counts, from the stem's shapes (the root 7*7*C*w + 2w; a unit
   c f + 2f + 9 f^2 + 2f + 4 f^2 + 8f, plus 4 c f + 8f with a projection), are the
   official hybrids' (test_presets_have_the_official_parameter_counts): R50+B/16
   98,659,112; R26+S/32 36,431,912; R+Ti/16 6,337,704; R26+B/32 101,383,976; R50+L/32
   328,994,856; the pure ViTs' are unchanged (test_pure_vit_counts_are_unchanged), and an
   allocated model holds what the count says
   (test_the_model_holds_what_count_parameters_says_and_the_sizes_are_real).

Then configs through JSON, the errors, float32 training and moving between devices.
"""
import json
from dataclasses import asdict, replace

import numpy as np
import pytest

import minivit as mv
from minivit import backend, checkpoint
from minivit.nn import ViTConfig, VisionTransformer, count_parameters, preset
from minivit.nn.resnet import BottleneckUnit, ResNetStem, feature_size
from minivit.official import official_shapes
from minivit.ops.patch import same_padding

from reference import loop_conv2d, loop_group_norm, loop_weight_standardize


OFFICIAL_COUNTS = {"R50+B/16": 98_659_112, "R26+S/32": 36_431_912, "R+Ti/16": 6_337_704,
                   "R26+B/32": 101_383_976, "R50+L/32": 328_994_856}


# A tiny hybrid for checks: 16 px, one channel, width 32 (the least GroupNorm's 32 groups
# allow), the root alone: a 4 x 4 feature map of 32 channels, 2 x 2 patches of it.
TINY = dict(image_size=16, patch_size=2, in_channels=1, num_classes=3, hidden_size=4,
            depth=1, num_heads=1, mlp_dim=4, resnet_layers=(), width_factor=0.5)


def np_std_conv(x, kernel, stride):
    """conv2d of NCHW x with the weight-standardised kernel, TensorFlow "SAME" padding."""
    return loop_conv2d(x, loop_weight_standardize(kernel), None, stride, "SAME")


def np_group_norm(x, scale, bias, groups=32):
    return loop_group_norm(x, scale, bias, groups)


def np_unit(x, p, stride):
    """A bottleneck unit from its arrays p = {"conv1": kernel, "gn1": (scale, bias), ...}."""
    relu = lambda a: np.maximum(a, 0)                                    # noqa: E731
    residual = x
    if "conv_proj" in p:
        residual = np_group_norm(np_std_conv(x, p["conv_proj"], stride), *p["gn_proj"])
    y = relu(np_group_norm(np_std_conv(x, p["conv1"], 1), *p["gn1"]))
    y = relu(np_group_norm(np_std_conv(y, p["conv2"], stride), *p["gn2"]))
    y = np_group_norm(np_std_conv(y, p["conv3"], 1), *p["gn3"])
    return relu(residual + y)


def unit_arrays(unit):
    """The arrays of a BottleneckUnit in the reference's form."""
    p = {}
    for name in ("proj", "1", "2", "3"):
        conv = getattr(unit, "conv" + ("_" if name == "proj" else "") + name)
        gn = getattr(unit, "gn" + ("_" if name == "proj" else "") + name)
        if conv is not None:
            key = "conv_proj" if name == "proj" else "conv" + name
            p[key] = conv.kernel.numpy()
            p[key.replace("conv", "gn")] = (gn.scale.numpy(), gn.bias.numpy())
    return p


def perturb(module, rng, scale=0.3):
    """Move every parameter off its initial value (gn3's scale starts at 0)."""
    for p in module.parameters():
        p.data = p.data + backend.asarray(scale * rng.standard_normal(p.shape),
                                          dtype=p.dtype, device=p.device)


def directional_check(loss, p, rng, eps=1e-6):
    """The gradient of a big array along one random direction v: the central difference
    (loss(p + eps v) - loss(p - eps v)) / (2 eps) must equal <dL/dp, v>.  Two evaluations
    check every entry of dL/dp at once (one random combination of them)."""
    v = backend.asarray(rng.standard_normal(p.shape), device=p.device)
    analytic = float((p.grad * v).sum())
    base = p.data.copy()
    p.data = base + eps * v
    up = loss()
    p.data = base - eps * v
    down = loss()
    p.data = base
    numeric = (up - down) / (2 * eps)
    return abs(analytic - numeric) / max(abs(analytic), abs(numeric), 1e-7)


# --- the unit and the stem against the formulas -----------------------------------------

@pytest.mark.parametrize("in_channels,features,stride", [(32, 32, 1), (128, 32, 1), (64, 32, 2)])
def test_bottleneck_unit_matches_the_formulas(device, in_channels, features, stride):
    rng = np.random.default_rng(0)
    unit = BottleneckUnit(in_channels, features, stride, rng).astype("float64")
    perturb(unit, rng)
    unit.to(device)
    assert (unit.conv_proj is None) == (in_channels == 4 * features and stride == 1)
    x = rng.standard_normal((2, in_channels, 5, 5))
    y = unit(mv.tensor(x, device=device))
    assert y.shape == (2, 4 * features, -(-5 // stride), -(-5 // stride))
    np.testing.assert_allclose(y.numpy(), np_unit(x, unit_arrays(unit), stride),
                               rtol=1e-10, atol=1e-11)


def test_a_fresh_unit_passes_its_residual(device, rng):
    unit = BottleneckUnit(128, 32, 1, rng).to(device)                   # gn3's scale is 0
    x = rng.standard_normal((1, 128, 3, 3)).astype(np.float32)
    np.testing.assert_array_equal(unit(mv.tensor(x, device=device)).numpy(), np.maximum(x, 0))


def test_the_stem_matches_the_formulas(device, rng):
    stem = ResNetStem(2, 32, (1, 1), rng).astype("float64")
    perturb(stem, rng)
    stem.to(device)
    x = rng.standard_normal((2, 2, 13, 13))
    y = np.maximum(np_group_norm(np_std_conv(x, stem.conv_root.kernel.numpy(), 2),
                                 stem.gn_root.scale.numpy(), stem.gn_root.bias.numpy()), 0)
    top, _ = same_padding(y.shape[2], 3, 2)
    y = np.pad(y, ((0, 0), (0, 0), same_padding(7, 3, 2), same_padding(7, 3, 2)),
               constant_values=-np.inf)
    y = np.max([y[:, :, i:i + 8:2, j:j + 8:2] for i in range(3) for j in range(3)], axis=0)
    assert y.shape == (2, 32, 4, 4) and top == 1
    for i, stage in enumerate(stem.stages):
        y = np_unit(y, unit_arrays(stage.units[0]), 1 if i == 0 else 2)
    np.testing.assert_allclose(stem(mv.tensor(x, device=device)).numpy(), y,
                               rtol=1e-10, atol=1e-11)


# --- gradients --------------------------------------------------------------------------

def test_gradcheck_a_bottleneck_unit(device):
    """Full gradient checks of the input and of every GroupNorm scale and bias; each
    kernel (thousands of weights) along a random direction."""
    rng = np.random.default_rng(0)
    unit = BottleneckUnit(32, 32, 2, rng).astype("float64")
    perturb(unit, rng)
    unit.to(device)
    x = mv.tensor(rng.standard_normal((1, 32, 3, 3)), requires_grad=True, device=device)
    norms = [p for name, p in unit.named_parameters() if not name.endswith("kernel")]
    assert mv.gradcheck(lambda x, *p: unit(x), x, *norms) < 1e-6
    g = backend.asarray(rng.standard_normal((1, 128, 2, 2)), device=device)
    unit.zero_grad()                          # gradcheck's own backward reached the kernels
    unit(x).backward(g)

    def loss():
        with mv.no_grad():
            return float((unit(x).data * g).sum())
    for name, p in unit.named_parameters():
        if name.endswith("kernel"):
            assert directional_check(loss, p, rng) < 1e-6, name


def test_gradcheck_a_tiny_hybrid(device):
    """Every parameter of a tiny hybrid and its images: all in full, except the root
    kernel (7*7*32 weights), which goes along random directions."""
    rng = np.random.default_rng(0)
    model = VisionTransformer(ViTConfig(**TINY), seed=0).astype("float64")
    perturb(model, rng, 0.1)
    model.to(device)
    images = mv.tensor(rng.standard_normal((1, 1, 16, 16)), requires_grad=True, device=device)
    root = model.resnet.conv_root.kernel
    others = [p for p in model.parameters() if p is not root]
    assert mv.gradcheck(lambda x, *p: model(x), images, *others) < 1e-6
    g = backend.asarray(rng.standard_normal((1, 3)), device=device)
    model.zero_grad()                         # gradcheck's own backward reached the root
    model(images).backward(g)

    def loss():
        with mv.no_grad():
            return float((model(images).data * g).sum())
    for _ in range(3):
        assert directional_check(loss, root, rng) < 1e-6


# --- the same encoder -------------------------------------------------------------------

def test_a_hybrid_is_a_vit_whose_image_is_the_feature_map(device, rng):
    """Sec. 3.1: only the input of E changes.  A pure ViT given the stem's feature map as
    its "image" (C' channels, feature_size pixels) and the hybrid's encoder weights
    computes the hybrid's logits."""
    config = ViTConfig(**TINY)
    hybrid = VisionTransformer(config, seed=0)
    perturb(hybrid, rng, 0.1)
    vit = VisionTransformer(replace(config, resnet_layers=None, image_size=config.feature_size,
                                    in_channels=config.embed_channels))
    vit.load_state_dict({k: v for k, v in hybrid.state_dict().items()
                         if not k.startswith("resnet.")})
    hybrid.to(device), vit.to(device)
    x = mv.tensor(rng.standard_normal((2, 1, 16, 16)).astype(np.float32), device=device)
    np.testing.assert_array_equal(vit(hybrid.resnet(x)).numpy(), hybrid(x).numpy())


# --- sizes and parameter counts ---------------------------------------------------------

def test_feature_size_rounds_up_like_same_padding():
    assert [feature_size(n, ()) for n in (224, 32, 33, 20, 7)] == [56, 8, 9, 5, 2]
    assert [feature_size(224, layers) for layers in ((3,), (3, 4), (3, 4, 9), (3, 4, 6, 3))] == \
        [56, 28, 14, 7]


@pytest.mark.parametrize("name,grid,channels", [("R50+B/16", 14, 1024), ("R26+S/32", 7, 2048),
                                                ("R+Ti/16", 7, 64), ("R50+L/32", 7, 2048),
                                                ("cifar-hybrid", 8, 32)])
def test_the_feature_map_and_the_token_grid(name, grid, channels):
    c = preset(name)
    assert (c.grid_size, c.embed_channels, c.num_patches) == (grid, channels, grid * grid)


def test_cifar_hybrid_has_as_many_tokens_as_cifar_tiny():
    hybrid, tiny = preset("cifar-hybrid"), preset("cifar-tiny")
    assert hybrid.feature_size == 8 and hybrid.num_tokens == tiny.num_tokens == 65
    assert (hybrid.hidden_size, hybrid.depth, hybrid.num_heads, hybrid.mlp_dim) == \
        (tiny.hidden_size, tiny.depth, tiny.num_heads, tiny.mlp_dim)
    assert count_parameters(hybrid) == 145_770


@pytest.mark.parametrize("name", OFFICIAL_COUNTS)
def test_presets_have_the_official_parameter_counts(name):
    config = preset(name)
    assert count_parameters(config) == OFFICIAL_COUNTS[name]
    # and the official layout of that config holds exactly as many numbers
    assert sum(int(np.prod(s)) for s in official_shapes(config).values()) == OFFICIAL_COUNTS[name]


def test_pure_vit_counts_are_unchanged():
    assert count_parameters(preset("B/16")) == 86_567_656
    assert not preset("B/16").hybrid and preset("B/16").embed_channels == 3


@pytest.mark.parametrize("fields", [
    dict(TINY), dict(TINY, image_size=20, patch_size=1),
    dict(TINY, resnet_layers=(1, 1), image_size=20, patch_size=1),
    dict(TINY, resnet_layers=(1, 2, 1), image_size=33, patch_size=1)])
def test_the_model_holds_what_count_parameters_says_and_the_sizes_are_real(fields, device):
    config = ViTConfig(**fields)
    model = VisionTransformer(config).to(device)
    assert model.num_parameters() == count_parameters(config)
    x = mv.tensor(np.zeros((1, config.in_channels, config.image_size, config.image_size),
                           np.float32), device=device)
    features = model.resnet(x)
    assert features.shape == (1, config.embed_channels, config.feature_size, config.feature_size)
    assert model(x).shape == (1, 3)


# --- errors, dtypes and devices ---------------------------------------------------------

def test_a_hybrid_config_survives_json(tmp_path, device):
    config = ViTConfig(**dict(TINY, resnet_layers=[1, 1], image_size=16, patch_size=1))
    assert config.resnet_layers == (1, 1)                     # a list becomes a tuple
    assert ViTConfig(**json.loads(json.dumps(asdict(config)))) == config
    model = VisionTransformer(config, seed=3)
    perturb(model, np.random.default_rng(0))
    model.to(device)
    path = checkpoint.save_checkpoint(tmp_path / "hybrid.npz", model)
    loaded = checkpoint.model_from_checkpoint(path).to(device)
    x = mv.tensor(np.random.default_rng(1).standard_normal((2, 1, 16, 16)).astype(np.float32),
                  device=device)
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


def test_bad_hybrid_configs_are_refused():
    with pytest.raises(ValueError, match=r"int\(64 \* width_factor\) = 16 must be a positive "
                                         r"multiple of the 32 GroupNorm groups"):
        ViTConfig(**dict(TINY, width_factor=0.25))
    with pytest.raises(ValueError, match=r"resnet_layers must be None \(a pure ViT\) or a tuple "
                                         r"of unit counts >= 1"):
        ViTConfig(**dict(TINY, resnet_layers=(3, 0)))
    with pytest.raises(ValueError, match=r"the ResNet's 4x4 feature map \(from 16 px images\) "
                                         r"is not a multiple of patch_size 3"):
        ViTConfig(**dict(TINY, patch_size=3))


def test_a_float32_training_step_reaches_every_parameter(device, rng):
    model = VisionTransformer("cifar-hybrid", seed=0).to(device)
    perturb(model, rng, 0.05)
    x = mv.tensor(rng.standard_normal((2, 3, 32, 32)).astype(np.float32), device=device)
    labels = backend.asarray(np.array([1, 7]), device=device)
    mv.cross_entropy(model(x), labels).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == np.float32, name
        assert bool(backend.module_for(device).isfinite(p.grad).all()), name


def test_to_astype_and_state_dict_cover_the_stem(device):
    model = VisionTransformer(ViTConfig(**TINY), seed=1)
    names = [n for n, _ in model.named_parameters()]
    assert names[:3] == ["resnet.conv_root.kernel", "resnet.gn_root.scale", "resnet.gn_root.bias"]
    state = model.state_dict()
    other = VisionTransformer(ViTConfig(**TINY), seed=2).to(device).astype("float64")
    other.load_state_dict(state)
    for name, p in other.named_parameters():
        assert p.device == device and p.dtype == np.float64
        np.testing.assert_array_equal(p.numpy(), state[name])
