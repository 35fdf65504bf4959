"""One training step of a CIFAR ViT preset, against the floor set by its matrix products.

    python benchmarks/vit_step.py [--preset cifar-small] [--batch 128] [--backend numpy]
    python benchmarks/vit_step.py --preset cifar-tiny --batch 4 --repeat 1     # for tests
    python benchmarks/vit_step.py --reference              # every fast path off
    python benchmarks/vit_step.py --without blocks,affine  # these fast paths off
    python benchmarks/vit_step.py --gains                  # each fast path's share of a step

A step is forward, cross-entropy, backward and a parameter update (plain SGD: the
update is a few elementwise passes whatever the optimiser).  The floor is the time
of the same step's matrix products alone: every matmul the forward pass made,
recorded with its operands, plus the two products its backward needs (g b^T and
a^T g), and the six batched products of each attention (q k^T and A v forward; A^T g,
g v^T, dS k and dS^T q backward), run back to back on raw arrays.  The share of time per op family comes from
timing every Function's forward and backward during one step.  On CuPy every timing
is bracketed by device synchronisations, so it counts the GPU's work, not just the
kernel launches; the per-op shares then include one synchronisation per op.

--gains measures what each fast path of minivit/fast.py is worth: the step with every
fast path on, with each one off in turn, and with all of them off, in rounds that
alternate the settings (so a machine's drift spreads over all of them), keeping each
setting's best time.
"""
import argparse
import collections
import sys
import time

import numpy as np

import minivit as mv
from minivit import backend, cli, fast
from minivit.autograd import Function
from minivit.ops.attention import FusedSelfAttention, ScaledDotProductAttention
from minivit.ops.basic import Affine, MatMul
from minivit.optim import SGD


def make_step(model, images, labels, lr=1e-3):
    optimizer = SGD(model.parameters(), lr=lr, momentum=0.0)     # fused: whole-buffer update

    def step():
        model.zero_grad()
        loss = mv.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss
    return step


def standin_counts(step):
    """Device reads, host-to-device copies and kernel launches of one step, counted by the
    CuPy stand-in (MINIVIT_FAKE_CUPY=1); None on a real GPU or on NumPy."""
    cupy = sys.modules.get("cupy")
    if cupy is None or not getattr(cupy, "_IS_STANDIN", False):
        return None
    from cupy import _standin
    _standin.reset()
    step()
    return _standin.counts()


def best_time(fn, device, repeat):
    times = []
    for _ in range(repeat):
        backend.synchronize(device)
        start = time.perf_counter()
        fn()
        backend.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def record_matmuls(step):
    """The operands of every matrix product in one step: each MatMul's (a, b) and each
    Affine's (x, W) (Linear layers), and each attention's (q, k, v), whose forward and
    backward are batched matmuls too."""
    pairs, triples = [], []
    originals = {cls: cls.forward for cls in (MatMul, Affine, ScaledDotProductAttention,
                                              FusedSelfAttention)}

    def record_matmul(self, a, b):
        pairs.append((a, b))
        return originals[MatMul](self, a, b)

    def record_affine(self, x, w, b=None):
        pairs.append((x.reshape(-1, w.shape[0]), w))
        return originals[Affine](self, x, w, b)

    def record_attention(self, q, k, v):
        triples.append((q, k, v))
        return originals[ScaledDotProductAttention](self, q, k, v)

    def record_self_attention(self, qkv):
        triples.append(tuple(self._heads(qkv, 3)))
        return originals[FusedSelfAttention](self, qkv)
    MatMul.forward, Affine.forward = record_matmul, record_affine
    ScaledDotProductAttention.forward = record_attention
    FusedSelfAttention.forward = record_self_attention
    try:
        step()
    finally:
        for cls, forward in originals.items():
            cls.forward = forward
    return pairs, triples


def matmul_floor(pairs, triples):
    def run():
        for a, b in pairs:
            g = a @ b                                    # forward (its result stands in for g)
            _ = g @ b.swapaxes(-1, -2)                   # da
            _ = a.swapaxes(-1, -2) @ g                   # db
        for q, k, v in triples:
            s = q @ k.swapaxes(-1, -2)                   # scores (stand in for A and dS too)
            out = s @ v                                  # A v (stands in for g)
            _ = s.swapaxes(-1, -2) @ out                 # dv = A^T g
            _ = out @ v.swapaxes(-1, -2)                 # dA = g v^T
            _ = s @ k                                    # dq = dS k
            _ = s.swapaxes(-1, -2) @ q                   # dk = dS^T q
    return run


def family(cls):
    if cls in (MatMul, Affine):
        return "matmul"
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def time_by_family(step, device):
    """Seconds spent in each Function's forward and backward during one step."""
    spent = collections.Counter()
    patched = []

    def timed(cls, method):
        original = getattr(cls, method)

        def wrapper(self, *args):
            backend.synchronize(device)
            start = time.perf_counter()
            out = original(self, *args)
            backend.synchronize(device)
            spent[f"{family(cls)} {method}"] += time.perf_counter() - start
            return out
        setattr(cls, method, wrapper)
        patched.append((cls, method, original))

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)
    for cls in set(subclasses(Function)):
        if "forward" in vars(cls):
            timed(cls, "forward")
        if "backward" in vars(cls):
            timed(cls, "backward")
    try:
        backend.synchronize(device)
        start = time.perf_counter()
        step()
        backend.synchronize(device)
        total = time.perf_counter() - start
    finally:
        for cls, method, original in patched:
            setattr(cls, method, original)
    return spent, total


