"""The engine in ten lines: build a graph, backpropagate, check the gradients.

    python examples/quickstart.py                 # NumPy, on the CPU
    MINIVIT_BACKEND=cupy python examples/quickstart.py   # CuPy, on a GPU
"""
import numpy as np

import minivit as mv

mv.cli.install()       # a user's mistake (MINIVIT_BACKEND=tpu, Ctrl-C) ends in one line

rng = np.random.default_rng(0)
x = mv.tensor(rng.standard_normal((4, 3)), requires_grad=True)   # on the default backend
w = mv.tensor(rng.standard_normal((3, 2)), requires_grad=True)

# log-mean-exp of a linear map, averaged over the batch
loss = ((x @ w).exp().sum(axis=1, keepdims=True) / 3.0).log().mean()
loss.backward()
print(f"backend: {mv.cli.backend_text(mv.backend.default_device())}   loss = {loss.item():.6f}")
print("dloss/dw =\n", mv.backend.to_numpy(w.grad))

error = mv.gradcheck(lambda x, w: ((x @ w).exp().sum(axis=1, keepdims=True) / 3.0).log(), x, w)
print(f"gradient check (float64 central differences): max relative error {error:.2e}  PASS")
