"""8-bit and 32-bit Adam/AdamW (docs/FORMATS.md §11): the reference against a plain scalar
definition, the optimizers against torch's Adam and bitsandbytes' CPU optimizer, the
state_dict format and resume, GlobalOptimManager, bad input, non-finite gradients,
distributed (DDP, gloo, 2 processes), and every GPU backend bit for bit against the
reference."""
from __future__ import annotations

import gc
import io
import logging
import os

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from reference import optim as ref
from reference.blockwise import dequantize_blockwise_f32
from reference.codebooks import dynamic_map, midpoints
from reference.dtypes import bf16_bits_to_float32, float32_to_bf16_bits
from tests.conftest import gpu_backends
from tests.strategies import round_to
from torch_ops import optim as O

Q1, Q2 = dynamic_map(True), dynamic_map(False)
DTYPES = ("float32", "float16", "bfloat16")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _fresh_manager():
    O.GlobalOptimManager.get_instance().initialize()
    yield
    O.GlobalOptimManager.get_instance().initialize()


# --- the reference against a plain definition ------------------------------------------------
def definition_quantize(x: np.ndarray, code: np.ndarray, sign_fix: bool):
    """docs/FORMATS.md §2.3 with np.searchsorted, blocks of 256, plus §11.2's sign fix."""
    n = x.size
    xb = np.concatenate([x, np.zeros((-n) % 256, np.float32)]).reshape(-1, 256)
    absmax = np.abs(xb).max(axis=1).astype(np.float32)
    with np.errstate(all="ignore"):
        y = (xb * (np.float32(1) / absmax)[:, None]).astype(np.float32)
    y[np.isnan(y)] = 0
    codes = np.searchsorted(midpoints(code), y.reshape(-1)[:n], side="left")
    if sign_fix:
        for i in range(n):
            if np.signbit(code[codes[i]]) != np.signbit(x[i]):
                codes[i] += 1 if x[i] > 0 else -1
    return codes.astype(np.uint8), absmax


def definition_step(p, g, m0, v0, s: ref.AdamScalars):
    """docs/FORMATS.md §11.2's update, one element at a time in float32 scalars."""
    f = np.float32
    p, m, v = p.copy(), np.zeros_like(m0), np.zeros_like(v0)
    bad = 0
    with np.errstate(all="ignore"):
        for i in range(p.size):
            gi = f(g[i]) * s.gnorm_scale
            if not np.isfinite(gi):
                bad += 1
                continue
            m[i] = f(m0[i] * s.beta1) + f(gi * s.one_minus_beta1)
            v[i] = f(v0[i] * s.beta2) + f(f(gi * gi) * s.one_minus_beta2)
            u = m[i] / f(np.sqrt(v[i]) + s.eps_c2)
            p[i] = f(f(p[i] + f(u * s.step_size)) * s.decay)
    return p, m, v, bad


def _storage(x32, dtype):
    return float32_to_bf16_bits(x32) if dtype == "bfloat16" else x32.astype(dtype)


def _values(raw, dtype):
    return bf16_bits_to_float32(raw) if dtype == "bfloat16" else raw.astype(np.float32)


@given(st.integers(1, 700), st.sampled_from(DTYPES), st.integers(0, 2**32 - 1),
       st.floats(-6, 2), st.sampled_from([0.0, 0.01]), st.sampled_from([1.0, 0.5]),
       st.booleans(), st.booleans())
