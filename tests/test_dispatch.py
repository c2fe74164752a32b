"""Routing: which engine serves a call for each ``TRITON_LOSSES_BACKEND`` value, device and tracing state."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

import triton_losses as tl_
from triton_losses import _dispatch

needs_triton = pytest.mark.skipif(not _dispatch.triton_available(), reason="triton is not installed")


@pytest.fixture
def cpu_x():
    return torch.randn(3, 5)


@pytest.fixture(params=sorted(_dispatch._REFERENCE))
def family(request):
    return request.param


def _env(monkeypatch, backend: str | None, interpret: str | None):
    for name, value in (("TRITON_LOSSES_BACKEND", backend), ("TRITON_INTERPRET", interpret)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


@pytest.mark.parametrize("interpret", [None, "0", ""])
def test_auto_on_cpu_without_the_interpreter_is_the_reference(monkeypatch, cpu_x, family, interpret):
    _env(monkeypatch, None, interpret)
    assert not _dispatch.interpreting()
    assert _dispatch.engine(family, cpu_x, op="f") is _dispatch._REFERENCE[family]


@needs_triton
def test_auto_on_cpu_under_the_interpreter_is_the_kernels(monkeypatch, cpu_x, family):
    _env(monkeypatch, "auto", "1")
    assert _dispatch.engine(family, None, cpu_x, op="f") is _dispatch._KERNELS[family]


@needs_triton
def test_auto_falls_back_silently_when_the_kernels_cannot_serve(monkeypatch, cpu_x, family):
    _env(monkeypatch, "auto", "1")
    assert _dispatch.engine(family, cpu_x, op="f", unsupported="option x") is _dispatch._REFERENCE[family]


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_torch_is_always_the_reference(monkeypatch, cpu_x, family, interpret):
    _env(monkeypatch, "torch", interpret)
    assert _dispatch.engine(family, cpu_x, op="f") is _dispatch._REFERENCE[family]
    assert _dispatch.engine(family, cpu_x, op="f", unsupported="option x") is _dispatch._REFERENCE[family]


@pytest.mark.parametrize("value", ["TORCH", " torch ", "Torch"])
def test_backend_value_is_case_and_space_insensitive(monkeypatch, cpu_x, value):
    _env(monkeypatch, value, "1")
    assert _dispatch.backend(cpu_x, op="f") == "torch"


def test_empty_backend_value_means_auto(monkeypatch, cpu_x):
    _env(monkeypatch, "", "0")
    assert _dispatch.backend(cpu_x, op="f") == "torch"


@needs_triton
def test_triton_names_the_unsupported_option(monkeypatch, cpu_x):
    _env(monkeypatch, "triton", "1")
    msg = "triton_losses.cross_entropy: the Triton kernels do not support probability targets of dtype int"
    with pytest.raises(NotImplementedError) as e:
        _dispatch.engine("cross_entropy", cpu_x, op="cross_entropy", unsupported="probability targets of dtype int")
    assert str(e.value) == msg


@needs_triton
def test_triton_on_cpu_without_the_interpreter_raises(monkeypatch, cpu_x):
    _env(monkeypatch, "triton", "0")
    with pytest.raises(NotImplementedError) as e:
        _dispatch.engine("softmax", cpu_x, op="softmax")
    assert str(e.value) == (
        "triton_losses.softmax: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU "
        "tensors), got a tensor on cpu"
    )


@needs_triton
def test_triton_on_cpu_without_the_interpreter_raises_from_the_public_function(monkeypatch, cpu_x):
    _env(monkeypatch, "triton", "0")
    with pytest.raises(NotImplementedError, match=r"^triton_losses\.cross_entropy: the Triton kernels need CUDA"):
        tl_.cross_entropy(cpu_x, torch.tensor([0, 1, 4]))


def test_triton_without_triton_installed_raises(monkeypatch, cpu_x):
    _env(monkeypatch, "triton", "1")
    monkeypatch.setattr(_dispatch, "_KERNELS", {})
    assert not _dispatch.triton_available()
    with pytest.raises(NotImplementedError) as e:
        _dispatch.engine("cross_entropy", cpu_x, op="cross_entropy")
    assert str(e.value) == "triton_losses.cross_entropy: TRITON_LOSSES_BACKEND=triton but triton is not installed"


def test_auto_without_triton_installed_is_the_reference(monkeypatch, cpu_x, family):
    _env(monkeypatch, "auto", "1")
    monkeypatch.setattr(_dispatch, "_KERNELS", {})
    assert _dispatch.engine(family, cpu_x, op="f") is _dispatch._REFERENCE[family]


@pytest.mark.parametrize("value", ["cuda", "tritn", "1"])
def test_bad_backend_value_raises(monkeypatch, cpu_x, value):
    _env(monkeypatch, value, "1")
    with pytest.raises(ValueError) as e:
        _dispatch.engine("cross_entropy", cpu_x, op="cross_entropy")
    assert str(e.value) == f"TRITON_LOSSES_BACKEND must be one of ('auto', 'triton', 'torch'), got {value!r}"


def test_bad_backend_value_raises_from_the_public_function(monkeypatch, cpu_x):
    _env(monkeypatch, "gpu", "1")
    with pytest.raises(ValueError, match="TRITON_LOSSES_BACKEND must be one of"):
        tl_.cross_entropy(cpu_x, torch.tensor([0, 1, 4]))


def test_the_first_tensor_given_decides_the_device(monkeypatch, cpu_x):
    _env(monkeypatch, "auto", "0")
    assert _dispatch.backend(None, cpu_x, None, op="f") == "torch"
    with pytest.raises(StopIteration):
        _dispatch.backend(None, op="f")


def test_not_tracing_in_eager():
    assert not _dispatch.tracing()


@needs_triton
def test_traced_engine_while_compiling(monkeypatch, cpu_x, family):
    """Under dynamo ``engine`` returns ``kernels.<family>.TRACED``; eager calls get the module itself."""
    _env(monkeypatch, "triton", "1")
    seen = []

    def probe(x):
        seen.append(_dispatch.engine(family, x, op="f"))
        return x * 2

    torch._dynamo.reset()
    torch.compile(probe, backend="eager")(cpu_x)
    probe(cpu_x)
    assert seen[0] is _dispatch._KERNELS[family].TRACED
    assert seen[-1] is _dispatch._KERNELS[family]


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compiled_graph_holds_the_custom_ops_only_on_the_triton_backend(monkeypatch, cpu_x, backend):
    _env(monkeypatch, backend, "1")
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    t = torch.tensor([0, 1, 4])
    out = torch.compile(lambda x: tl_.cross_entropy(x, t), backend=capture, fullgraph=True)(cpu_x)
    torch.testing.assert_close(out, torch.nn.functional.cross_entropy(cpu_x, t))
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert any("triton_losses" in s for s in targets) == (backend == "triton"), targets


@needs_triton
def test_every_engine_of_a_family_defines_the_traced_names(family):
    """``TRACED`` mirrors its kernels module, and the reference defines every one of those names too."""
    kernels, reference = _dispatch._KERNELS[family], _dispatch._REFERENCE[family]
    traced = kernels.TRACED
    assert isinstance(traced, types.SimpleNamespace)
    names = set(vars(traced))
    assert names, f"kernels.{family}.TRACED is empty"
    assert not names - set(dir(kernels)), f"kernels.{family} lacks {names - set(dir(kernels))}"
    assert not names - set(dir(reference)), f"reference.{family} lacks {names - set(dir(reference))}"
    for name in names:
        ours = getattr(traced, name)
        if callable(ours):
            assert callable(getattr(kernels, name)) and callable(getattr(reference, name)), name


def test_reference_and_kernel_tables_list_the_same_families():
    if _dispatch.triton_available():
        assert set(_dispatch._KERNELS) == set(_dispatch._REFERENCE)
    for name, module in _dispatch._REFERENCE.items():
        assert module.__name__ == f"triton_losses.reference.{name}"
        assert _dispatch.reference(name) is module
    for name, module in _dispatch._KERNELS.items():
        assert module.__name__ == f"triton_losses.kernels.{name}"


@needs_triton
@pytest.mark.interpreter
def test_interpreter_launches_leak_no_numpy_warnings(monkeypatch):
    """``-inf`` logits make the interpreter's numpy warn (log of 0, inf - inf); the caller sees none of it."""
    _env(monkeypatch, "triton", "1")
    x = torch.randn(4, 37)
    x[0] = float("-inf")
    x[1, :5] = float("-inf")
    x.requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tl_.cross_entropy(x, torch.tensor([0, 7, 3, 2]), reduction="none").sum().backward()
        tl_.log_softmax(x.detach(), 1)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
