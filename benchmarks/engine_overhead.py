"""How much does the autograd engine cost on top of the raw array operations?

    python benchmarks/engine_overhead.py [--repeat 2000] [--depth 8] [--size 512]

1. Per-op overhead: one elementwise op on tiny arrays, where the arithmetic is
   nearly free, so the time is the engine's bookkeeping (wrapping, the device check,
   recording the graph) plus its share of the backward walk.
2. A chain of `depth` matmuls of size x size, forward + backward through the engine,
   against the raw matmuls the same computation needs (1 forward and 2 backward
   products per layer): the ratio shows whether the engine adds more than noise where
   the real work is large.
NumPy backend only; numbers depend on the machine and its BLAS.
"""
import argparse
import time

import numpy as np

import minivit as mv


def best_of(fn, repeat, rounds=5):
    """Best mean time of `repeat` calls over a few rounds (seconds per call)."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - start) / repeat)
    return best


def per_op_overhead(repeat):
    a_np, b_np = np.ones((4, 4)), np.ones((4, 4))
    a, b = mv.tensor(a_np, requires_grad=True), mv.tensor(b_np, requires_grad=True)
    raw = best_of(lambda: a_np * b_np, repeat)
    with mv.no_grad():
        plain = best_of(lambda: a * b, repeat)
    recorded = best_of(lambda: a * b, repeat)

    def forward_backward():
        (a * b).backward(np.ones((4, 4)))
    full = best_of(forward_backward, repeat)
    print("1. per-op overhead, elementwise multiply of two 4x4 float64 arrays")
    print(f"   raw numpy op                          {raw * 1e6:8.2f} us")
    print(f"   Tensor op under no_grad               {plain * 1e6:8.2f} us  "
          f"(+{(plain - raw) * 1e6:.2f} us)")
    print(f"   Tensor op recording the graph         {recorded * 1e6:8.2f} us  "
          f"(+{(recorded - raw) * 1e6:.2f} us)")
    print(f"   forward + backward through the engine {full * 1e6:8.2f} us")


def matmul_chain(depth, size, repeat):
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((size, size)).astype(np.float32)
    ws_np = [(rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
             for _ in range(depth)]
    x = mv.tensor(x_np)
    ws = [mv.tensor(w, requires_grad=True) for w in ws_np]

    def engine():
        for w in ws:
            w.grad = None
        h = x
        for w in ws:
            h = h @ w
        h.backward(np.ones_like(x_np))

    def raw():
        hs = [x_np]
        for w in ws_np:
            hs.append(hs[-1] @ w)                 # forward
        g = np.ones_like(x_np)
        for h, w in zip(reversed(hs[:-1]), reversed(ws_np)):
            _ = h.T @ g                           # dW
            g = g @ w.T                           # dh
    t_engine, t_raw = best_of(engine, repeat), best_of(raw, repeat)
    print(f"2. chain of {depth} matmuls {size}x{size} float32, forward + backward")
    print(f"   raw matmuls (3 per layer)             {t_raw * 1e3:8.2f} ms")
    print(f"   through the engine                    {t_engine * 1e3:8.2f} ms  "
          f"({t_engine / t_raw:.3f}x the raw matmuls)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=2000, help="calls per timing round (part 1)")
    parser.add_argument("--depth", type=int, default=8, help="matmuls in the chain (part 2)")
    parser.add_argument("--size", type=int, default=512, help="matrix size (part 2)")
    args = parser.parse_args()
    per_op_overhead(args.repeat)
    matmul_chain(args.depth, args.size, max(1, args.repeat // 400))


if __name__ == "__main__":
    main()
