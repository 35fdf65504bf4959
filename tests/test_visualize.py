"""examples/visualize.py and examples/inductive_bias.py end to end, on tiny inputs.

visualize.py draws what minivit.inspection computes (tests/test_inspection.py checks the
numbers); here: that every figure the paper's Fig. 6-7 asks for is written for minivit's
own checkpoints and for official ones, that a figure which does not apply to a model is
left out with a note instead of failing (no position embeddings: no similarity map; a
hybrid: no pixel filters), and that bad input ends with one line on stderr and a
non-zero exit, never a traceback.

inductive_bias.py trains every model on every training-set size with the same budget,
--steps optimiser steps of --batch-size images, so a run on n images (a multiple of
the batch size) covers steps * batch_size / n epochs; the test checks that arithmetic,
the nesting of the subsets (fixed by the seed) and the three files it writes.
"""
import dataclasses
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import minivit as mv
from minivit import backend, checkpoint
from minivit.nn import VisionTransformer, ViTConfig
from conftest import backend_flag, load_example
from test_data import write_cifar

pytestmark = pytest.mark.usefixtures("keep_default_backend")

PNG = b"\x89PNG\r\n\x1a\n"
TINY = dict(image_size=16, patch_size=4, num_classes=10, hidden_size=16, depth=2, num_heads=2,
            mlp_dim=16)


@pytest.fixture(scope="module")
def visualize():
    return load_example("visualize")


@pytest.fixture(scope="module")
def inductive_bias():
    return load_example("inductive_bias")


def write_images(folder, names=("cat.png", "ship.jpg")):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for name in names:
        pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
        paths.append(str(folder / name))
    return paths


def minivit_checkpoint(path, **fields):
    model = VisionTransformer(seed=0, **{**TINY, **fields})
    checkpoint.save_checkpoint(path, model, normalization={"mean": [0.5] * 3, "std": [0.25] * 3})
    return path


def is_png(path):
    return pathlib.Path(path).read_bytes()[:8] == PNG


# --- visualize.py ---------------------------------------------------------------------------

def test_visualize_draws_every_figure_of_a_minivit_checkpoint(visualize, tmp_path, device,
                                                             capsys):
    ckpt = minivit_checkpoint(tmp_path / "ckpt.npz")
    images = write_images(tmp_path / "images")
    written = visualize.main(["--checkpoint", str(ckpt), *images, "--out", str(tmp_path / "figs"),
                              *backend_flag(device)])
    names = sorted(p.name for p in written)
    assert names == ["attention_distance.png", "embedding_filters.png",
                     "position_embeddings.png", "rollout_00_cat.png", "rollout_01_ship.png"]
    assert all(is_png(p) for p in written)
    assert "mean attention distance (pixels)" in capsys.readouterr().out


def test_visualize_reads_official_checkpoints(visualize, tmp_path):
    from minivit.official import save_official
    save_official(VisionTransformer(seed=0, **TINY), tmp_path / "ViT-tiny.npz")
    images = write_images(tmp_path / "images", names=("a.png",))
    written = visualize.main(["--checkpoint", str(tmp_path / "ViT-tiny.npz"), *images,
                              "--out", str(tmp_path / "figs")])
    assert len(written) == 4 and all(is_png(p) for p in written)


def test_without_images_only_the_weights_are_drawn(visualize, tmp_path):
    ckpt = minivit_checkpoint(tmp_path / "ckpt.npz")
    written = visualize.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "figs")])
    assert sorted(p.name for p in written) == ["embedding_filters.png", "position_embeddings.png"]


def test_write_model_figures_skips_what_does_not_apply(visualize, tmp_path, device, capsys):
    model = VisionTransformer(seed=0, **TINY, classifier="gap", pos_embed="none").to(device)
    x = backend.asarray(np.random.default_rng(0).standard_normal((3, 3, 16, 16)),
                        dtype="float32", device=device)                # device images work
    written = visualize.write_model_figures(model, tmp_path / "figs", x)
    assert sorted(p.name for p in written) == ["attention_distance.png", "embedding_filters.png"]
    assert "no position_embeddings.png" in capsys.readouterr().out


@pytest.mark.skipif("resnet_layers" not in {f.name for f in dataclasses.fields(ViTConfig)},
                    reason="the hybrid ViT is not in this tree")
def test_a_hybrid_gets_no_filter_figure(visualize, tmp_path, capsys):
    model = VisionTransformer(seed=0, image_size=32, patch_size=1, num_classes=10, hidden_size=16,
                              depth=1, num_heads=2, mlp_dim=16, resnet_layers=(),
                              width_factor=0.5)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype("float32")
    written = visualize.write_model_figures(model, tmp_path / "figs", x)
    assert sorted(p.name for p in written) == ["attention_distance.png", "position_embeddings.png"]
    assert "not meaningful for a hybrid" in capsys.readouterr().out


