"""examples/train_cifar.py end to end, on a tiny CIFAR-10 written by the test.

The promise of --resume: a run killed after epoch k and resumed ends in exactly the
state of a run never interrupted.  That holds because everything a run depends on is
either saved in the checkpoint (weights, optimiser moments, step count -- hence the
learning-rate schedule position -- settings, history) or drawn afresh each epoch from
(seed, epoch): the data order, the augmentation, the dropout masks and the tokens patch
dropout keeps.  The test compares the two final checkpoints array by array, with
dropout, patch dropout and augmentation on.
"""
import json
import math
import sys

import numpy as np
import pytest

import minivit as mv
from minivit import checkpoint
from conftest import backend_flag

pytestmark = pytest.mark.usefixtures("keep_default_backend")



def args(cifar_dir, out, *extra):
    return ["--data-dir", str(cifar_dir), "--no-download", "--no-progress", "--out", str(out),
            "--model", "cifar-tiny", "--hidden-size", "16", "--depth", "1", "--num-heads", "2",
            "--mlp-dim", "16", "--batch-size", "16", "--epochs", "2", "--dropout", "0.1",
            "--attention-dropout", "0.1", "--augment", "standard", "--warmup-epochs", "1",
            "--eval-every", "1", *extra]


def test_a_run_writes_log_curves_and_checkpoint(train_cifar, cifar_dir, tmp_path, capsys, device):
    final = train_cifar.main(args(cifar_dir, tmp_path / "run", *backend_flag(device)))
    out = capsys.readouterr().out
    assert f"backend {backend_flag(device)[1]}" in out
    assert (f"final test accuracy: {100 * final['test_acc']:.2f}% "
            f"({100 * final['test_acc_flip']:.2f}% with test-time flip averaging)") in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert "test_acc_flip" in rows[1] and "test_acc_flip" not in rows[0]   # the last epoch
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "images_per_s", "elapsed_s"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert rows[0]["train_images"] == 40
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = checkpoint.load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    assert saved["epoch"] == 2 and saved["settings"]["hidden_size"] == 16
    assert saved["class_names"][0] == "airplane" and len(saved["normalization"]["mean"]) == 3


def test_resume_reaches_the_state_of_an_uninterrupted_run(train_cifar, cifar_dir, tmp_path,
                                                          monkeypatch, device):
    flag = backend_flag(device) + ["--patch-dropout", "0.25"]
    train_cifar.main(args(cifar_dir, tmp_path / "straight", *flag))

    real_write_log = train_cifar.write_log

    def killed_after_first_epoch(path, history):
        real_write_log(path, history)
        raise KeyboardInterrupt                        # the checkpoint of epoch 1 is on disk
    monkeypatch.setattr(train_cifar, "write_log", killed_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_cifar.main(args(cifar_dir, tmp_path / "resumed", *flag))
    monkeypatch.setattr(train_cifar, "write_log", real_write_log)
    assert checkpoint.load_checkpoint(tmp_path / "resumed" / "checkpoint.npz")["epoch"] == 1
    train_cifar.main(args(cifar_dir, tmp_path / "resumed", "--resume", *flag))

    a = checkpoint.load_checkpoint(tmp_path / "straight" / "checkpoint.npz")
    b = checkpoint.load_checkpoint(tmp_path / "resumed" / "checkpoint.npz")
    assert a["epoch"] == b["epoch"] == 2
    for name in a["model"]:
        np.testing.assert_array_equal(a["model"][name], b["model"][name], err_msg=name)
    assert a["optimizer"]["steps"] == b["optimizer"]["steps"] == 6
    for slot in ("m", "v"):
        for x, y in zip(a["optimizer"][slot], b["optimizer"][slot]):
            np.testing.assert_array_equal(x, y)
    for ra, rb in zip(a["history"], b["history"]):
        assert ra["train_loss"] == rb["train_loss"] and ra["test_acc"] == rb["test_acc"]
    log = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2]


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(train_cifar, cifar_dir,
                                                                    tmp_path, monkeypatch,
                                                                    device):
    calls = {"n": 0}
    real = mv.cross_entropy

    def nan_in_the_second_epoch(logits, labels, **kwargs):
        calls["n"] += 1
        loss = real(logits, labels, **kwargs)
        return loss * float("nan") if calls["n"] == 6 else loss   # steps 1-3, test, step 5, 6
    monkeypatch.setattr(mv, "cross_entropy", nan_in_the_second_epoch)
    with pytest.raises(SystemExit, match=r"the training loss became nan at step 5; stopping\. "
                                         r"the last good checkpoint \(after epoch 1\) is kept"):
        train_cifar.main(args(cifar_dir, tmp_path / "run", *backend_flag(device)))
    assert checkpoint.load_checkpoint(tmp_path / "run" / "checkpoint.npz")["epoch"] == 1


