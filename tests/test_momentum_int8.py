"""The fused AdamW + 8-bit momentum step: AdamW exactness, the EMA bar, shapes, zero blocks, checkpoints."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mgrpo_kernels.momentum_int8 import (
    QUANT_BLOCK,
    FusedAdamWInt8Momentum,
    dequantize_delta,
    launch_fused_step,
    new_delta_state,
    quantize_delta_reference,
    reference_adamw_int8_momentum_step,
)

from .conftest import requires_gpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def params_of(sizes, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((0.02 * torch.randn(n, generator=g, dtype=torch.float64)).to(DEVICE, dtype))
            for n in sizes]


def test_adamw_part_equals_torch_adamw():
    sizes = [1, 255, 257, 3001, 0]
    ours, theirs = params_of(sizes, 0), params_of(sizes, 0)
    opt = FusedAdamWInt8Momentum(ours, lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1, momentum=0.9)
    ref = torch.optim.AdamW(theirs, lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(ours, theirs):
            grad = torch.randn(a.shape, generator=g).to(DEVICE)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(opt.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"], atol=1e-9, rtol=1e-5)


def test_kernel_equals_reference_step_in_distribution():
    """Same AdamW result as the plain-PyTorch reference; the delta agrees within one quantization step."""
    (p,), (q,) = params_of([1000], 3), params_of([1000], 3)
    grad = torch.randn(1000, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    codes, scales = new_delta_state(p)
    codes.copy_(torch.randint(-127, 128, (1000,)).to(torch.int8))
    scales.fill_(1e-5)
    c2, s2 = codes.clone(), scales.clone()
    state = [torch.zeros(1000, device=DEVICE), torch.zeros(1000, device=DEVICE)]
    state2 = [torch.zeros(1000, device=DEVICE), torch.zeros(1000, device=DEVICE)]
    launch_fused_step([p.data], [grad], [state[0]], [state[1]], [codes], [scales], step=1, lr=1e-4, beta1=0.9,
                      beta2=0.999, eps=1e-8, weight_decay=0.01, momentum=0.99, seed=5)
    reference_adamw_int8_momentum_step(q.data, grad, state2[0], state2[1], c2, s2, step=1, lr=1e-4, beta1=0.9,
                                       beta2=0.999, eps=1e-8, weight_decay=0.01, momentum=0.99)
    torch.testing.assert_close(p, q, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(scales, s2, atol=1e-12, rtol=1e-5)
    d1, d2 = dequantize_delta(codes, scales), dequantize_delta(c2, s2)
    assert (d1 - d2).abs().max() <= scales.repeat_interleave(QUANT_BLOCK)[:1000].max() * 1.0001


def test_stochastic_rounding_is_unbiased():
    x = torch.full((QUANT_BLOCK * 400,), 0.3) * torch.linspace(-1, 1, QUANT_BLOCK * 400)
    codes, scales = quantize_delta_reference(x, torch.Generator().manual_seed(0))
    err = dequantize_delta(codes, scales) - x
    assert err.abs().max() <= scales.max() * 1.0001          # within one step
    assert abs(err.mean().item()) < 0.02 * scales.max().item()  # unbiased on average


BAR_STEPS = 200   # two horizons of m = 0.99 (the EMA forgets an error older than ~1 / (1 - m) = 100 steps): the
                  # ratio is near its steady state by then (measured 0.027, 0.031, 0.032 at steps 100, 200, 300),
                  # and under the interpreter each step costs ~0.2 s, so a third horizon bought 0.001 for ~30 CPU
                  # seconds of the suite. The GPU test runs 1000 at scale.


def bar_ratios(params, opt, m, momentum_weights) -> list:
    """The bar's measurement: BAR_STEPS steps of a persistent drift plus noise as gradients; every 100 steps
    ||k_hat - k_ref|| / ||k_ref - q||, k_ref being the float64 EMA of what the policy stores."""
    k_ref = [p.detach().double().clone() for p in params]
    g = torch.Generator().manual_seed(11)
    drift = [torch.randn(p.shape, generator=g).to(DEVICE) for p in params]
    ratios = []
    for step in range(1, BAR_STEPS + 1):
        for p, d in zip(params, drift):
            p.grad = d + torch.randn(p.shape, generator=g).to(DEVICE)
        opt.step()
        for k, p in zip(k_ref, params):
            k.mul_(m).add_(p.detach().double(), alpha=1 - m)
        if step % 100 == 0:
            k_hat = torch.cat([w.double().reshape(-1) for w in momentum_weights()])
            k_exact, q = torch.cat(k_ref), torch.cat([p.detach().double() for p in params])
            ratios.append(((k_hat - k_exact).norm() / (k_exact - q).norm()).item())
    return ratios


def test_the_bar_tracks_the_exact_ema():
    """The issue's bar: weights N(0, 0.02) incl. sizes 1, 255, 257 and a prime above 65536; Adam-like steps of
    about 1e-6 with a persistent drift plus noise (BAR_STEPS of them here, 1000 in the GPU test); m = 0.99. At
    every checkpoint
    ||k_hat - k_ref|| / ||k_ref - q|| <= 0.05, k_ref being the float64 EMA of the policy."""
    sizes = [1, 255, 257, 65537]
    params = params_of(sizes, 10)
    m = 0.99
    opt = FusedAdamWInt8Momentum(params, lr=1e-6, momentum=m, seed=3)
    ratios = bar_ratios(params, opt, m, lambda: opt.momentum_weights(torch.float32))
    assert max(ratios) <= 0.05, ratios
    assert min(ratios) > 0   # it is an approximation: an exact 0 would mean the test compared a thing to itself


def test_the_bar_holds_with_bitsandbytes_8bit_adamw():
    """The same bar with bitsandbytes' AdamW8bit as the optimizer: the int8 momentum model then updates in the
    optimizer's per-parameter hook (before/after copies, the delta kernel) and must still track the exact EMA of
    what the policy stores. 8-bit moments make noisier steps, which the delta must follow all the same."""
    pytest.importorskip("bitsandbytes")
    from mgrpo.build import make_momentum_and_optimizer
    from mgrpo.config import AlgorithmConfig, OptimConfig
    sizes = [1, 255, 257, 4099]   # 4099: prime, above bitsandbytes' 4096-element threshold for 8-bit state
    params = params_of(sizes, 10)
    m = 0.99
    momentum, opt = make_momentum_and_optimizer([(str(i), p) for i, p in enumerate(params)],
                                                AlgorithmConfig(momentum=m, momentum_dtype="int8"),
                                                OptimConfig(name="adamw8bit", lr=1e-6, warmup_steps=0), seed=3)
    assert not momentum.optimizer_holds_state and len(opt.state) == len(params)
    ratios = bar_ratios(params, opt, m, lambda: momentum.local_weights(torch.float32))
    assert max(ratios) <= 0.05, ratios
    assert min(ratios) > 0
    assert momentum.bytes_per_parameter() < 1.05


def test_fused_kernel_rounds_without_bias():
    """The fused kernel's own stochastic rounding (test_stochastic_rounding_is_unbiased checks the reference's):
    one step d <- m (d - dq) from the same state under 16 seeds; the error against the exact value is within a
    code step everywhere and, averaged, far below the half step a rounding that is not stochastic would leave."""
    n, m = QUANT_BLOCK * 16, 0.99
    gen = torch.Generator().manual_seed(3)
    codes0 = torch.randint(-127, 128, (n,), generator=gen).to(torch.int8)
    scales0 = torch.rand(n // QUANT_BLOCK, generator=gen) * 1e-4 + 1e-5
    grad = torch.randn(n, generator=gen)
    errors, steps = [], []
    for seed in range(16):
        (p,) = params_of([n], 0)
        opt = FusedAdamWInt8Momentum([p], lr=1e-4, momentum=m, seed=seed)
        state = opt.state[p]
        state["codes"].copy_(codes0.to(DEVICE))
        state["scales"].copy_(scales0.to(DEVICE))
        before = p.detach().clone()
        p.grad = grad.clone().to(DEVICE)
        opt.step()
        exact = m * (dequantize_delta(codes0, scales0) - (p.detach() - before).cpu().double().float())
        errors.append(dequantize_delta(state["codes"].cpu(), state["scales"].cpu()) - exact)
        steps.append(state["scales"].cpu().repeat_interleave(QUANT_BLOCK)[:n])
    errors, steps = torch.stack(errors), torch.stack(steps)                        # [seeds, n]
    assert bool((errors.abs() <= steps * 1.0001).all())                              # within one code step
    assert not torch.equal(errors[0], errors[1])                                     # the seed changes the rounding
    assert abs(float((errors / steps).mean())) < 0.02                                # unbiased: mean << 0.5 step


def test_delta_kernel_equals_the_reference_in_distribution():
    """The delta-only kernel: d <- m (d - (after - before)), as the fused kernel's second half."""
    from mgrpo_kernels.momentum_int8 import launch_delta_ema
    (before,) = params_of([1000], 4)
    after = before.detach() + 1e-4 * torch.randn(1000, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    codes, scales = new_delta_state(before)
    codes.copy_(torch.randint(-127, 128, (1000,)).to(torch.int8))
    scales.fill_(1e-5)
    expected = 0.99 * (dequantize_delta(codes, scales) - (after - before.detach()))
    launch_delta_ema(before.detach().contiguous(), after.contiguous(), codes, scales, momentum=0.99, seed=5, tensor_id=0)
    got = dequantize_delta(codes, scales)
    assert (got - expected).abs().max() <= scales.repeat_interleave(QUANT_BLOCK)[:1000].max() * 1.0001
    assert abs(float((got - expected).mean())) < 0.05 * float(scales.max())     # unbiased


def test_zero_blocks_never_divide_by_zero():
    params = params_of([300, 1], 1)
    opt = FusedAdamWInt8Momentum(params, lr=0.0, momentum=0.99)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, w in zip(params, opt.momentum_weights(torch.float32)):
        s = opt.state[p]
        assert (s["scales"] == 0).all() and (s["codes"] == 0).all()
        assert torch.equal(w, p.detach())


def test_parameters_without_gradient_still_decay_the_delta():
    """No gradient: AdamW leaves theta_q alone (as torch does) but theta_k still moves: d <- m d."""
    (p,) = params_of([512], 2)
    opt = FusedAdamWInt8Momentum([p], lr=1e-2, momentum=0.5)
    p.grad = torch.ones_like(p)
    opt.step()
    before = p.detach().clone()
    d1 = dequantize_delta(opt.state[p]["codes"], opt.state[p]["scales"])
    p.grad = None
    opt.step()
    assert torch.equal(p.detach(), before)
    d2 = dequantize_delta(opt.state[p]["codes"], opt.state[p]["scales"])
    torch.testing.assert_close(d2, 0.5 * d1, atol=float(opt.state[p]["scales"].max()) * 1.001, rtol=0)


def test_bf16_parameters_form_their_own_group():
    fp32 = params_of([700], 5)
    bf16 = params_of([300], 6, torch.bfloat16)
    ref32, ref16 = params_of([700], 5), params_of([300], 6, torch.bfloat16)
    for p, r in zip(fp32 + bf16, ref32 + ref16):
        grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(DEVICE, p.dtype)
        p.grad, r.grad = grad.clone(), grad.clone()
    opt = FusedAdamWInt8Momentum(fp32 + bf16, lr=1e-3)
    launches = launch_fused_step(
        [p.data for p in fp32 + bf16], [p.grad for p in fp32 + bf16],
        [opt.state[p]["exp_avg"] for p in fp32 + bf16], [opt.state[p]["exp_avg_sq"] for p in fp32 + bf16],
        [opt.state[p]["codes"] for p in fp32 + bf16], [opt.state[p]["scales"] for p in fp32 + bf16],
        step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, momentum=0.99, seed=0)
    assert launches == 2
    torch.optim.AdamW(ref32, lr=1e-3).step()
    torch.testing.assert_close(fp32[0], ref32[0], atol=1e-7, rtol=1e-5)
    # bf16: fp32 math then one rounding to bf16 (the interpreter truncates: allow one bf16 ulp)
    ref_fp32 = ref16[0].detach().float() - 1e-3 * torch.sign(ref16[0].grad.float())
    torch.testing.assert_close(bf16[0].float(), ref_fp32, atol=0, rtol=2 ** -7)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 3), st.integers(250, 600)), min_size=1, max_size=5),
       st.floats(0.0, 0.999))
