"""Regression tests for the 8-bit/32-bit optimizers' failure behaviour (docs/FORMATS.md §11):
every step bumps the parameters' version counters (a Linear8bitLt with fp16 weights
refreshes its int8 copy), a failed load_state_dict or a refused step changes nothing, and
the public array API refuses bad scales. The CPU tests take about a second; the `gpu`
tests at the end run on a device; the numba backend's host round trip under the CUDA
simulator is in tests/test_optim_cudasim.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import torch_ops
from torch_ops import optim as O

ALL_CLASSES = [O.Adam, O.AdamW, O.Adam8bit, O.AdamW8bit, O.Adam32bit, O.AdamW32bit,
               O.PagedAdam, O.PagedAdamW, O.PagedAdam8bit, O.PagedAdamW8bit]


@pytest.fixture(autouse=True)
def _fresh_manager():
    O.GlobalOptimManager.get_instance().initialize()
    yield
    O.GlobalOptimManager.get_instance().initialize()


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    """Two groups' worth of parameters: 8-bit state (5000 >= 4096 elements), 32-bit state
    (300 elements) and a bfloat16 one with 8-bit state."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5000, generator=gen) * 0.1),
            torch.nn.Parameter(torch.randn(300, generator=gen) * 0.1),
            torch.nn.Parameter((torch.randn(50, 100, generator=gen) * 0.1).bfloat16())]


def _set_grads(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 0.01).to(p.device, p.dtype)