def test_reference_8bit_matches_definition(n, dtype, seed, log_scale, wd, gscale, specials, zeros):
    rng = np.random.default_rng(seed)
    p32 = round_to((rng.standard_normal(n) * 0.1).astype(np.float32), dtype)
    p = _storage(p32, dtype)
    s1, s2 = np.full(n, 127, np.uint8), np.zeros(n, np.uint8)
    a1, a2 = np.zeros(-(-n // 256), np.float32), np.zeros(-(-n // 256), np.float32)
    for step in (1, 2, 3):
        g32 = round_to((rng.standard_normal(n) * 10.0 ** log_scale).astype(np.float32), dtype)
        if zeros:
            g32[: min(n, 300)] = 0.0   # with zero state: an all-zero first block at step 1
        if specials and step == 2:
            g32[rng.integers(0, n, 2)] = rng.choice([np.nan, np.inf, -np.inf], 2)
        s = ref.adam_scalars(1e-3, (0.9, 0.999), 1e-8, wd, step, gscale)
        m0 = dequantize_blockwise_f32(s1, a1, Q1, 256)
        v0 = dequantize_blockwise_f32(s2, a2, Q2, 256)
        want_p, m, v, want_bad = definition_step(_values(p, dtype), g32, m0, v0, s)
        want_c1, want_a1 = definition_quantize(m, Q1, sign_fix=True)
        want_c2, want_a2 = definition_quantize(v, Q2, sign_fix=False)
        bad = ref.optimizer_update_8bit_blockwise(p, _storage(g32, dtype), s1, s2, a1, a2, Q1, Q2, s,
                                                  dtype)
        assert bad == want_bad
        np.testing.assert_array_equal(p.view(np.uint8), _storage(want_p, dtype).view(np.uint8))
        np.testing.assert_array_equal(s1, want_c1)
        np.testing.assert_array_equal(s2, want_c2)
        np.testing.assert_array_equal(a1, want_a1)
        np.testing.assert_array_equal(a2, want_a2)
        assert np.isfinite(a1).all() and np.isfinite(a2).all()
        assert not (np.signbit(Q1[s1]) != np.signbit(m)).any()  # the sign fix held


@given(st.integers(1, 500), st.sampled_from(DTYPES), st.integers(0, 2**32 - 1),
       st.sampled_from([0.0, 0.1]), st.booleans())
def test_reference_32bit_matches_definition(n, dtype, seed, wd, specials):
    rng = np.random.default_rng(seed)
    p = _storage(round_to((rng.standard_normal(n) * 0.1).astype(np.float32), dtype), dtype)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for step in (1, 2):
        g32 = round_to((rng.standard_normal(n) * 0.01).astype(np.float32), dtype)
        if specials:
            g32[rng.integers(0, n)] = np.nan
        s = ref.adam_scalars(1e-2, (0.8, 0.99), 1e-6, wd, step)
        want_p, want_m, want_v, want_bad = definition_step(_values(p, dtype), g32, m, v, s)
        assert ref.optimizer_update_32bit(p, _storage(g32, dtype), m, v, s, dtype) == want_bad
        np.testing.assert_array_equal(p.view(np.uint8), _storage(want_p, dtype).view(np.uint8))
        np.testing.assert_array_equal(m, want_m)
        np.testing.assert_array_equal(v, want_v)


def test_tiny_negative_moment_goes_to_126_and_zero_blocks_stay_zero():
    n = 512
    s1, s2 = np.full(n, 127, np.uint8), np.zeros(n, np.uint8)
    a1, a2 = np.zeros(2, np.float32), np.zeros(2, np.float32)
    g = np.zeros(n, np.float32)
    g[0], g[1] = 1.0, -1e-9          # m[1] / absmax is far below the smallest code
    p = np.ones(n, np.float32)
    ref.optimizer_update_8bit_blockwise(p, g, s1, s2, a1, a2, Q1, Q2,
                                        ref.adam_scalars(1e-3, (0.9, 0.999), 1e-8, 0.0, 1))
    assert s1[1] == 126 and s1[0] == 255 and (s1[2:256] == 127).all()
    assert a1[1] == 0 and a2[1] == 0 and (s1[256:] == 127).all() and (s2[256:] == 0).all()
    assert (p[256:] == 1).all()      # zero gradient, zero state: no movement without decay


def test_adam_scalars_and_percentile_clipping():
    s = ref.adam_scalars(1e-3, (0.9, 0.999), 1e-8, 0.01, 3)
    assert s.step_size == np.float32(-1e-3 * np.sqrt(1 - 0.999**3) / (1 - 0.9**3))
    assert s.decay == np.float32(1 - 1e-5) and s.eps_c2 == np.float32(1e-8 * np.sqrt(1 - 0.999**3))
    ring = np.zeros(100, np.float32)
    g = np.full(10, 2.0, np.float32)
    gnorm, clip, scale = ref.percentile_clipping(g, ring, 1, 5)
    assert (ring == 40).all() and gnorm == np.sqrt(np.float32(40)) and scale == 1
    gnorm, clip, scale = ref.percentile_clipping(g * 4, ring, 2, 5)   # an outlier step
    assert ring[2] == 640 and clip == np.sqrt(np.float32(40))
    assert scale == np.float32(clip / gnorm) and scale < 1
    with pytest.raises(ValueError, match="percentile"):
        ref.percentile_clipping(g, ring, 3, 100)


# --- optimizers on CPU: against torch's Adam and bitsandbytes ---------------------------------
def _bnb():
    try:
        logging.disable(logging.WARNING)
        import bitsandbytes as bnb
        return bnb
    except Exception:
        return None
    finally:
        logging.disable(logging.NOTSET)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam8bit_tracks_torch_adam_spec_acceptance(dtype):
    """docs/FORMATS.md §14's acceptance, bitsandbytes' own protocol: 50 steps, p = 0.1 randn,
    g = 0.01 randn; each step < 20 state elements outside isclose(atol=3e-3, rtol=1e-3) of
    torch's 32-bit Adam and mean |dp| < 6e-5 (fp32/fp16) or 1.7e-4 (bf16); then torch's
    parameter and moments are reset to ours, so every step measures one step's error."""
    torch.manual_seed(0)
    gt = TORCH_DTYPES[dtype]
    p2 = torch.nn.Parameter((torch.randn(32, 1024) * 0.1).to(gt))
    p1 = torch.nn.Parameter(p2.detach().float().clone())
    torch_opt = torch.optim.Adam([p1])
    opt = O.Adam8bit([p2])
    for _ in range(50):
        g = (torch.randn(32, 1024) * 0.01).to(gt)
        p1.grad, p2.grad = g.float(), g.clone()
        torch_opt.step()
        opt.step()
        st = opt.state[p2]
        for ours, key, code in (("state1", "exp_avg", Q1), ("state2", "exp_avg_sq", Q2)):
            deq = torch.from_numpy(dequantize_blockwise_f32(
                st[ours].numpy().reshape(-1), st["absmax" + ours[-1]].numpy(), code, 256))
            theirs = torch_opt.state[p1][key]
            assert (~torch.isclose(theirs.reshape(-1), deq, atol=3e-3, rtol=1e-3)).sum() < 20
            theirs.copy_(deq.reshape(theirs.shape))
        err = (p1.detach() - p2.detach().float()).abs().mean().item()
        assert err < (1.7e-4 if dtype == "bfloat16" else 6e-5)
        p1.data = p1.data.to(gt).float()
        p2.data.copy_(p1.data)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw8bit_tracks_bitsandbytes_cpu(dtype):
    """Same trajectory as bnb's CPU AdamW8bit (which decays before the step and quantizes
    with a lookup table, so not bit for bit: mean |dp| within bnb's acceptance bound)."""
    bnb = _bnb()
    if bnb is None:
        pytest.skip("bitsandbytes not importable")
    torch.manual_seed(1)
    gt = TORCH_DTYPES[dtype]
    p1 = torch.nn.Parameter((torch.randn(16, 1024) * 0.1).to(gt))
    p2 = torch.nn.Parameter(p1.detach().clone())
    theirs, ours = bnb.optim.AdamW8bit([p1]), O.AdamW8bit([p2])
    for _ in range(10):
        g = (torch.randn(16, 1024) * 0.01).to(gt)
        p1.grad, p2.grad = g.clone(), g.clone()
        theirs.step()
        ours.step()
    err = (p1.detach().float() - p2.detach().float()).abs().mean().item()
    assert err < (1.7e-4 if dtype == "bfloat16" else 6e-5)
    a, b = theirs.state[p1]["absmax2"], ours.state[p2]["absmax2"]
    torch.testing.assert_close(a, b, rtol=0.05, atol=0)  # same second-moment scale per block


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))