def test_shapes_property(sizes, m):
    """Any mix of sizes (empty and one-element included): AdamW exact, codes bounded, delta finite."""
    ours, theirs = params_of(sizes, sum(sizes)), params_of(sizes, sum(sizes))
    opt = FusedAdamWInt8Momentum(ours, lr=1e-3, momentum=m)
    ref = torch.optim.AdamW(theirs, lr=1e-3, weight_decay=0.0)
    for _ in range(2):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape).to(DEVICE)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
        s = opt.state[a]
        assert s["codes"].numel() == a.numel() and s["scales"].numel() == math.ceil(a.numel() / QUANT_BLOCK)
        assert torch.isfinite(dequantize_delta(s["codes"], s["scales"])).all()
        assert (s["codes"].int().abs() <= 127).all() and (s["scales"] >= 0).all()


def test_state_bytes_and_checkpoint_roundtrip():
    params = params_of([65536, 4096], 7)
    opt = FusedAdamWInt8Momentum(params, lr=1e-4, momentum=0.99)
    assert opt.momentum_state_bytes() / sum(p.numel() for p in params) <= 1.05
    for p in params:
        p.grad = torch.randn(p.shape).to(DEVICE)
    opt.step()
    saved = opt.state_dict()
    restored_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = FusedAdamWInt8Momentum(restored_params, lr=1e-4, momentum=0.99)
    opt2.load_state_dict(saved)
    for p, q in zip(params, restored_params):
        g = torch.randn(p.shape).to(DEVICE)
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    for p, q in zip(params, restored_params):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["codes"], opt2.state[q]["codes"])
        assert opt2.state[q]["scales"].dtype == torch.float32


