"""symconv.torch against independent references: torch.nn.functional.conv{1,2,3}d and torch's
own autograd, torch.autograd.gradcheck / gradgradcheck (float64 finite differences), and the
NumPy oracle for a 4-D convolution PyTorch does not have."""

from __future__ import annotations

import numpy as np
import pytest

from oracle import conv_backward, conv_forward

torch = pytest.importorskip("torch")
st = pytest.importorskip("symconv.torch")
functional = torch.nn.functional

CASES = [  # (input shape, weight shape, keyword arguments torch's conv{n}d also takes)
    pytest.param((2, 3, 11), (4, 3, 3), dict(stride=2, padding=1, dilation=2), id="1d-strided"),
    pytest.param((2, 4, 9), (6, 2, 3), dict(padding=1, groups=2), id="1d-groups"),
    pytest.param((2, 3, 9, 8), (5, 3, 3, 2), dict(stride=(2, 1), padding=(1, 0)), id="2d"),
    pytest.param((1, 4, 7, 7), (4, 1, 3, 3), dict(padding="same", groups=4), id="2d-depthwise"),
    pytest.param((1, 2, 6, 5, 5), (3, 2, 3, 2, 3), dict(stride=(1, 2, 2), padding=1,
                                                      dilation=(2, 1, 1)), id="3d"),
]


def tensors(input_shape, weight_shape, dtype, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(input_shape, dtype=dtype, generator=generator, requires_grad=True)
    w = torch.randn(weight_shape, dtype=dtype, generator=generator, requires_grad=True)
    b = torch.randn(weight_shape[0], dtype=dtype, generator=generator,
                    requires_grad=True) if bias else None
    return x, w, b


def close(got, expected, dtype, what):
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    scale = max(1.0, float(expected.detach().abs().max()))
    error = float((got.detach() - expected.detach()).abs().max()) / scale
    assert error <= tolerance, f"{what}: relative error {error:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("input_shape, weight_shape, kwargs", CASES)
def test_forward_and_gradients_match_torch(input_shape, weight_shape, kwargs, dtype, cache_dir):
    x, w, b = tensors(input_shape, weight_shape, dtype)
    conv = getattr(functional, f"conv{len(input_shape) - 2}d")
    expected = conv(x, w, b, **kwargs)
    got = st.conv(x, w, b, cache_dir=cache_dir, **kwargs)
    assert got.shape == expected.shape and got.dtype == dtype
    close(got, expected, dtype, "forward")
    gy = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (x, w, b), gy)
    have = torch.autograd.grad(got, (x, w, b), gy)
    for name, g, r in zip(("input", "weight", "bias"), have, want):
        close(g, r, dtype, f"grad_{name}")


@pytest.mark.parametrize("input_shape, weight_shape, kwargs, bias", [
    ((1, 2, 7), (3, 2, 3), dict(stride=2, padding=(2,), dilation=2), True),
    ((2, 2, 5, 4), (2, 1, 2, 3), dict(padding=((1, 0), (0, 2)), groups=2), False),
    ((1, 2, 4, 3, 3), (2, 2, 2, 2, 2), dict(stride=(2, 1, 1), padding=1), True),
    ((1, 1, 3, 4, 3, 3), (2, 1, 2, 2, 2, 2), dict(padding=1, dilation=(1, 2, 1, 1)), True),
], ids=["1d", "2d-groups-asym-nobias", "3d", "4d"])
def test_gradcheck_and_gradgradcheck(input_shape, weight_shape, kwargs, bias, cache_dir):
    x, w, b = tensors(input_shape, weight_shape, torch.float64, bias=bias, seed=1)
    inputs = (x, w) if b is None else (x, w, b)

    def fn(*args):
        return st.conv(*args, cache_dir=cache_dir, **kwargs)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_double_backward_matches_torch(cache_dir):
    """A gradient penalty, d/dw ||d loss/dx||², through both libraries' double backward."""
    results = []
    for impl in ("symconv", "torch"):
        x, w, b = tensors((2, 3, 8, 7), (4, 3, 3, 3), torch.float64, seed=2)
        conv = (lambda *a, **k: st.conv(*a, cache_dir=cache_dir, **k)) if impl == "symconv" \
            else functional.conv2d
        y = conv(x, w, b, stride=2, padding=1)
        loss = (torch.tanh(y) ** 2).sum()
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        penalty = (gx ** 2).sum()
        results.append(torch.autograd.grad(penalty, (x, w, b)))
    for name, got, ref in zip(("input", "weight", "bias"), *results):
        close(got, ref, torch.float64, f"second-order grad_{name}")