def _train(model, opt, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 96, generator=gen)
        y = torch.randn(32, 8, generator=gen)
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    return loss.item()


def _round_trip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("cls", [O.AdamW8bit, O.Adam8bit, O.AdamW32bit, O.PagedAdamW8bit])
@pytest.mark.parametrize("wrapped", [True, False])
@pytest.mark.filterwarnings("ignore:paged optimizers:RuntimeWarning")
def test_state_dict_round_trip_resumes_bit_identically(cls, wrapped):
    a = _model()
    opt_a = cls(a.parameters(), lr=3e-3, min_8bit_size=1024)
    _train(a, opt_a, 4, seed=1)
    sd = opt_a.state_dict()
    # format: bnb's keys, every state tensor wrapped, step outside
    st0 = sd["state"][0]
    assert set(st0) == {"step", O.QUANT_STATE_KEY} and st0["step"] == 4
    inner = set(st0[O.QUANT_STATE_KEY])
    assert inner == ({"state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2"}
                     if cls in (O.AdamW8bit, O.Adam8bit, O.PagedAdamW8bit) else {"state1", "state2"})
    assert {"alpha", "t_alpha", "t_beta3"} <= set(sd["param_groups"][0])
    assert set(sd["state"][1][O.QUANT_STATE_KEY]) == {"state1", "state2"}  # bias: 64 < 1024
    saved = _round_trip(sd)
    if not wrapped:
        for st in saved["state"].values():
            st.update(st.pop(O.QUANT_STATE_KEY))
    b = _model(seed=5)
    b.load_state_dict(a.state_dict())
    opt_b = cls(b.parameters(), lr=1.0, min_8bit_size=1024)  # lr comes from the state
    opt_b.load_state_dict(saved)
    assert opt_b.param_groups[0]["lr"] == 3e-3
    _train(a, opt_a, 3, seed=2)
    _train(b, opt_b, 3, seed=2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
        for k, v in opt_a.state[pa].items():
            assert (torch.equal(v, opt_b.state[pb][k]) if isinstance(v, torch.Tensor)
                    else v == opt_b.state[pb][k])


def test_bitsandbytes_state_dicts_interchange():
    bnb = _bnb()
    if bnb is None:
        pytest.skip("bitsandbytes not importable")
    a = _model()
    theirs = bnb.optim.AdamW8bit(a.parameters(), lr=1e-3, min_8bit_size=1024)
    _train(a, theirs, 3)
    sd = _round_trip(theirs.state_dict())
    b = _model()
    b.load_state_dict(a.state_dict())
    ours = O.AdamW8bit(b.parameters(), lr=1e-3, min_8bit_size=1024)
    ours.load_state_dict(sd)
    for pa, pb in zip(a.parameters(), b.parameters()):
        for k, v in theirs.state[pa].items():
            assert (torch.equal(v, ours.state[pb][k]) if isinstance(v, torch.Tensor)
                    else v == ours.state[pb][k]), k
    assert ours.state[b[0].weight]["state1"].dtype == torch.uint8
    _train(b, ours, 1)                      # and it continues from there
    assert ours.state[b[0].weight]["step"] == 4
    # ours loads into bitsandbytes, too
    c = _model()
    theirs2 = bnb.optim.AdamW8bit(c.parameters(), lr=1e-3, min_8bit_size=1024)
    theirs2.load_state_dict(_round_trip(ours.state_dict()))
    assert torch.equal(theirs2.state[c[0].weight]["absmax1"], ours.state[b[0].weight]["absmax1"])


# --- configuration ---------------------------------------------------------------------------
def test_global_optim_manager_overrides():
    model = _model()
    mng = O.GlobalOptimManager.get_instance()
    assert mng is O.GlobalOptimManager.get_instance()
    with pytest.raises(RuntimeError, match="get_instance"):
        O.GlobalOptimManager()
    mng.register_parameters(model.parameters())
    mng.override_config(model[0].weight, "optim_bits", 32)
    mng.register_module_override(model[2], "weight", {"lr": 0.0})
    opt = O.AdamW8bit(model.parameters(), min_8bit_size=256)
    w2 = model[2].weight.detach().clone()
    _train(model, opt, 2)
    assert opt.state[model[0].weight]["state1"].dtype == torch.float32   # overridden to 32-bit
    assert opt.state[model[2].weight]["state1"].dtype == torch.uint8     # 512 >= 256: 8-bit
    # lr 0 with decay 1e-2: decay factor 1 - 0 = 1, so the weight never moves
    assert torch.equal(model[2].weight, w2)
    with pytest.raises(ValueError, match="unknown optimizer override key 'lrr'"):
        mng.override_config(model[0].weight, "lrr", 1.0)
    with pytest.raises(ValueError, match="optim_bits"):
        mng.override_config(model[0].weight, key_value_dict={"optim_bits": 4})
    with pytest.raises(ValueError, match="no parameter 'wieght'"):
        mng.register_module_override(model[0], "wieght", {"lr": 1.0})


def test_min_8bit_size_uses_the_global_numel():
    """A DTensor shard smaller than min_8bit_size still gets 8-bit state when the full
    parameter is large enough (the decision never looks at the local shard)."""
    p = torch.nn.Parameter(torch.zeros(8192))  # stands in for a DTensor: global shape ...
    local = torch.zeros(1000)                    # ... and a local shard
    p.to_local = lambda: local                   # what DTensor offers and _local() uses
    opt = O.AdamW8bit([p])
    p.grad = torch.ones(8192)
    p.grad.to_local = lambda: torch.full((1000,), 0.5)
    opt.step()
    st = opt.state[p]
    assert st["state1"].dtype == torch.uint8 and st["state1"].numel() == 1000
    assert st["absmax1"].numel() == 4 and (local != 0).all()


@pytest.mark.parametrize("make, err, match", [
    (lambda ps: O.AdamW8bit(ps, betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
    (lambda ps: O.AdamW8bit(ps, betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
    (lambda ps: O.Adam8bit(ps, lr=-1e-3), ValueError, "lr must be"),
    (lambda ps: O.Adam8bit(ps, amsgrad=True), ValueError, "amsgrad"),
    (lambda ps: O.Adam8bit(ps, optim_bits=8), ValueError, "optim_bits"),
    (lambda ps: O.Adam(ps, optim_bits=4), ValueError, "optim_bits"),
    (lambda ps: O.AdamW8bit(ps, max_unorm=1.0), ValueError, "max_unorm"),
    (lambda ps: O.AdamW8bit(ps, percentile_clipping=0), ValueError, "percentile_clipping"),
    (lambda ps: O.AdamW8bit(ps, nonfinite="ignore"), ValueError, "nonfinite"),
    (lambda ps: O.AdamW8bit(ps, eps=-1.0), ValueError, "eps"),
    (lambda ps: O.AdamW8bit(ps, block_wise=False), ValueError, "block_wise"),
])
def test_bad_options_are_rejected(make, err, match):
    with pytest.raises(err, match=match):
        make([torch.nn.Parameter(torch.zeros(10))])


def test_bad_parameters_and_gradients_are_rejected():
    with pytest.raises(TypeError, match="complex"):
        O.AdamW8bit([torch.nn.Parameter(torch.zeros(4, dtype=torch.complex64))])
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = O.AdamW8bit(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradient"):
        opt.step()
    p = torch.nn.Parameter(torch.zeros(10))
    opt = O.AdamW8bit([p])
    p.grad = torch.ones(10)
    opt.step()
    opt.state[p]["state1"] = opt.state[p]["state1"].to("meta")  # state elsewhere than p
    with pytest.raises(ValueError, match="is on cpu but its optimizer state state1 is on meta"):
        opt.step()


def test_load_state_dict_rejects_mismatches():
    a = _model()
    opt = O.AdamW8bit(a.parameters(), min_8bit_size=1024)
    _train(a, opt, 1)
    sd = opt.state_dict()
    other = O.AdamW8bit(torch.nn.Linear(3, 3).parameters())
    with pytest.raises(ValueError, match="parameter group 0 has 4 parameters"):
        other.load_state_dict(sd)
    sd["state"][0][O.QUANT_STATE_KEY]["absmax1"] = torch.zeros(3)
    with pytest.raises(ValueError, match="absmax1 must be"):
        O.AdamW8bit(_model().parameters(), min_8bit_size=1024).load_state_dict(sd)


# --- non-finite gradients --------------------------------------------------------------------
def test_nonfinite_gradient_skip_warns_and_never_poisons_state():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1000) * 0.1)
    opt = O.AdamW8bit([p], min_8bit_size=0)
    p.grad = torch.randn(1000) * 0.01
    opt.step()
    before = p.detach().clone()
    g = torch.randn(1000) * 0.01
    g[3], g[700] = float("nan"), float("inf")
    p.grad = g
    with pytest.warns(RuntimeWarning, match="2 gradient element"):
        opt.step()
    st = opt.state[p]
    assert p[3] == before[3] and p[700] == before[700]
    assert (p != before).sum() > 900 and torch.isfinite(p).all()
    assert torch.isfinite(st["absmax1"]).all() and torch.isfinite(st["absmax2"]).all()
    assert st["state1"][3] == 127 and st["state2"][700] == 0     # moments reset to 0
    assert opt.nonfinite_count() == 2
    p.grad = torch.randn(1000) * 0.01
    opt.step()
    assert torch.isfinite(p).all()


def test_nonfinite_gradient_raise_changes_nothing():
    """Every gradient is checked before any parameter is touched: p, which comes before the
    NaN in q's gradient, is left as it was too."""
    p = torch.nn.Parameter(torch.randn(5000))
    q = torch.nn.Parameter(torch.randn(5000))
    opt = O.AdamW8bit([p, q], nonfinite="raise")
    p.grad, q.grad = torch.randn(5000), torch.randn(5000)
    opt.step()
    snaps = {x: {k: v.clone() if isinstance(v, torch.Tensor) else v
                 for k, v in opt.state[x].items()} for x in (p, q)}
    values = {x: x.detach().clone() for x in (p, q)}
    p.grad, q.grad = torch.randn(5000), torch.full((5000,), float("nan"))
    with pytest.raises(FloatingPointError, match=r"param_groups\[0\]\['params'\]\[1\]"):
        opt.step()
    for x in (p, q):
        assert torch.equal(x, values[x]) and opt.state[x]["step"] == 1
        assert all(torch.equal(v, opt.state[x][k]) if isinstance(v, torch.Tensor)
                   else v == opt.state[x][k] for k, v in snaps[x].items())


def test_grad_scaler_skips_a_step_with_inf():
    model = _model()
    opt = O.AdamW8bit(model.parameters(), min_8bit_size=1024)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = torch.randn(16, 96), torch.randn(16, 8)
    for bad in (False, True, False):
        opt.zero_grad()
        scaler.scale(((model(x) - y) ** 2).mean()).backward()
        if bad:
            model[0].weight.grad[0, 0] = float("inf")
            snap = [p.detach().clone() for p in model.parameters()]
            state = opt.state[model[0].weight]["state1"].clone()
        scaler.step(opt)
        scaler.update()
        if bad:
            assert all(torch.equal(a, b) for a, b in zip(snap, model.parameters()))
            assert torch.equal(state, opt.state[model[0].weight]["state1"])
            assert scaler.get_scale() == 512.0
    assert opt.state[model[0].weight]["step"] == 2


def test_percentile_clipping_and_max_unorm_on_cpu():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5000) * 0.1)
    opt = O.AdamW8bit([p], percentile_clipping=5)
    p.grad = torch.randn(5000) * 0.01
    opt.step()
    ring = opt.state[p]["gnorm_vec"]
    assert torch.allclose(ring, ring[0].expand(100)) and ring[0] > 0
    assert set(opt.state_dict()["state"][0][O.QUANT_STATE_KEY]) >= {"gnorm_vec"}
    q = torch.nn.Parameter(torch.full((1000,), 1e-3))
    opt32 = O.Adam32bit([q], lr=1.0, max_unorm=0.01)
    q.grad = torch.ones(1000)
    opt32.step()
    # step 1: update = m_hat / (sqrt(v_hat) + eps) ~ 1 per element, norm ~ sqrt(1000), far
    # above 0.01 * ||p||: the step is scaled down to exactly that norm
    moved = (q.detach() - 1e-3).norm().item()
    assert moved == pytest.approx(0.01 * (1e-3 * np.sqrt(1000)), rel=1e-4)


def test_paged_optimizer_on_cpu_warns_and_works():
    p = torch.nn.Parameter(torch.randn(5000))
    with pytest.warns(RuntimeWarning, match="paging is ignored"):
        opt = O.PagedAdamW8bit([p])
        p.grad = torch.randn(5000)
        opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8


# --- distributed: DDP over gloo, 2 processes --------------------------------------------------
def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = DDP(_model())
    opt = O.AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=1024)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, y = torch.randn(2, 16, 96, generator=gen), torch.randn(2, 16, 8, generator=gen)
        opt.zero_grad()
        ((model(x[rank]) - y[rank]) ** 2).mean().backward()
        opt.step()
    if rank == 0:
        torch.save([p.detach() for p in model.module.parameters()], out)
    # DDP's reducer goes before its process group: freed after destroy_process_group, its
    # destructor joins a gloo thread that waits for the GIL it holds (a suite hung here)
    del model, opt
    gc.collect()
    dist.destroy_process_group()


def test_ddp_gloo_two_processes_match_single_process(tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    model = _model()
    opt = O.AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=1024)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, y = torch.randn(2, 16, 96, generator=gen), torch.randn(2, 16, 8, generator=gen)
        opt.zero_grad()
        # DDP averages the two ranks' gradients: (g0 + g1) / 2, as this loss' gradient
        # (halving is exact, and autograd adds the two parts as the all-reduce does)
        (((model(x[0]) - y[0]) ** 2).mean() * 0.5 + ((model(x[1]) - y[1]) ** 2).mean() * 0.5).backward()
        opt.step()
    assert opt.state[model[0].weight]["state1"].dtype == torch.uint8
    for a, b in zip(got, model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


# --- the public array API ---------------------------------------------------------------------
def test_array_api_numpy_and_torch_cpu():
    import qkernels.optim as qo
    rng = np.random.default_rng(0)
    p = rng.standard_normal(600).astype(np.float32)
    g = rng.standard_normal(600).astype(np.float32)
    s1, s2 = np.full(600, 127, np.uint8), np.zeros(600, np.uint8)
    a1, a2 = np.zeros(3, np.float32), np.zeros(3, np.float32)
    want = [x.copy() for x in (p, s1, s2, a1, a2)]
    ref.optimizer_update_8bit_blockwise(want[0], g, want[1], want[2], want[3], want[4], Q1, Q2,
                                        ref.adam_scalars(1e-3, (0.9, 0.99), 1e-8, 0.0, 1))
    tp = torch.from_numpy(p.copy()).reshape(20, 30)
    targs = [torch.from_numpy(x.copy()) for x in (s1, s2, a1, a2)]
    qo.optimizer_update_8bit_blockwise(tp, torch.from_numpy(g).reshape(20, 30), *targs,
                                       lr=1e-3, betas=(0.9, 0.99), step=1)
    for got, w in zip([tp.reshape(-1)] + targs, want):
        np.testing.assert_array_equal(got.numpy(), w)
    with pytest.raises(ValueError, match="absmax1 must be float32 with 3 elements"):
        qo.optimizer_update_8bit_blockwise(p, g, s1, s2, a1[:2], a2, lr=1e-3, step=1)
    with pytest.raises(ValueError, match="g must match p"):
        qo.optimizer_update_8bit_blockwise(p, g.astype(np.float16), s1, s2, a1, a2, lr=1e-3, step=1)
    with pytest.raises(ValueError, match="step must be"):
        qo.optimizer_update_8bit_blockwise(p, g, s1, s2, a1, a2, lr=1e-3, step=0)
    with pytest.raises(TypeError, match="p must be"):
        qo.optimizer_update_32bit(s1, s1, a1, a2, lr=1e-3, step=1)


# --- GPU: every backend bit for bit against the reference -------------------------------------
GPU_SIZES = [1, 7, 255, 256, 257, 4095, 4097, 65536 + 13, 1 << 20]


def _gpu_case(n, dtype, seed, device="cuda"):
    rng = np.random.default_rng(seed)
    p32 = round_to((rng.standard_normal(n) * 0.1).astype(np.float32), dtype)
    gs = []
    for step in range(4):
        g32 = round_to((rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 0)).astype(np.float32), dtype)
        if step == 0 and n > 300:
            g32[:256] = 0.0                       # an all-zero block
        if step == 2:
            g32[rng.integers(0, n, 3)] = [np.nan, np.inf, -np.inf]
        gs.append(g32)
    return p32, gs


def _torch_raw(x32, dtype, device):
    return torch.from_numpy(np.ascontiguousarray(x32)).to(TORCH_DTYPES[dtype]).to(device)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends() or ["cupy"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", GPU_SIZES)
def test_gpu_8bit_kernel_matches_reference(backend, dtype, n):
    import qkernels
    import qkernels.optim as qo
    p32, gs = _gpu_case(n, dtype, seed=n)
    nb = -(-n // 256)
    host = [_storage(p32, dtype), np.full(n, 127, np.uint8), np.zeros(n, np.uint8),
            np.zeros(nb, np.float32), np.zeros(nb, np.float32)]
    dev = [_torch_raw(p32, dtype, "cuda"), torch.full((n,), 127, dtype=torch.uint8, device="cuda"),
           torch.zeros(n, dtype=torch.uint8, device="cuda"), torch.zeros(nb, device="cuda"),
           torch.zeros(nb, device="cuda")]
    count = torch.zeros(1, dtype=torch.int32, device="cuda")
    want_count = 0
    for step, g32 in enumerate(gs, 1):
        kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, step=step,
                  gnorm_scale=0.75 if step == 3 else 1.0)
        want_count += ref.optimizer_update_8bit_blockwise(
            host[0], _storage(g32, dtype), *host[1:], Q1, Q2,
            ref.adam_scalars(kw["lr"], kw["betas"], kw["eps"], kw["weight_decay"], step,
                             kw["gnorm_scale"]), dtype)
        with qkernels.use_backend(backend):
            qo.optimizer_update_8bit_blockwise(dev[0], _torch_raw(g32, dtype, "cuda"), *dev[1:],
                                               nonfinite=count, **kw)
        got_p = dev[0].cpu()
        got_p = got_p.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else got_p.numpy()
        np.testing.assert_array_equal(got_p.view(np.uint8), host[0].view(np.uint8), err_msg=f"p step {step}")
        for name, d, h in zip(("state1", "state2", "absmax1", "absmax2"), dev[1:], host[1:]):
            np.testing.assert_array_equal(d.cpu().numpy(), h, err_msg=f"{name} step {step}")
    assert int(count.item()) == want_count > 0


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends() or ["cupy"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 257, 4097, 65536 + 13])
def test_gpu_32bit_kernel_matches_reference(backend, dtype, n):
    import qkernels
    import qkernels.optim as qo
    p32, gs = _gpu_case(n, dtype, seed=n + 1)
    host = [_storage(p32, dtype), np.zeros(n, np.float32), np.zeros(n, np.float32)]
    dev = [_torch_raw(p32, dtype, "cuda"), torch.zeros(n, device="cuda"), torch.zeros(n, device="cuda")]
    for step, g32 in enumerate(gs, 1):
        uscale = np.float32(0.5) if step == 2 else np.float32(1.0)
        ref.optimizer_update_32bit(host[0], _storage(g32, dtype), host[1], host[2],
                                   ref.adam_scalars(1e-3, (0.9, 0.999), 1e-8, 0.0, step), dtype, uscale)
        with qkernels.use_backend(backend):
            qo.optimizer_update_32bit(dev[0], _torch_raw(g32, dtype, "cuda"), dev[1], dev[2],
                                      lr=1e-3, step=step, update_scale=uscale)
        got = dev[0].cpu()
        got = got.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else got.numpy()
        np.testing.assert_array_equal(got.view(np.uint8), host[0].view(np.uint8))
        np.testing.assert_array_equal(dev[1].cpu().numpy(), host[1])
        np.testing.assert_array_equal(dev[2].cpu().numpy(), host[2])


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:paged optimizers:RuntimeWarning")
@pytest.mark.parametrize("cls", [O.AdamW8bit, O.PagedAdamW8bit, O.Adam32bit])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_optimizer_matches_cpu_optimizer(cls, dtype):
    """The whole optimizer on CUDA (CuPy kernels, raw pointers, torch's stream) against the
    same optimizer on CPU (the reference): bit for bit, state_dict included."""
    gt = TORCH_DTYPES[dtype]
    torch.manual_seed(0)
    params = [torch.randn(shape, dtype=gt) * 0.1 for shape in [(1000, 300), (4097,), (31,)]]
    cpu = [torch.nn.Parameter(p.clone()) for p in params]
    gpu = [torch.nn.Parameter(p.clone().cuda()) for p in params]
    oc, og = cls(cpu, lr=1e-3), cls(gpu, lr=1e-3)
    side = torch.cuda.Stream()
    for step in range(3):
        for a, b in zip(cpu, gpu):
            g = (torch.randn(a.shape) * 0.01).to(gt)
            a.grad, b.grad = g.clone(), g.cuda()
        oc.step()
        with torch.cuda.stream(side):   # a non-default stream: kernels must follow it
            side.wait_stream(torch.cuda.current_stream())
            og.step()
        torch.cuda.current_stream().wait_stream(side)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a.detach(), b.detach().cpu())
        for k, v in oc.state[a].items():
            w = og.state[b][k]
            assert torch.equal(v, w.cpu()) if isinstance(v, torch.Tensor) else v == w
    if cls is O.PagedAdamW8bit:
        assert getattr(og.state[gpu[0]]["state1"], "is_paged", False)


