"""examples/predict.py and minivit/images.py: from image files to top-K classes.

What a prediction must equal.  For an image file the program computes

    u   = centre_crop_S(resize_shorter_side_to_S(rgb(upright(file))))     uint8 (S, S, 3)
    x_c = (u_c / 255 - mean_c) / std_c                                    per channel c
    p   = softmax(ViT(x)),   p_i = exp(l_i - max l) / sum_j exp(l_j - max l)

and prints the K largest p_i.  The tests rebuild u and x on their own (Pillow's resize
and a NumPy slice for the crop, the normalisation written out in float64), run the
model's own forward pass and a float64 softmax, and compare.  The head of the test
model is made non-zero (ViT's head starts at zero, which would give every class 1/10)
so that a wrong crop, channel order or normalisation changes the answer.

The pieces that decide u, checked one at a time:
  - greyscale: one value g per pixel becomes (g, g, g); 16-bit greyscale v in 0..65535
    becomes round(v / 257) (65535 / 257 = 255 exactly);
  - transparency: a pixel (c, a) over white is c a/255 + 255 (1 - a/255);
  - EXIF orientation 6 ("rotate 90 degrees clockwise to view") gives rot90(pixels, -1);
  - the crop is central: a 3S x S image of three S x S colour bands gives the middle band.
Official checkpoints (google-research/vision_transformer) use pixel / 127.5 - 1, which
is mean = std = 1/2 in the formula above: (u/255 - 1/2) / (1/2) = u/127.5 - 1.
"""
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

import minivit as mv
from minivit import backend, checkpoint, images
from minivit.nn import VisionTransformer
from conftest import load_example

pytestmark = pytest.mark.usefixtures("keep_default_backend")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "predict.py"
S = 8
TINY = dict(image_size=S, patch_size=4, num_classes=10, hidden_size=8, depth=1, num_heads=2,
            mlp_dim=16)
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
NAMES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def predict():
    return load_example("predict")


def tiny_model(seed=0, **overrides):
    model = VisionTransformer(**dict(TINY, **overrides), seed=seed)
    rng = np.random.default_rng(seed + 1)
    model.head.weight.data = rng.standard_normal(model.head.weight.shape).astype(np.float32)
    model.head.bias.data = rng.standard_normal(model.head.bias.shape).astype(np.float32)
    return model


@pytest.fixture
def saved(tmp_path):
    model = tiny_model()
    path = checkpoint.save_checkpoint(tmp_path / "ckpt.npz", model,
                                      normalization={"mean": MEAN, "std": STD},
                                      class_names=NAMES)
    return path, model


def write_images(folder):
    """Files of several modes and sizes; returns {name: path}."""
    rng = np.random.default_rng(0)
    rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    paths = {}

    def save(name, image, **kw):
        paths[name] = folder / name
        image.save(paths[name], **kw)

    save("rgb.png", Image.fromarray(rgb(12, 12)))
    save("grey.png", Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8), mode="L"))
    rgba = np.concatenate([rgb(S, S), 255 * rng.integers(0, 2, (S, S, 1), dtype=np.uint8)], -1)
    save("rgba.png", Image.fromarray(rgba, mode="RGBA"))
    save("palette.png", Image.fromarray(rgb(9, 9)).convert("P", palette=Image.Palette.ADAPTIVE,
                                                           colors=16))
    save("photo.jpg", Image.fromarray(rgb(16, 16)), quality=90)
    save("wide.png", Image.fromarray(rgb(12, 20)))          # 20 wide, 12 tall
    save("tall.png", Image.fromarray(rgb(12, 7)))            # 7 wide, 12 tall: 8 x 13.7
    return paths


def expected_pixels(path):
    """u of the module docstring, built independently: uint8 (S, S, 3)."""
    with Image.open(path) as file:
        image = file.copy()
    if image.mode == "RGBA":                        # alpha is 0 or 255 in these files
        a = np.asarray(image)
        rgb = np.where(a[:, :, 3:] == 255, a[:, :, :3], 255).astype(np.uint8)
        image = Image.fromarray(rgb)
    image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        size = (S, int(S * h / w))
    else:
        size = (int(S * w / h), S)
    if size != (w, h):
        image = image.resize(size, Image.Resampling.BICUBIC)
    u = np.asarray(image)
    top, left = (u.shape[0] - S) // 2, (u.shape[1] - S) // 2
    return u[top:top + S, left:left + S]


