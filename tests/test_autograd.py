"""The graph walk: the chain rule, summed over every path (minivit/autograd.py).

For L computed from x through intermediate tensors, dL/dx is the sum over the paths from
x to L of the product of the local derivatives along each path.  backward() visits the
tensors in reverse topological order (each after everything computed from it), so when
it reaches t, dL/dt is complete, and sends it through t's Function to t's inputs (see
backward_walk and _topological_order).  These tests check, in order:

1. A small graph, log(sum_j e^{(x w)_ij} / 3) averaged over i, gets the gradients worked
   out by hand, dx = P w^T / 4 and dw = x^T P / 4 with P the row softmax of x w
   (test_a_small_graph_matches_the_chain_rule_by_hand).
2. A tensor used twice adds both contributions before the walk goes on: y = a * a with
   a = 3x gives dL/dx = 3 * 2 a g = 18 x g (test_diamond_accumulates_both_paths), in one
   op and across ops (test_tensor_used_many_times_in_one_op_and_across_ops).
3. The walk is a loop over an explicit stack: a chain of 10,000 ops needs no recursion
   (test_chain_of_10000_ops_has_no_recursion_error).
4. After backward the graph is released, so its saved arrays are freed
   (test_graph_is_released_after_backward); a second backward needs retain_graph and
   then adds to .grad (test_second_backward_needs_retain_graph).
5. Leaves never share a gradient array (test_leaf_grads_never_alias); an intermediate
   keeps its gradient when asked (test_retain_grad_keeps_an_intermediate_gradient); only
   inputs that require grad get one (test_only_inputs_that_require_grad_get_one).
6. Under no_grad no graph is built, and the mode comes back even after an exception
   (test_no_grad_builds_no_graph, test_no_grad_restores_the_mode_after_an_exception).
7. An array on the left of an operator defers to the tensor
   (test_ndarray_on_the_left_defers_to_tensor), and a tensor reports its shape, dtype,
   device and values (test_tensor_attributes).

8. A parameter in an optimiser's flat buffer may get its gradient written straight into
   its slot there (Function.grad_destination): a whole cifar-tiny model gets exactly the
   gradients it gets without buffers, and the Linear layers' ones are written in place,
   not copied (test_gradients_written_into_their_slots_are_the_same_gradients); a
   parameter used twice, or across two backward passes, still adds both contributions
   (test_a_parameter_used_twice_still_adds_both_gradients).

Then the errors: backward without a gradient on a non-scalar, bad constructors, and a
Function whose backward returns a gradient of the wrong shape or dtype.
"""
import gc
import weakref

import numpy as np
import pytest

import minivit as mv
from minivit.autograd import Function

from conftest import numpy_grad


# --- the chain rule ---------------------------------------------------------------------

def test_a_small_graph_matches_the_chain_rule_by_hand(device):
    rng = np.random.default_rng(0)
    x_np, w_np = rng.standard_normal((4, 3)), rng.standard_normal((3, 2))
    x = mv.tensor(x_np, requires_grad=True, device=device)
    w = mv.tensor(w_np, requires_grad=True, device=device)
    loss = ((x @ w).exp().sum(axis=1, keepdims=True) / 3.0).log().mean()
    loss.backward()
    # By hand: loss = mean_i log(s_i / 3), s_i = sum_j e^{(xw)_ij};
    # d loss / d (xw)_ij = softmax_ij / 4, so dx = P w^T / 4 and dw = x^T P / 4.
    z = x_np @ w_np
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True) / 4
    np.testing.assert_allclose(numpy_grad(x), p @ w_np.T, rtol=1e-12)
    np.testing.assert_allclose(numpy_grad(w), x_np.T @ p, rtol=1e-12)
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    assert mv.gradcheck(lambda x, w: ((x @ w).exp().sum() / 3.0).log(), x, w) < 1e-6


def test_diamond_accumulates_both_paths(device):
    x = mv.tensor([1.0, 2.0], requires_grad=True, device=device)
    a = x * 3.0
    (a * a).sum().backward()
    np.testing.assert_allclose(numpy_grad(x), [18.0, 36.0])


def test_tensor_used_many_times_in_one_op_and_across_ops(device):
    x = mv.tensor([2.0], requires_grad=True, device=device)
    y = x * x + x * 4.0 - x            # dy/dx = 2x + 3 = 7
    y.sum().backward()
    np.testing.assert_allclose(numpy_grad(x), [7.0])


# --- the walk and the graph's lifetime --------------------------------------------------

def test_chain_of_10000_ops_has_no_recursion_error(device):
    x = mv.tensor([1.0], requires_grad=True, device=device)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.sum().backward()
    np.testing.assert_allclose(numpy_grad(x), [1.0001 ** 10_000], rtol=1e-9)