def test_4d_layer_against_numpy_oracle(cache_dir):
    """SymConv with rank 4 (a layer torch has no counterpart for) against the oracle."""
    torch.manual_seed(3)
    layer = st.SymConv(2, 3, (3, 2, 2, 3), stride=(2, 1, 1, 2), padding=1, dilation=(1, 2, 1, 1),
                       dtype=torch.float64, cache_dir=cache_dir)
    x = torch.randn(2, 2, 7, 6, 4, 5, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    args = ((2, 1, 1, 2), ((1, 1),) * 4, (1, 2, 1, 1), 1)
    weight, bias = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    np.testing.assert_allclose(y.detach().numpy(), conv_forward(x.detach().numpy(), weight, bias,
                                                                *args), rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    y.backward(gy)
    expected = conv_backward(x.detach().numpy(), weight, gy.numpy(), *args)
    for got, ref in zip((x.grad, layer.weight.grad, layer.bias.grad), expected):
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-12)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(6, 8, 3, stride=2, groups=2)
        self.head = torch.nn.Linear(8 * 3 * 3, 4)

    def forward(self, x):
        x = functional.relu(self.conv1(x))
        x = functional.max_pool2d(x, 2)
        x = functional.relu(self.conv2(x))
        return self.head(x.flatten(1))


def test_drops_into_a_torch_model_and_trains_the_same(cache_dir):
    torch.manual_seed(4)
    reference = Net()
    model = Net()
    model.load_state_dict(reference.state_dict())
    model.conv1 = st.SymConv.from_torch(model.conv1, cache_dir=cache_dir)
    model.conv2 = st.SymConv.from_torch(model.conv2, cache_dir=cache_dir)
    assert isinstance(model.conv1, st.SymConv) and "groups=2" in repr(model.conv2)
    assert sorted(dict(model.named_parameters())) == sorted(dict(reference.named_parameters()))
    x = torch.randn(8, 1, 14, 14)
    labels = torch.randint(0, 4, (8,))
    optimisers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
                  for m in (reference, model)]
    for _ in range(4):
        losses = []
        for net, optimiser in zip((reference, model), optimisers):
            optimiser.zero_grad()
            loss = functional.cross_entropy(net(x), labels)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-5 * max(1.0, abs(losses[0]))
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        close(q, p, torch.float32, name)


def test_module_defaults_and_state_dict(cache_dir):
    layer = st.SymConv(4, 8, 3, rank=2, groups=2, cache_dir=cache_dir)
    assert layer.weight.shape == (8, 2, 3, 3) and layer.bias.shape == (8,)
    bound = 1 / np.sqrt(2 * 9)
    assert float(layer.bias.detach().abs().max()) <= bound
    assert float(layer.weight.detach().abs().max()) <= bound
    assert set(layer.state_dict()) == {"weight", "bias"}
    no_bias = st.SymConv(2, 2, (3,), bias=False, cache_dir=cache_dir)
    assert no_bias.bias is None and set(no_bias.state_dict()) == {"weight"}
    x = torch.randn(1, 2, 6)
    close(no_bias(x), functional.conv1d(x, no_bias.weight), torch.float32, "no bias")
    with pytest.raises(ValueError, match="rank="):
        st.SymConv(1, 1, 3)
    with pytest.raises(ValueError, match="takes \\(N, C"):
        layer(torch.randn(1, 4, 5))


