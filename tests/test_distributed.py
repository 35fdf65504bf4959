"""Data parallelism: N processes with shards of every batch compute the step of one.

With the loss the mean over a batch of B images, L = (1/B) sum_i l_i, and the batch cut
into shards of B_r images with shard means L_r,

    L = sum_r (B_r / B) L_r,    so    dL/dw = sum_r (B_r / B) dL_r/dw:

each rank seeds its backward with B_r / B and one allreduce sums the gradients (for
equal shards, the average of the shard gradients).  Every rank then holds the same
gradient and takes the same step, so the ranks stay identical.  In exact arithmetic N
processes equal one; in floating point the gradient's sums are split differently, so
float64 agrees to ~1e-15 per step and float32 to its own rounding.

The multi-process tests run `mpiexec -n 2` (pip install -e ".[mpi]": mpi4py and the
mpich wheel, which brings mpiexec into the virtual environment); they skip without it.
"""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import minivit as mv
from minivit import checkpoint, distributed
from minivit.nn import VisionTransformer
from test_data import write_cifar

ROOT = pathlib.Path(__file__).resolve().parents[1]
MPIEXEC = shutil.which("mpiexec", path=os.pathsep.join([str(pathlib.Path(sys.executable).parent),
                                                          os.environ.get("PATH", "")]))


def needs_mpi():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip('needs mpi4py and mpiexec: pip install -e ".[mpi]"')
    if MPIEXEC is None:
        pytest.skip("needs mpiexec (the mpich wheel brings one)")


def mpirun(n, *args, timeout=300, env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_"))} | (env or {})
    env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = "1"
    command = [MPIEXEC, "-n", str(n)] if n > 1 else []
    return subprocess.run(command + [sys.executable, *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, env=env)


# --- one process -------------------------------------------------------------------------

def test_a_single_process_is_a_world_of_one():
    world = distributed.world()
    assert (world.size, world.rank, world.is_main) == (1, 0, True)
    a = np.arange(3.0)
    assert world.sum_(a) is a and a.tolist() == [0.0, 1.0, 2.0]
    assert world.shard(10) == (0, 10)
    world.check_agree("anything", {"a": 1})


def test_shards_cover_the_batch_once():
    for n, size in ((16, 2), (17, 3), (2, 4)):
        parts = []
        for rank in range(size):
            world = distributed.World()
            world.size, world.rank = size, rank
            parts.append(world.shard(n))
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        assert max(e - s for s, e in parts) - min(e - s for s, e in parts) <= 1


def test_launched_without_mpi4py_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(distributed.DistributedError, match=r"mpi4py is not installed.*\.\[mpi\]"):
        distributed.world()


def test_weighted_shard_gradients_add_up_to_the_batch_gradient(device):
    """The identity above, with two simulated ranks of unequal shards (3 and 2 images)."""
    model = VisionTransformer(image_size=8, patch_size=4, num_classes=3, hidden_size=8,
                              depth=1, num_heads=2, mlp_dim=16, seed=1).astype("float64")
    model.to(device)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 8, 8))
    y = np.array([0, 2, 1, 1, 0])
    head = model.head.bias
    head.data = head.data + mv.backend.to_device(rng.standard_normal(3) * 0.1, device)

    def gradients(xs, ys, weight):
        model.zero_grad()
        loss = mv.cross_entropy(model(mv.tensor(xs, device=device)), ys)
        (loss * weight).backward()
        return [mv.backend.to_numpy(p.grad).copy() for p in model.parameters()]

    whole = gradients(x, y, 1.0)
    shards = [gradients(x[:3], y[:3], 3 / 5), gradients(x[3:], y[3:], 2 / 5)]
    for w, a, b in zip(whole, *shards):
        np.testing.assert_allclose(a + b, w, rtol=1e-12, atol=1e-15)


# --- several processes -------------------------------------------------------------------