@requires_gpu
@pytest.mark.gpu
def test_gpu_bar_at_scale():
    """The bar on a GPU at millions of parameters, bf16-free fp32 master weights as in training."""
    sizes = [1, 255, 257, 65537, 4_000_037]
    params = params_of(sizes, 12)
    opt = FusedAdamWInt8Momentum(params, lr=1e-6, momentum=0.99, seed=1)
    k_ref = [p.detach().double().clone() for p in params]
    drift = [torch.randn_like(p) for p in params]
    for step in range(1, 1001):
        for p, d in zip(params, drift):
            p.grad = d + torch.randn_like(p)
        opt.step()
        for k, p in zip(k_ref, params):
            k.mul_(0.99).add_(p.detach().double(), alpha=0.01)
        if step % 250 == 0:
            k_hat = torch.cat([w.double() for w in opt.momentum_weights(torch.float32)])
            k_exact, q = torch.cat(k_ref), torch.cat([p.detach().double() for p in params])
            assert ((k_hat - k_exact).norm() / (k_exact - q).norm()).item() <= 0.05


def test_program_table_is_built_once_per_shape_set_and_covers_every_block():
    """Which tensor and first block each program takes: every quantization block of every tensor exactly once,
    ragged and empty tensors included; a second step with the same shapes reuses the cached device tables (no
    per-step work proportional to the model), other shapes get their own."""
    from mgrpo_kernels.momentum_int8 import program_table
    numels = (1, 255, 256, 257, 0, 5000, 3 * 256 * 4 + 1)
    tensor, block = program_table(numels, 4, torch.device("cpu"))
    covered = {(int(t), int(b) + i) for t, b in zip(tensor, block) for i in range(4)
               if int(b) + i < math.ceil(numels[int(t)] / QUANT_BLOCK)}
    expected = {(t, b) for t, n in enumerate(numels) for b in range(math.ceil(n / QUANT_BLOCK))}
    assert covered == expected
    assert len(tensor) == sum(math.ceil(math.ceil(n / QUANT_BLOCK) / 4) for n in numels)   # no idle programs
    again = program_table(numels, 4, torch.device("cpu"))
    assert again[0] is tensor and again[1] is block
    assert program_table(numels[:-1], 4, torch.device("cpu"))[0] is not tensor