def _snapshot(opt) -> dict:
    """Everything a step or a load may change: parameters, every state entry, groups."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {
        "params": [p.detach().clone() for p in params],
        "state": [{k: v.clone() if isinstance(v, torch.Tensor) else v
                   for k, v in opt.state[p].items()} if p in opt.state else None
                  for p in params],
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
    }


def _assert_same(a: dict, b: dict) -> None:
    for i, (x, y) in enumerate(zip(a["params"], b["params"])):
        assert torch.equal(x, y), f"parameter {i} changed"
    for i, (x, y) in enumerate(zip(a["state"], b["state"])):
        assert (x is None) == (y is None), f"state of parameter {i} appeared or vanished"
        if x is None:
            continue
        assert set(x) == set(y), f"state keys of parameter {i}: {sorted(x)} != {sorted(y)}"
        for k in x:
            same = torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k]
            assert same, f"state {k!r} of parameter {i} changed"
    assert a["groups"] == b["groups"]


# --- 1. a step bumps the parameters' version counters -----------------------------------------
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.filterwarnings("ignore:paged optimizers:RuntimeWarning")
def test_step_bumps_the_version_of_every_updated_parameter(cls):
    params = _params()
    frozen = torch.nn.Parameter(torch.zeros(10))       # no gradient: not updated, not bumped
    opt = cls(params + [frozen])
    for step in (1, 2):
        _set_grads(params, seed=step)
        before = [p._version for p in params]
        frozen_before = frozen._version
        opt.step()
        for i, (p, v) in enumerate(zip(params, before)):
            assert p._version > v, f"{cls.__name__}: parameter {i} updated without a version bump"
        assert frozen._version == frozen_before


def test_step_bumps_a_noncontiguous_and_a_sharded_parameter():
    wide = torch.nn.Parameter(torch.randn(100, 60).t())        # non-contiguous: updated by copy
    p = torch.nn.Parameter(torch.zeros(8192))                  # a DTensor stand-in ...
    local = torch.zeros(1000)                                  # ... and its local shard
    p.to_local = lambda: local
    opt = O.AdamW8bit([wide, p])
    wide.grad = torch.randn(60, 100)
    p.grad = torch.ones(8192)
    p.grad.to_local = lambda: torch.full((1000,), 0.5)
    versions = wide._version, p._version, local._version
    opt.step()
    assert wide._version > versions[0] and p._version > versions[1] and local._version > versions[2]


def test_linear8bitlt_with_fp16_weights_sees_the_weights_adamw8bit_wrote():
    """Linear8bitLt(has_fp16_weights=True) keys its int8 copy on the weight's version; the
    optimizer writes through a NumPy view (CPU) or a raw pointer (GPU), which torch cannot
    see, so the step itself must bump the version or the next forward uses stale int8s."""
    torch.manual_seed(0)
    layer = torch_ops.Linear8bitLt(128, 64, has_fp16_weights=True)
    x = torch.randn(4, 128)
    opt = O.AdamW8bit(layer.parameters(), lr=1e-2)
    assert layer.weight.numel() >= 4096                        # 8-bit state for the weight
    before = layer(x)                                          # builds the int8 copy
    before.square().mean().backward()
    opt.step()
    with torch.no_grad():
        after = layer(x)
        fresh = torch_ops.Linear8bitLt(128, 64, has_fp16_weights=True)
        fresh.weight.copy_(layer.weight)
        fresh.bias.copy_(layer.bias)
        want = fresh(x)
    assert opt.state[layer.weight]["state1"].dtype == torch.uint8
    assert not torch.equal(after, before.detach())
    assert torch.equal(after, want)


# --- 2. a failed load_state_dict keeps the current state ----------------------------------------
def _truncate_absmax1(sd):
    st = sd["state"][0][O.QUANT_STATE_KEY]
    st["absmax1"] = st["absmax1"][:-1]


def _absmax2_float64(sd):
    st = sd["state"][2][O.QUANT_STATE_KEY]
    st["absmax2"] = st["absmax2"].double()


def _missing_state2(sd):
    del sd["state"][2][O.QUANT_STATE_KEY]["state2"]


def _missing_step(sd):
    del sd["state"][1]["step"]


def _bad_step(sd):
    sd["state"][2]["step"] = -1


def _nan_lr(sd):
    sd["param_groups"][1]["lr"] = float("nan")


def _unknown_index_first(sd):
    sd["state"] = {7: sd["state"][0], **sd["state"]}


CORRUPTIONS = {
    "truncated absmax1": (_truncate_absmax1,
                          "parameter 0: absmax1 must be a torch.float32 tensor of 20 elements"),
    "float64 absmax2": (_absmax2_float64, "parameter 2: absmax2 must be a torch.float32 tensor"),
    "no state2": (_missing_state2, "state of parameter 2 lacks step/state1/state2"),
    "no step": (_missing_step, "state of parameter 1 lacks step"),
    "negative step": (_bad_step, "parameter 2: step must be an integer >= 0; got -1"),
    "nan lr": (_nan_lr, r"param_groups\[1\]: lr must be a finite number >= 0; got nan"),
    "unknown index": (_unknown_index_first, "unknown parameter index 7"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_failed_load_state_dict_leaves_the_state_as_it_was(corruption):
    """Every entry is checked before the current state is replaced (as torch.optim does):
    a bad checkpoint raises and the optimizer trains on as if load_state_dict was never
    called."""
    corrupt, match = CORRUPTIONS[corruption]
    params = _params()
    opt = O.AdamW8bit([{"params": params[:2]}, {"params": params[2:], "lr": 2e-3}])
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = O.AdamW8bit([{"params": twin_params[:2]}, {"params": twin_params[2:], "lr": 2e-3}])
    for step in (1, 2):
        for ps in (params, twin_params):
            _set_grads(ps, seed=step)
        opt.step()
        twin.step()
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 0.5              # would show if groups were half loaded
    corrupt(sd)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    _assert_same(before, _snapshot(opt))
    for ps in (params, twin_params):                 # and training goes on at step 3
        _set_grads(ps, seed=3)
    opt.step()
    twin.step()
    assert [opt.state[p]["step"] for p in params] == [3, 3, 3]
    _assert_same(_snapshot(twin), _snapshot(opt))


def test_load_state_dict_still_loads_a_good_state():
    params = _params()
    opt = O.AdamW8bit(params)
    _set_grads(params, seed=1)
    opt.step()
    sd = opt.state_dict()
    other = O.AdamW8bit([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.5)
    other.load_state_dict(sd)
    assert other.param_groups[0]["lr"] == 1e-3
    assert [s["step"] for s in other.state.values()] == [1, 1, 1]


# --- 4. nonfinite="raise" and bad hyper-parameters refuse the whole step ------------------------
def _nan_grad_in_group0_param1(opt, params):
    params[1].grad[7] = float("nan")
    return FloatingPointError, r"param_groups\[0\]\['params'\]\[1\].*no parameter or state"


def _inf_grad_in_group1(opt, params):
    params[2].grad[3, 4] = float("inf")
    return FloatingPointError, r"param_groups\[1\]\['params'\]\[0\]"


def _nan_lr_in_group1(opt, params):
    opt.param_groups[1]["lr"] = float("nan")
    return ValueError, r"param_groups\[1\]\['params'\]\[0\]: lr must be a finite number"


def _bad_betas_in_group1(opt, params):
    opt.param_groups[1]["betas"] = (0.9, 1.5)
    return ValueError, r"betas\[1\] must be in \[0, 1\)"


@pytest.mark.parametrize("spoil, nonfinite", [
    (_nan_grad_in_group0_param1, "raise"), (_inf_grad_in_group1, "raise"),
    (_nan_lr_in_group1, "raise"), (_nan_lr_in_group1, "skip"), (_bad_betas_in_group1, "skip")],
    ids=lambda x: x if isinstance(x, str) else x.__name__[1:])
def test_a_refused_step_changes_nothing(spoil, nonfinite):
    """Everything is checked (every gradient of every group for nonfinite="raise", every
    hyper-parameter) before the first parameter is touched."""
    params = _params()
    opt = O.AdamW8bit([{"params": params[:2]}, {"params": params[2:]}], nonfinite=nonfinite)
    _set_grads(params, seed=1)
    opt.step()
    _set_grads(params, seed=2)
    err, match = spoil(opt, params)
    before = _snapshot(opt)
    with pytest.raises(err, match=match):
        opt.step()
    _assert_same(before, _snapshot(opt))


def test_raise_on_a_parameter_without_state_creates_none():
    p, q = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(5000))
    opt = O.AdamW8bit([p, q], nonfinite="raise")
    p.grad, q.grad = torch.randn(5000), torch.full((5000,), float("nan"))
    pv = p.detach().clone()
    with pytest.raises(FloatingPointError):
        opt.step()
    assert torch.equal(p, pv) and len(opt.state) == 0
    q.grad = torch.randn(5000)
    opt.step()
    assert opt.state[p]["step"] == 1 and opt.state[q]["step"] == 1


def test_a_state_that_cannot_be_created_refuses_the_whole_step():
    """max_unorm with 8-bit state is refused when q's state would be created: p, whose
    state exists and comes first, is left as it was."""
    p, q = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(5000))
    opt = O.AdamW8bit([p, q])
    p.grad = torch.randn(5000)
    opt.step()
    O.GlobalOptimManager.get_instance().override_config(q, "max_unorm", 1.0)
    p.grad, q.grad = torch.randn(5000), torch.randn(5000)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"max_unorm applies to 32-bit state only.*\[0\]\[1\]"):
        opt.step()
    _assert_same(before, _snapshot(opt))
    assert q not in opt.state


@pytest.mark.parametrize("key, value, match", [
    ("lr", float("nan"), "lr must be a finite number >= 0; got nan"),
    ("betas", (0.9, 1.0), r"betas\[1\] must be in \[0, 1\)"),
    ("eps", -1.0, "eps must be"),
    ("weight_decay", float("inf"), "weight_decay must be"),
    ("percentile_clipping", 0, r"percentile_clipping must be an integer in \[1, 100\]; got 0"),
    ("max_unorm", float("nan"), "max_unorm must be a finite number >= 0; got nan"),
    ("min_8bit_size", -5, "min_8bit_size must be an integer >= 0; got -5"),
])
def test_override_config_rejects_bad_values(key, value, match):
    p = torch.nn.Parameter(torch.zeros(10))
    with pytest.raises(ValueError, match=match):
        O.GlobalOptimManager.get_instance().override_config(p, key, value)


# --- 5. the public array API validates gnorm_scale and update_scale -----------------------------
SCALES = [(8, "gnorm_scale"), (32, "gnorm_scale"), (32, "update_scale")]


def _arrays(bits: int, n: int = 300):
    rng = np.random.default_rng(0)
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    if bits == 8:
        nb = -(-n // 256)
        return [p, g, np.full(n, 127, np.uint8), np.zeros(n, np.uint8), np.zeros(nb, np.float32),
                np.zeros(nb, np.float32)]
    return [p, g, np.zeros(n, np.float32), np.zeros(n, np.float32)]


@pytest.mark.parametrize("bits, arg", SCALES)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, -1e-30, "1", None, True])
def test_public_update_rejects_a_bad_scale(bits, arg, value):
    import qkernels.optim as qo
    update = qo.optimizer_update_8bit_blockwise if bits == 8 else qo.optimizer_update_32bit
    arrays = _arrays(bits)
    before = [a.copy() for a in arrays]
    with pytest.raises(ValueError, match=f"{arg} must be a finite number >= 0.*got {value!r}"):
        update(*arrays, lr=1e-3, step=1, **{arg: value})
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bits, arg", SCALES)
def test_public_update_accepts_a_zero_or_large_scale(bits, arg):
    """0 is what percentile clipping (clip = 0 after all-zero gradients) and max_unorm
    (||p|| = 0) produce; a factor above 1 (e.g. unscaling a loss scale) is plain arithmetic."""
    import qkernels.optim as qo
    update = qo.optimizer_update_8bit_blockwise if bits == 8 else qo.optimizer_update_32bit
    for value in (0.0, 0.5, 4.0, np.float32(2.0)):
        arrays = _arrays(bits)
        update(*arrays, lr=1e-3, step=1, **{arg: value})
        assert all(np.isfinite(a).all() for a in arrays if a.dtype.kind == "f")
    arrays = _arrays(32)
    qo.optimizer_update_32bit(*arrays, lr=1e-3, step=1, gnorm_scale=0.0)
    assert not arrays[2].any() and not arrays[3].any()         # g * 0: moments stay 0


# --- GPU (checked on a device; skipped here) ----------------------------------------------------
def _gpu_backends():
    from tests.conftest import gpu_backends
    return gpu_backends() or ["cupy"]


def _bits(x) -> np.ndarray:
    """The bytes of a host array or CPU tensor (NaN-safe exact comparison)."""
    if isinstance(x, torch.Tensor):
        x = (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()
    return np.ascontiguousarray(x).view(np.uint8)


def _as_torch(arrays: list) -> list:
    """_arrays' NumPy arrays as CPU tensors, p and g in bfloat16."""
    p, g, *states = arrays
    return [torch.from_numpy(p).bfloat16(), torch.from_numpy(g).bfloat16(),
            *(torch.from_numpy(s) for s in states)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("bits", [8, 32])
def test_gpu_backend_writes_host_arrays_back(backend, kind, bits):
    """Host arrays (NumPy float32, CPU bfloat16 tensors) asked onto a GPU backend are
    updated there and copied back, bit for bit as the numpy backend does."""
    import qkernels
    import qkernels.optim as qo
    update = qo.optimizer_update_8bit_blockwise if bits == 8 else qo.optimizer_update_32bit
    make = (lambda: _arrays(bits)) if kind == "numpy" else (lambda: _as_torch(_arrays(bits)))
    want, got = make() + [np.zeros(1, np.int32)], make() + [np.zeros(1, np.int32)]
    if kind == "torch":
        want[-1], got[-1] = torch.from_numpy(want[-1]), torch.from_numpy(got[-1])
    want[1][7] = got[1][7] = float("nan")
    with qkernels.use_backend("numpy"):
        update(*want[:-1], lr=1e-2, step=1, nonfinite=want[-1])
    with qkernels.use_backend(backend):
        update(*got[:-1], lr=1e-2, step=1, nonfinite=got[-1])
    for i, (a, b) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=f"argument {i}")
    assert int(got[-1][0]) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("cls", [O.AdamW8bit, O.AdamW32bit, O.PagedAdamW8bit],
                         ids=lambda c: c.__name__)
