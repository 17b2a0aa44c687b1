"""Every op kind through symconv.torch's one custom op, differentiated by the VJP table:
values and gradients against PyTorch's own ops (or autograd of the same formula written in
torch), gradcheck and gradgradcheck in float64; torch.compile(fullgraph=True), torch.export,
torch.func.grad and torch.vmap."""

from __future__ import annotations

import numpy as np
import pytest

from oracle import conv_forward

torch = pytest.importorskip("torch")
st = pytest.importorskip("symconv.torch")
F = torch.nn.functional

SHIFT = "Y[n, c, i] = sum(W[c, a] * X[n, c, 2*i + a], (a, 0, 2))"
SQUASH = "Y[n, i] = sum(tanh(W[a] * X[n, i + a]) + X[n, i + a] ** 2 * W[a], (a, 0, 2))"


def shift_reference(x, w):
    return torch.einsum("ncia,ca->nci", x.unfold(2, 3, 2), w)


def squash_reference(x, w):
    windows = x.unfold(1, 3, 1)                          # (n, i, a)
    return (torch.tanh(windows * w) + windows ** 2 * w).sum(-1)


def _randn(generator, *shape):
    return torch.randn(*shape, dtype=torch.float64, generator=generator, requires_grad=True)


def cases(cache_dir):
    """name -> (symconv function, reference function, argument shapes).  Built for one
    instruction set (the default's baseline): second order builds a few derived packages."""
    from symconv.package import targets
    pad = {"cache_dir": cache_dir, "target": targets.variants()[-1].target}
    return {
        "conv1d": (lambda x, w, b: st.conv(x, w, b, stride=2, padding=1, dilation=2, **pad),
                   lambda x, w, b: F.conv1d(x, w, b, stride=2, padding=1, dilation=2),
                   [(2, 2, 9), (3, 2, 3), (3,)]),
        "conv2d-groups": (lambda x, w: st.conv(x, w, None, padding=1, groups=2, **pad),
                          lambda x, w: F.conv2d(x, w, None, padding=1, groups=2),
                          [(1, 4, 5, 4), (2, 2, 3, 2)]),
        "conv3d": (lambda x, w, b: st.conv(x, w, b, stride=(1, 2, 1), padding=1, **pad),
                   lambda x, w, b: F.conv3d(x, w, b, stride=(1, 2, 1), padding=1),
                   [(1, 2, 4, 5, 3), (2, 2, 2, 3, 2), (2,)]),
        "conv-transpose2d": (
            lambda x, w, b: st.conv_transpose(x, w, b, stride=2, padding=1, output_padding=1,
                                              **pad),
            lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1),
            [(1, 2, 3, 4), (2, 3, 3, 2), (3,)]),
        "avg-pool2d": (lambda x: st.avg_pool(x, 3, stride=2, padding=1, **pad),
                       lambda x: F.avg_pool2d(x, 3, stride=2, padding=1),
                       [(2, 2, 7, 6)]),
        **{f"conv2d-{mode}": (
            lambda x, w, b, mode=mode: st.conv(x, w, b, padding=(2, 1), padding_mode=mode, **pad),
            lambda x, w, b, mode=mode: F.conv2d(F.pad(x, (1, 1, 2, 2), mode=mode), w, b),
            [(1, 2, 5, 4), (2, 2, 3, 3), (2,)]) for mode in ("reflect", "replicate", "circular")},
        "op-strided": (st.op(SHIFT, {"X": (2, 3, 9), "W": (3, 3)}, **pad),
                       shift_reference, [(2, 3, 9), (3, 3)]),
        "op-nonlinear": (st.op(SQUASH, {"X": (2, 8), "W": (3,)}, **pad),
                         squash_reference, [(2, 8), (3,)]),
    }


NAMES = ["conv1d", "conv2d-groups", "conv3d", "conv-transpose2d", "avg-pool2d",
         "conv2d-reflect", "conv2d-replicate", "conv2d-circular", "op-strided", "op-nonlinear"]


@pytest.mark.parametrize("name", NAMES)
def test_values_gradients_and_second_order_match_torch(name, cache_dir):
    ours, reference, shapes = cases(cache_dir)[name]
    generator = torch.Generator().manual_seed(NAMES.index(name))
    args = [_randn(generator, *shape) for shape in shapes]
    got, expected = ours(*args), reference(*args)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    gy = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
    for have, want in zip(torch.autograd.grad(got, args, gy, create_graph=True),
                          torch.autograd.grad(expected, args, gy, create_graph=True)):
        torch.testing.assert_close(have, want, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(ours, args)
    assert torch.autograd.gradgradcheck(ours, args)


def test_four_dimensional_conv_against_the_numpy_oracle(cache_dir):
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((1, 2, 4, 3, 4, 3)), rng.standard_normal((2, 2, 2, 2, 3, 2))
    expected = conv_forward(x, w, None, (1, 1, 2, 1), [(1, 1)] * 4, (1,) * 4, 1)
    tx, tw = (torch.tensor(a, requires_grad=True) for a in (x, w))

    def ours(x, w):
        return st.conv(x, w, None, stride=(1, 1, 2, 1), padding=1, cache_dir=cache_dir)
    np.testing.assert_allclose(ours(tx, tw).detach().numpy(), expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(ours, (tx, tw))


class Net(torch.nn.Module):
    """A small CNN: a symconv convolution, a user op, torch ops between."""

    def __init__(self, cache_dir):
        super().__init__()
        self.conv = st.SymConv(1, 3, 3, padding=1, rank=2, cache_dir=cache_dir)
        self.mix = st.op("Y[n, c, i, j] = sum(M[c, d] * X[n, d, i, j], (d, 0, 2))",
                         {"X": ("n", 3, 6, 6), "M": (3, 3)}, cache_dir=cache_dir)
        self.weight = torch.nn.Parameter(torch.eye(3) + 0.1)
        self.head = torch.nn.Linear(3 * 36, 2)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.head(self.mix(y, self.weight).flatten(1))


def _train(model, batches, steps=3):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for x, target in batches[:steps]:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses


def _batches(seed=0, sizes=(4, 4, 3)):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 6, 6, generator=generator),
             torch.randint(0, 2, (n,), generator=generator)) for n in sizes]


