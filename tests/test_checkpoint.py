"""minivit's own checkpoints: one .npz, no pickles, written atomically.

What must hold: a model and optimiser saved and loaded give the same predictions and
the same next update; a save that fails midway leaves the previous file intact; a file
that is not a checkpoint is refused with a message that says so.
"""
import numpy as np
import pytest

import minivit as mv
from minivit import checkpoint
from minivit.nn import VisionTransformer
from minivit.optim import AdamW

TINY = dict(image_size=8, patch_size=4, num_classes=3, hidden_size=8, depth=2, num_heads=2,
            mlp_dim=16)


def trained_a_little(device, seed=0):
    model = VisionTransformer(**TINY, seed=seed).to(device)
    opt = AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    x = mv.tensor(np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32),
                  device=device)
    labels = np.array([0, 1, 2, 0])
    for _ in range(2):
        model.zero_grad()
        mv.cross_entropy(model(x), labels).backward()
        opt.step()
    return model, opt, x, labels


def test_round_trip_gives_the_same_model_and_next_step(tmp_path, device):
    model, opt, x, labels = trained_a_little(device)
    path = checkpoint.save_checkpoint(tmp_path / "ckpt.npz", model, opt, epoch=3, note="hi")
    loaded = checkpoint.load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["note"] == "hi"
    assert loaded["config"]["hidden_size"] == 8
    other = checkpoint.model_from_checkpoint(loaded, seed=99).to(device)
    np.testing.assert_array_equal(other(x).numpy(), model(x).numpy())
    other_opt = AdamW(other.parameters(), lr=0.01, weight_decay=0.1)
    other_opt.load_state_dict(loaded["optimizer"])
    for m, o in ((model, opt), (other, other_opt)):
        m.zero_grad()
        mv.cross_entropy(m(x), labels).backward()
        o.step()
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


def test_an_interrupted_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "ckpt.npz"
    checkpoint.save_npz(path, {"a": np.arange(3)}, {"epoch": 1})
    before = path.read_bytes()

    def crash(f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_write(path, crash)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]       # no temporary left


def test_files_that_are_not_checkpoints_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        checkpoint.load_checkpoint(tmp_path / "missing.npz")
    np.savez(tmp_path / "plain.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="not a minivit checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "plain.npz")
    checkpoint.save_npz(tmp_path / "other.npz", {}, {"format": "something-else"})
    with pytest.raises(ValueError, match="unknown checkpoint format 'something-else'"):
        checkpoint.load_checkpoint(tmp_path / "other.npz")


def test_loading_never_unpickles(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "evil.npz", meta=np.array([{"x": 1}], dtype=object))
    with pytest.raises(checkpoint.CheckpointError, match=r"evil.npz holds Python objects "
                                                         r"\(pickled arrays\), refused"):
        checkpoint.load_npz(tmp_path / "evil.npz")


def test_written_files_get_the_usual_permissions(tmp_path):
    import os
    import stat
    umask = os.umask(0o022)
    try:
        path = checkpoint.save_npz(tmp_path / "ckpt.npz", {"a": np.zeros(2)}, {})
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644         # not mkstemp's 0600