def test_graph_is_released_after_backward(device):
    x = mv.tensor(np.ones((3, 3)), requires_grad=True, device=device)
    h = x.exp()
    fn_ref = weakref.ref(h.creator)          # Exp saved its output for backward
    loss = (h * 2.0).sum()
    del h
    loss.backward()
    gc.collect()
    assert fn_ref() is None, "the Function (and the array it saved) must be freed"
    assert loss.creator is None


def test_second_backward_needs_retain_graph(device):
    x = mv.tensor([3.0], requires_grad=True, device=device)
    loss = (x * x).sum()
    loss.backward(retain_graph=True)
    loss.backward()                          # the graph was kept for this second pass
    np.testing.assert_allclose(numpy_grad(x), [12.0])   # 6 + 6: grads accumulate
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        loss.backward()


def test_leaf_grads_never_alias(device):
    a = mv.tensor([1.0], requires_grad=True, device=device)
    b = mv.tensor([1.0], requires_grad=True, device=device)
    (a + b).sum().backward()                 # Add hands the same g to both inputs
    a.grad *= 5
    np.testing.assert_allclose(numpy_grad(b), [1.0])


def test_retain_grad_keeps_an_intermediate_gradient(device):
    x = mv.tensor([1.0, 2.0], requires_grad=True, device=device)
    h = (x * 3.0).retain_grad()
    (h * h).sum().backward()
    np.testing.assert_allclose(numpy_grad(h), [6.0, 12.0])     # 2h
    other = x * 3.0
    assert other.grad is None


def test_only_inputs_that_require_grad_get_one(device):
    x = mv.tensor([1.0], requires_grad=True, device=device)
    c = mv.tensor([5.0], device=device)
    (x * c).sum().backward()
    assert c.grad is None
    np.testing.assert_allclose(numpy_grad(x), [5.0])


# --- no_grad and tensors ----------------------------------------------------------------

def test_no_grad_builds_no_graph(device):
    x = mv.tensor([1.0, 2.0], requires_grad=True, device=device)
    with mv.no_grad():
        y = (x * 2.0).exp()
        assert not mv.is_grad_enabled()
    assert mv.is_grad_enabled()
    assert y.creator is None and not y.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()


def test_no_grad_restores_the_mode_after_an_exception():
    with pytest.raises(ZeroDivisionError):
        with mv.no_grad():
            1 / 0
    assert mv.is_grad_enabled()


def test_ndarray_on_the_left_defers_to_tensor(device):
    x = mv.tensor([1.0, 2.0], requires_grad=True, device=device)
    a = mv.backend.to_device(np.array([3.0, 4.0]), device)
    y = a * x
    assert isinstance(y, mv.Tensor)
    y.sum().backward()
    np.testing.assert_allclose(numpy_grad(x), [3.0, 4.0])


def test_tensor_attributes(device):
    data = np.arange(6.0).reshape(2, 3)
    x = mv.tensor(data, requires_grad=True, device=device)
    assert x.shape == (2, 3) and x.ndim == 2 and x.dtype == np.float64 and x.size == 6
    assert x.device == device and len(x) == 2
    assert x[1, 2].item() == 5.0
    np.testing.assert_array_equal(x.numpy(), data)
    np.testing.assert_array_equal(x.T.numpy(), data.T)
    d = x.detach()
    assert d.creator is None and not d.requires_grad
    assert "requires_grad=True" in repr(x) and f"device='{device}'" in repr(x)
    assert x.is_leaf and not (x * 2).is_leaf


# --- gradients written into their slots of a flat buffer ---------------------------------

def cifar_tiny_gradients(device, in_buffer, copied=None):
    from minivit.nn.module import Parameter
    from minivit.nn.vit import VisionTransformer
    from minivit.optim import AdamW
    rng = np.random.default_rng(0)
    model = VisionTransformer("cifar-tiny", seed=1).to(device).astype("float64")
    for i, p in enumerate(model.parameters()):          # the head starts at zero: nudge all
        p.data = p.data + mv.backend.asarray(
            0.02 * np.random.default_rng(i).standard_normal(p.shape), device=device)
    if in_buffer:
        AdamW(model.parameters(), lr=0.1)
    if copied is not None:                              # note each gradient copied in
        accumulate = Parameter._accumulate_grad

        def noting(p, g):
            if g is not p._grad_view:
                copied.append(p)
            accumulate(p, g)
        Parameter._accumulate_grad = noting
    try:
        logits = model(mv.tensor(rng.standard_normal((3, 3, 32, 32)), device=device))
        labels = mv.backend.asarray(rng.integers(0, 10, 3), device=device)
        mv.cross_entropy(logits, labels).backward()
    finally:
        if copied is not None:
            Parameter._accumulate_grad = accumulate
    return model, {name: numpy_grad(p) for name, p in model.named_parameters()}