FLOAT64_STEPS = '''
import sys
import numpy as np
import minivit as mv
from minivit import distributed
from minivit.nn import VisionTransformer
from minivit.optim import SGD

world = distributed.world()
model = VisionTransformer(image_size=8, patch_size=4, num_classes=3, hidden_size=8, depth=2,
                          num_heads=2, mlp_dim=16, seed=world.rank).astype("float64")
opt = SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01)
distributed.broadcast_parameters(world, opt)          # ranks began with different seeds
rng = np.random.default_rng(0)
for step in range(3):
    x, y = rng.standard_normal((6, 3, 8, 8)), rng.integers(0, 3, 6)
    first, last = world.shard(6)
    model.zero_grad()
    loss = mv.cross_entropy(model(mv.tensor(x[first:last])), y[first:last])
    (loss * ((last - first) / 6)).backward()
    distributed.sum_gradients(world, opt)
    opt.step()
if world.is_main:
    np.savez(sys.argv[1], **model.state_dict())
'''


def test_two_processes_take_the_step_of_one_in_float64(tmp_path):
    needs_mpi()
    script = tmp_path / "steps.py"
    script.write_text(FLOAT64_STEPS)
    for n in (1, 2):
        run = mpirun(n, script, tmp_path / f"n{n}.npz")
        assert run.returncode == 0, run.stderr[-3000:]
    one, two = np.load(tmp_path / "n1.npz"), np.load(tmp_path / "n2.npz")
    for name in one.files:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-12, atol=1e-14, err_msg=name)


GPU_OF_EACH_RANK = """
from minivit import backend, cli, distributed
world = distributed.world()
cli.use_backend("cupy", world.local_rank)            # as train_cifar.py and scaling.py do
print(f"rank {world.rank} local {world.local_rank} gpu {backend.module_for('cuda').cuda.Device().id}")
"""


def test_each_rank_takes_its_own_gpu(tmp_path):
    """Under mpiexec every rank would otherwise use GPU 0: rank r of a machine (from a
    shared-memory split of the communicator) takes GPU r % (the GPUs it sees).  Three
    ranks on the stand-in made to show two GPUs: GPUs 0, 1, 0."""
    needs_mpi()
    script = tmp_path / "gpus.py"
    script.write_text(GPU_OF_EACH_RANK)
    env = {"MINIVIT_FAKE_CUPY": "1", "MINIVIT_FAKE_CUPY_DEVICES": "2"}
    run = mpirun(3, script, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(re.findall(r"rank \d local \d gpu \d", run.stdout)) == [
        "rank 0 local 0 gpu 0", "rank 1 local 1 gpu 1", "rank 2 local 2 gpu 0"]


def train_args(data, out, *extra):
    return ["examples/train_cifar.py", "--data-dir", data, "--no-download", "--no-progress",
            "--out", out, "--hidden-size", "16", "--depth", "1", "--num-heads", "2",
            "--mlp-dim", "16", "--batch-size", "16", "--dropout", "0", "--patch-dropout", "0",
            "--optimizer", "sgd", "--eval-every", "1", *extra]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, n=8)                      # 40 training images: batches of 16, 16, 8
    return root


def test_train_cifar_on_two_processes_equals_one(cifar, tmp_path, device):
    """On CuPy the gradient buffer is staged through the host for the allreduce."""
    needs_mpi()
    backend_flag = ["--backend", {"cpu": "numpy", "cuda": "cupy"}[device]]
    for n in (1, 2):
        run = mpirun(n, *train_args(cifar, tmp_path / f"n{n}", "--epochs", "2", *backend_flag))
        assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes (MPI)" in run.stdout and run.stdout.count("epoch   1/2") == 1
    assert_same_run(tmp_path / "n1", tmp_path / "n2")