def fast_path_gains(step, device, rounds):
    """{setting: best seconds of a step}: "all on", each fast path off alone, "all off"."""
    settings = ["all on"] + list(fast.PATHS) + ["all off"]
    best = {name: float("inf") for name in settings}
    for _ in range(rounds):
        for name in settings:
            fast.use_reference(False)
            if name != "all on":
                fast.use_reference(True, paths=None if name == "all off" else [name])
            step()                                        # warm up this setting
            best[name] = min(best[name], best_time(step, device, 1))
    fast.use_reference(False)
    return best


def parse_paths(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(fast.PATHS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown fast path(s) {', '.join(unknown)}; choose "
                                         f"from {', '.join(fast.PATHS)}")
    return names


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cifar-small", help="a CIFAR preset of minivit.nn.PRESETS")
    parser.add_argument("--batch", type=cli.positive_int, default=128, help="images per step")
    parser.add_argument("--backend", default=backend.default_backend_name(),
                        choices=["numpy", "cupy"], help="default: $MINIVIT_BACKEND, else numpy")
    parser.add_argument("--repeat", type=cli.positive_int, default=5,
                        help="steps timed (the best is kept); the per-op shares take the best "
                             "of min(3, repeat) steps")
    parser.add_argument("--reference", action="store_true",
                        help="every fast path off (as MINIVIT_REFERENCE=1)")
    parser.add_argument("--without", type=parse_paths, default=[], metavar="NAME[,NAME]",
                        help=f"these fast paths off: {', '.join(fast.PATHS)}")
    parser.add_argument("--gains", action="store_true",
                        help="time the step with each fast path off in turn (--repeat rounds)")
    parser.add_argument("--no-keep-host-memory", action="store_true",
                        help="leave glibc's malloc as it is (see minivit.backend.keep_host_memory)")
    args = parser.parse_args()
    kept = not args.no_keep_host_memory and backend.keep_host_memory()

    try:
        backend.use(args.backend)
    except backend.BackendError as e:
        sys.exit(f"error: {e}")
    device = backend.default_device()
    model = mv.nn.VisionTransformer(args.preset)
    rng = np.random.default_rng(0)
    c = model.config
    images = mv.tensor(rng.standard_normal((args.batch, 3, c.image_size, c.image_size),
                                           dtype=np.float32))
    labels = backend.to_device(rng.integers(0, c.num_classes, args.batch), device)
    step = make_step(model, images, labels)
    if args.gains:
        best = fast_path_gains(step, device, args.repeat)
        print(f"{args.preset}: batch {args.batch}, {args.backend} backend ({device}), best of "
              f"{args.repeat} rounds; a fast path's gain is the step without it minus the step "
              f"with every one on, as a share of the latter")
        on = best["all on"]
        for name, seconds in best.items():
            gain = "" if name == "all on" else f"  {100 * (seconds - on) / on:+6.1f}%"
            print(f"  {name:24s} {seconds * 1e3:9.1f} ms{gain}")
        return
    if args.reference:
        fast.use_reference(True)
    fast.use_reference(True, paths=args.without)

    step()                                                # warm up
    t_step = best_time(step, device, args.repeat)
    pairs, triples = record_matmuls(step)
    t_floor = best_time(matmul_floor(pairs, triples), device, args.repeat)
    spent, t_profiled = min((time_by_family(step, device) for _ in range(min(3, args.repeat))),
                            key=lambda r: r[1])

    standin = (" on the CuPy stand-in (MINIVIT_FAKE_CUPY=1): no GPU"
               if device == "cuda" and backend.uses_standin() else "")
    print(f"{args.preset}: {model.num_parameters():,} parameters, batch {args.batch}, "
          f"{args.backend} backend ({device}){standin}, host memory kept for reuse: {kept}")
    print(f"  fast paths off: {', '.join(fast.disabled()) or 'none'}")
    print(f"  training step (forward + backward + SGD update)  {t_step * 1e3:9.1f} ms  "
          f"({args.batch / t_step:,.0f} images/s)")
    print(f"  its matrix products alone ({len(pairs)} matmuls x 3, {len(triples)} attentions x 6)"
          f" {t_floor * 1e3:9.1f} ms")
    print(f"  step / matmul floor                               {t_step / t_floor:9.2f}x")
    counts = standin_counts(step)
    if counts:
        print(f"  per step on the CuPy stand-in: {counts['reads']} device reads, "
              f"{counts['copies']} host-to-device copies, {counts['launches']} kernel launches")
    print(f"  share of one step ({t_profiled * 1e3:.1f} ms with per-op timing):")
    for name, seconds in spent.most_common():
        if seconds / t_profiled >= 0.005:
            print(f"    {name:40s} {seconds * 1e3:8.1f} ms  {100 * seconds / t_profiled:5.1f}%")
    rest = t_profiled - sum(spent.values())
    print(f"    {'(engine, update, other)':40s} {rest * 1e3:8.1f} ms  {100 * rest / t_profiled:5.1f}%")


if __name__ == "__main__":
    cli.install()
    main()