def test_tensors_reach_the_kernel_without_copies(cache_dir, monkeypatch):
    x, w, b = tensors((2, 3, 10), (4, 3, 3), torch.float32)
    kernel = st.kernel_for(x.shape, w.shape, 1, 1, 1, 1, True, "float32", cache_dir=cache_dir)
    seen = []
    function = kernel.functions["forward"]
    original = function.__call__

    class Spy:
        args = function.args
        output_shape = function.output_shape

        def __call__(self, *arrays, out=None, **options):
            seen.append(([a.__array_interface__["data"][0] for a in arrays],
                         out.__array_interface__["data"][0]))
            return original(*arrays, out=out, **options)
    monkeypatch.setitem(kernel.functions, "forward", Spy())
    y = st.conv(x, w, b, padding=1, cache_dir=cache_dir)
    (pointers, out_pointer), = seen
    assert pointers == [x.data_ptr(), w.data_ptr(), b.data_ptr()]
    assert out_pointer == y.data_ptr()


def test_non_contiguous_input_is_copied_or_refused(cache_dir):
    x, w, b = tensors((2, 3, 8, 9), (4, 3, 3, 3), torch.float64)
    xt = x.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()  # strided view
    assert not xt.is_contiguous()
    expected = functional.conv2d(x, w, b, padding=1)
    got = st.conv(xt, w, b, padding=1, cache_dir=cache_dir)
    close(got, expected, torch.float64, "forward of a strided view")
    got.sum().backward()
    close(xt.grad, torch.autograd.grad(expected.sum(), x)[0], torch.float64, "grad_input")
    channels_last = x.detach().to(memory_format=torch.channels_last)
    close(st.conv(channels_last, w, b, padding=1, cache_dir=cache_dir), expected,
          torch.float64, "channels_last")
    with pytest.raises(ValueError, match="input is not contiguous"):
        st.conv(xt, w, b, padding=1, cache_dir=cache_dir, allow_copy=False)


def test_clear_errors(cache_dir):
    x, w, b = tensors((1, 2, 6), (2, 2, 3), torch.float32)
    with pytest.raises(ValueError, match="device meta.*CPU"):
        st.conv(x.detach().to("meta"), w.detach().to("meta"), cache_dir=cache_dir)
    with pytest.raises(TypeError, match="torch.float32 or torch.float64"):
        st.conv(x.detach().half(), w.detach().half(), cache_dir=cache_dir)
    with pytest.raises(TypeError, match="torch.float32 or torch.float64"):
        st.conv(x.detach().to(torch.int32), w.detach().to(torch.int32), cache_dir=cache_dir)
    with pytest.raises(TypeError, match="different dtypes.*weight torch.float64"):
        st.conv(x, w.detach().double(), b, cache_dir=cache_dir)
    with pytest.raises(ValueError, match="same number of dims"):
        st.conv(x, w[..., None], cache_dir=cache_dir)
    with pytest.raises(ValueError, match="ConvSpec.groups"):
        st.conv(x, w, b, groups=3, cache_dir=cache_dir)
    with pytest.raises(ValueError, match="CPU"):
        st.SymConv(2, 2, 3, rank=1, device="cuda")


def test_padding_modes_match_torch(cache_dir):
    from dataclasses import fields

    from symconv import ConvSpec
    if "padding_mode" not in {f.name for f in fields(ConvSpec)}:
        pytest.skip("this ConvSpec has no padding_mode")
    torch.manual_seed(5)
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    for mode in ("reflect", "replicate", "circular"):
        reference = torch.nn.Conv2d(2, 3, 3, padding=(2, 1), padding_mode=mode,
                                    dtype=torch.float64)
        layer = st.SymConv.from_torch(reference, cache_dir=cache_dir)
        expected, got = reference(x), layer(x)
        close(got, expected, torch.float64, f"{mode} forward")
        gy = torch.randn_like(expected)
        for g, r in zip(torch.autograd.grad(got, (x, layer.weight), gy),
                        torch.autograd.grad(expected, (x, reference.weight), gy)):
            close(g, r, torch.float64, f"{mode} gradient")