def assert_same_run(one, many):
    """The runs in folders `one` and `many` ended at the same model and history."""
    one = checkpoint.load_checkpoint(one / "checkpoint.npz")
    many = checkpoint.load_checkpoint(many / "checkpoint.npz")
    for name in one["model"]:                   # float32: equal up to summation order
        np.testing.assert_allclose(many["model"][name], one["model"][name], rtol=1e-4,
                                   atol=1e-6, err_msg=name)
    for a, b in zip(one["history"], many["history"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["test_acc"] == a["test_acc"] and b["train_images"] == a["train_images"] == 40


def test_resume_with_two_processes_and_with_one(cifar, tmp_path):
    needs_mpi()
    assert mpirun(2, *train_args(cifar, tmp_path / "straight", "--epochs", "2")).returncode == 0
    assert mpirun(2, *train_args(cifar, tmp_path / "resumed", "--epochs", "1")).returncode == 0
    run = mpirun(2, *train_args(cifar, tmp_path / "resumed", "--resume", "--epochs", "2"))
    assert run.returncode == 0, run.stderr[-3000:]
    a = checkpoint.load_checkpoint(tmp_path / "straight" / "checkpoint.npz")
    b = checkpoint.load_checkpoint(tmp_path / "resumed" / "checkpoint.npz")
    for name in a["model"]:
        np.testing.assert_array_equal(a["model"][name], b["model"][name], err_msg=name)
    run = mpirun(1, *train_args(cifar, tmp_path / "resumed", "--resume", "--epochs", "3"))
    assert run.returncode == 0 and "epoch   3/3" in run.stdout, run.stderr[-3000:]


def test_a_rank_that_fails_ends_every_rank_with_one_message(cifar, tmp_path):
    needs_mpi()
    bad = tmp_path / "bad"
    shutil.copytree(cifar, bad)
    (bad / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"garbage")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_"))}
    good_rank = [sys.executable, *map(str, train_args(cifar, tmp_path / "run", "--epochs", "50"))]
    bad_rank = [sys.executable, *map(str, train_args(bad, tmp_path / "run", "--epochs", "50"))]
    run = subprocess.run([MPIEXEC, "-n", "1", *good_rank, ":", "-n", "1", *bad_rank],
                         capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert run.returncode != 0
    assert "rank 1: error:" in run.stderr and "data_batch_2" in run.stderr, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    differ = [sys.executable, *map(str, train_args(cifar, tmp_path / "run2", "--lr", "0.5"))]
    run = subprocess.run([MPIEXEC, "-n", "1", *good_rank[:-2], "--epochs", "1", ":", "-n", "1",
                          *differ], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env=env)
    assert run.returncode != 0 and "the ranks disagree on the settings" in run.stderr
    assert "Traceback" not in run.stderr and "rank 1: error: the ranks disagree" in run.stderr


def test_the_scaling_benchmark_reports_one_and_two_processes():
    needs_mpi()
    run = mpirun(1, "benchmarks/scaling.py", "--preset", "cifar-tiny", "--batch", "4",
                 "--steps", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines()
            if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert [int(r[0]) for r in rows] == [1, 2]
    assert all(float(r[3].replace(",", "")) > 0 for r in rows)
    assert float(rows[0][5].split()[0]) == 0.0 and float(rows[1][5].split()[0]) > 0


# --- processes of one machine, without MPI (distributed.start, train_cifar --processes) ---

def collectives(world, results):
    """Run on every rank of a Local world: each collective once, with rank-made values."""
    summed = world.sum_(np.full(4, world.rank + 1.0, dtype=np.float32))      # as raw bytes
    strided = world.sum_(np.full((2, 4), world.rank + 1.0)[:, ::2])          # pickled
    largest = world.reduce_host(np.array([world.rank * 10.0]), "max")
    shared = world.broadcast_(np.arange(3.0) if world.rank == 0 else np.zeros(3))
    gathered = world.allgather((world.rank, summed.tolist() + strided.ravel().tolist(),
                                largest.tolist(), shared.tolist()))
    if world.is_main:
        results.extend(gathered)


def fail_on_rank_one(world, how, size):
    if world.rank == 1:
        if how == "exit":
            sys.exit("error: rank one's own message")
        raise ValueError("rank one broke")
    world.sum_(np.zeros(size))             # its message is longer, or shorter, than this


def disagree(world):
    world.check_agree("the settings", {"lr": 0.1 if world.rank == 2 else 0.2})


def test_local_processes_run_each_collective_in_rank_order():
    results = []
    world = distributed.start(3, collectives, [])
    try:
        collectives(world, results)
    finally:
        world.close()
    assert [r[0] for r in results] == [0, 1, 2]                 # allgather keeps rank order
    assert all(r[1] == [6.0] * 8 for r in results)              # 1 + 2 + 3 on every rank
    assert all(r[2] == [20.0] and r[3] == [0.0, 1.0, 2.0] for r in results)
    assert all(p.exitcode == 0 for p in world.processes)


@pytest.mark.parametrize("how, message, size", [
    ("raise", r"ValueError: rank one broke", 3), ("exit", r"error: rank one's own message", 3),
    ("raise", r"ValueError: rank one broke", 100_000)])
def test_a_local_rank_that_fails_tells_rank_zero_why(how, message, size):
    world = distributed.start(2, fail_on_rank_one, how, size)
    try:
        with pytest.raises(distributed.DistributedError, match=r"process 1 of 2 stopped: "
                                                              + message):
            fail_on_rank_one(world, how, size)
    finally:
        world.close()


def test_local_ranks_that_disagree_all_stop_and_close_ends_the_others():
    world = distributed.start(3, disagree)
    try:
        with pytest.raises(distributed.DistributedError, match=r"rank\(s\) 2 differ") as e:
            disagree(world)
        assert e.value.everywhere
    finally:
        world.close()
    assert all(p.exitcode == 1 for p in world.processes)        # said nothing: rank 0 did
    waiting = distributed.start(2, collectives, [])              # rank 1 waits in sum_ ...
    waiting.close()                                              # ... and ends with the pipe
    assert waiting.processes[0].exitcode == 1


@pytest.mark.parametrize("n", [2, 3])
def test_train_cifar_on_local_processes_equals_one(cifar, tmp_path, n):
    """Batches of 16, 16, 8 images cut into 2 or 3 shards (3: shards of 5, 5, 6)."""
    for processes in (1, n):
        run = mpirun(1, *train_args(cifar, tmp_path / f"n{processes}", "--epochs", "2",
                                    "--backend", "numpy", "--processes", processes))
        assert run.returncode == 0, run.stderr[-3000:]
    assert f"{n} processes" in run.stdout and "MPI" not in run.stdout
    assert_same_run(tmp_path / "n1", tmp_path / f"n{n}")


def test_local_processes_stop_with_rank_zero_and_keep_its_checkpoint(cifar, tmp_path):
    """A run that stops on rank 0 (here: a NaN loss from a huge learning rate) ends the
    other processes too, with one message."""
    run = mpirun(1, *train_args(cifar, tmp_path / "run", "--epochs", "3", "--backend", "numpy",
                                "--processes", "2", "--lr", "1e30", "--clip-norm", "0"))
    assert run.returncode != 0 and "stopping" in run.stderr, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and run.stderr.count("error:") == 1


def test_processes_default_to_the_cores_for_the_cpu_preset(train_cifar, monkeypatch):
    monkeypatch.setattr(train_cifar, "usable_cores", lambda: 16)
    one = distributed.World()

    def processes(*flags):
        return train_cifar.local_processes(train_cifar.parse_args(list(flags)), one)

    assert processes("--preset", "cpu", "--backend", "numpy") == train_cifar.MAX_PROCESSES == 8
    monkeypatch.setattr(train_cifar, "usable_cores", lambda: 2)
    assert processes("--preset", "cpu", "--backend", "numpy") == 2
    assert processes("--preset", "cpu", "--backend", "numpy", "--processes", "1") == 1
    assert processes("--backend", "numpy") == processes("--preset", "gpu", "--backend", "numpy") == 1
    assert processes("--preset", "cpu", "--backend", "cupy") == 1
    with pytest.raises(SystemExit, match="with --backend cupy start one process per GPU"):
        processes("--backend", "cupy", "--processes", "2")
    mpi = distributed.World()
    mpi.size = 2
    with pytest.raises(SystemExit, match="mpiexec has started 2 processes already"):
        train_cifar.local_processes(train_cifar.parse_args(["--processes", "2"]), mpi)
