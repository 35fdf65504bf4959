"""Data-parallel scaling: training images/s on 1 and N processes, and the bytes allreduced.

    python benchmarks/scaling.py [--preset cifar-small] [--batch 128] [--ranks 1 2]

For each number of processes it starts `mpiexec -n N` on this script in worker mode;
every rank builds the same ViT, takes its shard of each global batch of random images,
and after backward the flat gradient buffer is summed across ranks (one allreduce)
before the AdamW step, exactly as examples/train_cifar.py does under MPI.  The BLAS
threads are split between the ranks (OPENBLAS_NUM_THREADS = cores // N, printed), so
the comparison is of the same machine used in two ways.  Needs the mpi extra
(pip install -e ".[mpi]") for N > 1.
"""
import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

from minivit import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def worker(args):
    import numpy as np

    import minivit as mv
    from minivit import backend, distributed
    from minivit.nn import VisionTransformer
    from minivit.optim import AdamW

    world = distributed.world()
    backend.use(args.backend, world.local_rank)                 # one GPU per rank
    if backend.default_device() == "cpu":
        backend.keep_host_memory()
    model = VisionTransformer(args.preset)
    optimizer = AdamW(model.parameters(), lr=1e-4)
    distributed.broadcast_parameters(world, optimizer)
    rng = np.random.default_rng(0)
    c = model.config
    x = rng.standard_normal((args.batch, 3, c.image_size, c.image_size)).astype(np.float32)
    y = rng.integers(0, c.num_classes, args.batch)
    first, last = world.shard(args.batch)
    x, y = mv.tensor(x[first:last]), backend.asarray(y[first:last])
    xp = backend.default_module()
    seed = xp.full((), (last - first) / args.batch, dtype="float32")

    def step():
        model.zero_grad()
        mv.cross_entropy(model(x), y).backward(seed)
        distributed.sum_gradients(world, optimizer)
        optimizer.step()

    for _ in range(2):
        step()                                      # warm up
    times = []
    for _ in range(args.steps):
        if world.comm is not None:
            world.comm.Barrier()
        start = time.perf_counter()
        step()
        backend.to_numpy(optimizer.buffers[0].data[:1])      # wait for the device
        times.append(time.perf_counter() - start)
    if world.is_main:
        best = sorted(times)[len(times) // 2]                 # the median step
        print(json.dumps({"ranks": world.size, "step_s": best, "images_per_s": args.batch / best,
                          "allreduce_bytes": distributed.bytes_per_step(optimizer, world.size),
                          "gradient_bytes": sum(b.grad.nbytes for b in optimizer.buffers)}))


def launch(args):
    cores = os.cpu_count() or 1
    mpiexec = shutil.which("mpiexec", path=os.pathsep.join(
        [str(pathlib.Path(sys.executable).parent), os.environ.get("PATH", "")]))
    rows = []
    for n in args.ranks:
        threads = max(1, cores // n)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_"))}
        env.update(OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
                   PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
        command = [sys.executable, __file__, "--worker", "--preset", args.preset, "--batch",
                   str(args.batch), "--steps", str(args.steps), "--backend", args.backend]
        if n > 1:
            if mpiexec is None:
                sys.exit('error: mpiexec not found: pip install -e ".[mpi]"')
            command = [mpiexec, "-n", str(n)] + command
        run = subprocess.run(command, capture_output=True, text=True, env=env)
        if run.returncode != 0:
            sys.exit(f"error: {n} processes failed:\n{run.stderr[-2000:]}")
        row = json.loads(run.stdout.strip().splitlines()[-1])
        row["blas_threads"] = threads
        rows.append(row)
    print(f"{args.preset}, global batch {args.batch}, {args.backend}, {cores} cores; "
          f"gradient buffer {rows[0]['gradient_bytes'] / 1e6:.1f} MB")
    print("| processes | BLAS threads each | step (ms) | images/s | speed-up | allreduced per "
          "step per rank |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['ranks']} | {row['blas_threads']} | {1000 * row['step_s']:.0f} | "
              f"{row['images_per_s']:,.0f} | {row['images_per_s'] / rows[0]['images_per_s']:.2f}x"
              f" | {row['allreduce_bytes'] / 1e6:.1f} MB |")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cifar-small")
    p.add_argument("--batch", type=cli.positive_int, default=128, help="the global batch")
    p.add_argument("--steps", type=cli.positive_int, default=10,
                   help="timed steps (the median is kept)")
    p.add_argument("--ranks", type=cli.positive_int, nargs="+", default=[1, 2])
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    return worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    cli.install()
    main()
