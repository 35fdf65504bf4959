"""How much does the autograd engine cost on top of the raw array operations?

    python benchmarks/engine_overhead.py [--repeat 2000] [--depth 8] [--size 512] [--backend cupy]
    python benchmarks/engine_overhead.py --smoke          # a second or two, for the tests

1. Per-op overhead: one elementwise op on tiny arrays, where the arithmetic is
   nearly free, so the time is the engine's bookkeeping (wrapping, the device check,
   recording the graph) plus its share of the backward walk.
2. A chain of `depth` matmuls of size x size, forward + backward through the engine,
   against the raw matmuls the same computation needs (1 forward and 2 backward
   products per layer): the ratio shows whether the engine adds more than noise where
   the real work is large.
Runs on the default backend (NumPy, or CuPy with --backend cupy or MINIVIT_BACKEND=cupy);
on CuPy every timing round ends with a device synchronisation, so queued kernels are
counted.  Numbers depend on the machine and its BLAS.
"""
import argparse
import sys
import time

import numpy as np

import minivit as mv
from minivit import backend, cli


def best_of(fn, repeat, rounds=5):
    """Best mean time of `repeat` calls over a few rounds (seconds per call)."""
    best = float("inf")
    for _ in range(rounds):
        backend.synchronize()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        backend.synchronize()
        best = min(best, (time.perf_counter() - start) / repeat)
    return best


def per_op_overhead(repeat, rounds):
    xp = backend.default_module()                 # numpy or cupy
    a_raw, b_raw, ones = xp.ones((4, 4)), xp.ones((4, 4)), xp.ones((4, 4))
    a, b = mv.tensor(a_raw, requires_grad=True), mv.tensor(b_raw, requires_grad=True)
    raw = best_of(lambda: a_raw * b_raw, repeat, rounds)
    with mv.no_grad():
        plain = best_of(lambda: a * b, repeat, rounds)
    recorded = best_of(lambda: a * b, repeat, rounds)

    def forward_backward():
        (a * b).backward(ones)
    full = best_of(forward_backward, repeat, rounds)
    print("1. per-op overhead, elementwise multiply of two 4x4 float64 arrays")
    print(f"   {'raw ' + xp.__name__ + ' op':38s}{raw * 1e6:8.2f} us")
    print(f"   Tensor op under no_grad               {plain * 1e6:8.2f} us  "
          f"(+{(plain - raw) * 1e6:.2f} us)")
    print(f"   Tensor op recording the graph         {recorded * 1e6:8.2f} us  "
          f"(+{(recorded - raw) * 1e6:.2f} us)")
    print(f"   forward + backward through the engine {full * 1e6:8.2f} us")


def matmul_chain(depth, size, repeat, rounds):
    rng = np.random.default_rng(0)                # drawn on the host, moved to the backend
    x_raw = backend.asarray(rng.standard_normal((size, size)), dtype="float32")
    ws_raw = [backend.asarray(rng.standard_normal((size, size)) / np.sqrt(size), dtype="float32")
              for _ in range(depth)]
    ones = backend.default_module().ones_like(x_raw)
    x = mv.tensor(x_raw)
    ws = [mv.tensor(w, requires_grad=True) for w in ws_raw]

    def engine():
        for w in ws:
            w.grad = None
        h = x
        for w in ws:
            h = h @ w
        h.backward(ones)

    def raw():
        hs = [x_raw]
        for w in ws_raw:
            hs.append(hs[-1] @ w)                 # forward
        g = ones
        for h, w in zip(reversed(hs[:-1]), reversed(ws_raw)):
            _ = h.T @ g                           # dW
            g = g @ w.T                           # dh
    t_engine, t_raw = best_of(engine, repeat, rounds), best_of(raw, repeat, rounds)
    print(f"2. chain of {depth} matmuls {size}x{size} float32, forward + backward")
    print(f"   raw matmuls (3 per layer)             {t_raw * 1e3:8.2f} ms")
    print(f"   through the engine                    {t_engine * 1e3:8.2f} ms  "
          f"({t_engine / t_raw:.3f}x the raw matmuls)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=cli.positive_int, default=2000,
                        help="calls per timing round (part 1)")
    parser.add_argument("--depth", type=cli.positive_int, default=8,
                        help="matmuls in the chain (part 2)")
    parser.add_argument("--size", type=cli.positive_int, default=512, help="matrix size (part 2)")
    parser.add_argument("--rounds", type=cli.positive_int, default=5,
                        help="timing rounds (the best is kept)")
    parser.add_argument("--backend", default=backend.default_backend_name(),
                        choices=["numpy", "cupy"], help="default: $MINIVIT_BACKEND, else numpy")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest run, for tests: --repeat 20 --depth 2 --size 32 "
                             "--rounds 1")
    args = parser.parse_args()
    if args.smoke:
        args.repeat, args.depth, args.size, args.rounds = 20, 2, 32, 1
    try:
        backend.use(args.backend)
    except backend.BackendError as e:
        sys.exit(f"error: {e}")
    print(f"{args.backend} backend ({backend.default_device()})"
          + (" on the CuPy stand-in (MINIVIT_FAKE_CUPY=1): no GPU" if args.backend == "cupy"
             and backend.uses_standin() else ""))
    per_op_overhead(args.repeat, args.rounds)
    matmul_chain(args.depth, args.size, max(1, args.repeat // 400), args.rounds)


if __name__ == "__main__":
    cli.install()
    main()