def test_compile_fullgraph_trains_like_eager(cache_dir):
    torch.manual_seed(0)
    eager = Net(cache_dir)
    compiled_model = Net(cache_dir)
    compiled_model.load_state_dict(eager.state_dict())
    explanation = torch._dynamo.explain(compiled_model)(_batches()[0][0])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(compiled_model, fullgraph=True)
    want, got = _train(eager, _batches()), _train(compiled, _batches())
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(eager.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_export_round_trip_with_a_dynamic_batch(cache_dir, tmp_path):
    torch.manual_seed(1)
    model = Net(cache_dir)
    x = torch.randn(4, 1, 6, 6)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    assert any("symconv.call" in str(node.target) for node in program.graph.nodes)
    path = tmp_path / "net.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    for n in (4, 1, 7):
        x = torch.randn(n, 1, 6, 6)
        torch.testing.assert_close(loaded(x), model(x))


def test_func_grad_jvp_jacrev_and_hessian(cache_dir):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 7, dtype=torch.float64, generator=generator)
    w = torch.randn(3, 2, 3, dtype=torch.float64, generator=generator)

    def ours(w):
        return (torch.tanh(st.conv(x, w, None, padding=1, cache_dir=cache_dir)) ** 2).sum()

    def theirs(w):
        return (torch.tanh(F.conv1d(x, w, padding=1)) ** 2).sum()
    torch.testing.assert_close(torch.func.grad(ours)(w), torch.func.grad(theirs)(w))
    torch.testing.assert_close(
        torch.func.jacrev(lambda w: st.conv(x, w, None, cache_dir=cache_dir))(w),
        torch.func.jacrev(lambda w: F.conv1d(x, w))(w))
    torch.testing.assert_close(torch.func.hessian(ours)(w), torch.func.hessian(theirs)(w))
    tangent = torch.randn(w.shape, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(torch.func.jvp(ours, (w,), (tangent,))[1],
                               torch.func.jvp(theirs, (w,), (tangent,))[1])
    import torch.autograd.forward_ad as fwad
    with fwad.dual_level():                     # forward mode outside torch.func too
        dual = st.conv(x, fwad.make_dual(w, tangent), None, padding=1, cache_dir=cache_dir)
        expected = fwad.unpack_dual(F.conv1d(x, fwad.make_dual(w, tangent), padding=1))
        torch.testing.assert_close(fwad.unpack_dual(dual).tangent, expected.tangent)


def test_vmap_folds_into_the_batch_or_maps_per_element(cache_dir):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 7, dtype=torch.float64, generator=generator)
    w = torch.randn(3, 2, 3, dtype=torch.float64, generator=generator)
    stacked = torch.randn(5, 2, 2, 7, dtype=torch.float64, generator=generator)
    mapped = torch.vmap(lambda xi: st.conv(xi, w, None, padding=1, cache_dir=cache_dir))(stacked)
    torch.testing.assert_close(mapped, torch.stack([F.conv1d(xi, w, padding=1) for xi in stacked]))
    moved = torch.vmap(lambda xi: st.conv(xi, w, None, padding=1, cache_dir=cache_dir),
                       in_dims=1)(stacked.transpose(0, 1))
    torch.testing.assert_close(moved, mapped)
    weights = torch.randn(4, 3, 2, 3, dtype=torch.float64, generator=generator)
    mapped = torch.vmap(lambda wi: st.conv(x, wi, None, cache_dir=cache_dir))(weights)
    torch.testing.assert_close(mapped, torch.stack([F.conv1d(x, wi) for wi in weights]))


def test_op_module_errors(cache_dir):
    made = st.op(SHIFT, {"X": (2, 3, 9), "W": (3, 3)}, dtype="float64", cache_dir=cache_dir)
    x, w = torch.randn(2, 3, 9), torch.randn(3, 3)
    with pytest.raises(TypeError, match="made with dtype='float64'"):
        made(x, w)
    with pytest.raises(TypeError, match="takes 2 tensors"):
        made(x.double())
    with pytest.raises(TypeError, match="shapes"):
        st.op(SHIFT)
    with pytest.raises(TypeError, match="different dtypes"):
        made(x.double(), w)