def normalized(u, mean, std):
    x = (u.astype(np.float64) / 255 - np.array(mean)) / np.array(std)      # (S, S, 3)
    return x.transpose(2, 0, 1).astype(np.float32)


def reference_probabilities(model, arrays, device="cpu"):
    with mv.no_grad():
        logits = mv.Tensor(backend.asarray(np.stack(arrays), device=device))
        logits = backend.to_numpy(model.eval()(logits).data).astype(np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def as_vector(predictions, num_classes=10):
    p = np.full(num_classes, np.nan)
    for pred in predictions:
        p[pred.index] = pred.probability
    return p


# --- predictions ------------------------------------------------------------------------

def test_predictions_equal_the_models_forward_on_independently_prepared_images(
        predict, saved, tmp_path, device, capsys):
    path, model = saved
    files = write_images(tmp_path)
    backend_name = {"cpu": "numpy", "cuda": "cupy"}[device]
    results = predict.main([*map(str, files.values()), "--checkpoint", str(path), "--top", "10",
                            "--batch-size", "3", "--backend", backend_name])
    expected = reference_probabilities(
        model, [normalized(expected_pixels(p), MEAN, STD) for p in files.values()])
    assert len(results) == len(files)
    for name, result, want in zip(files, results, expected):
        got = as_vector(result)
        np.testing.assert_allclose(got, want, atol=2e-6, err_msg=name)
        probs = [r.probability for r in result]
        assert abs(sum(probs) - 1) < 1e-5
        assert probs == sorted(probs, reverse=True)
        assert [r.name for r in result] == [NAMES[r.index] for r in result]
        assert result[0].index == int(np.argmax(want))
    # the images are told apart: not every image gets the same answer
    assert len({r[0].index for r in results}) > 1
    out = capsys.readouterr().out
    top = results[0][0]
    assert f"{files['rgb.png']}\n  {100 * top.probability:7.2f}%  {top.name}\n" in out
    assert predict.exit_status(results) == 0


def test_top_k_gives_k_classes_at_most_num_classes(predict, saved, tmp_path):
    path, _ = saved
    files = write_images(tmp_path)
    for k, want in (("1", 1), ("3", 3), ("50", 10)):
        results = predict.main([str(files["rgb.png"]), str(files["photo.jpg"]),
                                "--checkpoint", str(path), "--top", k])
        assert [len(r) for r in results] == [want, want]
    assert len(predict.main([str(files["rgb.png"]), "--checkpoint", str(path)])[0]) == 5
    with pytest.raises(SystemExit):
        predict.main([str(files["rgb.png"]), "--checkpoint", str(path), "--top", "0"])


def test_the_normalisation_stored_in_the_checkpoint_is_used(predict, tmp_path):
    # the same weights saved with two normalisations give two different answers, each
    # equal to the forward pass on its own normalisation
    model = tiny_model()
    files = write_images(tmp_path)
    u = expected_pixels(files["rgb.png"])
    got = []
    for i, (mean, std) in enumerate([(MEAN, STD), ((0.5, 0.5, 0.5), (0.1, 0.1, 0.1))]):
        path = checkpoint.save_checkpoint(tmp_path / f"c{i}.npz", model,
                                          normalization={"mean": mean, "std": std})
        result = predict.main([str(files["rgb.png"]), "--checkpoint", str(path), "--top", "10"])
        got.append(as_vector(result[0]))
        want = reference_probabilities(model, [normalized(u, mean, std)])[0]
        np.testing.assert_allclose(got[-1], want, atol=2e-6)
    assert np.abs(got[0] - got[1]).max() > 1e-3


# --- preprocessing ----------------------------------------------------------------------

def test_greyscale_becomes_three_equal_channels(tmp_path):
    g = np.random.default_rng(1).integers(0, 256, (S, S), dtype=np.uint8)
    Image.fromarray(g, mode="L").save(tmp_path / "g.png")
    u = images.prepare_image(tmp_path / "g.png", S)
    assert u.shape == (3, S, S) and u.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(u[c], g)
    # 16-bit: v = 257 g is read back as g (Pillow's own conversion would clip at 255)
    Image.fromarray(g.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as file:
        assert file.mode.startswith("I")
    u16 = images.prepare_image(tmp_path / "g16.png", S)
    for c in range(3):
        np.testing.assert_array_equal(u16[c], g)


def test_transparent_pixels_are_composited_onto_white(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (S, S, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], -1), mode="RGBA").save(tmp_path / "a.png")
    a = alpha / 255.0
    want = rgb * a + 255 * (1 - a)
    u = images.prepare_image(tmp_path / "a.png", S).transpose(1, 2, 0)
    assert np.abs(u - want).max() <= 1.0                    # rounding of the blend only
    # a palette image whose colour 0 is transparent: those pixels come out white
    index = rng.integers(0, 4, (S, S), dtype=np.uint8)
    pal = Image.fromarray(index, mode="P")
    pal.putpalette([10, 20, 30, 200, 0, 0, 0, 200, 0, 0, 0, 200])
    pal.save(tmp_path / "p.png", transparency=0)
    u = images.prepare_image(tmp_path / "p.png", S).transpose(1, 2, 0)
    colours = np.array([[255, 255, 255], [200, 0, 0], [0, 200, 0], [0, 0, 200]])
    np.testing.assert_array_equal(u, colours[index])


def test_other_modes_become_rgb(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (S, S, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    Image.fromarray(rgb).convert("1").save(tmp_path / "bw.png")
    for name in ("cmyk.jpg", "bw.png"):
        u = images.prepare_image(tmp_path / name, S)
        assert u.shape == (3, S, S) and u.dtype == np.uint8
        with Image.open(tmp_path / name) as file:
            want = np.asarray(file.convert("RGB")).transpose(2, 0, 1)
        np.testing.assert_array_equal(u, want)


def test_the_centre_crop_picks_the_centre(predict, saved, tmp_path):
    bands = [np.full((S, S, 3), c, np.uint8) for c in ([255, 0, 0], [0, 255, 0], [0, 0, 255])]
    Image.fromarray(np.concatenate(bands, axis=1)).save(tmp_path / "wide.png")      # 3S x S
    Image.fromarray(np.concatenate(bands, axis=0)).save(tmp_path / "tall.png")      # S x 3S
    Image.fromarray(bands[1]).save(tmp_path / "green.png")
    green = np.zeros((3, S, S), np.uint8)
    green[1] = 255
    for name in ("wide.png", "tall.png"):
        np.testing.assert_array_equal(images.prepare_image(tmp_path / name, S), green)
    path, _ = saved
    results = predict.main([str(tmp_path / n) for n in ("wide.png", "tall.png", "green.png")]
                           + ["--checkpoint", str(path), "--top", "10"])
    for result in results[:2]:                  # equal up to float32 rounding in the batch
        assert [r.index for r in result] == [r.index for r in results[2]]
        np.testing.assert_allclose(as_vector(result), as_vector(results[2]), atol=1e-6)
    # and a larger image is shrunk first: 6S x 2S bands -> 3S x S bands -> the middle one
    big = np.concatenate([np.repeat(np.repeat(b, 2, 0), 2, 1) for b in bands], axis=1)
    Image.fromarray(big).save(tmp_path / "big.png")
    u = images.prepare_image(tmp_path / "big.png", S)
    assert np.abs(u[:, 1:-1, 1:-1].astype(int) - green[:, 1:-1, 1:-1]).max() <= 2


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.random.default_rng(4).integers(0, 256, (S, 2 * S, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6                                    # "rotate 90 degrees clockwise"
    Image.fromarray(pixels).save(tmp_path / "sideways.png", exif=exif)
    upright = np.rot90(pixels, -1)                      # (2S, S, 3)
    loaded = np.asarray(images.load_image(tmp_path / "sideways.png"))
    np.testing.assert_array_equal(loaded, upright)
    u = images.prepare_image(tmp_path / "sideways.png", S).transpose(1, 2, 0)
    np.testing.assert_array_equal(u, upright[S // 2:S // 2 + S])


def test_resize_center_crop_refuses_a_bad_size():
    with pytest.raises(ValueError, match="expected a positive integer size, got 0"):
        images.resize_center_crop(Image.new("RGB", (4, 4)), 0)


# --- failures ---------------------------------------------------------------------------

def test_unreadable_images_are_reported_by_name_and_the_rest_classified(
        predict, saved, tmp_path, capsys):
    path, model = saved
    files = write_images(tmp_path)
    missing = tmp_path / "missing.png"
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not a PNG file at all")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(files["photo.jpg"].read_bytes()[:200])
    argv = [str(files["rgb.png"]), str(missing), str(corrupt), str(truncated),
            str(files["grey.png"])]
    results = predict.main(argv + ["--checkpoint", str(path), "--top", "10", "--batch-size", "2"])
    assert results[1] is None and results[2] is None and results[3] is None
    want = reference_probabilities(model, [normalized(expected_pixels(files[n]), MEAN, STD)
                                           for n in ("rgb.png", "grey.png")])
    np.testing.assert_allclose(as_vector(results[0]), want[0], atol=2e-6)
    np.testing.assert_allclose(as_vector(results[4]), want[1], atol=2e-6)
    captured = capsys.readouterr()
    assert f"error: cannot read image {missing}: no such file" in captured.err
    assert f"error: cannot read image {corrupt}: " in captured.err
    assert f"error: cannot read image {truncated}: " in captured.err
    assert str(files["rgb.png"]) in captured.out and str(files["grey.png"]) in captured.out
    assert predict.exit_status(results) == 1


def run_script(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), MINIVIT_BACKEND="numpy")
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=60)


def test_the_exit_status_says_whether_every_image_was_read(saved, tmp_path):
    path, _ = saved
    files = write_images(tmp_path)
    bad = run_script(files["rgb.png"], tmp_path / "nope.png", "--checkpoint", path)
    assert bad.returncode == 1
    assert f"{tmp_path / 'nope.png'}: no such file" in bad.stderr
    assert str(files["rgb.png"]) in bad.stdout
    good = run_script(files["rgb.png"], files["photo.jpg"], "--checkpoint", path, "--top", "2")
    assert good.returncode == 0, good.stderr
    assert good.stdout.count("%") == 4


def test_a_missing_or_unreadable_checkpoint_is_a_clear_error(predict, tmp_path):
    image = write_images(tmp_path)["rgb.png"]
    with pytest.raises(SystemExit, match=r"no checkpoint at .*absent\.npz"):
        predict.main([str(image), "--checkpoint", str(tmp_path / "absent.npz")])
    with pytest.raises(SystemExit, match="is not a file"):
        predict.main([str(image), "--checkpoint", str(tmp_path)])
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(SystemExit, match=r"cannot load the checkpoint .*junk\.npz"):
        predict.main([str(image), "--checkpoint", str(tmp_path / "junk.npz")])


def test_a_checkpoint_with_non_finite_weights_or_python_objects_is_refused(predict, saved,
                                                                          tmp_path):
    path, model = saved
    image = str(write_images(tmp_path)["rgb.png"])
    arrays, meta = checkpoint.load_npz(path)
    arrays["model/blocks.0.mlp.fc1.weight"][0, 0] = np.nan
    checkpoint.save_npz(tmp_path / "nan.npz", arrays, meta)
    with pytest.raises(SystemExit, match=r"nan\.npz: its array model/blocks\.0\.mlp\.fc1\.weight "
                                         r"holds non-finite values"):
        predict.main([image, "--checkpoint", str(tmp_path / "nan.npz")])
    arrays, meta = checkpoint.load_npz(path)
    np.savez(tmp_path / "objects.npz", meta=arrays["model/head.bias"],
             extra=np.array([{"a": 1}], dtype=object))
    with pytest.raises(SystemExit) as info:
        predict.main([image, "--checkpoint", str(tmp_path / "objects.npz")])
    assert "holds Python objects (pickled arrays), refused" in str(info.value)
    assert "damaged" not in str(info.value)


def test_max_pixels_governs_not_pillows_own_limit(tmp_path, monkeypatch):
    """Pillow refuses images over 2 * Image.MAX_IMAGE_PIXELS (about 179 MP) whatever the
    caller allows; --max-pixels replaces that limit in both directions."""
    from PIL import Image
    Image.new("RGB", (100, 50), (1, 2, 3)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)          # Pillow's bomb: > 2000
    assert images.load_image(tmp_path / "big.png", max_pixels=10_000).size == (100, 50)
    assert images.load_image(tmp_path / "big.png", max_pixels=None).size == (100, 50)
    with pytest.raises(images.ImageTooLargeError, match="5,000 pixels, over the limit of 4,999"):
        images.load_image(tmp_path / "big.png", max_pixels=4999)
    assert Image.MAX_IMAGE_PIXELS == 1000                         # Pillow's own is kept


def test_the_first_frame_of_an_animated_image_is_used_and_noted(predict, saved, tmp_path,
                                                               capsys):
    from PIL import Image
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    frames[0].save(tmp_path / "red.png")
    path, _ = saved
    animated, still = predict.main([str(tmp_path / "anim.gif"), str(tmp_path / "red.png"),
                                    "--checkpoint", str(path), "--top", "10"])
    assert [p.index for p in animated] == [p.index for p in still]
    np.testing.assert_allclose([p.probability for p in animated],
                               [p.probability for p in still], rtol=1e-6)
    err = capsys.readouterr().err
    assert f"note: {tmp_path / 'anim.gif'}: 2 frames (animated or multi-page); the first is " \
           f"used" in err
    assert "red.png" not in err


# --- class names ------------------------------------------------------------------------

def test_a_labels_file_names_the_classes(predict, saved, tmp_path):
    path, _ = saved
    image = str(write_images(tmp_path)["rgb.png"])
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"label {i}\n" for i in range(10)))
    result = predict.main([image, "--checkpoint", str(path), "--labels", str(labels)])[0]
    assert [r.name for r in result] == [f"label {r.index}" for r in result]
    labels.write_text("".join(f"label {i}\n" for i in range(9)))
    with pytest.raises(SystemExit, match=r"labels file .*labels\.txt has 9 lines but the model "
                                         r"has 10 classes"):
        predict.main([image, "--checkpoint", str(path), "--labels", str(labels)])
    with pytest.raises(SystemExit, match=r"cannot read the labels file .*absent\.txt"):
        predict.main([image, "--checkpoint", str(path), "--labels", str(tmp_path / "absent.txt")])
    labels.write_text("".join(f"label {i}\n" if i != 4 else "\n" for i in range(10)) + "\n")
    with pytest.raises(SystemExit, match=r"labels\.txt: line 5 is blank"):
        predict.main([image, "--checkpoint", str(path), "--labels", str(labels)])


def test_without_names_classes_are_numbered(predict, tmp_path):
    path = checkpoint.save_checkpoint(tmp_path / "c.npz", tiny_model(),
                                      normalization={"mean": MEAN, "std": STD})
    result = predict.main([str(write_images(tmp_path)["rgb.png"]), "--checkpoint", str(path)])[0]
    assert [r.name for r in result] == [f"class {r.index}" for r in result]


# --- official checkpoints ---------------------------------------------------------------

def official_input(path):
    return (expected_pixels(path).astype(np.float64) / 127.5 - 1).transpose(2, 0, 1) \
        .astype(np.float32)


def test_official_checkpoints_are_normalised_as_pixel_over_127_5_minus_1(
        predict, tmp_path, monkeypatch):
    # A stand-in for minivit.official with its API (is_official, load_official), so this
    # checks predict.py's side whether or not the real module is present.
    model = tiny_model(seed=5)
    ckpt = tmp_path / "official.npz"
    ckpt.write_bytes(b"stand-in")
    calls = []

    def load_official(path, num_classes=None, image_size=None, seed=0):
        calls.append(pathlib.Path(path))
        return model
    fake = types.SimpleNamespace(is_official=lambda p: pathlib.Path(p).name == "official.npz",
                                 load_official=load_official)
    monkeypatch.setitem(sys.modules, "minivit.official", fake)
    files = write_images(tmp_path)
    results = predict.main([str(files["rgb.png"]), str(files["wide.png"]),
                            "--checkpoint", str(ckpt), "--top", "10"])
    assert calls == [ckpt]
    want = reference_probabilities(model, [official_input(files[n])
                                           for n in ("rgb.png", "wide.png")])
    for result, w in zip(results, want):
        np.testing.assert_allclose(as_vector(result), w, atol=2e-6)
        assert [r.name for r in result] == [f"class {r.index}" for r in result]


def test_a_real_official_checkpoint(predict, tmp_path, device):
    official = pytest.importorskip("minivit.official")
    if not hasattr(official, "save_official"):
        pytest.skip("minivit.official has no save_official to write a test checkpoint")
    path = tmp_path / "ViT-tiny.npz"
    official.save_official(tiny_model(seed=6, gelu="tanh"), path)
    assert official.is_official(path)
    model = official.load_official(path)
    files = write_images(tmp_path)
    results = predict.main([str(files["photo.jpg"]), str(files["tall.png"]),
                            "--checkpoint", str(path), "--top", "10",
                            "--backend", {"cpu": "numpy", "cuda": "cupy"}[device]])
    want = reference_probabilities(model, [official_input(files[n])
                                           for n in ("photo.jpg", "tall.png")])
    for result, w in zip(results, want):
        np.testing.assert_allclose(as_vector(result), w, atol=2e-6)