def test_gradients_written_into_their_slots_are_the_same_gradients(device, fast_paths):
    copied = []
    model, in_slots = cifar_tiny_gradients(device, in_buffer=True, copied=copied)
    _, plain = cifar_tiny_gradients(device, in_buffer=False)
    assert in_slots.keys() == plain.keys()
    for name in plain:
        np.testing.assert_array_equal(in_slots[name], plain[name], err_msg=name)
    linear = [p for name, p in model.named_parameters()
              if name.endswith(("qkv.weight", "qkv.bias", "fc1.weight", "head.bias"))]
    assert linear and not any(p in copied for p in linear)      # written in place
    assert all(p.grad is p._grad_view for p in model.parameters())


def test_a_parameter_used_twice_still_adds_both_gradients(device):
    from minivit.nn import Linear
    from minivit.optim import SGD
    rng = np.random.default_rng(3)
    x = mv.tensor(rng.standard_normal((4, 5)), device=device)
    g = mv.tensor(rng.standard_normal((4, 5)), device=device)

    def grads(in_buffer, passes):
        layer = Linear(5, 5, np.random.default_rng(0)).to(device).astype("float64")
        if in_buffer:
            SGD(layer.parameters(), lr=0.1)
        for _ in range(passes):
            (layer(layer(x)) * g).sum().backward()            # W and b used twice
        return numpy_grad(layer.weight), numpy_grad(layer.bias)
    w, b = grads(False, 1)
    x_np, g_np = x.numpy(), g.numpy()
    layer = Linear(5, 5, np.random.default_rng(0)).astype("float64")
    W, bias = layer.weight.numpy(), layer.bias.numpy()
    h = x_np @ W + bias                                         # dL/dh = g W^T
    np.testing.assert_allclose(w, h.T @ g_np + x_np.T @ (g_np @ W.T), rtol=1e-12)
    np.testing.assert_allclose(b, g_np.sum(0) + (g_np @ W.T).sum(0), rtol=1e-12)
    for passes in (1, 2):
        for got, want in zip(grads(True, passes), (passes * w, passes * b)):
            np.testing.assert_allclose(got, want, rtol=1e-12)


# --- errors, dtypes and devices ---------------------------------------------------------

def test_backward_needs_a_scalar_or_a_gradient(device):
    x = mv.tensor([1.0, 2.0], requires_grad=True, device=device)
    with pytest.raises(RuntimeError, match=r"single-value tensor, got shape \(2,\)"):
        (x * 2.0).backward()
    with pytest.raises(ValueError, match=r"grad has shape \(3,\), expected the tensor's shape \(2,\)"):
        (x * 2.0).backward(np.ones(3))
    y = x * 2.0
    y.backward(mv.backend.to_device(np.array([1.0, 10.0]), device))
    np.testing.assert_allclose(numpy_grad(x), [2.0, 20.0])


def test_constructor_errors():
    with pytest.raises(TypeError, match="numpy or cupy array, got list"):
        mv.Tensor([1.0, 2.0])
    with pytest.raises(TypeError, match="detach"):
        mv.Tensor(mv.tensor([1.0]))
    assert mv.tensor([1.0, 2.0]).dtype == np.float64
    assert mv.tensor([1, 2], dtype="float32").dtype == np.float32


def test_a_wrong_gradient_shape_is_reported(device):
    class Broken(Function):
        def forward(self, x):
            return x * 2

        def backward(self, g):
            return g.sum()

    x = mv.tensor([1.0, 2.0], requires_grad=True, device=device)
    with pytest.raises(RuntimeError, match=r"Broken.backward returned a gradient of shape \(\)"):
        Broken()(x).sum().backward()


def test_a_wrong_gradient_dtype_is_reported(device):
    class Promotes(Function):
        def forward(self, x):
            return x * 2

        def backward(self, g):
            return g.astype("float64") * 2

    x = mv.tensor(np.ones(2, np.float32), requires_grad=True, device=device)
    with pytest.raises(RuntimeError, match="returned a float64 gradient for a float32 input"):
        Promotes()(x).sum().backward()


def test_backward_names_a_gradient_of_the_wrong_dtype(device):
    x = mv.tensor(np.ones(2, np.float32), requires_grad=True, device=device)
    with pytest.raises(ValueError, match="grad is float64 on .*, expected the tensor's float32"):
        (x * 2.0).backward(mv.backend.to_device(np.ones(2), device))