@pytest.mark.gpu
def test_gpu_fused_launch_is_graph_capturable_on_torch_stream():
    """The optimizers' hot path (raw pointers, torch's current stream) captured in a CUDA
    graph and replayed gives the eager result."""
    from qkernels.optim import _cupy
    n = 3 * 65536 + 5
    torch.manual_seed(0)

    def fresh():
        return [torch.randn(n, device="cuda") * 0.1, torch.randn(n, device="cuda") * 0.01,
                torch.full((n,), 127, dtype=torch.uint8, device="cuda"),
                torch.zeros(n, dtype=torch.uint8, device="cuda"),
                torch.zeros(-(-n // 256), device="cuda"), torch.zeros(-(-n // 256), device="cuda")]
    a = fresh()
    b = [t.clone() for t in a]
    s = ref.adam_scalars(1e-3, (0.9, 0.999), 1e-8, 0.0, 1)

    def launch(ts):
        _cupy.optimizer_update_8bit_blockwise(*(t.data_ptr() for t in ts), qmap1=Q1, qmap2=Q2, n=n,
                                              dtype="float32", scalars=s,
                                              stream=torch.cuda.current_stream().cuda_stream)
    launch(a)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        launch([t.clone() for t in b])  # warm-up (compiles, caches tables) outside capture
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=side):
            launch(b)
    graph.replay()
    torch.cuda.synchronize()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.gpu
def test_gpu_nonfinite_is_counted_without_poisoning_and_warned_later():
    p = torch.nn.Parameter(torch.randn(10000, device="cuda"))
    opt = O.AdamW8bit([p])
    g = torch.randn(10000, device="cuda")
    g[5] = float("nan")
    p.grad = g
    opt.step()
    with pytest.warns(RuntimeWarning, match="1 gradient element"):
        assert opt.nonfinite_count() == 1
    assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["absmax1"]).all()
    q = torch.nn.Parameter(torch.randn(10000, device="cuda"))
    opt = O.AdamW8bit([q], nonfinite="raise")
    q.grad = g
    with pytest.raises(FloatingPointError):
        opt.step()


@pytest.mark.gpu
def test_gpu_percentile_clipping_and_numba_backend_optimizer():
    import qkernels
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5000) * 0.1) for _ in range(3)]
    cpu, cup, nba = ([torch.nn.Parameter(p.detach().clone().to(d)) for p in ps]
                     for d in ("cpu", "cuda", "cuda"))
    oc = O.AdamW8bit(cpu, percentile_clipping=50)
    og = O.AdamW8bit(cup, percentile_clipping=50)
    on = O.AdamW8bit(nba)
    oc2 = O.AdamW8bit([torch.nn.Parameter(p.detach().clone()) for p in ps])
    for step in range(3):
        for group in (cpu, cup, nba, oc2.param_groups[0]["params"]):
            torch.manual_seed(step)
            for p in group:
                p.grad = (torch.randn(5000) * 0.01 * (10 if step == 2 else 1)).to(p.device)
        oc.step()
        og.step()
        oc2.step()
        with qkernels.use_backend("numba"):
            on.step()
    for a, b in zip(cpu, cup):  # gnorm sums differ in order: float32 rounding only
        torch.testing.assert_close(a.detach(), b.detach().cpu(), rtol=1e-5, atol=1e-7)
    for a, b in zip(oc2.param_groups[0]["params"], nba):
        assert torch.equal(a.detach(), b.detach().cpu())