def test_refuses_to_overwrite_a_run_and_to_resume_nothing(train_cifar, cifar_dir, tmp_path):
    with pytest.raises(SystemExit, match="--resume: no checkpoint at"):
        train_cifar.main(args(cifar_dir, tmp_path / "run", "--resume"))
    train_cifar.main(args(cifar_dir, tmp_path / "run", "--epochs", "1"))
    before = (tmp_path / "run" / "checkpoint.npz").read_bytes()
    with pytest.raises(SystemExit, match="already exists; pass --resume"):
        train_cifar.main(args(cifar_dir, tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoint.npz").read_bytes() == before


def test_missing_data_says_what_to_do(train_cifar, tmp_path):
    with pytest.raises(SystemExit, match="--data-dir"):
        train_cifar.main(["--data-dir", str(tmp_path / "nowhere"), "--no-download",
                          "--out", str(tmp_path / "run")])


def test_cupy_backend_without_cupy_is_a_clear_error(train_cifar, cifar_dir, tmp_path,
                                                    monkeypatch):
    monkeypatch.delenv("MINIVIT_FAKE_CUPY", raising=False)
    monkeypatch.setitem(sys.modules, "cupy", None)          # `import cupy` fails
    with pytest.raises(SystemExit, match=r"CuPy, which is not installed.*\.\[cuda12\]"):
        train_cifar.main(args(cifar_dir, tmp_path / "run", "--backend", "cupy"))


def test_help_explains_every_flag(train_cifar, capsys):
    with pytest.raises(SystemExit) as info:
        train_cifar.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--backend", "--seed", "--epochs", "--batch-size", "--lr", "--out",
                 "--data-dir", "--preset", "--resume", "--model"):
        assert flag in text


def test_fine_tuning_an_official_checkpoint(train_cifar, cifar_dir, tmp_path, device):
    """--pretrained: the official weights, a new zero 10-class head, the position
    embeddings resized to the new resolution, and the official pixel / 127.5 - 1."""
    from minivit.nn import VisionTransformer
    from minivit.official import save_official
    pretrained = VisionTransformer(image_size=8, patch_size=4, num_classes=7, hidden_size=8,
                                   depth=1, num_heads=2, mlp_dim=16, gelu="tanh", seed=3)
    save_official(pretrained, tmp_path / "ViT-tiny.npz")
    train_cifar.main(["--preset", "finetune", "--pretrained", str(tmp_path / "ViT-tiny.npz"),
                      "--image-size", "16", "--epochs", "1", "--batch-size", "16",
                      "--data-dir", str(cifar_dir), "--no-download", "--no-progress",
                      "--out", str(tmp_path / "ft"), *backend_flag(device)])
    saved = checkpoint.load_checkpoint(tmp_path / "ft" / "checkpoint.npz")
    c = saved["config"]
    assert (c["image_size"], c["num_classes"], c["gelu"]) == (16, 10, "tanh")
    assert saved["model"]["pos_embed"].shape == (1, 17, 8)          # 4x4 patches + [CLS]
    assert saved["model"]["head.weight"].shape == (8, 10)
    assert saved["settings"]["optimizer"] == "sgd" and saved["settings"]["lr"] == 0.03
    assert saved["normalization"] == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    # the encoder starts from the official weights (one SGD step moved them only a little)
    before = pretrained.state_dict()["blocks.0.mlp.fc1.weight"]
    after = saved["model"]["blocks.0.mlp.fc1.weight"]
    assert np.abs(after - before).max() < 0.1 * np.abs(before).max()


def test_finetune_preset_needs_a_checkpoint(train_cifar, cifar_dir, tmp_path):
    with pytest.raises(SystemExit, match="--pretrained PATH"):
        train_cifar.main(["--preset", "finetune", "--data-dir", str(cifar_dir),
                          "--out", str(tmp_path / "ft")])


def test_steps_instead_of_epochs(train_cifar, cifar_dir, tmp_path):
    """--steps 4 with 3 steps per epoch: a full epoch, then one step of the second."""
    train_cifar.main(args(cifar_dir, tmp_path / "run", "--steps", "4", "--warmup-steps", "2"))
    saved = checkpoint.load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    assert saved["optimizer"]["steps"] == 4 and saved["epoch"] == 2
    assert [row["train_images"] for row in saved["history"]] == [40, 16]


def test_accumulating_micro_batches_matches_whole_batches(train_cifar, cifar_dir, tmp_path):
    """--accumulate 4 runs each batch of 16 as 4 passes of 4 whose gradients add up: the
    same update as one pass, up to float32 rounding (no dropout, which draws per pass).
    SGD, because Adam divides by sqrt(v): the key bias's gradient is exactly zero in
    exact arithmetic (softmax ignores a shift of every score in a row), so in float32 it
    is rounding noise that Adam would blow up to full-size steps."""
    plain = ["--dropout", "0", "--attention-dropout", "0", "--epochs", "1", "--optimizer", "sgd"]
    train_cifar.main(args(cifar_dir, tmp_path / "whole", *plain))
    train_cifar.main(args(cifar_dir, tmp_path / "parts", *plain, "--accumulate", "4"))
    a = checkpoint.load_checkpoint(tmp_path / "whole" / "checkpoint.npz")
    b = checkpoint.load_checkpoint(tmp_path / "parts" / "checkpoint.npz")
    for name in a["model"]:
        np.testing.assert_allclose(a["model"][name], b["model"][name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    assert a["history"][0]["train_loss"] == pytest.approx(b["history"][0]["train_loss"], rel=1e-5)


def test_pretrained_takes_dropout_and_refuses_shape_flags(train_cifar, cifar_dir, tmp_path):
    from minivit.nn import VisionTransformer
    from minivit.official import save_official
    save_official(VisionTransformer(image_size=8, patch_size=4, num_classes=7, hidden_size=8,
                                    depth=1, num_heads=2, mlp_dim=16), tmp_path / "tiny.npz")
    common = ["--pretrained", str(tmp_path / "tiny.npz"), "--image-size", "8", "--epochs", "1",
              "--data-dir", str(cifar_dir), "--no-progress"]
    train_cifar.main(common + ["--dropout", "0.3", "--attention-dropout", "0.2",
                               "--patch-dropout", "0.5", "--out", str(tmp_path / "ft")])
    c = checkpoint.load_checkpoint(tmp_path / "ft" / "checkpoint.npz")["config"]
    assert (c["dropout"], c["attention_dropout"], c["patch_dropout"], c["gelu"]) == \
        (0.3, 0.2, 0.5, "tanh")
    with pytest.raises(SystemExit, match="--hidden-size, --depth cannot change the shape"):
        train_cifar.main(common + ["--hidden-size", "16", "--depth", "2",
                                   "--out", str(tmp_path / "ft2")])


@pytest.mark.parametrize("flag,value,expected", [
    ("--epochs", "0", "a positive integer"), ("--batch-size", "-1", "a positive integer"),
    ("--lr", "-0.1", "a positive number"), ("--lr", "abc", "a positive number"),
    ("--lr", "nan", "a positive number"), ("--lr", "inf", "a positive number"),
    ("--dropout", "1.0", "a number >= 0 and < 1"), ("--dropout", "nan", "a number >= 0 and < 1"),
    ("--momentum", "nan", "a number >= 0 and < 1"),
    ("--label-smoothing", "nan", "a number >= 0 and < 1"),
    ("--attention-dropout", "nan", "a number >= 0 and < 1"),
    ("--patch-dropout", "1", "a number >= 0 and < 1"),
    ("--clip-norm", "nan", "a number >= 0"), ("--warmup-epochs", "inf", "a number >= 0"),
    ("--weight-decay", "1e400", "a number >= 0"), ("--seed", "-1", "an integer from 0 to"),
    ("--seed", "1.5", "an integer from 0 to"), ("--threads", "0", "a positive integer")])
def test_bad_numbers_are_refused_by_the_parser(train_cifar, flag, value, expected, capsys):
    """Each in argparse's one-line usage error, before anything runs: NaN, infinities, text
    and numbers out of range, naming the kind of number the flag takes."""
    with pytest.raises(SystemExit) as info:
        train_cifar.main([flag, value])
    assert info.value.code == 2
    assert f"argument {flag}: expected {expected}" in capsys.readouterr().err


def test_a_data_dir_without_data_is_not_a_download_target(train_cifar, tmp_path):
    with pytest.raises(SystemExit, match="--data-dir must hold the data"):
        train_cifar.main(["--data-dir", str(tmp_path / "typo"), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "typo").exists()


# What one cifar-small step at batch 128 (data, forward, loss, backward, clipping, AdamW)
# may cost on a GPU, counted on the CuPy stand-in.
STEP_BUDGET = {"reads": 1, "copies": 0, "launches": 400, "bytes": 6e9}


def step_costs(train_cifar, data_dir, out, monkeypatch, standin):
    """The stand-in's counters of each train_cifar.py step (cifar-small, batch 128) after
    the first, as differences between consecutive optimiser steps: set-up, the kernels'
    self-checks and evaluation fall outside them."""
    from minivit.optim import AdamW
    snapshots = []
    real_step = AdamW.step

    def counted_step(self):
        real_step(self)
        snapshots.append(dict(standin.counts()))
    monkeypatch.setattr(AdamW, "step", counted_step)
    train_cifar.main(["--data-dir", str(data_dir), "--no-download", "--no-progress",
                      "--out", str(out), "--model", "cifar-small", "--epochs", "1",
                      "--batch-size", "128", "--backend", "cupy"])
    return [{k: b[k] - a[k] for k in a} for a, b in zip(snapshots, snapshots[1:])]


def test_a_gpu_training_step_stays_within_its_host_budget(train_cifar, tmp_path, monkeypatch,
                                                          standin, fast_paths):
    """What costs time on a GPU is the host and memory traffic: each read of a device
    value waits for the whole queue, each copy crosses PCIe, each array operation is a
    kernel launch of 4-10 us that reads and writes whole arrays.  One cifar-small step of
    train_cifar.py at batch 128 makes at most 1 read, no copy, at most 400 launches
    (hidden copies included) and at most 6 GB of traffic."""
    from test_data import write_cifar
    monkeypatch.delenv("MINIVIT_KERNELS", raising=False)  # the GPU's step: kernels on
    write_cifar(tmp_path / "data", n=80)                  # 400 images: batches 128, 128, 128, 16
    steps = step_costs(train_cifar, tmp_path / "data", tmp_path / "run", monkeypatch, standin)
    assert len(steps) == 3
    for step in steps[:2]:                                # the two full batches after the first
        assert step["reads"] <= STEP_BUDGET["reads"], steps
        assert step["copies"] <= STEP_BUDGET["copies"], steps
        assert step["launches"] <= STEP_BUDGET["launches"], steps
        assert step["bytes"] <= STEP_BUDGET["bytes"], steps


def test_the_hybrid_recipe_trains_and_resumes(train_cifar, cifar_dir, tmp_path, device):
    """--preset cpu-hybrid: the convolutional root block in front of cifar-tiny's encoder."""
    common = ["--preset", "cpu-hybrid", "--data-dir", str(cifar_dir), "--no-download",
              "--no-progress", "--out", str(tmp_path / "run"), "--batch-size", "16",
              *backend_flag(device)]
    train_cifar.main(common + ["--epochs", "1"])
    final = train_cifar.main(common + ["--resume", "--epochs", "2"])
    saved = checkpoint.load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    assert final["epoch"] == 2 and saved["settings"]["model"] == "cifar-hybrid"
    assert list(saved["config"]["resnet_layers"]) == [] and saved["config"]["patch_size"] == 1
    assert any(name.startswith("resnet.") for name in saved["model"])


def test_eval_every_evaluates_every_nth_epoch_and_the_last(train_cifar, cifar_dir, tmp_path,
                                                           capsys, monkeypatch):
    """--eval-every 2 over 3 epochs: the test set after epochs 2 and 3 (the last) only;
    epoch 1 logs its training numbers alone.  It may change on --resume: it changes what
    is reported, not what is trained."""
    evaluated = []
    real_evaluate = train_cifar.evaluate

    def evaluate(*a, **kw):
        evaluated.append(len(evaluated))
        return real_evaluate(*a, **kw)
    monkeypatch.setattr(train_cifar, "evaluate", evaluate)
    train_cifar.main(args(cifar_dir, tmp_path / "run", "--epochs", "3", "--eval-every", "2"))
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(evaluated) == 2
    assert ["test_acc" in row for row in rows] == [False, True, True]
    assert "test_acc_flip" in rows[2] and math.isfinite(rows[0]["train_loss"])
    assert "epoch   1/3" in out and "test loss" not in out.split("epoch   1/3")[1].split("\n")[0]
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train_cifar.main(args(cifar_dir, tmp_path / "run", "--epochs", "4", "--eval-every", "1",
                          "--resume"))
    assert len(evaluated) == 3


def test_val_split_holds_out_the_last_training_images_and_never_reads_the_test_set(
        train_cifar, cifar_dir, tmp_path, capsys, monkeypatch):
    """--val-split N: train on the first 50,000 - N training images, evaluate on the last N
    (choosing a recipe without looking at the test set).  The validation accuracy logged
    is the saved model's accuracy on exactly those N images."""
    from minivit.data import load_cifar10
    cifar = load_cifar10(cifar_dir)
    seen = []
    real_evaluate = train_cifar.evaluate

    def evaluate(model, images, labels, *rest, **kw):
        seen.append(images)
        return real_evaluate(model, images, labels, *rest, **kw)
    monkeypatch.setattr(train_cifar, "evaluate", evaluate)
    final = train_cifar.main(args(cifar_dir, tmp_path / "run", "--val-split", "8"))
    out = capsys.readouterr().out
    assert "training on 32 images, validating on the last 8 training images" in out
    assert f"final validation accuracy: {100 * final['val_acc']:.2f}%" in out
    assert all(np.array_equal(images, cifar.train_images[-8:]) for images in seen) and seen
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert rows[0]["train_images"] == 32 and "test_acc" not in rows[0]

    from minivit.nn import VisionTransformer
    model = VisionTransformer.from_pretrained(tmp_path / "run" / "checkpoint.npz")
    saved = checkpoint.load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    mean, std = saved["normalization"]["mean"], saved["normalization"]["std"]
    again = real_evaluate(model, cifar.train_images[-8:], cifar.train_labels[-8:], 8, mean, std,
                          "cpu", split="val")
    assert again["val_acc"] == final["val_acc"]

    with pytest.raises(SystemExit, match="--val-split 40 leaves no training image"):
        train_cifar.main(args(cifar_dir, tmp_path / "all", "--val-split", "40"))


def test_flip_averaging_classifies_by_the_mean_logits_of_an_image_and_its_mirror(train_cifar,
                                                                                 rng):
    """The last epoch's evaluation also reports test-time flip averaging: each image and
    its left-right mirror image go through the model, and the mean of the two logits
    decides the class."""
    from minivit import data
    from minivit.nn import VisionTransformer, preset
    model = VisionTransformer(preset("cifar-tiny", num_classes=10, hidden_size=16, depth=1,
                                     num_heads=2, mlp_dim=16), seed=0)
    for p in model.parameters():                  # a head that is not zero: logits differ
        p.data = rng.standard_normal(p.shape).astype(p.dtype)
    images = rng.integers(0, 256, (24, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, 24)
    mean, std = data.CIFAR10_MEAN, data.CIFAR10_STD
    result = train_cifar.evaluate(model, images, labels, 10, mean, std, "cpu", flip=True)
    x = data.normalize(images, mean, std)
    model.eval()
    with mv.no_grad():
        plain = model(mv.Tensor(x)).data
        both = plain + model(mv.Tensor(np.ascontiguousarray(x[..., ::-1]))).data
    assert result["test_acc"] == np.mean(plain.argmax(axis=1) == labels)
    assert result["test_acc_flip"] == np.mean(both.argmax(axis=1) == labels)
    assert "test_acc_flip" not in train_cifar.evaluate(model, images, labels, 10, mean, std,
                                                       "cpu")


def test_a_run_ends_with_the_figures_of_what_the_model_learned(train_cifar, cifar_dir, tmp_path):
    train_cifar.main(args(cifar_dir, tmp_path / "run", "--epochs", "1"))
    figures = sorted(p.name for p in (tmp_path / "run" / "figures").glob("*.png"))
    assert figures == ["attention_distance.png", "embedding_filters.png", "position_embeddings.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in (tmp_path / "run" / "figures").iterdir())


def test_a_gpu_run_needs_no_cusolver(train_cifar, cifar_dir, tmp_path, monkeypatch, standin):
    """A driver-only GPU machine with NVRTC and cuBLAS but no cuSOLVER: every cupy.linalg
    call fails, and a run still trains, tests and draws its figures (the SVD of the
    embedding filters runs on the host)."""
    monkeypatch.setenv("MINIVIT_FAKE_CUPY_MISSING", "cusolver")
    cupy = mv.backend.module_for("cuda")
    with pytest.raises(RuntimeError, match="libcusolver"):
        cupy.linalg.svd(cupy.ones((3, 2), dtype="float32"))
    final = train_cifar.main(args(cifar_dir, tmp_path / "run", "--epochs", "1",
                                  "--backend", "cupy"))
    assert final["epoch"] == 1
    figures = sorted(p.name for p in (tmp_path / "run" / "figures").glob("*.png"))
    assert figures == ["attention_distance.png", "embedding_filters.png", "position_embeddings.png"]