def test_a_figure_that_cannot_be_drawn_is_named_with_the_reason(visualize, tmp_path,
                                                               monkeypatch, capsys):
    ckpt = minivit_checkpoint(tmp_path / "ckpt.npz")

    def broken(similarity):
        raise RuntimeError("the colour map is missing")
    monkeypatch.setattr(visualize, "position_figure", broken)
    (tmp_path / "figs" / "embedding_filters.png").mkdir(parents=True)    # cannot be written
    with pytest.raises(SystemExit, match=r"^error: 2 figures could not be drawn: "
                                         r"embedding_filters\.png, position_embeddings\.png$"):
        visualize.main(["--checkpoint", str(ckpt), *write_images(tmp_path / "images"),
                        "--out", str(tmp_path / "figs")])
    err = capsys.readouterr().err
    assert (f"error: could not draw {tmp_path / 'figs' / 'position_embeddings.png'}: "
            f"RuntimeError: the colour map is missing") in err
    assert f"error: could not draw {tmp_path / 'figs' / 'embedding_filters.png'}: " in err
    assert is_png(tmp_path / "figs" / "attention_distance.png")          # the others are drawn
    assert is_png(tmp_path / "figs" / "rollout_00_cat.png")


def test_the_default_output_folder_is_ignored_by_git(visualize):
    default = pathlib.PurePosixPath(visualize.parse_args(["--checkpoint", "c.npz"]).out)
    ignored = (pathlib.Path(__file__).resolve().parents[1] / ".gitignore").read_text().split()
    assert f"/{default.parts[0]}/" in ignored, default


def test_bad_input_is_one_line_and_a_failure(visualize, tmp_path):
    ckpt = minivit_checkpoint(tmp_path / "ckpt.npz")
    (tmp_path / "broken.png").write_text("not an image")
    (tmp_path / "junk.npz").write_bytes(b"PK not really a zip")
    cases = [(["--checkpoint", str(tmp_path / "missing.npz")], "no checkpoint file"),
             (["--checkpoint", str(tmp_path / "junk.npz")], "cannot load the checkpoint"),
             (["--checkpoint", str(ckpt), str(tmp_path / "broken.png")], "cannot read image"),
             (["--checkpoint", str(ckpt), str(tmp_path / "nowhere.png")], "cannot read image")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as stop:
            visualize.main(argv + ["--out", str(tmp_path / "figs")])
        assert isinstance(stop.value.code, str) and stop.value.code.startswith("error: ")
        assert message in stop.value.code and "\n" not in stop.value.code
    assert not (tmp_path / "figs").exists()


def test_bad_input_from_the_command_line_prints_no_traceback(tmp_path):
    script = pathlib.Path(__file__).resolve().parents[1] / "examples" / "visualize.py"
    run = subprocess.run([sys.executable, str(script), "--checkpoint", str(tmp_path / "no.npz")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    expected = f"error: no checkpoint file at {tmp_path / 'no.npz'}"
    assert run.stderr.strip().splitlines() == [expected]


# --- inductive_bias.py ------------------------------------------------------------------------

def test_inductive_bias_trains_every_model_on_every_size(inductive_bias, tmp_path, device, capsys):
    write_cifar(tmp_path / "data", n=8)                   # 40 training images, 8 test images
    out = tmp_path / "run"
    runs = inductive_bias.main(["--data-dir", str(tmp_path / "data"), "--no-download",
                                "--sizes", "16", "8", "--steps", "3", "--batch-size", "8",
                                "--test-subset", "6", "--out", str(out), "--no-progress",
                                *backend_flag(device)])
    assert [(r["model"], r["train_images"]) for r in runs] == [
        ("vit", 8), ("cnn", 8), ("vit", 16), ("cnn", 16)]
    for r in runs:
        assert r["steps"] == 3 and r["epochs"] == 3 * 8 / r["train_images"]   # 3 steps of 8
        assert 0 <= r["test_accuracy"] <= 1 and (6 * r["test_accuracy"]).is_integer()
    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"] == runs and saved["settings"]["steps"] == 3
    table = (out / "results.md").read_text()
    assert "| training images | epochs | vit | cnn |" in table and "| 8 | 3.0 |" in table
    assert is_png(out / "accuracy_vs_data.png")
    lines = capsys.readouterr().out.splitlines()
    assert sum("test accuracy" in line for line in lines) == 4


def test_inductive_bias_subsets_are_nested(inductive_bias, tmp_path, monkeypatch):
    write_cifar(tmp_path / "data", n=8)
    seen = []
    monkeypatch.setattr(inductive_bias, "train", lambda model, x, y, *rest: seen.append(x) or 1.0)
    inductive_bias.main(["--data-dir", str(tmp_path / "data"), "--no-download", "--models", "cnn",
                         "--sizes", "8", "24", "--steps", "1", "--out", str(tmp_path / "run"),
                         "--no-progress"])
    small, large = seen
    np.testing.assert_array_equal(large[:8], small)         # the first 8 of one shuffle


def test_inductive_bias_refuses_more_images_than_there_are(inductive_bias, tmp_path):
    write_cifar(tmp_path / "data", n=8)
    with pytest.raises(SystemExit, match="error: --sizes asks for 41 training images"):
        inductive_bias.main(["--data-dir", str(tmp_path / "data"), "--no-download",
                             "--sizes", "41", "--out", str(tmp_path / "run")])


@pytest.mark.parametrize("name", ["vit", "cnn", "resnet", "hybrid"])
def test_every_model_builds_and_classifies(inductive_bias, name):
    try:
        model = inductive_bias.MODELS[name](0)
    except (ImportError, ValueError) as e:                   # the hybrid not in this tree
        pytest.skip(f"{name}: {e}")
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype("float32")
    assert model(mv.tensor(x)).shape == (2, 10)