def test_gpu_step_bumps_versions_and_refreshes_linear8bitlt(backend, cls):
    import qkernels
    torch.manual_seed(0)
    layer = torch_ops.Linear8bitLt(512, 256, has_fp16_weights=True).cuda()
    x = torch.randn(4, 512, device="cuda")
    opt = cls(layer.parameters(), lr=1e-2)
    layer(x).square().mean().backward()
    versions = [p._version for p in layer.parameters()]
    with qkernels.use_backend(backend):
        opt.step()
    assert all(p._version > v for p, v in zip(layer.parameters(), versions))
    with torch.no_grad():
        fresh = torch_ops.Linear8bitLt(512, 256, has_fp16_weights=True).cuda()
        fresh.weight.copy_(layer.weight)
        fresh.bias.copy_(layer.bias)
        assert torch.equal(layer(x), fresh(x))


@pytest.mark.gpu
def test_gpu_raise_checks_every_gradient_before_any_update():
    ps = [torch.nn.Parameter(torch.randn(5000, device="cuda")) for _ in range(3)]
    opt = O.AdamW8bit([{"params": ps[:2]}, {"params": ps[2:]}], nonfinite="raise")
    _set_grads(ps, seed=1)
    opt.step()
    _set_grads(ps, seed=2)
    ps[2].grad[9] = float("nan")
    before = _snapshot(opt)
    with pytest.raises(FloatingPointError, match=r"param_groups\[1\]\['params'\]\[0\]"):
        opt.step()
    _assert_same(before, _snapshot(opt))