@pytest.mark.parametrize("cls", ["StableEmbedding", "Embedding"])
def test_embeddings_keep_32bit_state_and_their_forward(cls):
    """bitsandbytes' StableEmbedding / Embedding: Xavier-uniform init with the padding row
    zero, 32-bit optimizer state for the weight (large enough for 8-bit otherwise), and for
    StableEmbedding a LayerNorm of the looked-up rows in the default dtype."""
    import torch_ops
    torch.manual_seed(0)
    emb = getattr(torch_ops, cls)(1000, 64, padding_idx=3)
    head = torch.nn.Linear(64, 64)
    assert torch.equal(emb.weight[3], torch.zeros(64))
    bound = (6 / (1000 + 64)) ** 0.5   # Xavier-uniform's limit
    assert emb.weight.abs().max() <= bound and emb.weight.abs().max() > 0.9 * bound
    ids = torch.tensor([[1, 3, 999], [0, 5, 5]])
    out = emb(ids)
    looked_up = torch.nn.functional.embedding(ids, emb.weight, padding_idx=3)
    want = emb.norm(looked_up) if cls == "StableEmbedding" else looked_up
    assert out.shape == (2, 3, 64) and torch.equal(out, want)
    opt = O.AdamW8bit(list(emb.parameters()) + list(head.parameters()), min_8bit_size=1024)
    head(emb(ids)).sum().backward()
    opt.step()
    assert opt.state[emb.weight]["state1"].dtype == torch.float32     # 64000 elements, kept 32-bit
    assert opt.state[head.weight]["state1"].dtype == torch.uint8      # 4096 >= 1024: 8-bit
    half = getattr(torch_ops, cls)(10, 8, dtype=torch.bfloat16)
    assert half(torch.tensor([1, 2])).dtype == torch.bfloat16
