"""
The test suite: CPU only, tiny networks, 16-32 px; `python -m pytest -q test_all.py` (a few minutes
on 2 cores). Formulas are checked against independent hand computations, gradients against autograd
identities, training against resume and DDP (2 gloo processes) equivalence.
"""
import contextlib
import copy
import glob
import hashlib
import inspect
import io
import itertools
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import types
import zipfile

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import attention  # noqa: E402
import data  # noqa: E402
import losses  # noqa: E402
import metrics  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402

torch.set_num_threads(2)
TINY = dict(resolution=16, z_dim=32, w_dim=32, channel_base=256, channel_max=32, map_layers=2, mbstd_group=4,
            conv_clamp=None, g_attn='none', g_attn_res=8, d_attn='none', d_attn_res=8, ref_attn_eq=8,
            sel='none', heatmap='hier')
TINY_FLAGS = ['--cfg', 'cpu', '--resolution', '16', '--channel-base', '256', '--channel-max', '32', '--z-dim', '32',
              '--w-dim', '32', '--map-layers', '2', '--batch', '8', '--workers', '0', '--metrics', 'none',
              '--max-images', '64', '--log-sec', '0']


def tiny(**kw):
    torch.manual_seed(0)
    return model.build_networks({**TINY, **kw})


# ==============================================================================================
# model.py: StyleGAN2

@pytest.mark.parametrize('res', [16, 32])
def test_shapes(res):
    G, D = tiny(resolution=res)
    z = torch.randn(4, 32)
    img, ws = G(z, return_ws=True)
    assert img.shape == (4, 3, res, res) and ws.shape == (4, 2 * int(math.log2(res)) - 2, 32)
    assert G.num_ws == ws.shape[1] and len(G.noise_res) == G.num_ws - 1
    assert D(img).shape == (4,)
    logits, feat = D(img, return_features=True)
    assert feat.shape == (4, 32)


def test_config_e_f_parameter_counts():
    """Config E at 256x256: G + D = 48.77M parameters, the StyleGAN2 row of thesis Table 2.4."""
    n = lambda m: sum(p.numel() for p in m.parameters())
    cfg = dict(TINY, resolution=256, z_dim=512, w_dim=512, map_layers=8, channel_max=512)
    G, D = model.build_networks(dict(cfg, channel_base=16384))
    assert round((n(G) + n(D)) / 1e6, 2) == 48.77
    # exactly, layer by layer as the official networks count them (noise_const is a buffer): a conv layer is
    # weight + style affine (w_dim x C_in + bias) + bias + noise strength; D convs and FCs have biases, the skip none
    ch, W = model.channels_per_res(16384, 512, 256), 512
    g = 8 * (W * W + W) + 16 * ch[4]  # mapping, const
    for r, c in ch.items():
        convs = [(c, c)] if r == 4 else [(ch[r // 2], c), (c, c)]
        g += sum(i * o * 9 + W * i + i + o + 1 for i, o in convs) + 3 * c + W * c + c + 3  # ... + toRGB
    d = 4 * ch[256] + sum(c * c * 9 + c + c * o * 9 + o + c * o for r, c in ch.items() if r > 4 for o in [ch[r // 2]])
    d += (ch[4] + 1) * ch[4] * 9 + ch[4] + 16 * ch[4] ** 2 + ch[4] + ch[4] + 1  # epilogue: mbstd conv, fc, out
    assert (n(G), n(D)) == (g, d) == (24767458, 24001089)
    assert G.synthesis.b32.conv1.weight.shape == (512, 512, 3, 3) and D.b256.fromrgb.weight.shape == (64, 3, 1, 1)
    G, D = model.build_networks(dict(cfg, channel_base=32768))  # config F: twice the channels below 512
    assert D.b256.fromrgb.weight.shape == (128, 3, 1, 1) and G.synthesis.b256.conv1.weight.shape == (128, 128, 3, 3)
    names = {k for k, _ in G.named_parameters()}
    assert {'mapping.fc7.weight', 'synthesis.b32.conv1.affine.weight', 'synthesis.b4.const'} <= names


def test_resolution_must_be_power_of_two():
    with pytest.raises(ValueError, match='power of two'):
        model.Generator(48)


def test_equalized_lr():
    """Weights are stored N(0, 1) (x 1/lr_mul) and scaled at run time by lr_mul / sqrt(fan_in)."""
    torch.manual_seed(0)
    fc = model.FC(512, 256, lr_mul=0.01)
    assert abs(fc.weight.std().item() - 100) < 2
    x = torch.randn(1024, 512)
    assert abs(fc(x).std().item() - 1) < 0.05
    # the gradient w.r.t. the stored weight carries the run-time gain: d(sum y)/dW = gain * sum_b x
    fc.weight.grad = None
    fc(x).sum().backward()
    assert torch.allclose(fc.weight.grad[0], 0.01 / math.sqrt(512) * x.sum(0), rtol=1e-4, atol=1e-4)
    conv = model.Conv(64, 64, 3, act=False)
    assert abs(conv(torch.randn(8, 64, 16, 16))[:, :, 1:-1, 1:-1].std().item() - 1) < 0.05


def reference_modconv(x, weight, styles, demodulate, up):
    """Per-sample loop: modulate and demodulate the weight explicitly (StyleGAN2 Eq. 1-3); the 2x
    up-sampling as zero insertion + 'full' convolution, then the [1,3,3,1] FIR with gain 4."""
    out = []
    f = torch.tensor([1.0, 3, 3, 1])
    f = torch.outer(f, f) / 64
    for i in range(x.shape[0]):
        w = weight * styles[i].view(1, -1, 1, 1)
        if demodulate:
            w = w / w.square().sum([1, 2, 3], keepdim=True).add(1e-8).sqrt()
        xi = x[i:i + 1]
        if up == 2:
            z = torch.zeros(1, xi.shape[1], 2 * xi.shape[2] - 1, 2 * xi.shape[3] - 1)
            z[:, :, ::2, ::2] = xi
            y = F.conv2d(F.pad(z, [2, 2, 2, 2]), w.flip([2, 3]))  # transposed conv = full conv, flipped kernel
            y = F.conv2d(F.pad(y, [1, 1, 1, 1]), (4 * f).expand(y.shape[1], 1, 4, 4), groups=y.shape[1])
        else:
            y = F.conv2d(xi, w, padding=weight.shape[-1] // 2)
        out.append(y)
    return torch.cat(out)


@pytest.mark.parametrize('up, demodulate', [(1, True), (2, True), (1, False)])  # toRGB (no demod.) never upsamples
@pytest.mark.parametrize('fused', [False, True])
def test_modulated_conv_matches_per_sample_reference(up, fused, demodulate):
    torch.manual_seed(0)
    x, weight, styles = torch.randn(3, 6, 5, 5), torch.randn(4, 6, 3, 3), torch.randn(3, 6)
    y = model.modulated_conv2d(x, weight, styles, demodulate, up, model.fir_filter(), fused)
    ref = reference_modconv(x, weight, styles, demodulate, up)
    assert y.shape == ref.shape
    assert torch.allclose(y, ref, atol=1e-4), (y - ref).abs().max()


@pytest.mark.parametrize('fused', [False, True])
def test_modulated_conv_under_fp16_autocast_does_not_overflow(fused):
    """sum (s w)^2 = 64 * 9 * 16^2 ~ 150k > fp16's 65504: the demodulation must not be computed in
    fp16 (it gave rsqrt(inf) = 0, an all-zero layer); the official fp16 pre-normalisation keeps the
    conv's own sums in range. CPU autocast stands in for the GPU's."""
    torch.manual_seed(0)
    x, weight, styles = torch.randn(2, 64, 6, 6), torch.randn(8, 64, 3, 3), 16 + torch.randn(2, 64)
    ref = reference_modconv(x, weight, styles, True, 1)
    with torch.autocast('cpu', dtype=torch.float16):
        y = model.modulated_conv2d(x, weight, styles, fused=fused)
    assert y.dtype == torch.float16 and torch.allclose(y.float(), ref, atol=2e-2), (y.float() - ref).abs().max()


@pytest.mark.parametrize('case', ['large x', 'large styles', 'fp16 tensors'])
@pytest.mark.parametrize('fused', [False, True])
def test_fp16_prenormalisation_keeps_correlated_sums_finite(case, fused):
    """All-positive x, weights and styles: nothing cancels in the 512 x 9 sums of the conv, so only the
    official pre-normalisation (weights by their max / sqrt(fan-in), styles by their max) keeps them
    under fp16's 65504; demodulation undoes it. Under autocast, and with fp16 tensors (no autocast)."""
    torch.manual_seed(0)
    x, weight = torch.full((1, 512, 4, 4), 1.0 if case == 'large styles' else 100.0), torch.rand(4, 512, 3, 3)
    styles = (3000 if case == 'large styles' else 1) + torch.rand(1, 512)
    ref = reference_modconv(x.double(), weight.double(), styles.double(), True, 1).float()
    if case == 'fp16 tensors':
        y = model.modulated_conv2d(x.half(), weight.half(), styles.half(), fused=fused)
    else:
        with torch.autocast('cpu', dtype=torch.float16):
            y = model.modulated_conv2d(x, weight, styles, fused=fused)
    assert y.dtype == torch.float16 and y.isfinite().all()
    assert torch.allclose(y.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_generator_sums_its_rgb_skip_path_in_fp32_under_autocast():
    """Under bf16 autocast each block's toRGB output joins the upsampled image in fp32 (the official
    code), so the image G returns is fp32 and equals that sum computed from the blocks' own outputs."""
    G, _ = tiny()
    imgs = []
    for res in G.res_list:
        getattr(G.synthesis, f'b{res}').register_forward_hook(lambda m, i, out: imgs.append(out[1]))
    torch.manual_seed(1)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        img = G(torch.randn(2, 32), noise_mode='const')
    assert img.dtype == torch.float32 and all(x.dtype == torch.float32 for x in imgs)
    assert imgs[-1] is img


def test_autocast_covers_only_the_four_highest_resolutions_as_the_official_code():
    """Under autocast (here bf16 on the CPU) StyleGAN2's mapping, its blocks below the official
    fp16_resolution (the 4 highest resolutions, at least 8) and D's epilogue run in fp32."""
    assert [model.fp16_resolution(r) for r in (16, 32, 64, 128, 256, 1024)] == [8, 8, 8, 16, 32, 128]
    torch.manual_seed(0)
    G, D = model.build_networks({**TINY, 'resolution': 128, 'channel_base': 512, 'channel_max': 16})
    dtypes = {}
    hook = lambda name: (lambda m, i, out: dtypes.update({name: (out[0] if isinstance(out, tuple) else out).dtype}))
    G.mapping.register_forward_hook(hook('mapping'))
    D.b4.register_forward_hook(hook('D.b4'))
    for res in G.res_list:
        getattr(G.synthesis, f'b{res}').register_forward_hook(hook(f'G.b{res}'))
    for res in D.res_list:
        getattr(D, f'b{res}').register_forward_hook(hook(f'D.b{res}'))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits = D(G(torch.randn(2, 32)))
    bf16 = {k for k, v in dtypes.items() if v == torch.bfloat16}
    assert bf16 == {'G.b16', 'G.b32', 'G.b64', 'G.b128', 'D.b128', 'D.b64', 'D.b32', 'D.b16'}, dtypes
    assert logits.dtype == torch.float32 and len(dtypes) == 2 + 6 + 5


def test_losses_take_low_precision_logits_in_fp32():
    """Every loss casts the logits first: the WGAN drift term's square of 300 overflows fp16 (65504)."""
    big, low = torch.full([4], 300.0), torch.tensor([-2.0, -0.5, 0.5, 2.0])  # exact in fp16
    for kind in losses.LOSSES:
        for real, fake in [(big, low), (low, big)]:
            want_d, want_g = losses.d_loss(kind, real, fake), losses.g_loss(kind, fake, real)
            got_d, got_g = losses.d_loss(kind, real.half(), fake.half()), losses.g_loss(kind, fake.half(), real.half())
            assert got_d.dtype == got_g.dtype == torch.float32, kind
            assert torch.allclose(got_d, want_d) and torch.allclose(got_g, want_g), kind


def test_spectral_norm_and_sagan_logits_stay_fp32_under_autocast():
    """SN's power iteration and sigma are not autocast (the buffers u, v after a bf16 forward equal
    those of an fp32 one); SAGAN's attention logits reach the softmax in fp32."""
    torch.manual_seed(0)
    layer = model.SNLayer(16, 24, k=3, padding=1)
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 16, 5, 5)
    layer(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        twin(x)
    assert torch.equal(layer.u, twin.u) and torch.equal(layer.v, twin.v)
    seen = []

    class Softmaxes(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.softmax, torch.softmax):
                seen.append(args[0].dtype)
            return func(*args, **(kwargs or {}))
    sagan = attention.SAGAN(16)
    with torch.autocast('cpu', dtype=torch.bfloat16), Softmaxes():
        sagan(torch.randn(2, 16, 4, 4))
    assert seen == [torch.float32]


def test_device_cuda_n_outside_torchrun_becomes_the_current_device(monkeypatch):
    """--device cuda:1 in a single process: the benchmark's syncs and every kernel go to GPU 1, not 0."""
    set_to = []
    monkeypatch.delenv('RANK', raising=False)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'set_device', set_to.append)
    assert train.init_distributed('cuda:1') == (0, 1, torch.device('cuda:1')) and set_to == [torch.device('cuda:1')]
    assert train.init_distributed('cpu')[2] == torch.device('cpu') and len(set_to) == 1


def test_demodulation_gives_unit_variance():
    torch.manual_seed(0)
    x = torch.randn(4, 64, 32, 32)
    y = model.modulated_conv2d(x, torch.randn(64, 64, 3, 3), torch.rand(4, 64) * 3 + 0.1)
    assert abs(y[:, :, 1:-1, 1:-1].std().item() - 1) < 0.05


def test_torgb_by_hand():
    """ToRGB = 1x1 modulated conv without demodulation: s = (w A^T / sqrt(w_dim) + a) / sqrt(C_in),
    y[b, o] = sum_i W[o, i] s[b, i] x[b, i] + bias[o]."""
    torch.manual_seed(0)
    m = model.ToRGB(8, 6).double()
    with torch.no_grad():
        m.bias.normal_()
        m.affine.bias.normal_()
    x, w = torch.randn(2, 8, 3, 5, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    s = (w @ m.affine.weight.T / math.sqrt(6) + m.affine.bias) / math.sqrt(8)
    y = torch.einsum('oi,bi,bihw->bohw', m.weight[:, :, 0, 0], s, x) + m.bias.view(1, 3, 1, 1)
    for fused in (False, True):
        assert torch.allclose(m(x, w, fused=fused), y, atol=1e-12)


def test_discriminator_block_by_hand():
    """Residual D block from F.conv2d: skip = 1x1 stride-2 conv of the [1,3,3,1]-blurred input (pad 1) x sqrt(.5);
    conv path = lrelu(3x3 conv + b0) sqrt 2, then 3x3 stride-2 conv of its blur (pad 2) + b1, lrelu, x sqrt 2
    x sqrt(.5); weights / sqrt(fan-in); out = skip + conv path."""
    torch.manual_seed(0)
    m = model.DiscriminatorBlock(4, 4, 6).double()
    with torch.no_grad():
        m.conv0.bias.normal_()
        m.conv1.bias.normal_()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    f = torch.tensor([1., 3, 3, 1], dtype=torch.float64)
    f = (torch.outer(f, f) / 64).expand(4, 1, 4, 4)
    fir = lambda t, p: F.conv2d(F.pad(t, [p] * 4), f, groups=4)
    lrelu = lambda t: F.leaky_relu(t, 0.2) * math.sqrt(2)
    skip = F.conv2d(fir(x, 1), m.skip.weight / math.sqrt(4), stride=2) * math.sqrt(0.5)
    h = lrelu(F.conv2d(x, m.conv0.weight / math.sqrt(36), m.conv0.bias, padding=1))
    h = lrelu(F.conv2d(fir(h, 2), m.conv1.weight / math.sqrt(36), m.conv1.bias, stride=2)) * math.sqrt(0.5)
    assert torch.allclose(m(x), skip + h, atol=1e-12)


def test_mapping_normalises_z_by_hand():
    """z -> z / sqrt(mean(z^2) + 1e-8), then FC layers y = lrelu(x W^T 0.01 / sqrt(fan-in) + 0.01 b) sqrt 2
    (stored W ~ N(0, 1/0.01^2)); so w(c z) = w(z) for any c > 0."""
    torch.manual_seed(0)
    m = model.MappingNetwork(8, 5, num_ws=3, layers=2).double()
    with torch.no_grad():
        for i in range(2):
            getattr(m, f'fc{i}').bias.normal_(0, 100)
    z = 3 * torch.randn(4, 8, dtype=torch.float64)
    x = z / (z.square().mean(1, keepdim=True) + 1e-8).sqrt()
    for i, fan_in in enumerate((8, 5)):
        fc = getattr(m, f'fc{i}')
        x = F.leaky_relu(x @ fc.weight.T * 0.01 / math.sqrt(fan_in) + 0.01 * fc.bias, 0.2) * math.sqrt(2)
    ws = m(z)
    assert ws.shape == (4, 3, 5) and torch.allclose(ws, x[:, None].expand(4, 3, 5), atol=1e-10)
    assert torch.allclose(m(z / 7), ws, atol=1e-10)


def test_upsample_and_downsample_filters():
    """upsample2d == zero insertion then the 4x4 FIR (gain 4), 'same' padding [2, 1]; a constant
    image stays constant through both resamplers (the filter is normalised)."""
    torch.manual_seed(0)
    x, f = torch.randn(2, 3, 4, 4), model.fir_filter()
    z = torch.zeros(2, 3, 8, 8)
    z[:, :, ::2, ::2] = x
    ref = F.conv2d(F.pad(z, [2, 1, 2, 1]), (4 * f).expand(3, 1, 4, 4), groups=3)
    assert torch.allclose(model.upsample2d(x, f), ref, atol=1e-6)
    c = torch.ones(1, 3, 8, 8)
    assert torch.allclose(model.upsample2d(c, f)[:, :, 2:-2, 2:-2], torch.ones(1, 3, 12, 12))
    assert torch.allclose(model.blur(c, f, 2)[:, :, 2:-2, 2:-2], torch.ones(1, 3, 5, 5))


def upfirdn2d_ref(x, f, up=1, down=1, pad=(0, 0), gain=1.0):
    """The official upfirdn2d's definition, written out: zero insertion by `up`, padding (before,
    after) on both axes, a true convolution with f (flipped, then correlated) times gain, keeping
    every `down`-th pixel. An independent reference for the FIR resampling of model.py."""
    B, C, H, W = x.shape
    z = torch.zeros(B, C, H * up, W * up, dtype=x.dtype)
    z[:, :, ::up, ::up] = x
    z = F.pad(z, [pad[0], pad[1], pad[0], pad[1]])
    y = F.conv2d(z, (f.flip([0, 1]) * gain).expand(C, 1, *f.shape), groups=C)
    return y[:, :, ::down, ::down]


def test_resampling_with_an_asymmetric_filter_follows_upfirdn2d():
    """A loaded network may hold any 4x4 filter: the image upsampling, the up-conv of G and the
    down-convs of D (3x3 and the 1x1 skip) against upfirdn2d_ref with the official paddings."""
    torch.manual_seed(0)
    f = torch.rand(4, 4, dtype=torch.float64)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert torch.allclose(model.upsample2d(x, f), upfirdn2d_ref(x, f, up=2, pad=(2, 1), gain=4), atol=1e-12)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    up = F.conv_transpose2d(x, w.transpose(0, 1), stride=2)  # the official transposed conv, then the FIR
    assert torch.allclose(model.conv2d_resample(x, w, f, up=2), upfirdn2d_ref(up, f, pad=(1, 1), gain=4), atol=1e-12)
    assert torch.allclose(model.conv2d_resample(x, w, f, down=2), F.conv2d(upfirdn2d_ref(x, f, pad=(2, 2)), w, stride=2),
                          atol=1e-12)
    w1 = torch.randn(5, 3, 1, 1, dtype=torch.float64)
    assert torch.allclose(model.conv2d_resample(x, w1, f, down=2), F.conv2d(upfirdn2d_ref(x, f, down=2, pad=(1, 1)), w1),
                          atol=1e-12)


@pytest.mark.parametrize('padding', [1, 2])
def test_blur_gradients_of_any_order(padding):
    # blur is a true convolution with f (the official upfirdn2d flips the filter) with a hand-written
    # gradient (correlation with f, padding k - 1 - p): compare values and first and second derivatives
    # with autograd through a plain grouped conv of the flipped filter; an asymmetric filter checks the
    # flips, gradgradcheck the second order R1 / path length / GradCAM need.
    f = torch.rand(4, 4, dtype=torch.float64)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    plain = lambda x: F.conv2d(x, f.flip([0, 1]).expand(3, 1, 4, 4), padding=padding, groups=3)
    outs = []
    for fn in (lambda x: model.blur(x, f, padding), plain):
        y = fn(x)
        g, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        h, = torch.autograd.grad(g.sin().sum(), x)
        outs.append((y, g, h))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-10)
    torch.autograd.gradgradcheck(lambda x: model.blur(x, f, padding), (x,))


def test_minibatch_std_hand_computation():
    torch.manual_seed(0)
    x = torch.randn(8, 6, 4, 4)
    y = model.minibatch_std(x, 4)
    assert y.shape == (8, 7, 4, 4) and torch.equal(y[:, :6], x)
    for g in range(2):  # contiguous groups of 4
        grp = x[4 * g:4 * g + 4].double()
        s = (grp.var(0, unbiased=False) + 1e-8).sqrt().mean()
        assert torch.allclose(y[4 * g:4 * g + 4, 6].double(), s.expand(4, 4, 4), atol=1e-5)


def test_truncation_and_style_mixing():
    G, _ = tiny()
    G.mapping.w_avg.normal_()
    z, z2 = torch.randn(3, 32), torch.randn(3, 32)
    ws0 = G.map(z, psi=0)
    assert torch.allclose(ws0, G.mapping.w_avg.expand_as(ws0))
    ws_half = G.map(z, psi=0.5, cutoff=2)
    full = G.map(z)
    assert torch.allclose(ws_half[:, 2:], full[:, 2:]) and torch.allclose(ws_half[:, :2], (full[:, :2] + G.mapping.w_avg) / 2, atol=1e-6)
    _, ws = G(z, mix_z=z2, mix_cutoff=torch.tensor(3), return_ws=True)
    assert torch.allclose(ws[:, :3], full[:, :3]) and torch.allclose(ws[:, 3:], G.map(z2)[:, 3:])
    _, ws = G(z, mix_z=z2, mix_cutoff=torch.tensor(G.num_ws), return_ws=True)
    assert torch.allclose(ws, full)


def test_w_avg_tracking_and_noise_inputs():
    G, _ = tiny()
    z = torch.randn(16, 32)
    G.mapping.w_avg.fill_(0.5)  # a running mean from earlier steps
    G(z, update_w_avg=True)
    assert torch.allclose(G.mapping.w_avg, 0.5 + 0.005 * (G.map(z)[:, 0].mean(0) - 0.5), atol=1e-6)
    G.eval()
    a, b = G(z[:2], noise_mode='const'), G(z[:2], noise_mode='const')
    assert torch.equal(a, b)  # const noise and fused inference conv are deterministic
    for m in G.modules():
        if isinstance(m, model.SynthesisLayer):
            m.noise_strength.data.fill_(1.0)
    noise = [torch.zeros(2, 1, r, r) for r in G.noise_res]
    assert torch.allclose(G(z[:2], noise=noise), G(z[:2], noise_mode='none'), atol=1e-6)
    assert not torch.allclose(G(z[:2], noise_mode='random'), G(z[:2], noise_mode='none'))


# ==============================================================================================
# losses.py

def ce_matrix(pos, neg):
    """Softmax cross-entropy picking column 0 of the explicit [B, 1 + M] logit matrix."""
    logits = torch.cat([pos[:, None], neg[None, :].expand(len(pos), -1)], 1)
    return F.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.long))


def test_contrastive_loss_equals_explicit_cross_entropy():
    torch.manual_seed(0)
    r, f = torch.randn(6) * 3, torch.randn(6) * 3
    d = losses.d_loss('contrastive', r, f)
    assert torch.allclose(d, ce_matrix(r, f) + ce_matrix(-f, -r), atol=1e-6)  # Eq. 2.1 + 2.2
    g = losses.g_loss('contrastive', f, r, 'swap')
    assert torch.allclose(g, ce_matrix(f, r) + ce_matrix(-r, -f), atol=1e-6)
    assert torch.allclose(losses.g_loss('contrastive', f, r, 'minimax'), -d)
    # with one sample per side it reduces to the logistic loss, twice
    r1, f1 = r[:1], f[:1]
    assert torch.allclose(losses.d_loss('contrastive', r1, f1), 2 * F.softplus(f1 - r1).squeeze(), atol=1e-6)


def test_losses_hand_values():
    r, f = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.0])
    sp = lambda x: math.log1p(math.exp(x))
    assert math.isclose(losses.d_loss('nonsat', r, f).item(), (sp(-2) + sp(0)) / 2 * 2, rel_tol=1e-6)
    assert math.isclose(losses.g_loss('nonsat', f).item(), (sp(2) + sp(0)) / 2, rel_tol=1e-6)
    assert math.isclose(losses.g_loss('sat', f).item(), -(sp(-2) + sp(0)) / 2, rel_tol=1e-6)
    assert math.isclose(losses.d_loss('hinge', r, f).item(), (0 + 1) / 2 + (0 + 1) / 2, rel_tol=1e-6)
    assert math.isclose(losses.d_loss('wgan', r, f).item(), -1 - 1 + 1e-3 * 2, rel_tol=1e-6)
    assert math.isclose(losses.g_loss('wgan', f).item(), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize('kind', losses.LOSSES)
def test_loss_gradient_signs(kind):
    """D's loss falls when real logits rise and fake logits fall; G's loss falls when fakes rise."""
    torch.manual_seed(1)
    r = (torch.rand(5) * 1.8 - 0.9).requires_grad_(True)  # inside the hinge margin
    f = (torch.rand(5) * 1.8 - 0.9).requires_grad_(True)
    gr, gf = torch.autograd.grad(losses.d_loss(kind, r, f), [r, f])
    assert (gr < 0).all() and (gf > 0).all()
    (gf,) = torch.autograd.grad(losses.g_loss(kind, f, r.detach()), [f])
    assert (gf < 0).all()
    if kind == 'contrastive':
        (gf,) = torch.autograd.grad(losses.g_loss(kind, f, r.detach(), 'minimax'), [f])
        assert (gf < 0).all()


def test_unknown_loss_message():
    with pytest.raises(ValueError, match='choose one of'):
        losses.d_loss('lsgan', torch.zeros(2), torch.zeros(2))


def test_r1_and_gradient_penalty_hand_values():
    """For a linear D(x) = <a, x>: R1 = ||a||^2 and the WGAN-GP term = (||a|| - 1)^2, per sample."""
    torch.manual_seed(0)
    a = torch.randn(3, 4, 4)
    D = lambda x, ref=None: (x * a).flatten(1).sum(1)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    assert torch.allclose(losses.r1_penalty(x, D(x)), a.square().sum().expand(5), rtol=1e-5)
    gp = losses.wgan_gp(D, torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4))
    assert torch.allclose(gp, (a.norm() - 1).square().expand(5), rtol=1e-4)
    # a quadratic D sees where it is evaluated: ||grad|| = ||2 x_hat||, x_hat = lerp(real, fake, t)
    real, fake, t = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4), torch.rand(5, 1, 1, 1)
    gp = losses.wgan_gp(lambda x, ref=None: x.square().flatten(1).sum(1), real, fake, t=t)
    x_hat = real + t * (fake - real)
    assert torch.allclose(gp, ((2 * x_hat).flatten(1).norm(dim=1) - 1).square(), rtol=1e-4)
    # R1 of a quadratic D(x) = sum x^2 is ||2x||^2, and it is differentiable (for the backward)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    r1 = losses.r1_penalty(x, x.square().flatten(1).sum(1))
    assert torch.allclose(r1, (2 * x).square().flatten(1).sum(1))
    (g,) = torch.autograd.grad(r1.sum(), x)
    assert torch.allclose(g, 8 * x)


def test_losses_hand_values_with_asymmetric_logits():
    """Hand values where real and fake logits differ in magnitude: WGAN's drift is 1e-3 E[r^2] on
    the reals only; 'sat' D uses the nonsat D loss; hinge G is -E[f]."""
    r, f = torch.tensor([3.0, 1.0]), torch.tensor([0.5, -2.0])
    sp = lambda x: math.log1p(math.exp(x))
    assert math.isclose(losses.d_loss('wgan', r, f).item(), (0.5 - 2) / 2 - (3 + 1) / 2 + 1e-3 * (9 + 1) / 2, rel_tol=1e-6)
    want = (sp(-3) + sp(-1)) / 2 + (sp(0.5) + sp(-2)) / 2
    assert math.isclose(losses.d_loss('sat', r, f).item(), want, rel_tol=1e-6)
    assert math.isclose(losses.d_loss('nonsat', r, f).item(), want, rel_tol=1e-6)
    assert math.isclose(losses.g_loss('hinge', f).item(), 0.75, rel_tol=1e-6)
    assert math.isclose(losses.d_loss('hinge', r, f).item(), (0 + 0) / 2 + (1.5 + 0) / 2, rel_tol=1e-6)


def test_minmax_by_hand():
    """Per-sample (x - min) / (max - min): [2, 4, 6] -> [0, .5, 1], [-3, 1] -> [0, 1] with a
    negative minimum, and a constant sample -> zeros; each sample on its own (not the batch's range)."""
    x = torch.tensor([[2.0, 4.0, 6.0, 5.0], [-3.0, 1.0, -1.0, -3.0], [7.0, 7.0, 7.0, 7.0]]).view(3, 1, 2, 2)
    want = torch.tensor([[0, 0.5, 1, 0.75], [0, 1, 0.5, 0], [0, 0, 0, 0]]).view(3, 1, 2, 2)
    assert torch.allclose(losses.minmax(x), want, atol=1e-6)
    assert torch.allclose(losses.minmax(x + 10), want, atol=1e-6) and torch.allclose(losses.minmax(x * 3), want, atol=1e-6)


def test_path_length_penalty_hand_computation():
    """img = (sum over layers of ws) @ M: J^T y = M y for every layer, so the length is ||M y||."""
    torch.manual_seed(0)
    M = torch.randn(8, 3 * 4 * 4)
    ws = torch.randn(5, 6, 8, requires_grad=True)
    img = (ws.sum(1) @ M).view(5, 3, 4, 4)
    y = torch.randn(5, 3, 4, 4)
    pl_mean = torch.full([], 3.0)  # a running mean from earlier steps
    pen = losses.path_length_penalty(img, ws, pl_mean, noise=y)
    lengths = ((y / 4).flatten(1) @ M.t()).norm(dim=1)  # 1 / sqrt(H W) = 1 / 4
    assert torch.allclose(pl_mean, 3.0 + 0.01 * (lengths.mean() - 3.0), rtol=1e-5)
    assert torch.allclose(pen, (lengths - pl_mean).square(), rtol=1e-4)
    assert not pl_mean.requires_grad  # the running mean is a constant of the penalty: no graph kept across steps


# ==============================================================================================
# attention.py

def _attn_make(kind, C, **kw):
    torch.manual_seed(0)
    if kind not in ('san', 'ref'):
        kw.pop('patch', None)
    return attention.RefAttention(C, **kw) if kind == 'ref' else attention.self_attention(kind, C, **kw)


def _attn_run(m, x, ref=None):
    if isinstance(getattr(m, '_orig_mod', m), attention.RefAttention):
        return m(x, x.flip(0) if ref is None else ref)
    return m(x)


ATTN_KINDS = ['san', 'sagan', 'dfn', 'vt', 'ref']


# Eq. 2.4-2.6 exactly as written: per position, extract the k patch, concat q, two FCs, reshape,
# weighted sum of the v patch; zero padding at the borders. Returns attention + res and the weights.
def _naive_attend(m, k_src, q_src, v_src, res):
    def proj(conv, x):  # 1x1 conv + bias + leaky ReLU
        w = conv.weight.flatten(1) * conv.scale
        return F.leaky_relu(torch.einsum('oc,bchw->bohw', w, x) + conv.bias[:, None, None], 0.2)

    s, G, r = m.patch, m.groups, m.patch // 2
    K, Q, V = proj(m.key, k_src), proj(m.query, q_src), proj(m.value, v_src)
    Kp, Vp = F.pad(K, [r] * 4), F.pad(V, [r] * 4)
    M1 = torch.cat([m.fc1_k.weight.flatten(1) * m.fc1_k.scale, m.fc1_q.weight.flatten(1) * m.fc1_q.scale], 1)
    M2 = m.fc2.weight.flatten(1) * m.fc2.scale
    B, C, H, W = V.shape
    out = torch.zeros_like(V)
    weights = torch.zeros(B, G, s * s, H, W, dtype=V.dtype)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                k = Kp[b, :, i:i + s, j:j + s]                       # s x s x c' key patch
                p = torch.cat([k.flatten(), Q[b, :, i, j]])          # Eq. 2.4
                w_hat = F.leaky_relu(M1 @ p + m.fc1_k.bias, 0.2)     # Eq. 2.5
                w = (M2 @ w_hat + m.fc2.bias).view(G, s, s)          # Eq. 2.5, reshape of Eq. 2.6
                v = Vp[b, :, i:i + s, j:j + s]                       # s x s x c value patch
                for c in range(C):                                   # channel c uses group c % G
                    out[b, c, i, j] = (w[c % G] * v[c]).sum()        # Eq. 2.6
                weights[b, :, :, i, j] = w.flatten(1)
    return out + res, weights


@pytest.mark.parametrize('kind', ATTN_KINDS)
@pytest.mark.parametrize('C,hw', [(16, (8, 8)), (8, (5, 7)), (8, (1, 3))])
def test_attention_shapes(kind, C, hw):
    m = _attn_make(kind, C)
    x = torch.randn(2, C, *hw)
    y = _attn_run(m, x)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()


@pytest.mark.parametrize('kw,hw', [(dict(patch=3, reduction=4, share=4, hidden=6), (5, 6)),
                                   (dict(), (5, 7))])  # default patch 9 is larger than the map: all borders
def test_attention_san_matches_naive_loop(kw, hw):
    m = _attn_make('san', 16, **kw).double()
    with torch.no_grad():  # nonzero biases so the test sees them
        for p in m.parameters():
            if p.dim() == 1:
                p.normal_()
    x = torch.randn(2, 16, *hw, dtype=torch.float64)
    y, w = m(x, return_weights=True)
    y0, w0 = _naive_attend(m, x, x, x, x)
    assert w.shape == (2, m.groups, m.patch ** 2, *hw)
    assert (y - y0).abs().max() < 1e-5 and (w - w0).abs().max() < 1e-5
    assert (y - x).abs().max() > 1e-2  # the attention branch is not zero at init (residual + attention)


@pytest.mark.parametrize('block', [1 << 20, 50])  # 50: the CPU's cache blocks split the groups in two
def test_attention_san_aggregation_gradients_of_any_order(block, monkeypatch):
    # Eq. 2.6 has hand-written gradients (three bilinear ops that differentiate into each other):
    # check them against finite differences (gradcheck) and second order (gradgradcheck, as R1 and
    # path length need), and against plain autograd through an unfold of the padded values.
    monkeypatch.setattr(attention, 'BLOCK', block)
    s, G = 3, 2
    v = torch.randn(2, 6, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, G, s * s, 4, 5, dtype=torch.float64, requires_grad=True)
    m = attention.SAN(6, patch=s, reduction=3, share=3).double()
    assert m.groups == G
    torch.autograd.gradcheck(m.aggregate, (v, w))
    torch.autograd.gradgradcheck(m.aggregate, (v, w))

    def unfolded(v, w):  # o[b, c] = sum_k unfold(v)[b, c, k] * w[b, c % G, k]
        cols = F.unfold(v, s, padding=s // 2).view(2, 6, s * s, 4, 5)
        return (cols * w.repeat(1, 3, 1, 1, 1)).sum(2)
    gy = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    results = []
    for f in (m.aggregate, unfolded):
        out = f(v, w)
        gv, gw = torch.autograd.grad(out, (v, w), gy, create_graph=True)
        hv, hw = torch.autograd.grad((gv.square().sum() + gw.sin().sum()), (v, w))
        results.append((out, gv, gw, hv, hw))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-10)
    vs, g = v.detach().view(2, 3, G, 4, 5), torch.randn(2, 3, G, 4, 5, dtype=torch.float64)
    for op, args in ((attention.agg, (vs, w, s)), (attention.agg_t, (g, w, s)), (attention.corr, (vs, g, s))):
        torch.library.opcheck(op, args)  # the custom ops' shapes, strides and autograd as torch.compile sees them


def test_san_runtime_scales_by_hand():
    """Equalized lr: each Conv's run-time scale is 1/sqrt(fan-in) from its shapes (C = 64, C' = 2, D = 64,
    G = 4, s = 9): K, Q, V 1/8; fc1 (both halves of M_w1) 1/sqrt(81 * 2 + 2); fc2 (1/s)/sqrt(D) = 1/72, and
    the conv applies weight x scale. At init the attention branch of a unit-variance input has std ~0.33."""
    torch.manual_seed(0)
    m = attention.SAN(64)
    assert (m.patch, m.groups) == (9, 4) and m.key.weight.shape[0] == 2 and m.fc1_k.weight.shape[0] == 64
    hand = dict(key=1 / 8, query=1 / 8, value=1 / 8, fc1_k=1 / math.sqrt(164), fc1_q=1 / math.sqrt(164), fc2=1 / 72)
    for name, scale in hand.items():
        assert getattr(m, name).scale == pytest.approx(scale, rel=1e-12), name
    x = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        m.key.bias.normal_()
        assert torch.allclose(m.key(x), torch.einsum('oc,bchw->bohw', m.key.weight[:, :, 0, 0] / 8, x)
                              + m.key.bias.view(1, -1, 1, 1), atol=1e-5)
        assert 0.2 < (m(x) - x).std().item() < 0.5  # 2.5 with fc2 scaled by 1/sqrt(D) only


def test_sagan_matches_einsum_derivation():
    """SAGAN with gamma = 0.7: f, g, h, v 1x1 convs (weights / sqrt(fan-in), biases);
    beta[j, i] = softmax_i(f_i . g_j) (over the key positions i), o_j = sum_i beta[j, i] h_i,
    out = x + gamma v(o)."""
    torch.manual_seed(0)
    m = attention.SAGAN(16).double()
    with torch.no_grad():
        m.gamma.fill_(0.7)
        for conv in (m.f, m.g, m.h, m.v):
            conv.bias.normal_()
    x = torch.randn(2, 16, 3, 5, dtype=torch.float64).flatten(2)  # [B, C, N]
    conv = lambda c, t, fan_in: torch.einsum('oc,bcn->bon', c.weight[:, :, 0, 0], t) / math.sqrt(fan_in) + c.bias[:, None]
    f, g, h = (conv(c, x, 16) for c in (m.f, m.g, m.h))
    s = torch.einsum('bci,bcj->bji', f, g)
    beta = s.exp() / s.exp().sum(2, keepdim=True)
    o = torch.einsum('bji,bci->bcj', beta, h)
    out = x + 0.7 * conv(m.v, o, 8)
    assert torch.allclose(m(x.view(2, 16, 3, 5)), out.view(2, 16, 3, 5), atol=1e-10)


def test_vt_matches_einsum_derivation():
    """VT (C = 16, L = 4 tokens, 2 heads of width 8): A = softmax over the HW positions of W_A X, tokens
    T = A X^T; T += proj(MHSA(LN1(T))) with softmax(q k^T / sqrt 8); T += W2 gelu(W1 LN2(T));
    out = X + softmax over the L tokens of (W_Q X)(W_K T)^T / sqrt(C), times T. 1x1 weights / sqrt(fan-in)."""
    torch.manual_seed(0)
    m = attention.VT(16, tokens=4, heads=2).double()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.normal_()
    B, C, H, W = 2, 16, 3, 5
    x = torch.randn(B, C, H * W, dtype=torch.float64)
    lin = lambda c, t: torch.einsum('oc,...c->...o', c.weight[:, :, 0, 0], t) / math.sqrt(c.weight.shape[1]) + c.bias
    sm = lambda t: t.exp() / t.exp().sum(-1, keepdim=True)
    ln = lambda n, t: (t - t.mean(-1, keepdim=True)) / (t.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt() * n.weight + n.bias
    a = sm(lin(m.tokenizer, x.transpose(1, 2)).transpose(1, 2))  # [B, L, HW], normalised over HW
    t = torch.einsum('bln,bcn->blc', a, x)
    q, k, v = lin(m.qkv, ln(m.norm1, t)).view(B, 4, 3, 2, 8).unbind(2)  # each [B, L, heads, 8]
    att = torch.einsum('bhlk,bkhd->blhd', sm(torch.einsum('blhd,bkhd->bhlk', q, k) / math.sqrt(8)), v)
    t = t + lin(m.proj, att.reshape(B, 4, C))
    t = t + lin(m.mlp2, F.gelu(lin(m.mlp1, ln(m.norm2, t))))
    p = sm(torch.einsum('bnc,blc->bnl', lin(m.proj_q, x.transpose(1, 2)), lin(m.proj_k, t)) / math.sqrt(C))
    out = x + torch.einsum('bnl,blc->bcn', p, t)
    assert torch.allclose(m(x.view(B, C, H, W)), out.view(B, C, H, W), atol=1e-10)


@pytest.mark.parametrize('eq,srcs', [(8, 'rrp'), (1, 'prr'), (2, 'prp')])
def test_attention_ref_routes_k_q_v(eq, srcs):
    m = _attn_make('ref', 16, eq=eq, patch=3, reduction=4, share=4).double()
    pri, ref = torch.randn(2, 16, 5, 6, dtype=torch.float64), torch.randn(2, 16, 5, 6, dtype=torch.float64)
    seen = {}
    for name in ('key', 'query', 'value'):
        getattr(m, name).register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, inp[0]))
    y = m(pri, ref)
    src = {'p': pri, 'r': ref}
    for name, c in zip(('key', 'query', 'value'), srcs):  # which projection sees which image
        assert seen[name] is src[c], (eq, name)
    y0, _ = _naive_attend(m, src[srcs[0]], src[srcs[1]], src[srcs[2]], pri)
    assert (y - y0).abs().max() < 1e-5
    # perturbing the reference changes the output and exactly the projections fed by it
    ref2 = ref + 1
    assert (m(pri, ref2) - y).abs().max() > 1e-3
    for name, c in zip(('key', 'query', 'value'), srcs):
        assert seen[name] is (ref2 if c == 'r' else pri), (eq, name)


def test_attention_and_alignment_defaults():
    """The defaults a user copying attention.py / losses.py gets: DFN's MLP of width C/8 (the heavy row of
    Table 2.4), VT heads of width 64, reference-attention as Eq. 2.8, the alignment loss as the paper reads."""
    assert attention.DFN(64).fc1.weight.shape[0] == 8 and attention.VT(128).heads == 2
    assert attention.RefAttention(16, patch=3, reduction=4, share=4).eq == 8
    default = inspect.signature(losses.align_loss).parameters
    assert {k: default[k].default for k in ('tau', 'truncation', 'cam_weights')} == dict(tau=0.25, truncation='paper',
                                                                                        cam_weights='graph')


def test_san_aggregation_sums_bf16_in_fp32():
    """Under bf16 the 81 products of Eq. 2.6 are summed in fp32 and rounded once: within bf16's rounding
    (2^-8) of the exact sum of the rounded inputs; summing in bf16 is off by about 3% here."""
    torch.manual_seed(0)
    v, w = (torch.rand(2, 4, 8, 16, 16) + 1).bfloat16(), torch.rand(2, 8, 81, 16, 16).bfloat16()
    exact = attention._agg(v.double(), w.double(), 9)
    got = attention.agg(v, w, 9)
    assert got.dtype == torch.bfloat16 and ((got.double() - exact) / exact).abs().max() < 2 ** -8


def test_attention_ref_eq8_value_only_from_primary():
    m = _attn_make('ref', 16, eq=8, patch=3, reduction=4, share=4)
    pri, ref = torch.randn(2, 16, 6, 6), torch.randn(2, 16, 6, 6, requires_grad=True)
    y = m(pri, ref)
    gy = torch.randn_like(y)
    g_ref, = torch.autograd.grad(y, ref, gy, retain_graph=True)
    assert g_ref.abs().max() > 0  # the reference steers the output through K and Q ...
    with torch.no_grad():  # ... but with V(T_pri) zeroed the attention part vanishes: out = T_pri
        m.value.weight.zero_()
        m.value.bias.zero_()
    assert torch.equal(m(pri, ref), pri)
    with pytest.raises(ValueError, match='eq'):
        attention.RefAttention(16, eq=3)


def test_attention_sagan_is_identity_at_init():
    x = torch.randn(2, 16, 5, 7)
    assert torch.equal(_attn_make('sagan', 16)(x), x)


@pytest.mark.parametrize('kind', ATTN_KINDS)
def test_attention_every_parameter_gets_a_gradient(kind):
    m = _attn_make(kind, 16)
    x = torch.randn(2, 16, 6, 5)
    _attn_run(m, x).mul(torch.randn(2, 16, 6, 5)).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name  # DDP without find_unused_parameters needs all in the graph
        if kind != 'sagan' or name == 'gamma':
            assert p.grad.abs().max() > 0, name
    if kind == 'sagan':  # gamma = 0 at init zeroes the others' gradients; they flow once gamma moves
        with torch.no_grad():
            m.gamma.fill_(0.5)
        m.zero_grad()
        _attn_run(m, x).mul(torch.randn_like(x)).sum().backward()
        assert all(p.grad.abs().max() > 0 for p in m.parameters())


@pytest.mark.parametrize('kind', ATTN_KINDS)
def test_attention_double_backward(kind):  # R1 in D and path length in G differentiate input gradients
    m = _attn_make(kind, 8, patch=5)
    if kind == 'sagan':
        with torch.no_grad():
            m.gamma.fill_(0.5)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    g, = torch.autograd.grad(_attn_run(m, x).square().sum(), x, create_graph=True)
    g.square().sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_attention_san_default_budget_at_512():
    C = 512
    with torch.device('meta'):
        m = attention.SAN(C)
    s, Ck, G, D = 9, C // 32, C // 16, C
    formula = 2 * (C * Ck + Ck) + C * C + C + (s * s * Ck + Ck) * D + D + D * s * s * G + s * s * G
    n = attention.count_params(m)
    assert n == formula == 2_281_024
    conv_affine = 9 * C * C + C * C
    assert n <= conv_affine - 340_000 + 1_000 and abs(conv_affine - n - 340_000) < 1_000  # Table 2.4: -0.34M
    assert attention.flops(m, (1, C, 32, 32)) == 2_318_848 * 1024 <= 9 * C * C * 1024  # <= the 3x3 conv


@pytest.mark.parametrize('kind', ATTN_KINDS)
def test_attention_flops_match_torch_flop_counter(kind):
    m = _attn_make(kind, 16, patch=5)
    x = torch.randn(2, 16, 6, 5)
    with FlopCounterMode(display=False) as counter:
        _attn_run(m, x)
    macs = counter.get_total_flops() // 2
    if kind in ('san', 'ref'):  # the elementwise aggregation (Eq. 2.6) is invisible to the counter
        macs += 2 * m.patch ** 2 * 16 * 30
    assert attention.flops(m, x.shape) == macs
    assert attention.flops(torch.nn.Conv2d(16, 16, 3, padding=1), x.shape) == 2 * 30 * 9 * 16 * 16


@pytest.mark.parametrize('kind', ATTN_KINDS)
def test_attention_autocast_bf16_and_channels_last(kind):
    m = _attn_make(kind, 16, patch=5)
    if kind == 'sagan':
        with torch.no_grad():
            m.gamma.fill_(0.5)
    x = torch.randn(2, 16, 6, 7)
    ref = torch.randn(2, 16, 6, 7)
    y = _attn_run(m, x, ref)
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    yc = _attn_run(m, xc, ref.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(yc, y, atol=1e-5)
    assert yc.is_contiguous(memory_format=torch.channels_last)  # the next layers stay channels_last
    yc.sum().backward()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        yb = _attn_run(m, xc, ref)
    assert yb.shape == y.shape and torch.isfinite(yb).all()
    assert (yb.float() - y).abs().max() < 0.05 * y.abs().max()
    yb.float().sum().backward()


@pytest.mark.parametrize('kind', ATTN_KINDS)
def test_attention_compiles_without_graph_breaks(kind):
    m = _attn_make(kind, 8, patch=3)
    x = torch.randn(2, 8, 5, 5)
    cm = torch.compile(m, backend='eager', fullgraph=True)  # dynamo tracing only: no inductor codegen
    assert torch.allclose(_attn_run(cm, x), _attn_run(m, x), atol=1e-6)


def test_attention_factory():
    for kind, cls in [('san', attention.SAN), ('sagan', attention.SAGAN), ('dfn', attention.DFN), ('vt', attention.VT)]:
        assert type(attention.self_attention(kind, 8)) is cls
    with pytest.raises(ValueError, match='san, sagan, dfn, vt'):
        attention.self_attention('nonlocal', 8)
    with pytest.raises(ValueError, match='odd'):
        attention.SAN(8, patch=4)


# ---- attention inside G and D (model.py integration)

@pytest.mark.parametrize('g_attn', ['none', 'san', 'sagan', 'dfn', 'vt'])
@pytest.mark.parametrize('d_attn', ['none', 'self', 'ref'])
def test_attention_every_combination_forward_backward(g_attn, d_attn):
    G, D = tiny(g_attn=g_attn, d_attn=d_attn)
    z, ref = torch.randn(4, 32), torch.rand(4, 3, 16, 16) * 2 - 1
    img = G(z)
    logits = D(img, ref) if d_attn == 'ref' else D(img)
    assert img.shape == (4, 3, 16, 16) and logits.shape == (4,)
    (logits.sum() + img.square().mean()).backward()
    missing = [n for n, p in list(G.named_parameters()) + list(D.named_parameters()) if p.grad is None]
    assert not missing, missing  # every parameter takes part (manual DDP gradient sync relies on it)
    if g_attn != 'none':
        layer = G.synthesis.b8.conv1
        assert isinstance(layer.attn, torch.nn.Module) and not hasattr(layer, 'weight') and not hasattr(layer, 'affine')


def test_spectral_norm_compiles_and_trains_as_eager():
    """--compile on the SN backbones: D runs on fakes, then on reals, then one backward. Compiled by inductor
    (the partitioner that recomputed v from the mutated u: a RuntimeError before), the gradients and the
    power iteration's u, v equal eager mode's."""
    torch.manual_seed(0)
    eager = model.SNLayer(8, 4, k=3, padding=1)
    compiled = copy.deepcopy(eager)
    x1, x2 = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    for net, run in ((eager, eager), (compiled, torch.compile(compiled, dynamic=False))):
        (run(x1).square().sum() + run(x2).sum()).backward()
    torch.testing.assert_close(compiled.weight.grad, eager.weight.grad, rtol=1e-4, atol=1e-4)  # inductor sums in another order
    assert torch.allclose(compiled.u, eager.u) and torch.allclose(compiled.v, eager.v)
    assert not torch.equal(eager.u, model.SNLayer(8, 4, k=3, padding=1).u)  # (the iteration moved u: two updates)


@pytest.mark.parametrize('kw', [dict(g_attn='san', d_attn='self'), dict(d_attn='ref'), dict(sel='norm'), dict(sel='flatten'),
                                dict(sel='norm', heatmap='official', eqgan='official')])
def test_networks_compile_without_graph_breaks(kw):
    """--compile: G (style mixing, given noise, heatmaps) and D (features, GradCAM maps) trace as one
    graph each (fullgraph=True raises at a graph break); dynamo only, no code generation."""
    G, D = tiny(**kw)
    gen = torch.Generator().manual_seed(0)
    z, z2 = torch.randn(4, 32, generator=gen), torch.randn(4, 32, generator=gen)
    args = dict(heatmaps=G.sample_heatmaps(4, 'cpu', gen), mix_z=z2, mix_cutoff=torch.tensor(3),
                noise=[torch.randn(4, 1, r, r, generator=gen) for r in G.noise_res])
    img = torch.compile(G, backend='eager', fullgraph=True)(z, **args)
    assert torch.equal(img, G(z, **args))
    ref = torch.rand(4, 3, 16, 16) * 2 - 1 if D.needs_ref else None
    logits, feat, maps = torch.compile(D, backend='eager', fullgraph=True)(img, ref, return_features=True, return_maps=True)
    assert torch.equal(logits, D(img, ref)) and feat.shape == (4, 32) and sorted(maps) == [4, 8]


@pytest.mark.parametrize('res', [8, 16])  # 16: the fusion in the first block (fromrgb of both streams)
def test_reference_attention_discriminator_is_siamese(res):
    _, D = tiny(d_attn='ref', d_attn_res=res)
    _, D_self = tiny(d_attn='self', d_attn_res=res)
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(D) == n(D_self)  # the reference branch adds no parameters: shared (Siamese) layers
    assert isinstance(getattr(D, f'b{res}').conv0.attn, attention.RefAttention)
    torch.manual_seed(0)
    img, ref, ref2 = (torch.rand(4, 3, 16, 16) * 2 - 1 for _ in range(3))
    with pytest.raises(ValueError, match='reference'):
        D(img)
    a, b = D(img, ref), D(img, ref2)
    assert not torch.allclose(a, b)  # the output depends on the reference (through K and Q)
    assert D(img[:2], ref[:2]).shape == (2,)
    ref_ = ref.clone().requires_grad_(True)
    D(img, ref_).sum().backward()
    assert ref_.grad.abs().sum() > 0  # gradients reach the reference image too
    # [fakes; reals] sharing one batch of references (train.py's D step) == two calls, values and gradients
    img2 = torch.rand(4, 3, 16, 16) * 2 - 1
    joint, apart = D(torch.cat([img, img2]), ref), torch.cat([D(img, ref), D(img2, ref)])
    assert torch.allclose(joint, apart, atol=1e-6)
    for a, b in zip(*(torch.autograd.grad(y.square().sum(), list(D.parameters())) for y in (joint, apart))):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match='reference'):
        D(img[:3], ref[:2])


def test_attention_training_steps(tmp_path):
    for g_attn, d_attn, loss in [('san', 'ref', 'contrastive'), ('sagan', 'self', 'hinge'), ('dfn', 'none', 'wgan'),
                                 ('vt', 'ref', 'sat'), ('none', 'self', 'nonsat')]:
        extra = (['--g-attn-res', '8'] if g_attn != 'none' else []) + (['--warmup-kimg', '0.008'] if loss == 'contrastive' else [])
        out = run_train(tmp_path, '--kimg', '0.016', '--g-attn', g_attn, '--d-attn', d_attn, '--loss', loss, *extra,
                        '--gamma', '1', '--r1-interval', '2', '--pl-weight', '2', '--pl-interval', '2', name=f'{g_attn}-{d_attn}')
        ck = load(glob.glob(f'{out}/ckpt-*.pt')[0])
        assert ck['args']['g_attn'] == g_attn and ck['args']['d_attn'] == d_attn
        nets = model.load_checkpoint(glob.glob(f'{out}/ckpt-*.pt')[0])
        assert nets['D'].needs_ref == (d_attn == 'ref')


# ==============================================================================================
# EqGAN-SA: heatmaps, SEL (model.py), GradCAM and alignment (losses.py)

TINY_G = dict(z_dim=32, w_dim=32, channel_base=256, channel_max=32, map_layers=2)


def tiny_g(sel='norm', heatmap='hier', res=16):
    torch.manual_seed(0)
    return model.Generator(res, **TINY_G, sel=sel, heatmap=heatmap)


def tiny_d(res=16, **kw):
    torch.manual_seed(1)
    return model.Discriminator(res, channel_base=256, channel_max=32, **kw).requires_grad_(False)


def sp_make(heatmap='hier', sel='norm', res=16):
    return model.SpatialEncoding(sel, heatmap, res, model.channels_per_res(256, 32, res))


def sp_draw(sp, n, seed=0):
    return sp.sample(n, 'cpu', torch.Generator().manual_seed(seed))


def set_alpha(G, value):
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith('.alpha'):
                p.fill_(value)


def corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    return ((a * b).mean() / (a.std(unbiased=False) * b.std(unbiased=False))).item()


# ==============================================================================================
# Heatmap sampling

def test_level0_centre_is_truncated_normal():
    """Level 0 ~ N(1/2, (1/3)^2) per axis re-drawn while outside [0, 1]: the moments of the normal
    truncated at +-1.5 std, mean 1/2 and std (1/3) sqrt(1 - 2 a phi(a) / (2 Phi(a) - 1)), a = 1.5."""
    c = sp_draw(sp_make(), 40000)['centers']
    assert c.shape == (40000, 7, 2)
    c0 = c[:, 0]
    assert c0.min() >= 0 and c0.max() <= 1
    a = 1.5
    phi, Z = math.exp(-a * a / 2) / math.sqrt(2 * math.pi), math.erf(a / math.sqrt(2))
    std = (1 / 3) * math.sqrt(1 - 2 * a * phi / Z)  # 0.2476 (untruncated: 0.333)
    assert torch.allclose(c0.mean(0), torch.tensor([0.5, 0.5]), atol=0.005)
    assert torch.allclose(c0.std(0), torch.tensor([std, std]), atol=0.004)
    assert abs(corr(c0[:, 0], c0[:, 1])) < 0.03  # x and y independent
    # the truncated CDF at the quartiles of the untruncated law: P(c < 1/2 - (1/3) 0.6745) = (0.25 - Phi(-a)) / Z
    q = 0.5 - 0.6745 / 3
    assert abs((c0[:, 0] < q).float().mean().item() - (0.25 - (1 - Z) / 2) / Z) < 0.01


def test_hier_finer_centres_follow_level0():
    c = sp_draw(sp_make('hier'), 40000)['centers']
    off = c[:, 1:] - c[:, :1]  # [N, 6, 2]
    assert torch.allclose(off.mean((0, 1)), torch.zeros(2), atol=0.004)
    assert torch.allclose(off.flatten(0, 1).std(0), torch.full([2], 1 / 6), atol=0.003)
    # corr(c1, c0) = sqrt(var c0 / (var c0 + 1/36)) = 0.83; offsets independent of c0
    assert corr(c[:, 1, 0], c[:, 0, 0]) > 0.78 and corr(c[:, 5, 1], c[:, 0, 1]) > 0.78
    assert abs(corr(off[:, 0, 0], c[:, 0, 0])) < 0.03


def test_nonhier_centres_are_independent():
    c = sp_draw(sp_make('nonhier'), 40000)['centers']
    assert c.min() >= 0 and c.max() <= 1  # every centre drawn like level 0
    for k in (1, 3, 6):
        assert abs(corr(c[:, k, 0], c[:, 0, 0])) < 0.03 and abs(corr(c[:, k, 1], c[:, 0, 1])) < 0.03
        assert abs(c[:, k].std(0).mean().item() - c[:, 0].std(0).mean().item()) < 0.005


def test_heatmaps_deterministic_and_render_reproduces_sample():
    sp = sp_make('hier')
    h1, h2, h3 = sp_draw(sp, 8, seed=3), sp_draw(sp, 8, seed=3), sp_draw(sp, 8, seed=4)
    assert all(torch.equal(h1[k], h2[k]) for k in h1)
    assert not torch.equal(h1['centers'], h3['centers'])
    again = sp.render(h1['centers'])
    assert set(again) == {'centers', 'h4', 'h8', 'h16'}
    assert all(torch.allclose(again[k], h1[k]) for k in h1)
    hn = sp_make('noise')
    assert torch.equal(sp_draw(hn, 4, 1)['h16'], sp_draw(hn, 4, 1)['h16'])


def test_render_values():
    """Eq. 2 with peak 1 and std one cell of the level's grid; H = sum of the level's sub-maps; (x, y) = (column, row)."""
    sp = sp_make('hier')
    c = torch.tensor([[[0.375, 0.625]] + [[0.3125, 0.5625]] * 2 + [[0.0, 0.0]] * 3 + [[0.96875, 0.03125]]])  # [1, 7, 2]
    h = sp.render(c)
    s0 = 1 / 4
    d2 = lambda x, y, cx, cy: (x - cx) ** 2 + (y - cy) ** 2
    assert h['h4'][0, 0, 2, 1].item() == pytest.approx(1.0)  # row 2 (y = 0.625), column 1 (x = 0.375)
    assert h['h4'][0, 0, 0, 3].item() == pytest.approx(math.exp(-d2(0.875, 0.125, 0.375, 0.625) / (2 * s0 ** 2)), rel=1e-5)
    assert h['h8'][0, 0, 4, 2].item() == pytest.approx(2.0)  # two coincident level-1 blobs sum
    assert h['h8'][0, 0, 4, 0].item() == pytest.approx(2 * math.exp(-(2 / 8) ** 2 / (2 * (1 / 8) ** 2)), rel=1e-5)  # width 1/8
    assert h['h16'][0, 0, 0, 15].item() == pytest.approx(1.0, abs=1e-3)  # the last blob's own pixel (others far)
    assert h['h16'][0, 0, 0, 0].item() == pytest.approx(3 * math.exp(-2 * (1 / 32) ** 2 / (2 * (1 / 16) ** 2)), rel=1e-5)
    assert sp.render(c.repeat(3, 1, 1))['h8'].shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match='centers must be'):
        sp.render(c[:, :3])


def test_levels_follow_resolution_and_noise_mode():
    sp8 = sp_make('hier', res=8)
    h = sp_draw(sp8, 5)
    assert set(h) == {'centers', 'h4', 'h8'} and h['centers'].shape == (5, 3, 2)
    hn = sp_draw(sp_make('noise'), 4000)
    assert set(hn) == {'h4', 'h8', 'h16'}  # noise maps have no centres
    assert abs(hn['h16'].mean().item()) < 0.01 and abs(hn['h16'].std().item() - 1) < 0.01
    with pytest.raises(ValueError, match='noise'):
        sp_make('noise').render(torch.zeros(1, 7, 2))


def test_shift():
    c = sp_draw(sp_make('hier'), 2)['centers']
    d = torch.tensor([0.1, -0.2])
    assert torch.allclose(sp_make('hier').shift(c, 0.1, -0.2), c + d)  # hier: the finer centres move along
    moved = sp_make('nonhier').shift(c, 0.1, -0.2)
    assert torch.allclose(moved[:, 0], c[:, 0] + d) and torch.equal(moved[:, 1:], c[:, 1:])
    target = torch.tensor([[0.5, 0.5], [0.2, 0.9]])  # per-sample: place level 0 at a given point
    moved = sp_make('hier').shift(c, target[:, 0] - c[:, 0, 0], target[:, 1] - c[:, 0, 1])
    assert torch.allclose(moved[:, 0], target) and torch.allclose(moved - moved[:, :1], c - c[:, :1], atol=1e-6)
    moved = sp_make('hier').shift(c, 0.1, -0.2, level=1)
    assert torch.allclose(moved[:, 1:3], c[:, 1:3] + d) and torch.equal(moved[:, [0, 3, 4, 5, 6]], c[:, [0, 3, 4, 5, 6]])


def test_spatial_encoding_kinds():
    ch = model.channels_per_res(256, 32, 32)
    assert model.Generator(32, **TINY_G, sel='none').spatial is None
    for sel, heatmap, bad in [('spade', 'hier', '--sel'), ('none', 'hier', '--sel'), ('norm', 'gauss', '--heatmap')]:
        with pytest.raises(ValueError, match=bad):
            model.SpatialEncoding(sel, heatmap, 32, ch)
    with pytest.raises(ValueError, match='--sel'):
        model.Generator(32, **TINY_G, sel='spade')
    fl = model.SpatialEncoding('flatten', 'hier', 32, ch)
    h = sp_draw(fl, 3)
    assert fl.flat_dim == 16 + 64 + 256 and fl.flat(h).shape == (3, 336) and fl.encode(h) == {}
    assert fl.sel_layers(8, 2) is None and len(list(fl.parameters())) == 0
    no = model.SpatialEncoding('norm', 'hier', 32, ch)
    assert no.flat_dim == 0 and no.flat(h) is None and no.sel_layers(32, 2) is None
    assert {r: v.shape for r, v in no.encode(h).items()} == {r: (3, model.HEAT_HIDDEN, r, r) for r in (4, 8, 16)}


# ==============================================================================================
# Spatial encoding layers

@pytest.mark.parametrize('sel', ['norm', 'concat'])
def test_sel_is_identity_at_init(sel):
    """alpha starts at 0: every SEL returns its input exactly, and G equals the same G without SELs."""
    G = tiny_g(sel, res=32)
    assert G.synthesis.b32.sel is None and all(getattr(G.synthesis, f'b{r}').sel is not None for r in (4, 8, 16))
    h = G.sample_heatmaps(2, 'cpu', torch.Generator().manual_seed(0))
    hf = G.spatial.encode(h)
    x = torch.randn(2, 32, 8, 8)
    for layer in G.synthesis.b8.sel:
        assert torch.equal(layer(x, hf[8]), x)
    z = torch.randn(2, 32)
    img = G(z, heatmaps=h, noise_mode='const')
    G.synthesis.b16.sel = G.synthesis.b8.sel = G.synthesis.b4.sel = None  # the plain StyleGAN2 block
    assert torch.equal(G(z, heatmaps=h, noise_mode='const'), img)


def test_sel_norm_eq3():
    """With phi_sigma = 1 + g and phi_mu = b constant maps, SEL_norm(F) = F + alpha ((1 + g) IN(F) + b)."""
    G = tiny_g('norm')
    layer = G.synthesis.b8.sel[1]
    with torch.no_grad():
        layer.alpha.copy_(torch.linspace(-1, 1, 32))
        for conv, v in ((layer.gamma, 0.5), (layer.beta, -0.3)):
            conv.weight.zero_()
            conv.bias.fill_(v)
    x = torch.randn(3, 32, 8, 8) * 3 + 2
    h = G.spatial.encode(G.sample_heatmaps(3, 'cpu'))[8]
    want = x + layer.alpha.view(1, -1, 1, 1) * (1.5 * F.instance_norm(x, eps=1e-5) - 0.3)
    assert torch.allclose(layer(x, h), want, atol=1e-5)
    # and the scale map really is point-wise in the heatmap: phi_sigma(H) = 1 + conv3x3(h)
    with torch.no_grad():
        layer.gamma.weight.normal_()
    y = layer(x, h) - x
    g = 1 + F.conv2d(h, layer.gamma.weight * layer.gamma.weight_gain, layer.gamma.bias, padding=1)  # [3, 1, 8, 8]
    assert torch.allclose(y, layer.alpha.view(1, -1, 1, 1) * (g * F.instance_norm(x, eps=1e-5) - 0.3), atol=1e-4)


def test_heatmap_encoder_and_sel_placement():
    """h = lrelu(conv3x3(H) + b) sqrt 2 per level (equalized lr: weight / sqrt(9)); each block has two SELs
    of its own, one between conv0 (or the const) and conv1, one between conv1 and toRGB."""
    G = tiny_g('norm')
    with torch.no_grad():
        for e in G.spatial.enc.values():
            e.bias.normal_()
    h = G.sample_heatmaps(2, 'cpu', torch.Generator().manual_seed(0))
    for r, got in G.spatial.encode(h).items():
        e = G.spatial.enc[str(r)]
        assert torch.allclose(got, LRELU(F.conv2d(h[f'h{r}'], e.weight / 3, e.bias, padding=1)), atol=1e-6)
    ids = [id(p) for p in G.parameters()]
    assert len(ids) == len(set(ids))  # no SEL module or parameter shared between places
    seen = []
    for name, m in G.synthesis.named_modules():
        if isinstance(m, (model.SELNorm, model.SynthesisLayer, model.ToRGB)):
            m.register_forward_pre_hook(lambda mod, args, name=name: seen.append(name))
    G(torch.randn(1, 32), noise_mode='const')
    assert seen == ['b4.sel.0', 'b4.conv1', 'b4.sel.1', 'b4.torgb', 'b8.conv0', 'b8.sel.0', 'b8.conv1', 'b8.sel.1',
                    'b8.torgb', 'b16.conv0', 'b16.sel.0', 'b16.conv1', 'b16.sel.1', 'b16.torgb']


@pytest.mark.parametrize('heatmap', ['hier', 'nonhier', 'noise'])
@pytest.mark.parametrize('sel', ['norm', 'concat', 'flatten'])
def test_generator_every_combination(sel, heatmap):
    G = tiny_g(sel, heatmap)
    set_alpha(G, 0.5)  # as after some training (at init the SELs are the identity)
    gen = torch.Generator().manual_seed(0)
    h = G.sample_heatmaps(2, 'cpu', gen)
    z = torch.randn(2, 32)
    img = G(z, heatmaps=h, noise_mode='const')
    assert img.shape == (2, 3, 16, 16) and img.isfinite().all()
    if heatmap == 'noise':
        other = G.sample_heatmaps(2, 'cpu', gen)
    else:
        other = G.spatial.render(G.spatial.shift(h['centers'], 0.2, -0.1))
    diff = (G(z, heatmaps=other, noise_mode='const') - img).abs().amax((1, 2, 3))
    assert (diff > 1e-4).all()  # moving the heatmap changes every sample
    assert G(z, noise_mode='const').shape == (2, 3, 16, 16)  # samples its own heatmaps
    if sel == 'flatten':
        assert G.mapping.fc0.weight.shape[1] == 32 + 336 and G.synthesis.b8.sel is None


# ==============================================================================================
# GradCAM and the alignment loss

def test_gradcam_linear_d():
    """logits_i = sum_{c,y,x} W[c,y,x] A_i[c,y,x]: d logit_i / dA_i = W, weights mean_yx W_c,
    CAM = min-max(relu(sum_c mean(W_c) A_c)); and d CAM / d input through A only."""
    torch.manual_seed(0)
    B, C, r = 3, 5, 4
    W = torch.randn(C, r, r)
    x = torch.randn(B, C, r, r, requires_grad=True)
    A = x * 1.0
    cam = losses.gradcam((A * W).sum((1, 2, 3)), {r: A}, [r])[r]
    want = F.relu((W.mean((1, 2)).view(1, C, 1, 1) * x).sum(1, keepdim=True))
    lo, hi = want.flatten(1).min(1).values.view(B, 1, 1, 1), want.flatten(1).max(1).values.view(B, 1, 1, 1)
    want = (want - lo) / (hi - lo)
    assert cam.shape == (B, 1, r, r) and torch.allclose(cam, want, atol=1e-6)


def test_gradcam_differentiates_through_the_weights():
    """Quadratic 'D' logits = sum W A^2: the weights mean_yx(2 W_c A_c) depend on the input, and the
    gradient of a loss on the CAM must include that path (create_graph=True)."""
    torch.manual_seed(0)
    B, C, r = 2, 4, 4
    W = torch.randn(C, r, r)
    x = torch.randn(B, C, r, r, requires_grad=True)
    target = torch.rand(B, 1, r, r)
    cam = losses.gradcam((W * x.square()).sum((1, 2, 3)), {r: x}, [r])[r]
    (g_cam,) = torch.autograd.grad((cam - target).abs().sum(), x)
    xr = x.detach().clone().requires_grad_(True)
    want = F.relu(((2 * W * xr).mean((2, 3), keepdim=True) * xr).sum(1, keepdim=True))
    (g_want,) = torch.autograd.grad((losses.minmax(want) - target).abs().sum(), xr)
    assert torch.allclose(g_cam, g_want, atol=1e-5)
    xd = x.detach().clone().requires_grad_(True)  # without the weights' path the gradient differs
    want = F.relu(((2 * W * xd.detach()).mean((2, 3), keepdim=True) * xd).sum(1, keepdim=True))
    (g_no,) = torch.autograd.grad((losses.minmax(want) - target).abs().sum(), xd)
    assert not torch.allclose(g_cam, g_no, atol=1e-3)
    # 'detached' (the authors' code): the same CAM, and exactly the gradient without the weights' path
    cam_d = losses.gradcam((W * x.square()).sum((1, 2, 3)), {r: x}, [r], weights='detached')[r]
    (g_d,) = torch.autograd.grad((cam_d - target).abs().sum(), x)
    assert torch.allclose(cam_d, cam, atol=1e-6) and torch.allclose(g_d, g_no, atol=1e-5)
    with pytest.raises(ValueError, match='GradCAM weights'):
        losses.gradcam(x.sum((1, 2, 3)), {r: x}, [r], weights='none')


def test_truncation_semantics():
    err = torch.tensor([0.1, -0.3, 0.5, 0.2])
    assert losses.truncated_l1(err, 0.25).item() == pytest.approx((0.3 + 0.5) / 4)  # paper: dead zone, mean over all
    assert losses.truncated_l1(err, 0.25, 'official').item() == pytest.approx((0.3 + 0.5) / 2)  # mean over those > tau
    one = torch.tensor([0.1, 0.5, -0.2, 0.1])
    assert losses.truncated_l1(one, 0.25).item() == pytest.approx(0.5 / 4)
    assert losses.truncated_l1(one, 0.25, 'official').item() == pytest.approx(0.9 / 4)  # < 2 exceed: mean of all
    small = torch.tensor([0.1, -0.25, 0.2])
    assert losses.truncated_l1(small, 0.25).item() == 0
    with pytest.raises(ValueError, match='truncation'):
        losses.truncated_l1(err, 0.25, 'soft')


def test_align_loss_hand_computed():
    """A linear 'D' whose CAM is known: L = sum over levels of the truncated mean |CAM - minmax(H)|."""
    torch.manual_seed(0)
    B = 2
    x4, x8 = torch.rand(B, 1, 4, 4), torch.rand(B, 1, 8, 8)  # one channel, weight 1: CAM = minmax(x)
    A4, A8 = x4.clone().requires_grad_(True), x8.clone().requires_grad_(True)
    logits = A4.sum((1, 2, 3)) + A8.sum((1, 2, 3))
    sp = sp_make('hier')
    h = sp_draw(sp, B)
    for tau, mode in [(0.25, 'paper'), (0.1, 'official'), (0.0, 'paper')]:
        got = losses.align_loss(logits, {4: A4, 8: A8}, h, tau, mode)
        want = sum(losses.truncated_l1(losses.minmax(x) - losses.minmax(h[f'h{r}']), tau, mode)
                   for r, x in ((4, x4), (8, x8)))  # h16 has no D map: not compared
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
    e = (losses.minmax(x4) - losses.minmax(h['h4'])).abs()
    got = losses.align_loss(logits, {4: A4}, h, 0.0)
    assert got.item() == pytest.approx(e.mean().item(), rel=1e-5)  # tau 0: the plain L1 of Eq. 4


def test_align_grad_reaches_g_not_d():
    G, D = tiny_g('norm', res=32), tiny_d(32)
    set_alpha(G, 0.5)
    h = G.sample_heatmaps(4, 'cpu', torch.Generator().manual_seed(0))
    logits, maps = D(G(torch.randn(4, 32), heatmaps=h), return_maps=True)
    assert sorted(maps) == [4, 8, 16]
    loss = losses.align_loss(logits, maps, h)
    assert loss.item() > 0
    loss.backward()
    assert all(p.grad is None for p in D.parameters())
    for name in ('synthesis.b32.conv1.weight', 'synthesis.b8.sel.0.gamma.weight', 'spatial.enc.16.weight', 'mapping.fc0.weight'):
        assert G.get_parameter(name).grad.abs().sum() > 0, name


def test_align_with_reference_attention_d():
    """Siamese D: maps above the fusion (8x8) hold 2B rows; the CAM keeps the primaries."""
    if not hasattr(model.attention, 'RefAttention'):
        pytest.skip('attention.py has no RefAttention yet')
    G, D = tiny_g('norm', res=32), tiny_d(32, d_attn='ref', d_attn_res=16)
    set_alpha(G, 0.5)
    h = G.sample_heatmaps(2, 'cpu', torch.Generator().manual_seed(0))
    ref = torch.randn(2, 3, 32, 32)
    logits, maps = D(G(torch.randn(2, 32), heatmaps=h), ref, return_maps=True)
    assert maps[16].shape[0] == 4 and maps[8].shape[0] == 2 and logits.shape == (2,)
    cams = losses.gradcam(logits, maps, [8, 16])
    assert cams[16].shape == (2, 1, 16, 16) and cams[8].shape == (2, 1, 8, 8)
    (g,) = torch.autograd.grad(logits.sum(), maps[16], retain_graph=True)  # [4, C, 16, 16]
    assert g[2:].abs().sum() > 0  # the references take part in the score ...
    want = F.relu((g[:2].mean((2, 3), keepdim=True) * maps[16][:2]).sum(1, keepdim=True))
    assert torch.allclose(cams[16], losses.minmax(want), atol=1e-5)  # ... but the CAM is the primaries'
    loss = losses.align_loss(logits, maps, h)
    loss.backward()
    assert loss.isfinite() and all(p.grad is None for p in D.parameters())
    assert G.synthesis.b16.sel[1].alpha.grad.abs().sum() > 0


# ==============================================================================================
# data.py

# ---- synthetic dataset

def test_synthetic_deterministic_per_index_and_varied():
    a, b = data.SyntheticShapes(32, 100, seed=0), data.SyntheticShapes(32, 100, seed=0)
    assert torch.equal(a[7], b[7]) and torch.equal(a[7], a[7])
    imgs = torch.stack([a[i] for i in range(20)])
    assert len({x.numpy().tobytes() for x in imgs}) == 20                        # every index differs
    assert not torch.equal(data.SyntheticShapes(32, 100, seed=1)[7], a[7])       # the seed matters
    assert (imgs.float().std(dim=(1, 2, 3)) > 5).all()                           # no blank images
    assert (imgs.float().amax(1) - imgs.float().amin(1)).amax() > 100            # coloured objects on grey

@pytest.mark.parametrize('res', [16, 32])
def test_synthetic_shape_dtype(res):
    ds = data.make_dataset(None, res, max_images=10)
    x = ds[3]
    assert x.shape == (3, res, res) and x.dtype == torch.uint8 and len(ds) == 10
    assert ds.resolution == res and ds.name == 'synthetic-seed0-n10'

def test_synthetic_scene_parameters():
    ds = data.SyntheticShapes(32, 300)
    scenes = [ds.scene(i) for i in range(300)]
    counts = [len(s['objects']) for s in scenes]
    assert min(counts) >= 1 and max(counts) <= 4 and set(counts) == {1, 2, 3, 4}
    objs = [o for s in scenes for o in s['objects']]
    assert {o['shape'] for o in objs} == {'sphere', 'cube', 'cylinder'}
    assert {o['colour'] for o in objs} == set(range(8)) and {o['metal'] for o in objs} == {True, False}
    assert all([o['z'] for o in s['objects']] == sorted([o['z'] for o in s['objects']], reverse=True) for s in scenes)  # far first

def test_synthetic_resolutions_agree():
    # the same scene at two resolutions: the 64 px render box-downsampled is close to the 32 px one
    x32, x64 = data.SyntheticShapes(32, 10)[2].float(), data.SyntheticShapes(64, 10)[2].float()
    down = torch.nn.functional.avg_pool2d(x64[None], 2)[0]
    assert (down - x32).abs().mean() < 4

def test_data_bad_resolution():
    with pytest.raises(data.DataError, match='48 is not a power of two'):
        data.make_dataset(None, 48)
    with pytest.raises(data.DataError):
        data.make_dataset(None, 4096)

# ---- image folders and zips

def _data_png(im):
    buf = io.BytesIO()
    im.save(buf, format='PNG')
    return buf.getvalue()

def _data_mixed_images():
    """name -> (PIL image, expected uint8 [3, 32, 32] or None when only the shape is checked)."""
    out = {}
    g = Image.new('L', (32, 32), 77)
    out['a/gray.png'] = (g, np.full((3, 32, 32), 77))
    la = Image.new('LA', (32, 32), (100, 255))
    la.putpixel((0, 0), (0, 0))                                           # fully transparent -> white
    exp = np.full((3, 32, 32), 100); exp[:, 0, 0] = 255
    out['a/la.png'] = (la, exp)
    rgba = Image.new('RGBA', (32, 32), (200, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))
    exp = np.zeros((3, 32, 32)); exp[0] = 200; exp[:, 0, 1] = 255
    out['b/rgba.PNG'] = (rgba, exp)                                       # upper-case extension
    p = Image.new('P', (32, 32), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.info['transparency'] = 0                                            # palette entry 0 is transparent -> white
    p.putpixel((2, 0), 0)
    exp = np.broadcast_to(np.array([10, 20, 30])[:, None, None], (3, 32, 32)).copy(); exp[:, 0, 2] = 255
    out['b/pal.png'] = (p, exp)
    out['c/i16.png'] = (Image.new('I;16', (32, 32), 40000), np.full((3, 32, 32), 156))  # 40000 / 257 = 155.6, not clipped to 255
    out['c/cmyk.jpg'] = (Image.new('CMYK', (32, 32), (0, 255, 255, 0)), None)  # red; JPEG is lossy, checked loosely below
    # non-square: the centre crop of a 48x32 image keeps columns 8..39, of a 32x64 one rows 16..47 (no resampling)
    rng = np.random.default_rng(0)
    wide, tall = rng.integers(0, 256, (32, 48), dtype=np.uint8), rng.integers(0, 256, (64, 32), dtype=np.uint8)
    out['d/wide.png'] = (Image.fromarray(wide), np.broadcast_to(wide[:, 8:40], (3, 32, 32)))
    out['d/tall.png'] = (Image.fromarray(tall), np.broadcast_to(tall[16:48], (3, 32, 32)))
    big = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))   # LANCZOS of the centre 64x64 to 32
    out['e/big.png'] = (big, np.asarray(big.resize((32, 32), Image.LANCZOS, box=(16, 0, 80, 64))).transpose(2, 0, 1))
    return out

def _data_write_folder(root, images):
    for name, (im, _) in images.items():
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        im.save(os.path.join(root, name))

def _data_check_mixed(ds, images):
    names = sorted(images, key=str)
    assert ds.names == names and len(ds) == len(images) and ds.resolution == 32
    for i, name in enumerate(names):
        x, expected = ds[i], images[name][1]
        assert x.shape == (3, 32, 32) and x.dtype == torch.uint8, name
        if expected is not None:
            assert np.array_equal(x.numpy(), expected), name
    red = ds[names.index('c/cmyk.jpg')].float().mean((1, 2))
    assert red[0] > 230 and red[1] < 25 and red[2] < 25

def test_data_folder_mixed_modes(tmp_path):
    images = _data_mixed_images()
    _data_write_folder(tmp_path / 'imgs', images)
    (tmp_path / 'imgs' / 'notes.txt').write_text('not an image, and ignored')
    os.makedirs(tmp_path / 'imgs' / '.ipynb_checkpoints')
    (tmp_path / 'imgs' / '.ipynb_checkpoints' / 'junk.png').write_text('ignored too')
    ds = data.make_dataset(str(tmp_path / 'imgs'), 32)
    _data_check_mixed(ds, images)
    assert ds.name.startswith('imgs-') and ds.name.endswith(f'-n{len(images)}')
    assert len(data.make_dataset(str(tmp_path / 'imgs'), 32, max_images=3)) == 3

def test_data_zip_dataset_tool_layout(tmp_path):
    images = _data_mixed_images()
    # stylegan2-ada dataset_tool: 00000/img00000000.png ... and a dataset.json (ignored here)
    renamed = {f'{i // 4:05d}/img{i:08d}.png': (im.convert('RGB') if im.mode == 'CMYK' else im, exp)
               for i, (im, exp) in enumerate(images.values())}
    path = tmp_path / 'ds.zip'
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('dataset.json', json.dumps({'labels': None}))
        z.writestr('__MACOSX/00000/._img00000000.png', b'resource fork debris')
        for name, (im, _) in renamed.items():
            z.writestr(name, _data_png(im))
    ds = data.make_dataset(str(path), 32)
    assert ds.names == sorted(renamed)
    for i, name in enumerate(ds.names):
        if renamed[name][1] is not None:
            assert np.array_equal(ds[i].numpy(), renamed[name][1]), name
    ds._zipfile()                                                          # an open handle must not break pickling
    assert torch.equal(pickle.loads(pickle.dumps(ds))[0], ds[0])

# ---- bad input

def test_data_missing_and_empty(tmp_path):
    with pytest.raises(data.DataError, match='does not exist'):
        data.make_dataset(str(tmp_path / 'nope'), 32)
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'a.txt').write_text('x')
    with pytest.raises(data.DataError, match='no images .* found under .*empty'):
        data.make_dataset(str(tmp_path / 'empty'), 32)
    with zipfile.ZipFile(tmp_path / 'e.zip', 'w') as z:
        z.writestr('dataset.json', '{}')
    with pytest.raises(data.DataError, match='no images .* found under .*e.zip'):
        data.make_dataset(str(tmp_path / 'e.zip'), 32)
    (tmp_path / 'f.png').write_bytes(_data_png(Image.new('RGB', (32, 32))))
    with pytest.raises(data.DataError, match='not a .zip'):
        data.make_dataset(str(tmp_path / 'f.png'), 32)

def _data_bad_folder(root):
    os.makedirs(root)
    for i in range(4):
        Image.new('RGB', (32, 32), (i * 50, 0, 0)).save(os.path.join(root, f'ok{i}.png'))
    with open(os.path.join(root, 'fake.jpg'), 'w') as f:
        f.write('<html>not an image</html>')
    Image.new('RGB', (20, 40)).save(os.path.join(root, 'small.png'))
    full = _data_png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    with open(os.path.join(root, 'ok2_trunc.png'), 'wb') as f:            # sorts between ok2 and ok3
        f.write(full[:len(full) // 2])

def test_data_bad_files_named(tmp_path):
    root = str(tmp_path / 'bad')
    _data_bad_folder(root)
    with pytest.raises(data.DataError, match=r'1 file\(s\) are not readable images: fake.jpg; 1 image\(s\) are smaller '
                                             r'than --resolution 32 on their short side: small.png; delete or re-save them, '
                                             r'lower --resolution, or pass --skip-bad') as e:
        data.make_dataset(root, 32)  # both kinds at once
    assert '\n' not in str(e.value)
    os.remove(os.path.join(root, 'fake.jpg'))
    with pytest.raises(data.DataError, match=r'1 image\(s\) are smaller than --resolution 32.*small.png; lower --resolution, or') as e:
        data.make_dataset(root, 32)
    os.remove(os.path.join(root, 'small.png'))
    ds = data.make_dataset(root, 32)                                      # truncation is found when decoded
    ds[0]
    with pytest.raises(data.DataError, match='ok2_trunc.png could not be decoded') as e:
        ds[ds.names.index('ok2_trunc.png')]
    assert '\n' not in str(e.value)

def test_data_skip_bad(tmp_path, capsys):
    root = str(tmp_path / 'bad')
    _data_bad_folder(root)
    ds = data.make_dataset(root, 32, skip_bad=True)
    assert ds.names == ['ok0.png', 'ok1.png', 'ok2.png', 'ok2_trunc.png', 'ok3.png']
    assert {n for n, _ in ds.bad} == {'fake.jpg', 'small.png'}
    i = ds.names.index('ok2_trunc.png')
    x = ds[i]
    assert torch.equal(x, ds[i + 1]) and ds.num_skipped == 1              # deterministic substitute: the next good file
    ds[i]
    assert ds.num_skipped == 2
    err = capsys.readouterr().err
    assert err.count('skipping') == 1 and 'ok2_trunc.png' in err           # warned once per file
    bad = data.check_images(root, 32)
    assert [n for n, _ in bad] == ['fake.jpg', 'ok2_trunc.png', 'small.png']
    assert data.main(['--data', root, '--check']) == 1
    out = capsys.readouterr().out
    assert all(n in out for n in ('fake.jpg', 'ok2_trunc.png', 'small.png'))

# ---- loader

class _IndexedData(torch.utils.data.Dataset):
    """Item i: pixel values encode i; columns differ, so an x-flip is visible."""
    def __init__(self, n):
        self.n = n
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        x = torch.zeros(3, 4, 4, dtype=torch.uint8)
        x[0], x[1] = i % 256, i // 256
        x[2] = torch.arange(4, dtype=torch.uint8)
        return x

def _data_ids(batch):  # [b, 3, 4, 4] -> dataset indices
    return (batch[:, 0, 0, 0].long() + 256 * batch[:, 1, 0, 0].long()).tolist()

def _data_take(loader, k):
    return [next(loader) for _ in range(k)]

def test_loader_order_epochs_and_determinism():
    ds = _IndexedData(10)
    a = _data_take(data.InfiniteLoader(ds, 4, seed=3, workers=0), 10)         # 40 positions = 4 epochs
    b = _data_take(data.InfiniteLoader(ds, 4, seed=3, workers=0), 10)
    c = _data_take(data.InfiniteLoader(ds, 4, seed=4, workers=0), 10)
    assert all(x.shape == (4, 3, 4, 4) and x.dtype == torch.uint8 for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    ids = sum((_data_ids(x) for x in a), [])
    assert ids != sum((_data_ids(x) for x in c), [])
    epochs = [ids[i:i + 10] for i in range(0, 40, 10)]
    assert all(sorted(e) == list(range(10)) for e in epochs)              # each epoch is a permutation
    assert len({tuple(e) for e in epochs}) > 1                            # reshuffled per epoch

def test_loader_resume():
    ds = _IndexedData(7)
    full = sum((_data_ids(x) for x in _data_take(data.InfiniteLoader(ds, 3, seed=1, workers=0), 8)), [])
    resumed = sum((_data_ids(x) for x in _data_take(data.InfiniteLoader(ds, 3, seed=1, start_nimg=9, workers=0), 5)), [])
    assert resumed == full[9:24]
    odd = _data_ids(next(data.InfiniteLoader(ds, 3, seed=1, start_nimg=5, workers=0)))  # not a batch boundary
    assert odd == full[5:8]

def test_loader_world_size_invariance():
    ds = _IndexedData(13)
    one = _data_take(data.InfiniteLoader(ds, 6, seed=2, mirror=True, workers=0), 5)
    r0 = _data_take(data.InfiniteLoader(ds, 3, rank=0, world_size=2, seed=2, mirror=True, workers=0), 5)
    r1 = _data_take(data.InfiniteLoader(ds, 3, rank=1, world_size=2, seed=2, mirror=True, workers=0), 5)
    assert all(torch.equal(x, torch.cat([a, b])) for x, a, b in zip(one, r0, r1))
    r1_resumed = next(data.InfiniteLoader(ds, 3, rank=1, world_size=2, seed=2, start_nimg=12, mirror=True, workers=0))
    assert torch.equal(r1_resumed, r1[2])

def test_loader_mirror():
    ds = _IndexedData(50)
    plain = torch.cat(_data_take(data.InfiniteLoader(ds, 25, seed=5, workers=0), 4))
    m1 = torch.cat(_data_take(data.InfiniteLoader(ds, 25, seed=5, mirror=True, workers=0), 4))
    m2 = torch.cat(_data_take(data.InfiniteLoader(ds, 25, seed=5, mirror=True, workers=0), 4))
    assert torch.equal(m1, m2) and _data_ids(m1) == _data_ids(plain)
    flipped = (m1[:, 2, 0] != plain[:, 2, 0]).any(1)
    assert torch.equal(m1[flipped], plain[flipped].flip(3)) and torch.equal(m1[~flipped], plain[~flipped])
    assert 30 < flipped.sum() < 70                                          # about half of 100
    other = torch.cat(_data_take(data.InfiniteLoader(ds, 25, seed=6, mirror=True, workers=0), 4))
    assert not torch.equal(flipped, other[:, 2, 0, 0] != 0)                 # the flips depend on the seed

class _CountingData(_IndexedData):  # counts how often each item is made
    def __init__(self, n):
        super().__init__(n)
        self.made = [0] * n
    def __getitem__(self, i):
        self.made[i] += 1
        return super().__getitem__(i)

def test_loader_keeps_a_small_data_set_and_yields_the_same_batches(monkeypatch):
    kept = _CountingData(10)
    a = _data_take(data.InfiniteLoader(kept, 4, seed=3, mirror=True, workers=0), 10)  # 4 epochs
    assert kept.made == [1] * 10                                          # each item made once, then kept
    monkeypatch.setattr(data, 'CACHE_BYTES', 10 * 48 - 1)                 # one byte short of the whole set
    fresh = _CountingData(10)
    b = _data_take(data.InfiniteLoader(fresh, 4, seed=3, mirror=True, workers=0), 10)
    assert fresh.made == [4] * 10                                         # too large: made on every use
    assert all(torch.equal(x, y) for x, y in zip(a, b))                   # the same batches, flips included

def test_loader_workers_match_and_errors_are_one_line(tmp_path):
    ds = _IndexedData(9)
    w0 = _data_take(data.InfiniteLoader(ds, 4, seed=7, mirror=True, workers=0), 4)
    w1 = _data_take(data.InfiniteLoader(ds, 4, seed=7, mirror=True, workers=1), 4)
    assert all(torch.equal(x, y) for x, y in zip(w0, w1))
    root = str(tmp_path / 'bad')
    _data_bad_folder(root)
    for f in ('fake.jpg', 'small.png'):
        os.remove(os.path.join(root, f))
    loader = data.InfiniteLoader(data.make_dataset(root, 32), 5, workers=1)  # one batch = one epoch: hits the truncated file
    with pytest.raises(data.DataError, match='ok2_trunc.png could not be decoded') as e:
        next(loader)
    assert '\n' not in str(e.value) and 'Traceback' not in str(e.value)

def test_data_16bit_scaled_by_257_and_rounded():
    """16-bit pixels map to 8 bits as rint(v / 257) (65535 -> 255): values v = 257 k + 128 sit just
    below k + 0.5, so they give k exactly (/ 256 would give k + 1, truncation or clipping other
    values; k = 255 uses 65535). Both the I;16 mode of a 16-bit PNG (via the folder dataset) and PIL's 32-bit 'I'."""
    k = np.arange(256)
    v = np.minimum(257 * k + 128, 65535).reshape(16, 16)  # the last one: 65535 -> 255
    want = np.broadcast_to(k.reshape(16, 16), (3, 16, 16))
    im16 = Image.fromarray(v.astype(np.uint16))
    assert im16.mode == 'I;16'
    assert np.array_equal(np.asarray(data._to_rgb(im16)).transpose(2, 0, 1), want)
    im32 = Image.fromarray(v.astype(np.int32))
    assert im32.mode == 'I'
    assert np.array_equal(np.asarray(data._to_rgb(im32)).transpose(2, 0, 1), want)
    top = Image.fromarray(np.full((2, 2), 65535, np.uint16))
    assert np.asarray(data._to_rgb(top)).min() == 255


def test_data_16bit_png_through_the_folder_dataset(tmp_path):
    """The same ramp written as a 16-bit PNG and read back by ImageFolderDataset (16 px, no resize)."""
    k = np.arange(256)
    root = tmp_path / 'i16'
    root.mkdir()
    Image.fromarray(np.minimum(257 * k + 128, 65535).reshape(16, 16).astype(np.uint16)).save(root / 'ramp.png')
    ds = data.make_dataset(str(root), 16)
    assert np.array_equal(ds[0].numpy(), np.broadcast_to(k.reshape(16, 16), (3, 16, 16)))


def test_data_exif_rotation_then_centre_crop(tmp_path):
    """EXIF orientation 6 ('rotate 90 degrees clockwise to display') is applied before the crop:
    a stored 32 wide x 48 tall image shows 48 wide x 32 tall, np.rot90(a, -1), whose centre crop
    keeps columns 8..39. Odd margins round the offset down: 49 x 32 keeps columns 8..39
    ((49 - 32) // 2 = 8), 32 x 51 keeps rows 9..40."""
    rng = np.random.default_rng(0)
    root = tmp_path / 'exif'
    root.mkdir()
    a = rng.integers(0, 256, (48, 32), dtype=np.uint8)  # [H, W]
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(root / 'a_rot.png', exif=exif)
    wide, tall = rng.integers(0, 256, (32, 49), dtype=np.uint8), rng.integers(0, 256, (51, 32), dtype=np.uint8)
    Image.fromarray(wide).save(root / 'b_wide.png')
    Image.fromarray(tall).save(root / 'c_tall.png')
    ds = data.make_dataset(str(root), 32)
    assert ds.names == ['a_rot.png', 'b_wide.png', 'c_tall.png']
    rot = np.rot90(a, -1)  # [32, 48]: out[i, j] = a[47 - j, i]
    assert rot[0, 0] == a[47, 0] and rot[31, 47] == a[0, 31]
    for i, want in enumerate([rot[:, 8:40], wide[:, 8:40], tall[9:41]]):
        assert np.array_equal(ds[i].numpy(), np.broadcast_to(want, (3, 32, 32))), ds.names[i]


def test_data_max_images_keeps_the_first_n_good_images(tmp_path, capsys):
    """--max-images N keeps the first N *good* images in sorted order: a dropped file before them
    (--skip-bad) does not count, and files after the N-th good one are not even opened.
    --max-images 0 (or below) keeps nothing and is refused, for folders and the built-in data."""
    root = str(tmp_path / 'bad')
    _data_bad_folder(root)  # sorted: fake.jpg (not an image), ok0, ok1, ok2, ok2_trunc, ok3, small.png (too small)
    ds = data.make_dataset(root, 32, max_images=3, skip_bad=True)
    assert ds.names == ['ok0.png', 'ok1.png', 'ok2.png'] and [n for n, _ in ds.bad] == ['fake.jpg']
    os.remove(os.path.join(root, 'fake.jpg'))
    ds = data.make_dataset(root, 32, max_images=2)  # small.png comes after: never read, no error
    assert ds.names == ['ok0.png', 'ok1.png'] and ds.bad == [] and ds.name.endswith('-n2')
    assert len(data.make_dataset(None, 16, max_images=1)) == 1
    for path in (None, root):
        for n in (0, -3):
            with pytest.raises(data.DataError, match=f'--max-images {n} keeps no images'):
                data.make_dataset(path, 32, max_images=n)


def test_synthetic_scene_depends_on_seed_and_index_not_their_sum():
    """Item i of seed s is drawn from default_rng([s, i]): (s, i) pairs with the same s + i are
    different scenes (a seed s + i would make seed 1 item 6 == seed 0 item 7), while the same pair
    gives the same scene in a fresh object."""
    scenes = [data.SyntheticShapes(16, 10, seed=s).scene(7 - s) for s in range(4)]
    floors = [sc['floor'] for sc in scenes]
    assert len(set(floors)) == 4, floors
    assert not torch.equal(data.SyntheticShapes(16, 10, seed=1)[6], data.SyntheticShapes(16, 10, seed=0)[7])
    again = data.SyntheticShapes(16, 10, seed=2).scene(5)
    assert again['floor'] == scenes[2]['floor'] and np.array_equal(again['light'], scenes[2]['light'])


def test_synthetic_empty_floor_is_lit_towards_the_camera():
    """An empty scene is the grey floor alone: brighter towards the camera (the bottom rows), mirror-
    symmetric left-right, 0.5 x (1 + (y - 0.5) / 4 - 0.35 ((x - 0.5)^2 + (y - 0.55)^2)) at pixel centres."""
    img = data.SyntheticShapes(16, 1).render(dict(floor=0.5, light=np.array([0, 1, 0], np.float32), objects=[])) / 255
    y, x = (np.arange(16)[:, None] + 0.5) / 16, (np.arange(16)[None] + 0.5) / 16
    want = 0.5 * (1 + 0.25 * (y - 0.5) - 0.35 * ((x - 0.5) ** 2 + (y - 0.55) ** 2))
    assert np.abs(img - want).max() <= 0.5 / 255 + 1e-6
    assert (img[:, -1] > img[:, 0]).all() and np.array_equal(img, img[:, :, ::-1])


def test_synthetic_shadow_only_darkens_the_floor_by_at_most_60_percent(monkeypatch):
    """With the objects' own drawing switched off, the render is floor x (1 - shadow) with the
    smoothstep shadow in [0, 0.6]: some pixels darker, none brighter, none below 0.4 x the floor
    (up to the uint8 rounding of +-0.5)."""
    ds = data.SyntheticShapes(32, 10)
    for shape in ('sphere', 'cube', 'cylinder'):
        monkeypatch.setattr(ds, '_' + shape, lambda *a: None, raising=False)
    scene = ds.scene(3)
    floor = np.repeat(ds._floor[None] * scene['floor'], 3, 0) * 255  # [3, H, W], before rounding
    img = ds.render(scene).astype(np.float64)
    assert (img <= floor + 0.5 + 1e-6).all()
    assert (img >= 0.4 * floor - 0.5 - 1e-6).all()
    darker = img < floor - 3
    assert darker.sum() > 10 and (img / floor).min() < 0.6  # a visible shadow with a dark core
    empty = dict(scene, objects=[])
    assert np.abs(ds.render(empty).astype(np.float64) - floor).max() <= 0.5 + 1e-6


def test_loader_mirror_flips_follow_the_position_not_the_item():
    """The x-flip is drawn per global position, not per dataset item: over 8 epochs of a 10-image
    dataset every item is seen both flipped and not (a flip tied to the item would show each image
    in one orientation only, which is no augmentation)."""
    ds = _IndexedData(10)
    batches = _data_take(data.InfiniteLoader(ds, 5, seed=3, mirror=True, workers=0), 16)  # 80 positions
    seen = {}
    for x in batches:
        for i, f in zip(_data_ids(x), (x[:, 2, 0, 0] != 0).tolist()):  # column 0 holds 3 when flipped
            seen.setdefault(i, set()).add(f)
    assert sorted(seen) == list(range(10)) and all(v == {True, False} for v in seen.values()), seen


def test_loader_workers_leave_stop_signals_to_the_main_process():
    """Workers take neither Ctrl-C nor a cluster's SIGTERM (the main process may still need a batch
    to finish its step: train.py) but end at once, with status 0, at their parent's SIGTERM (the
    loader or multiprocessing ending them)."""
    loader = data.InfiniteLoader(data.SyntheticShapes(16, 32), 4, workers=1)
    first = next(loader)
    worker = loader._iter._workers[0]
    for sig in ('INT', 'TERM'):
        subprocess.run(['kill', f'-{sig}', str(worker.pid)], check=True)  # sent by another process
    worker.join(0.5)
    assert worker.is_alive() and next(loader).shape == first.shape
    worker.terminate()  # SIGTERM from the parent
    worker.join(5)
    assert worker.exitcode == 0


def test_data_save_grid(tmp_path):
    imgs = torch.stack([data.SyntheticShapes(16, 5)[i] for i in range(5)])
    data.save_grid(imgs, tmp_path / 'g.png')
    g = np.asarray(Image.open(tmp_path / 'g.png'))
    assert g.shape == (32, 48, 3)                                           # 2 rows x 3 columns
    assert np.array_equal(g[16:, 16:32], imgs[4].permute(1, 2, 0).numpy()) and not g[16:, 32:].any()
    data.save_grid(imgs, tmp_path / 'r.png', cols=1)
    assert np.asarray(Image.open(tmp_path / 'r.png')).shape == (80, 16, 3)
    data.save_grid(torch.cat([imgs] * 7)[:32], tmp_path / 's.png')  # train.py's 32-image grids: 8 x 4, no empty cell
    assert np.asarray(Image.open(tmp_path / 's.png')).shape == (4 * 16, 8 * 16, 3)



def test_atomic_writes_leave_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    """Grids (and checkpoints, conversions, the trimmed log) go through data.atomic_write: a write that fails
    half-way (a full disk) leaves the previous file as it was and no .tmp behind."""
    imgs = torch.stack([data.SyntheticShapes(16, 4)[i] for i in range(4)])
    path = str(tmp_path / 'fakes.png')
    data.save_grid(imgs, path)
    before = open(path, 'rb').read()

    def full_disk(self, f, *a, **k):
        f.write(b'\x89PNG half an image')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(Image.Image, 'save', full_disk)
    with pytest.raises(OSError, match='No space left'):
        data.save_grid(imgs.flip(0), path)
    assert open(path, 'rb').read() == before and os.listdir(tmp_path) == ['fakes.png']
    monkeypatch.undo()
    data.atomic_write(path, lambda f: f.write(b'new'))  # a write that completes replaces the file
    assert open(path, 'rb').read() == b'new' and os.listdir(tmp_path) == ['fakes.png']


def test_symlinked_folders_are_read_once(tmp_path, capsys):
    """Links are followed, but a folder reached twice (a loop, or two links to one folder) is read once and
    the skipped links are counted; a link to another folder adds its images."""
    root, other = tmp_path / 'imgs', tmp_path / 'other'
    (root / 'sub').mkdir(parents=True)
    other.mkdir()
    for i, folder in enumerate([root, root, root / 'sub', other, other]):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(folder / f'{i}.png')
    os.symlink('..', root / 'sub' / 'up')       # a loop: sub/up/sub/up/... would repeat the images
    os.symlink(root, root / 'again')            # a second path to the same folder
    os.symlink(other, root / 'more')            # a link elsewhere: followed
    os.symlink(other, root / 'sub' / 'more2')   # ... but only once
    ds = data.ImageFolderDataset(str(root), 16)
    assert sorted(ds.names) == ['0.png', '1.png', 'more/3.png', 'more/4.png', 'sub/2.png'] and len(ds) == 5
    err = capsys.readouterr().err
    assert 'skipped 3 linked folder(s)' in err and 'sub/up' in err, err


# ==============================================================================================
# metrics.py

# The 472 parameter/buffer names and shapes of pytorch-fid's weights file. The manifest lives in the
# project's shared/ folder beside the checkout; its hash is kept here so the test runs without it.
FID_MANIFEST = os.path.join(HERE, '..', 'shared', 'fid_inception_keys.json')
FID_MANIFEST_SHA256 = '579c09ebb0c6f0f4c9f0a51099479eb353aaee1969adaaf05fbc5cefaa1f987e'


def manifest_sha256(manifest):
    return hashlib.sha256(json.dumps(sorted(manifest.items())).encode()).hexdigest()


def fid_manifest():
    if os.path.isfile(FID_MANIFEST):
        m = json.load(open(FID_MANIFEST))
        assert manifest_sha256(m) == FID_MANIFEST_SHA256
        return m
    return {k: list(v.shape) for k, v in metrics.FIDInception().state_dict().items()}


# ---- Frechet distance -----------------------------------------------------------------------

def _spd(d, seed, rank=None):
    a = np.random.default_rng(seed).standard_normal((d, rank or d))
    return a @ a.T / d + (0 if rank else 0.1 * np.eye(d))


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2, a, b = rng.normal(size=5), rng.normal(size=5), rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expect = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, rel=1e-10)


def test_frechet_non_commuting_matches_scipy_sqrtm_and_is_symmetric():
    s1, s2 = _spd(12, 1), _spd(12, 2)
    mu1, mu2 = np.zeros(12), np.full(12, 0.5)
    expect = 12 * 0.25 + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    fd = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert fd == pytest.approx(expect, rel=1e-9)
    assert metrics.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(fd, rel=1e-9)


def test_frechet_singular_covariances():
    s1, s2 = _spd(16, 3, rank=4), _spd(16, 4, rank=5)  # rank 4 and 5 in 16 dimensions (fewer samples than features)
    assert all(torch.linalg.cholesky_ex(torch.from_numpy(s)).info > 0 for s in (s1, s2))  # the eigh branch runs
    # independent: tr sqrt(S1^1/2 S2 S1^1/2) = nuclear norm of S2^1/2 S1^1/2 (roots by scipy)
    r1, r2 = (scipy.linalg.sqrtm(s).real for s in (s1, s2))
    expect = np.trace(s1) + np.trace(s2) - 2 * np.linalg.svd(r2 @ r1, compute_uv=False).sum()
    mu = np.ones(16)
    assert metrics.frechet_distance(mu, s1, mu, s2) == pytest.approx(expect, rel=1e-6)
    s3 = _spd(16, 5)  # only S1 singular: the Cholesky factor of S2 serves
    r3 = scipy.linalg.sqrtm(s3).real
    expect = np.trace(s1) + np.trace(s3) - 2 * np.linalg.svd(r3 @ r1, compute_uv=False).sum()
    assert metrics.frechet_distance(mu, s1, mu, s3) == pytest.approx(expect, rel=1e-6)
    assert abs(metrics.frechet_distance(mu, s1, mu, s1)) < 1e-12 * np.trace(s1)


def test_fid_of_identical_feature_sets_is_zero():
    x = torch.randn(300, 32)
    stats = metrics.feature_stats(x)
    assert abs(metrics.frechet_distance(*stats, *stats)) < 1e-9
    assert np.allclose(stats[1], np.cov(x.double().numpy(), rowvar=False))


# ---- Inception -------------------------------------------------------------------------------

def _random_inception_state(with_counters):
    g, state = torch.Generator().manual_seed(0), {}
    for key, shape in fid_manifest().items():
        if key.endswith('conv.weight'):  # He init: keeps activations away from denormals (slow) and zero
            v = torch.randn(shape, generator=g) * math.sqrt(2 / np.prod(shape[1:]))
        elif key.endswith('running_var') or key.endswith('bn.weight'):
            v = torch.ones(shape)
        else:
            v = torch.randn(shape, generator=g) * 0.01
        state[key] = v
        if with_counters and key.endswith('running_var'):
            state[key.replace('running_var', 'num_batches_tracked')] = torch.tensor(0)
    return state


@pytest.fixture(scope='module')
def inception_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp('w') / 'inception.pth'
    torch.save(_random_inception_state(True), path)
    return str(path)


def test_inception_state_dict_matches_manifest():
    state = {k: list(v.shape) for k, v in metrics.FIDInception().state_dict().items()}
    assert len(state) == 472 and manifest_sha256(state) == FID_MANIFEST_SHA256
    if os.path.isfile(FID_MANIFEST):
        assert state == json.load(open(FID_MANIFEST))


@pytest.mark.parametrize('with_counters, res', [(True, 16), (False, 32)])
def test_inception_loads_manifest_weights_and_gives_2048_features(tmp_path, with_counters, res):
    state = _random_inception_state(with_counters)
    torch.save(state, tmp_path / 'w.pth')
    net = metrics.load_inception(str(tmp_path / 'w.pth'))
    assert torch.equal(net.Mixed_7c.branch_pool.conv.weight, state['Mixed_7c.branch_pool.conv.weight'])
    with torch.no_grad():
        f = net(torch.randint(0, 256, (2, 3, res, res), dtype=torch.uint8))
    assert f.shape == (2, 2048) and torch.isfinite(f).all() and f.abs().sum() > 0


def test_inception_loader_reports_bad_keys_in_one_line(tmp_path):
    state = _random_inception_state(False)
    del state['Mixed_6b.branch7x7_2.conv.weight']
    state['extra.weight'] = torch.zeros(1)
    torch.save(state, tmp_path / 'w.pth')
    with pytest.raises(metrics.MetricUnavailable) as e:
        metrics.load_inception(str(tmp_path / 'w.pth'))
    msg = str(e.value)
    assert '\n' not in msg and 'Mixed_6b.branch7x7_2.conv.weight' in msg and 'extra.weight' in msg
    (tmp_path / 'cut.pth').write_bytes((tmp_path / 'w.pth').read_bytes()[:5000])  # a truncated download
    with pytest.raises(metrics.MetricUnavailable, match='cut.pth is not a readable state dict'):
        metrics.load_inception(str(tmp_path / 'cut.pth'))


def test_no_weights_raises_one_line_without_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv('METRICS_NO_DOWNLOAD', '1')
    monkeypatch.setattr(metrics.urllib.request, 'urlopen', lambda *a, **k: pytest.fail('download attempted'))
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        with pytest.raises(metrics.MetricUnavailable) as e:
            metrics.load_inception()
    finally:
        torch.hub.set_dir(old)
    msg = str(e.value)
    assert '\n' not in msg and metrics.FID_WEIGHTS_URL in msg and '--fid-weights' in msg


def test_tf1_resize_by_hand():
    img = torch.arange(20.).view(1, 1, 4, 5) ** 1.5
    out = metrics.resize_tf1(img, 6, 3)
    for y in range(6):
        for x in range(3):
            sy, sx = y * 4 / 6, x * 5 / 3  # TF1: source = dst * in / out, no half-pixel offset
            y0, x0 = int(sy), int(sx)
            y1, x1, fy, fx = min(y0 + 1, 3), min(x0 + 1, 4), sy - y0, sx - x0
            top = img[0, 0, y0, x0] * (1 - fx) + img[0, 0, y0, x1] * fx
            bottom = img[0, 0, y1, x0] * (1 - fx) + img[0, 0, y1, x1] * fx
            assert out[0, 0, y, x] == pytest.approx(float(top * (1 - fy) + bottom * fy), rel=1e-5)


def test_tf1_resize_matrix_is_built_once_per_size_and_device():
    metrics._tf1_resize_matrix.cache_clear()
    x = torch.rand(2, 3, 8, 8)
    a, b = metrics.resize_tf1(x, 299, 299), metrics.resize_tf1(x, 299, 299)
    info = metrics._tf1_resize_matrix.cache_info()
    assert (info.misses, info.hits) == (1, 3) and torch.equal(a, b)


def test_compile_keeps_shapes_static_for_the_reference_attention_batches(tmp_path, monkeypatch):
    """--d-attn ref: D_main sees b primaries in Gmain and 2b in Dmain (fakes and reals sharing the
    references): compiled with dynamic=False, one static graph each instead of a dynamic batch."""
    calls, shapes = [], set()
    monkeypatch.setattr(torch, 'compile', lambda net, **kw: calls.append(kw) or (
        lambda *a, **k: (a and shapes.add(a[0].shape[0])) or net(*a, **k)))  # D's primaries (G takes keywords)
    run_train(tmp_path, '--kimg', '0.008', '--compile', '--d-attn', 'ref', '--d-attn-res', '8')
    assert calls == [dict(dynamic=False)] * 2 and shapes == {8, 16}  # b = 8


def test_inception_input_protocols():
    x = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)
    assert torch.allclose(metrics._inception_input(x, 'stylegan2'), (x.float() - 128) / 128, atol=1e-6)
    small = x[:, :, :32, :32]
    a, b = metrics._inception_input(small, 'stylegan2'), metrics._inception_input(small, 'pytorch-fid')
    assert a.shape == b.shape == (1, 3, 299, 299) and (a - b).abs().max() > 0.01


# ---- KID, precision/recall -------------------------------------------------------------------

def test_kid_matches_hand_computed_unbiased_mmd():
    x, y = torch.randn(10, 4).double(), torch.randn(10, 4).double() + 0.3
    k = lambda a, b: (a @ b / 4 + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(10) for j in range(10) if i != j) / 90
    yy = sum(k(y[i], y[j]) for i in range(10) for j in range(10) if i != j) / 90
    xy = sum(k(x[i], y[j]) for i in range(10) for j in range(10)) / 100
    kid = metrics.kernel_inception_distance(x, y, num_subsets=3)  # subsets = the whole sets, permuted
    assert kid == pytest.approx(float(xx + yy - 2 * xy), rel=1e-9)


def test_kid_same_distribution_near_zero_shifted_positive():
    g = torch.Generator().manual_seed(0)
    real, same = torch.randn(800, 16, generator=g), torch.randn(800, 16, generator=g)
    kid = lambda fake: metrics.kernel_inception_distance(real, fake, num_subsets=20, max_subset_size=500)
    shifted = kid(same + 0.5)
    assert shifted > 0.05 and abs(kid(same)) < 0.02 * shifted


def test_precision_recall_constructed_sets():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    assert metrics.precision_recall(x, x.clone(), block=64) == (1.0, 1.0)
    assert metrics.precision_recall(x, x + 100) == (0.0, 0.0)
    centres = torch.tensor([[0., 0.], [50, 0], [0, 50], [50, 50]])  # 4 far modes; the fakes cover 2 of them
    real = (centres[:, None] + torch.randn(4, 200, 2, generator=g)).flatten(0, 1)
    fake = (centres[:2, None] + torch.randn(2, 200, 2, generator=g)).flatten(0, 1)
    precision, recall = metrics.precision_recall(real, fake, block=128)
    assert precision > 0.9 and 0.45 < recall <= 0.5


# ---- SWD, DI, FDDF, PPL ----------------------------------------------------------------------

def test_swd_zero_for_identical_sets_and_grows_with_noise():
    g = torch.Generator().manual_seed(0)
    base = F.interpolate(torch.rand(16, 3, 8, 8, generator=g), size=32, mode='bilinear') * 255  # smooth images
    desc = metrics.swd_descriptors(base.to(torch.uint8), seed=1)
    assert desc.shape == (16, 2, 128, 3, 49)  # levels 32 and 16
    assert metrics.sliced_wasserstein(desc, desc.clone()) == [0.0, 0.0]
    other = metrics.swd_descriptors(base.to(torch.uint8), seed=2)  # other patches of the same images
    swd = [sum(metrics.sliced_wasserstein(desc, metrics.swd_descriptors(
        (base + s * torch.randn(base.shape, generator=g)).clamp(0, 255).to(torch.uint8), seed=2))) for s in (8, 24, 64)]
    assert sum(metrics.sliced_wasserstein(desc, other)) < swd[0] < swd[1] < swd[2]


def test_laplacian_pyramid_reconstructs():
    x = torch.rand(2, 3, 32, 32)
    lap, coarse = metrics.laplacian_pyramid(x, 2)
    up = torch.zeros_like(x)
    up[:, :, ::2, ::2] = coarse
    assert coarse.shape == (2, 3, 16, 16) and torch.allclose(lap + metrics._blur(up, 4 * metrics._GAUSS), x, atol=1e-6)


def test_di_by_hand():
    real, fake = torch.randn(64) + 2, torch.randn(64)
    assert metrics.disequilibrium_indicator(real, fake) == pytest.approx((real.min() - fake.max()).item(), abs=1e-6)
    g = torch.Generator().manual_seed(0)  # draws of 1: DI -> E[s_r] - E[s_g]
    di = metrics.disequilibrium_indicator(torch.randn(5000, generator=g) + 3, torch.randn(5000, generator=g), draws=4000, size=1)
    assert di == pytest.approx(3, abs=0.1)


class TinyD(nn.Module):
    needs_ref = True

    def __init__(self):
        super().__init__()
        self.conv, self.fc, self.out = nn.Conv2d(3, 4, 3, 2, 1), nn.Linear(4 * 8 * 8, 6), nn.Linear(6, 1)

    def forward(self, img, ref=None, return_features=False):
        assert ref is not None and ref.shape == img.shape and img.dtype == torch.float32
        h = F.leaky_relu(self.conv(img + 0.1 * ref), 0.2)
        f = F.leaky_relu(self.fc(h.flatten(1)), 0.2) + h.std(0).mean()  # minibatch-dependent, like minibatch-std
        logits = self.out(f)[:, 0]
        return (logits, f) if return_features else logits


def test_fddf_on_tiny_d():
    torch.manual_seed(0)
    D, x = TinyD(), torch.rand(64, 3, 16, 16) * 2 - 1
    feats = lambda img: D(img, ref=x, return_features=True)[1].detach()
    same, shifted = metrics.fddf(feats(x), feats(x)), metrics.fddf(feats(x), feats(x * 0.5 + 0.4))
    assert abs(same) < 1e-9 and shifted > 1e-3
    assert shifted == pytest.approx(metrics.frechet_distance(*metrics.feature_stats(feats(x)),
                                                             *metrics.feature_stats(feats(x * 0.5 + 0.4))))


class LinearG(nn.Module):  # synthesis is linear in w: the PPL integrand is known in closed form
    z_dim, c = 64, 3.0

    def map(self, z, psi=1.0, heatmaps=None):
        return z[:, None]                                     # [B, 1, 64]

    def sample_heatmaps(self, batch, device):
        return torch.rand(batch, 1, 8, 8, device=device) * 10

    def synthesize(self, ws, noise_mode='const', heatmaps=None):
        return self.c * ws[:, 0].view(-1, 1, 8, 8) + heatmaps  # shared heatmaps cancel in the difference


def test_ppl_closed_form_with_user_distance():
    sq = lambda a, b: (a - b).square().flatten(1).sum(1)
    state = torch.get_rng_state()
    ppl = metrics.perceptual_path_length(LinearG(), 512, sq, batch=64)  # E = c^2 E|z1 - z0|^2 = 2 c^2 d
    assert ppl == pytest.approx(2 * 9 * 64, rel=0.05) and torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize('sel', ['none', 'flatten'])  # flatten: the heatmaps enter the mapping too
def test_ppl_runs_on_the_real_generator(sel):
    G = tiny_g(sel).eval()
    sq = lambda a, b: (a - b).square().flatten(1).sum(1)
    a, b = (metrics.perceptual_path_length(G, 8, sq, batch=4) for _ in range(2))
    assert a == b and 0 < a < float('inf')  # seeded per chunk, const noise

def test_precision_recall_kth_neighbour_radius_by_hand():
    """k = 3 on the line. Reals {0, 1, 2, 3, 10}: real 0's 3rd-NN radius is 3 (its 2nd-NN radius 2), real 10's
    is 9 (10 - 1). Fakes {-2.5, 1.5, 20, 30, 40}: -2.5 is covered only by the ball of 0 (2.5 <= 3), 1.5 by
    several, 20 by none (10 > 9): precision 2/5 (1/5 with the 2nd-NN radius). Fake -2.5's 3rd-NN radius
    (to 30) is 32.5 and covers every real: recall 1. Then random 2-D sets against a brute-force numpy
    version (sorted distance rows; column 0 is the point itself)."""
    real = torch.tensor([[0.], [1], [2], [3], [10]])
    fake = torch.tensor([[-2.5], [1.5], [20], [30], [40]])
    assert metrics.precision_recall(real, fake, k=3) == pytest.approx((0.4, 1.0))

    def brute(real, fake, k):
        d = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
        cov = lambda p, x: (d(p, x) <= np.sort(d(x, x), 1)[:, k][None]).any(1).mean()
        return cov(fake, real), cov(real, fake)

    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(40, 2, generator=g, dtype=torch.float64), torch.randn(30, 2, generator=g, dtype=torch.float64) + 1
    p, r = brute(real.numpy(), fake.numpy(), 3)
    assert (p, r) != brute(real.numpy(), fake.numpy(), 2)  # the case separates k from k - 1
    assert metrics.precision_recall(real, fake, k=3, block=16) == pytest.approx((p, r), abs=1e-6)


def test_laplacian_pyramid_levels_by_hand():
    """ProGAN's pyramid by scipy: coarse = every 2nd pixel of the image blurred by the separable binomial
    [1, 4, 6, 4, 1] / 16 with mirrored borders; band = image - blur of the zero-inserted coarse level with
    4x that kernel."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 12, generator=g, dtype=torch.float64)
    lap, coarse = metrics.laplacian_pyramid(x, 2)
    k1 = np.array([1., 4, 6, 4, 1]) / 16
    blur = lambda im, gain: scipy.ndimage.convolve(im, gain * np.outer(k1, k1)[None, None], mode='mirror')
    down = blur(x.numpy(), 1)[:, :, ::2, ::2]
    up = np.zeros(x.shape)
    up[:, :, ::2, ::2] = down
    assert np.allclose(coarse.numpy(), down, atol=1e-12)
    assert np.allclose(lap.numpy(), x.numpy() - blur(up, 4), atol=1e-12)


def test_swd_w1_and_per_channel_normalisation_by_hand():
    """(a) One channel, one value per descriptor: every unit direction is +-1, so SWD = mean |sorted a' -
    sorted b'| of the standardised values (ddof 0): a = (0, 1, 2, 3) -> (-3, -1, 1, 3) / sqrt 5,
    b = (0, 0, 0, 4) -> (-1, -1, -1, 3) / sqrt 3. (b) Two channels on scales 1 and 100, four values each:
    each set standardised per channel over descriptors and values, then the mean W1 over the directions
    (drawn as the code documents: randn(C S, dirs) from a Generator seeded with `seed`, unit columns)."""
    a = torch.tensor([0., 1, 2, 3]).view(4, 1, 1, 1, 1)         # [N, levels, P, C, S]
    b = torch.tensor([0., 0, 0, 4]).view(4, 1, 1, 1, 1)
    hand = np.abs(np.array([-3., -1, 1, 3]) / np.sqrt(5) - np.array([-1., -1, -1, 3]) / np.sqrt(3)).mean()
    assert metrics.sliced_wasserstein(a, b, repeats=2, dirs=3)[0] == pytest.approx(hand, rel=1e-5)

    g = torch.Generator().manual_seed(1)
    scale = torch.tensor([1., 100.]).view(1, 1, 1, 2, 1)
    da, db = (torch.randn(3, 1, 4, 2, 4, generator=g) * scale + s for s in (0, 0.5))
    seed, repeats, dirs = 3, 2, 5

    def norm(d):  # [N, 1, P, C, S] -> [N P, C S]
        d = d[:, 0].reshape(-1, 2, 4).double().numpy()
        return ((d - d.mean((0, 2), keepdims=True)) / d.std((0, 2), keepdims=True)).reshape(len(d), -1)
    gen, w1 = torch.Generator().manual_seed(seed), []
    for _ in range(repeats):
        v = torch.randn(8, dirs, generator=gen).double().numpy()
        v /= np.linalg.norm(v, axis=0)
        w1.append(np.abs(np.sort(norm(da) @ v, 0) - np.sort(norm(db) @ v, 0)).mean())
    assert metrics.sliced_wasserstein(da, db, seed=seed, repeats=repeats, dirs=dirs)[0] == pytest.approx(np.mean(w1), rel=1e-4)
    # in chunks of one image x 2 directions (what bounds the memory at 16k images): the same value
    assert metrics.sliced_wasserstein(da, db, seed=seed, repeats=repeats, dirs=dirs, rows=2, cols=2)[0] == pytest.approx(
        np.mean(w1), rel=1e-4)


class PplStubG:  # w = z, image = w: the PPL tests plant the distances through their own distance function
    z_dim = 4
    sample_heatmaps = staticmethod(lambda batch, device: None)
    map = staticmethod(lambda z, psi=1.0, heatmaps=None: z[:, None])
    synthesize = staticmethod(lambda w, noise_mode='const', heatmaps=None: w[:, :, :, None])


def test_ppl_trims_below_1st_and_above_99th_percentile():
    """A stub G and a distance that returns planted values x eps^2: 200 pairs, 198 of them in [1, 2], one 0 and
    one 1000. numpy's 'lower' 1st percentile of 200 values is the 2nd smallest (index floor(0.01 * 199) = 1),
    the 'higher' 99th the 2nd largest (index ceil(0.99 * 199) = 198): PPL = the mean of the 198."""
    g = torch.Generator().manual_seed(0)
    planted = torch.cat([1 + torch.rand(198, generator=g, dtype=torch.float64), torch.tensor([0., 1000.], dtype=torch.float64)])
    planted = planted[torch.randperm(200, generator=g)]
    chunks = iter(planted.split(50))

    ppl = metrics.perceptual_path_length(PplStubG(), 200, lambda a, b: next(chunks) * 1e-8, batch=50, epsilon=1e-4,
                                         log=lambda *a: None)
    assert ppl == pytest.approx(np.sort(planted.numpy())[1:-1].mean(), rel=1e-9)


# ---- evaluate(): end to end, cache, DDP ------------------------------------------------------


class TinyG(nn.Module):
    z_dim, img_resolution = 8, 16

    def __init__(self):
        super().__init__()
        self.mapping, self.syn = nn.Linear(8, 8), nn.Linear(8, 3 * 16 * 16)

    def map(self, z, psi=1.0, heatmaps=None):
        return self.mapping(z)[:, None].repeat(1, 2, 1)       # [B, 2, 8]

    def sample_heatmaps(self, batch, device):
        return torch.rand(batch, 1, 16, 16, device=device)

    def synthesize(self, ws, noise_mode='const', heatmaps=None):
        x = self.syn(ws.mean(1)).view(-1, 3, 16, 16)
        return torch.tanh(x + heatmaps if heatmaps is not None else x)

    def forward(self, z):  # draws its own heatmaps and noise from the global RNG, like the real G
        x = self.synthesize(self.map(z), heatmaps=self.sample_heatmaps(len(z), z.device))
        return (x + 0.05 * torch.randn_like(x)).clamp(-1, 1)


class TinyData(torch.utils.data.Dataset):
    """n smooth random uint8 images: base x base noise upsampled bilinearly to resolution."""
    name = 'tiny'

    def __init__(self, n=40, resolution=16, base=4):
        g = torch.Generator().manual_seed(1)
        self.resolution = resolution
        self.x = (F.interpolate(torch.rand(n, 3, base, base, generator=g), size=resolution, mode='bilinear') * 255).to(torch.uint8)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def _met_nets():
    torch.manual_seed(0)
    return TinyG(), TinyD()


MET_NAMES = ['swd', 'di', 'fddf']
MET_KW = dict(batch=16, num_gen=40)  # 40 of 16-image chunks: a short last chunk, wrap-around reals with 2 ranks


def test_evaluate_swd_di_fddf_and_rng_restored():
    G, D = _met_nets()
    lines = []
    torch.manual_seed(123)
    res = metrics.evaluate(MET_NAMES, G, D, TinyData(), 'cpu', log=lines.append, **MET_KW)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3)), 'evaluate() must leave the global RNG as it found it'
    assert set(res) == set(MET_NAMES)
    assert set(res['swd']) == {'16', 'avg'} and res['swd']['avg'] > 0
    assert math.isfinite(res['di']) and res['fddf'] > 0
    assert any(line.startswith('di: ') and '40 generated vs 40 real' in line for line in lines)


def test_evaluate_runs_g_and_d_in_the_training_precision():
    G, D = _met_nets()
    seen = []
    for net in (G.syn, D):  # G's synthesis layer, D's logits
        net.register_forward_hook(lambda m, i, out: seen.append((type(m).__name__, out[0].dtype)))
    for amp in ('none', 'bf16'):
        metrics.evaluate(['di'], G, D, TinyData(16), 'cpu', batch=16, num_gen=16, amp=amp)
    f32, bf16 = torch.float32, torch.bfloat16
    assert set(seen) == {('TinyD', f32), ('TinyD', bf16), ('Linear', f32), ('Linear', bf16)}
    assert seen[0][1] == f32 and seen[-1][1] == bf16


def test_evaluate_skips_inception_metrics_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv('METRICS_NO_DOWNLOAD', '1')
    G, D = _met_nets()
    lines = []
    res = metrics.evaluate(['fid50k_full', 'di'], G, D, TinyData(), 'cpu', fid_weights=str(tmp_path / 'none.pth'),
                           log=lines.append, **MET_KW)
    assert set(res) == {'di'}
    assert sum('skipping fid50k_full' in line and '--fid-weights' in line for line in lines) == 1


def test_evaluate_inception_metrics_and_real_feature_cache(inception_weights, tmp_path):
    class Unreadable(TinyData):
        def __getitem__(self, i):
            raise AssertionError('real features should come from the cache')

    G, D = _met_nets()
    names, kw = ['fid4_full', 'kid4', 'pr4'], dict(batch=4, num_gen=4, fid_weights=inception_weights, cache_dir=str(tmp_path), log=print)
    res = metrics.evaluate(names, G, D, TinyData(4), 'cpu', **kw)
    assert res['fid4_full'] > 0 and math.isfinite(res['kid4']) and set(res['pr4']) == {'precision', 'recall'}
    metrics._REAL_CACHE.clear()  # next: from the disk cache (KID and PR use the same real features as FID)
    assert metrics.evaluate(names[1:], G, D, Unreadable(4), 'cpu', **kw) == {k: res[k] for k in names[1:]}


def _ddp_worker(rank, world_size, init, out):
    dist.init_process_group('gloo', init_method=init, rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    G, D = _met_nets()
    res = metrics.evaluate(MET_NAMES, G, D, TinyData(), 'cpu', rank, world_size, log=lambda s: None, **MET_KW)
    x = torch.full([2], float(rank), requires_grad=True)  # the contrastive loss's all-gather: its backward
    g = torch.ones(4)  # must not all-reduce the incoming gradient in place (autograd may hold it elsewhere)
    losses.all_gather(x).backward(g)
    res['all_gather'] = [x.grad.tolist(), g.tolist()]
    with open(os.path.join(out, f'{rank}.json'), 'w') as f:
        json.dump(res, f)
    dist.destroy_process_group()


def test_ddp_sharded_equals_single_process(tmp_path):
    G, D = _met_nets()
    single = metrics.evaluate(MET_NAMES, G, D, TinyData(), 'cpu', log=lambda s: None, **MET_KW)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, f'file://{tmp_path}/store', str(tmp_path)), nprocs=2)
    for rank in range(2):
        res = json.load(open(tmp_path / f'{rank}.json'))
        assert res['di'] == pytest.approx(single['di'], rel=1e-6, abs=1e-6)
        assert res['fddf'] == pytest.approx(single['fddf'], rel=1e-6, abs=1e-6)
        assert res['swd'] == pytest.approx(single['swd'], rel=1e-6, abs=1e-6)
        assert res['all_gather'] == [[2.0, 2.0], [1.0] * 4]  # summed over the ranks; the caller's gradient untouched


def test_cli_prints_one_json_line(monkeypatch, capsys):
    G, D = _met_nets()
    seen = {}

    def make_dataset(path=None, resolution=None, max_images=None, seed=0, skip_bad=False, labels=False):
        seen.update(path=path, resolution=resolution, max_images=max_images, seed=seed, skip_bad=skip_bad)
        return TinyData()

    monkeypatch.setitem(sys.modules, 'model', types.SimpleNamespace(load_checkpoint=lambda path, device: dict(
        G_ema=G, D=D, args=dict(data='from-ckpt', resolution=16, max_images=64, seed=3, mbstd_group=4, skip_bad=True))))
    monkeypatch.setitem(sys.modules, 'data', types.SimpleNamespace(make_dataset=make_dataset))
    argv = ['metrics.py', 'ckpt.pt', '--metrics', 'di,swd', '--num-gen', '40', '--batch', '16', '--device', 'cpu']
    monkeypatch.setattr(sys, 'argv', argv)
    metrics.main()
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and set(json.loads(out[0])) == {'di', 'swd'}
    assert seen == dict(path='from-ckpt', resolution=16, max_images=64, seed=3, skip_bad=True)  # the run's own data
    monkeypatch.setattr(sys, 'argv', argv + ['--max-images', '500'])  # a limited-data run vs more images
    metrics.main()
    assert seen == dict(path='from-ckpt', resolution=16, max_images=500, seed=3, skip_bad=True)
    for extra, needle in [(['--batch', '10'], "--batch 10 is not a multiple of this D's minibatch-std group 4"),
                          (['--batch', '0'], '--batch 0 must be at least 1'), (['--num-gen', '0'], '--num-gen 0 must be'),
                          (['--amp', 'fp16'], '--amp fp16 is for CUDA GPUs'),  # emulated on the CPU: 50x slower
                          (['--metrics', 'fid10k', '--fid-weights', 'nowhere.pth'],
                           'no metric could be computed (the reason is printed above); swd2k, di2k and fddf2k need no')]:
        monkeypatch.setattr(sys, 'argv', argv + extra)
        with pytest.raises(SystemExit) as e:
            metrics.main()
        assert e.value.code != 0 and needle in capsys.readouterr().err + str(e.value.code), extra


def test_plot_logs_draws_each_curve(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    with open(run / 'log.jsonl', 'w') as f:
        for k in range(5):
            f.write(json.dumps({'kimg': k, 'D/real_min': -k, 'D/fake_max': k * 2}) + '\n')
        f.write(json.dumps({'kimg': 5, 'step': 9, 'metrics': {'swd': {'avg': 1.0}, 'di': 2.0}}) + '\n')
    metrics.plot_logs([str(run / 'log.jsonl')], ['D/real_min', 'D/fake_max'], str(tmp_path / 'p.png'))
    img = np.asarray(Image.open(tmp_path / 'p.png'))
    for colour in [(31, 119, 180), (255, 127, 14)]:  # the two series' colours are drawn
        assert (img == colour).all(-1).sum() > 50
    with pytest.raises(ValueError, match='none of --keys G/loss .* they hold D/fake_max, D/real_min, di, swd/avg$'):
        metrics.plot_logs([str(run / 'log.jsonl')], ['G/loss'], str(tmp_path / 'q.png'))
    metrics.plot_logs([str(run / 'log.jsonl')], ['di', 'swd/avg'], str(tmp_path / 'm.png'))  # metric lines, flattened



def test_plot_of_a_single_evaluation_draws_the_point(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'log.jsonl').write_text(json.dumps({'kimg': 5, 'step': 9, 'metrics': {'swd2k': {'avg': 70.0}}}) + '\n')
    metrics.plot_logs([str(run / 'log.jsonl')], ['swd2k/avg'], str(tmp_path / 'p.png'))
    img = np.asarray(Image.open(tmp_path / 'p.png'))[28:400 - 36, 56:720 - 200]  # the plot's frame, not the legend
    assert (img == (31, 119, 180)).all(-1).sum() >= 9


def test_metrics_help_and_error_name_the_offline_metrics(monkeypatch, capsys):
    monkeypatch.setattr(sys, 'argv', ['metrics.py', '--help'])
    with pytest.raises(SystemExit):
        metrics.main()
    out = capsys.readouterr().out
    assert all(m in out for m in ('swd2k', 'di2k', 'fddf2k', 'swd10k', '_full')), out
    assert 'swd2k, di2k and fddf2k need no download' in metrics.OFFLINE  # the error's tail (test_cli_prints_one_json_line)


def test_seed_bands_summaries_and_tables_over_runs(tmp_path):
    """Runs NAME-s<seed> are one curve (mean, +-1 std band) and one table row (mean +- std of the final
    values); a summary holds kimg, training seconds (sum of interval x sec/kimg), metric seconds, snapshots."""
    logs = []
    for seed, (a, b) in enumerate([(10.0, 4.0), (14.0, 8.0)]):
        run = tmp_path / f'exp-s{seed}'
        run.mkdir()
        with open(run / 'log.jsonl', 'w') as f:
            f.write(json.dumps({'kimg': 1, 'sec_per_kimg': 2.0}) + '\n')
            f.write(json.dumps({'kimg': 1, 'step': 5, 'metrics': {'swd': {'avg': a}}, 'seconds': 3.0}) + '\n')
            f.write(json.dumps({'kimg': 3, 'sec_per_kimg': 4.0}) + '\n')
            f.write(json.dumps({'kimg': 3, 'step': 9, 'metrics': {'swd': {'avg': b}, 'di': seed}, 'seconds': 1.5}) + '\n')
        logs.append(str(run / 'log.jsonl'))
    sm = metrics.summarize(logs[0])
    assert (sm['run'], sm['kimg'], sm['train_seconds'], sm['metric_seconds']) == ('exp-s0', 3, 1 * 2.0 + 2 * 4.0, 4.5)
    assert sm['snapshots'] == [{'kimg': 1, 'swd/avg': 10.0}, {'kimg': 3, 'swd/avg': 4.0, 'di': 0}] and sm['final']['di'] == 0
    rows = metrics.table([metrics.summarize(p) for p in logs], ['swd/avg', 'di']).splitlines()
    assert rows[2] == '| exp | 2 | 6.00 +- 2.00 | 0.50 +- 0.50 |'  # finals 4 and 8, di 0 and 1
    best = metrics.table([metrics.summarize(p) for p in logs], ['min:swd/avg', 'max:swd/avg', 'max:di']).splitlines()
    assert best[2] == '| exp | 2 | 6.00 +- 2.00 | 12.0 +- 2.0 | 0.50 +- 0.50 |'  # min 4, 8; max 10, 14; di only at 3 kimg
    sums = [metrics.summarize(p) for p in logs]
    del sums[0]['final']['di']  # a metric one seed lacks counts its seeds; one no seed has reads '-'
    assert metrics.table(sums, ['di', 'fid']).splitlines()[2] == '| exp | 2 | 1.00 +- 0.00 (1 of 2 seeds) | - |'
    captured = {}
    real = metrics.plot_curves
    metrics.plot_curves = lambda series, *a, **k: captured.update(series=series) or real(series, *a, **k)
    try:
        Image.new('RGB', (50, 30), (255, 0, 0)).save(tmp_path / 'grid.png')
        metrics.plot_logs(logs, ['swd/avg'], str(tmp_path / 'c.png'), seeds=True, beside=str(tmp_path / 'grid.png'))
    finally:
        metrics.plot_curves = real
    (label, xs, mean, lo, hi), = captured['series']
    assert label == 'exp swd/avg (2 seeds)' and xs == [1, 3]
    assert np.allclose(mean, [12, 6]) and np.allclose(lo, [10, 4]) and np.allclose(hi, [14, 8])
    img = Image.open(tmp_path / 'c.png')
    assert img.size == (50 + 720, 400) and img.getpixel((10, 10)) == (255, 0, 0)  # the grid, left of the plot


def test_metric_names():
    assert metrics._parse('fid50k_full', None, 70000) == ('fid', 50000, 70000)
    assert metrics._parse('kid50k_full', None, 2_000_000) == ('kid', 50000, 1_000_000)
    assert metrics._parse('pr50k3', None, 70000) == ('pr', 50000, 50000)
    assert metrics._parse('fid2000', 100, 70000) == ('fid', 100, 100)
    assert metrics._parse('swd', None, 1000) == ('swd', 1000, 1000)
    assert metrics._parse('ppl2_wend', None, 10) == ('ppl', 50000, 0)  # stylegan2-ada's names: ppl2 uncropped
    assert metrics._parse('ppl_wend', None, 10) == ('ppl_crop', 50000, 0)  # with the face crop
    with pytest.raises(ValueError):
        metrics._parse('fid50k3', None, 10)


# ==============================================================================================
# train.py

def run_train(tmp_path, *extra, name='run'):
    out = str(tmp_path / name)
    train.main(TINY_FLAGS + ['--out', out, *extra])
    return out


SN_FLAGS = ['--resolution', '16', '--channel-base', '64', '--channel-max', '16', '--z-dim', '16', '--batch', '8',
            '--workers', '0', '--metrics', 'none', '--max-images', '64', '--log-sec', '0']


def run_sn(tmp_path, arch, *extra, name='sn'):  # a tiny SN-DCGAN / SNGAN run (its -cpu preset, narrowed)
    out = str(tmp_path / name)
    train.main(['--cfg', f'{arch}-cpu'] + SN_FLAGS + ['--out', out, *extra])
    return out


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_state(a, b, atol=0.0, skip=()):
    for key in ('G', 'D', 'G_ema'):
        for k in set(a[key]) - set(skip):
            assert torch.allclose(a[key][k].float(), b[key][k].float(), atol=atol, rtol=0), (key, k)
    assert a['step'] == b['step'] and a['nimg'] == b['nimg']


def test_d_steps_reduce_d_loss_on_fixed_batch():
    G, D = tiny()
    torch.manual_seed(0)
    with torch.no_grad():
        fake = G(torch.randn(8, 32))
    real = torch.rand(8, 3, 16, 16) * 2 - 1
    opt = torch.optim.Adam(D.parameters(), lr=2e-3, betas=(0.0, 0.99))
    first = None
    for _ in range(20):
        loss = losses.d_loss('nonsat', D(real), D(fake))
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_phase_step_zeroes_nonfinite_grads_but_leaves_overflow_to_the_fp16_scaler():
    lin = nn.Linear(3, 1, bias=False)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    w0 = lin.weight.detach().clone()
    bad = torch.tensor([math.inf, 1.0, 2.0])
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 16, enabled=True)  # fp16 loss scaling
    train.phase_step(lin, opt, scaler, (lin.weight * bad).sum(), world=1)
    assert torch.equal(lin.weight, w0) and scaler.get_scale() == 2.0 ** 15  # step skipped, scale halved
    opt.zero_grad(set_to_none=True)
    off = torch.amp.GradScaler('cpu', enabled=False)  # fp32 / bf16: like the official code
    train.phase_step(lin, opt, off, (lin.weight * bad).sum(), world=1)
    assert torch.allclose(lin.weight, w0 - 0.5 * torch.tensor([[1e5, 1.0, 2.0]]), rtol=0, atol=1e-2)


def test_phase_step_keeps_each_gradient_in_its_parameters_layout():
    """channels_last weights get channels_last gradients (views of the one flat all-reduce buffer),
    which a fused Adam needs: its updates then equal those of the contiguous weights."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LeakyReLU(0.2), nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 3, 6, 6)
    nets = {}
    for layout, fused in itertools.product([torch.contiguous_format, torch.channels_last], [False, True]):
        net = copy.deepcopy(ref).to(memory_format=layout)
        opt = torch.optim.Adam(net.parameters(), lr=0.1, fused=fused)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            train.phase_step(net, opt, torch.amp.GradScaler('cpu', enabled=False),
                             net(x.contiguous(memory_format=layout)).square().mean(), world=1)
            assert all(p.grad.stride() == p.stride() for p in net.parameters())
        nets[layout, fused] = net
    assert nets[torch.channels_last, False][0].weight.is_contiguous(memory_format=torch.channels_last)
    for key, net in nets.items():
        for p, q in zip(net.parameters(), nets[torch.contiguous_format, False].parameters()):
            assert torch.allclose(p, q, atol=1e-6, rtol=0), key


class _BucketNet(nn.Module):  # a BatchNorm whose backward all-reduces amid the buckets', a layer used twice, one unused
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin1, self.bn, self.unused, self.lin2 = nn.Linear(4, 8), model.BatchNorm(8), nn.Linear(3, 3), nn.Linear(8, 3)
        self.extra = nn.Parameter(torch.zeros(5))  # gets its gradient only from a backward before phase_step's

    def losses(self, x, rank):  # x: [b, 4] -> (loss of the backward before phase_step, phase_step's loss)
        h = self.bn(self.lin1(x))
        return ((self.extra * (rank + 1)).sum() + self.lin1(x).square().mean(),
                (self.lin2(h) + self.lin2(h.tanh())).square().mean())


def _bucket_worker(rank, world, init, out):
    dist.init_process_group('gloo', init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    train.BUCKET_MB = 64 / 2 ** 20  # 16 floats: 7 buckets, unused's 2 parameters in the 3rd, BN's 2 in the 4th
    x = torch.randn([6, 4], generator=torch.Generator().manual_seed(rank))
    ref = _BucketNet()  # this rank's own gradients, to check each bucket left complete
    sum(ref.losses(x, rank)).backward()
    local = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in ref.parameters()])
    sent, real = [], dist.all_reduce

    def all_reduce(t, *a, async_op=False, **k):  # async: phase_step's buckets; None: the BatchNorm's all-reduces
        sent.append((t.storage_offset(), t.numel(), t.clone()) if async_op else None)
        return real(t, *a, async_op=async_op, **k)
    dist.all_reduce = all_reduce
    net = _BucketNet()
    first, second = net.losses(x, rank)
    first.backward()
    norm = train.phase_step(net, torch.optim.SGD(net.parameters(), lr=0), torch.amp.GradScaler('cpu', enabled=False),
                            second, world)
    dist.all_reduce = real
    torch.save(dict(grads=[p.grad for p in net.parameters()], norm=norm, local=local, sent=sent), f'{out}/{rank}.pt')
    dist.destroy_process_group()


def test_phase_step_bucketed_all_reduce_averages_every_gradient_once_and_complete(tmp_path):
    """2 gloo processes, buckets of 16 floats: every gradient is the average over both processes of
    the whole phase's gradient (one process with both halves of the batch computes it), a gradient
    accumulated before phase_step's backward included, 0 for a parameter no backward reaches; each
    bucket is sent once, in order, with its gradients complete (their final local values)."""
    torch.multiprocessing.spawn(_bucket_worker, args=(2, f'file://{tmp_path}/store', str(tmp_path)), nprocs=2)
    net = _BucketNet()
    xs = [torch.randn([6, 4], generator=torch.Generator().manual_seed(r)) for r in range(2)]
    h = net.bn(net.lin1(torch.cat(xs)))  # the global batch's statistics, as the 2 processes' BatchNorm
    loss = 0
    for r, (x, hr) in enumerate(zip(xs, h.chunk(2))):
        loss = loss + ((net.extra * (r + 1)).sum() + net.lin1(x).square().mean()
                       + (net.lin2(hr) + net.lin2(hr.tanh())).square().mean()) / 2
    loss.backward()
    want = {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in net.named_parameters()}
    assert want['extra'].tolist() == [1.5] * 5 and not want['unused.weight'].any()  # (1 + 2) / 2; 0
    total = sum(p.numel() for p in net.parameters())
    for rank in range(2):
        res = torch.load(tmp_path / f'{rank}.pt')
        for got, (k, w) in zip(res['grads'], want.items()):
            assert torch.allclose(got, w, rtol=1e-5, atol=1e-6), k
        assert torch.allclose(res['norm'], torch.cat([w.flatten() for w in want.values()]).norm(), rtol=1e-5)
        events = res['sent']
        # BatchNorm's forward all-reduce; in the backward lin2's 2 buckets leave before BatchNorm's all-reduce there
        # (overlap), BN's bucket waits for unused's, which goes after the backward: the same order on every process
        assert [e is None for e in events] == [True, False, False, True, False, False, False, False, False]
        buckets = [e for e in events if e is not None]
        starts = [o for o, _, _ in buckets]
        assert len(starts) == 7 and starts == sorted(starts, reverse=True)  # last parameters first
        covered = torch.zeros(total, dtype=torch.int)
        for o, n, sent in buckets:
            covered[o:o + n] += 1
            assert torch.equal(sent, res['local'][o:o + n])  # sent complete: this rank's final gradients
        assert covered.eq(1).all()  # each element in exactly one bucket, each bucket sent once


def test_phase_step_refuses_a_second_gradient_in_one_backward():
    """Reentrant checkpointing accumulates a layer's gradient once per use within one backward: its
    bucket would have left with the first part, so phase_step stops with a clear error."""
    lin = nn.Linear(3, 3)
    x = torch.randn(2, 3, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(lin, torch.utils.checkpoint.checkpoint(lin, x, use_reentrant=True), use_reentrant=True)
    with pytest.raises(RuntimeError, match='two gradients in one backward'):
        train.phase_step(lin, torch.optim.SGD(lin.parameters(), lr=0), torch.amp.GradScaler('cpu', enabled=False),
                         y.sum(), world=1)


def test_channels_last_training_equals_contiguous_training(tmp_path):
    """--channels-last (weights, gradients, Adam's state, G_ema, images) trains as the contiguous run,
    with a foreach and with a fused Adam (2 steps, R1 and path length included)."""
    flags = ['--kimg', '0.016', '--pl-weight', '2', '--pl-interval', '1']
    a = load(f'{run_train(tmp_path, *flags, name="a")}/ckpt-0000002.pt')
    for adam in ('foreach', 'fused'):
        b = load(f'{run_train(tmp_path, *flags, "--adam", adam, "--channels-last", name=adam)}/ckpt-0000002.pt')
        for net in ('G', 'G_ema'):
            assert b[net]['synthesis.b8.conv1.weight'].is_contiguous(memory_format=torch.channels_last)
        assert_same_state(a, b, atol=1e-4)  # Adam steps are lr=2e-3: a layout mix-up moves weights by far more


def test_training_writes_logs_grids_and_checkpoints(tmp_path):
    out = run_train(tmp_path, '--kimg', '0.032', '--snap-kimg', '0.016', '--keep', '1', '--pl-weight', '2',
                    '--pl-interval', '2', '--r1-interval', '2', '--gamma', '1')
    assert [os.path.basename(p) for p in glob.glob(f'{out}/ckpt-*.pt')] == ['ckpt-0000004.pt']  # keep 1
    assert os.path.isfile(f'{out}/fakes-0000004.png') and os.path.isfile(f'{out}/reals.png')
    assert Image.open(f'{out}/fakes-0000004.png').size[0] >= 16 * 4
    lines = [json.loads(s) for s in open(f'{out}/log.jsonl')]
    assert lines[-1]['kimg'] == 0.032 and lines[-1]['step'] == 4
    for k in ('sec_per_kimg', 'img_per_sec', 'mem_gb', 'G/loss', 'D/loss', 'D/r1', 'G/pl', 'D/real_min', 'D/fake_max'):
        assert any(k in line for line in lines), k
    ck = load(f'{out}/ckpt-0000004.pt')
    assert ck['nimg'] == 32 and ck['args']['g_attn'] == 'none' and ck['pl_mean'] > 0
    nets = model.load_checkpoint(f'{out}/ckpt-0000004.pt')
    assert nets['G_ema'](torch.randn(2, 32)).shape == (2, 3, 16, 16)


def test_resume_equals_uninterrupted_run(tmp_path):
    """Stop after 2 steps (a checkpoint), resume to 4: identical to 4 steps in one go."""
    common = ['--snap-kimg', '0.016', '--pl-weight', '2', '--pl-interval', '2', '--r1-interval', '3',
              '--gamma', '1', '--mirror', '--loss', 'contrastive', '--warmup-kimg', '0.016']
    a = run_train(tmp_path, '--kimg', '0.032', *common, name='a')
    b = run_train(tmp_path, '--kimg', '0.016', *common, name='b')
    assert len(glob.glob(f'{b}/ckpt-*.pt')) == 1
    run_train(tmp_path, '--kimg', '0.032', *common, name='b')  # the same command again: --resume auto
    ca, cb = load(f'{a}/ckpt-0000004.pt'), load(f'{b}/ckpt-0000004.pt')
    assert_same_state(ca, cb)
    for opt in ('opt_G', 'opt_D'):
        for k, st in ca[opt]['state'].items():
            assert torch.equal(st['exp_avg_sq'], cb[opt]['state'][k]['exp_avg_sq'])
    assert torch.equal(ca['pl_mean'], cb['pl_mean'])
    steps = lambda out: [json.loads(line)['step'] for line in open(f'{out}/log.jsonl')]
    assert steps(a) == steps(b) == [1, 2, 3, 4]  # the resumed log holds each step once


def test_contrastive_reuses_the_g_steps_real_logits_in_the_d_step(tmp_path, monkeypatch):
    """With StyleGAN2's D, the contrastive loss's D pass on the reals in Gmain serves Dmain too (one D
    pass less per step); training equals the run that computes it twice. SN-DCGAN's D (its power
    iteration changes u on every forward) keeps both passes."""
    calls = []
    forward = model.Discriminator.forward
    monkeypatch.setattr(model.Discriminator, 'forward', lambda self, *a, **kw: calls.append(1) or forward(self, *a, **kw))
    common = ['--kimg', '0.024', '--snap-kimg', '0.024', '--loss', 'contrastive', '--warmup-kimg', '0', '--gamma', '0']
    a = run_train(tmp_path, *common, name='reuse')
    assert len(calls) == 3 * 3  # per step: fakes and reals in Gmain, fakes in Dmain
    monkeypatch.setattr(train, 'reuses_real_logits', lambda D: False)
    calls.clear()
    b = run_train(tmp_path, *common, name='twice')
    assert len(calls) == 4 * 3
    assert_same_state(load(f'{a}/ckpt-0000003.pt'), load(f'{b}/ckpt-0000003.pt'), atol=1e-6)
    assert not train.reuses_real_logits(model.build_networks(vars(train.parse_args(['--cfg', 'quick'])))[1])
    assert not train.reuses_real_logits(model.Discriminator(16, channel_base=64, channel_max=16, d_attn='ref'))


def test_cpu_runs_are_bitwise_repeatable_per_thread_count_and_a_resume_says_when_it_changes(tmp_path, capsys):
    """The same command at the same thread count gives the same weights to the bit; at another thread count
    the CPU kernels may sum in another order (measured on the quick preset: 1 vs 2 threads differ by up to
    3e-3 in G's weights after 15 steps), so a resume that changes it says so in one line (one that keeps it
    does not)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        runs = [run_train(tmp_path, '--kimg', '0.016', name=n) for n in ('a', 'b')]
        torch.set_num_threads(1)
        runs.append(run_train(tmp_path, '--kimg', '0.016', name='c'))
        a, b, c = (load(f'{r}/ckpt-0000002.pt') for r in runs)
        assert (a['threads'], c['threads']) == (2, 1)
        assert_same_state(a, b)
        capsys.readouterr()
        run_train(tmp_path, '--kimg', '0.024', name='c')  # the same count: silent
        assert 'CPU threads' not in capsys.readouterr().out
        torch.set_num_threads(2)
        run_train(tmp_path, '--kimg', '0.032', name='c')
        assert 'note: this run trained with 1 CPU threads per process and resumes with 2' in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)


def test_resume_takes_new_lr_and_refuses_another_run_or_a_stale_checkpoint(tmp_path, capsys):
    out = run_train(tmp_path, '--kimg', '0.024', '--snap-kimg', '0.008', '--keep', '3')
    ckpts = sorted(glob.glob(f'{out}/ckpt-*.pt'))
    assert len(ckpts) == 3
    flags = TINY_FLAGS + ['--out', out, '--kimg', '0.032']
    expect_error(capsys, flags + ['--seed', '5'], 'other settings', '--seed 0 (this run: 5)', f'--resume {ckpts[-1]}')
    expect_error(capsys, flags + ['--resume', ckpts[0]], 'past step 1', 'ckpt-0000003.pt')
    train.main(flags + ['--seed', '5', '--lr', '1e-4', '--resume', ckpts[-1]])  # on purpose: allowed
    ck = load(f'{out}/ckpt-0000004.pt')
    assert ck['args']['seed'] == 5 and ck['step'] == 4
    assert ck['opt_G']['param_groups'][0]['lr'] == pytest.approx(1e-4 * 4 / 5)  # the flag, not the saved 2e-3 (x 4 / 5: lazy G)
    assert ck['opt_D']['param_groups'][0]['lr'] == pytest.approx(1e-4 * 16 / 17)  # lazy R1: lr x 16 / 17
    del ck['G']['synthesis.b4.const']
    torch.save(ck, tmp_path / 'old.pt')
    expect_error(capsys, TINY_FLAGS + ['--out', str(tmp_path / 'n'), '--resume', str(tmp_path / 'old.pt')],
                 'does not fit this code', 'synthesis.b4.const')


def test_resume_evaluates_the_metrics_a_stop_interrupted(tmp_path, monkeypatch, capsys):
    """A step's checkpoint is written before its metrics. A run stopped while evaluating them
    (simulated: the metrics line and what followed it are missing) evaluates them first when the
    same command runs again; a run with nothing missing evaluates nothing more."""
    calls = []
    monkeypatch.setattr(metrics, 'evaluate', lambda names, G_ema, *a, **k: calls.append(names) or {'m': len(calls)})
    flags = ['--kimg', '0.024', '--snap-kimg', '0.008', '--metrics', 'swd2k', '--metrics-kimg', '0.008', '--keep', '5']
    out = run_train(tmp_path, *flags)
    records = lambda: [json.loads(line) for line in open(f'{out}/log.jsonl')]
    measured = lambda: [r['step'] for r in records() if 'metrics' in r]
    assert measured() == [1, 2, 3] and len(calls) == 3
    # stopped while evaluating step 2's metrics: ckpt-0000002 written, its metrics line not
    os.remove(f'{out}/ckpt-0000003.pt')
    kept = [r for r in records() if r['step'] < 2 or r['step'] == 2 and 'metrics' not in r]
    with open(f'{out}/log.jsonl', 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in kept)
    run_train(tmp_path, *flags)
    assert measured() == [1, 2, 3] and len(calls) == 5 and calls[3] == ['swd2k']
    assert [r['step'] for r in records()] == [1, 1, 2, 2, 3, 3]  # in order, each once
    # stopped during the final evaluation: the same command evaluates it and trains nothing
    kept = records()[:-1]
    with open(f'{out}/log.jsonl', 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in kept)
    run_train(tmp_path, *flags)
    assert measured() == [1, 2, 3] and len(calls) == 6
    run_train(tmp_path, *flags)  # complete: nothing to do
    assert len(calls) == 6 and len(records()) == 6
    assert 'the run is already at 0.024 kimg: raise --kimg to go on' in capsys.readouterr().out


def test_a_stop_leaves_its_steps_metrics_to_the_resume(tmp_path, monkeypatch):
    """A SIGTERM during a step whose metrics are due (a cluster's grace period is short; fid50k is
    long) checkpoints and exits at once; the resume evaluates those metrics first."""
    calls = []
    monkeypatch.setattr(metrics, 'evaluate', lambda names, G_ema, *a, **k: calls.append(names) or {'m': len(calls)})
    out = str(tmp_path / 'run')

    class Late(list):  # the signal arrives during step 2, after step 1's metrics
        def __bool__(self):
            return len(glob.glob(f'{out}/ckpt-*.pt')) >= 2
    monkeypatch.setattr(train, 'stop_requests', contextlib.contextmanager(lambda rank, world: iter([Late([(15, 0.0)])])))
    flags = ['--kimg', '0.024', '--snap-kimg', '0.008', '--metrics', 'swd2k', '--metrics-kimg', '0.008']
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, *flags)
    assert e.value.code == 128 + 15 and len(calls) == 1 and os.path.isfile(f'{out}/ckpt-0000002.pt')
    monkeypatch.undo()  # the real signal handling, metrics stubbed again
    monkeypatch.setattr(metrics, 'evaluate', lambda names, G_ema, *a, **k: calls.append(names) or {'m': len(calls)})
    run_train(tmp_path, *flags)
    assert [r['step'] for r in map(json.loads, open(f'{out}/log.jsonl')) if 'metrics' in r] == [1, 2, 3]


def test_lr_decays_linearly_to_zero_and_a_stopped_run_resumes_on_the_schedule(tmp_path, monkeypatch, capsys):
    """--lr-decay-kimg: the factor by hand (1 until the last N kimg, then linearly to 0 at --kimg); the
    lr each step uses follows it, and a run stopped mid-decay resumes exactly (the factor comes from
    the images seen, which the checkpoint holds)."""
    assert [train.lr_scale(n, 100, 0.05) for n in (0, 50, 60, 75, 100)] == [1.0, 1.0, 0.8, 0.5, 0.0]
    assert train.lr_scale(70, 100, 0) == 1.0  # 0: constant
    flags = ['--kimg', '0.032', '--snap-kimg', '0.008', '--lr-decay-kimg', '0.024']  # 4 steps of 8; decay from step 2
    a = run_sn(tmp_path, 'sndcgan', *flags, name='a')
    lrs = [json.loads(line)['lr'] for line in open(f'{a}/log.jsonl')]  # the lr of the step after each line's
    assert lrs == pytest.approx([2e-4, 2e-4 * 16 / 24, 2e-4 * 8 / 24, 0.0], rel=1e-3)  # 4 digits
    ck = load(f'{a}/ckpt-0000004.pt')  # step 4 ran at nimg 24: 8 of the 24 decay kimg left
    assert [ck[o]['param_groups'][0]['lr'] for o in ('opt_G', 'opt_D')] == pytest.approx([2e-4 / 3] * 2)
    out = str(tmp_path / 'b')

    class Late(list):  # a SIGTERM once step 2 is checkpointed, in the middle of the decay
        def __bool__(self):
            return len(glob.glob(f'{out}/ckpt-*.pt')) >= 2
    monkeypatch.setattr(train, 'stop_requests', contextlib.contextmanager(lambda rank, world: iter([Late([(15, 0.0)])])))
    with pytest.raises(SystemExit):
        run_sn(tmp_path, 'sndcgan', *flags, name='b')
    monkeypatch.undo()
    run_sn(tmp_path, 'sndcgan', *flags, name='b')
    assert_same_state(ck, load(f'{out}/ckpt-0000004.pt'))
    expect_error(capsys, ['--cfg', 'sndcgan-cpu'] + SN_FLAGS + ['--out', str(tmp_path / 'c'), '--kimg', '0.032',
                                                              '--lr-decay-kimg', '0.04'],
                 '--lr-decay-kimg 0.04 must lie in [0, --kimg 0.032]')


def test_resume_may_switch_to_fp16_loss_scaling(tmp_path, monkeypatch, capsys):
    """A run without fp16 saves empty GradScaler states; resumed with --amp fp16 (a GPU flag, let
    through on the CPU here) the scalers start a new scale instead of failing to load them; the
    fp16 run's scale then goes to its checkpoint and back. The switch says that it clamps activations now."""
    real_check = train.check_args
    monkeypatch.setattr(train, 'check_args', lambda args, world, device: real_check(args, world, torch.device('cuda')))
    out = run_train(tmp_path, '--kimg', '0.008')
    assert load(f'{out}/ckpt-0000001.pt')['scaler_G'] == {}
    capsys.readouterr()
    run_train(tmp_path, '--kimg', '0.016', '--amp', 'fp16')
    assert 'note: --amp fp16 clamps activations at +-256 (conv_clamp' in capsys.readouterr().out
    saved = load(f'{out}/ckpt-0000002.pt')['scaler_G']
    assert saved['scale'] > 0
    run_train(tmp_path, '--kimg', '0.024', '--amp', 'fp16')
    assert load(f'{out}/ckpt-0000003.pt')['scaler_G']['_growth_tracker'] == saved['_growth_tracker'] + 1


def test_gradcam_under_fp16_goes_through_a_bf16_d_pass(tmp_path, monkeypatch):
    """GradCAM's inner gradient has no loss scaling: through fp16 activations it underflows (shown
    here: 1e-4 x 1e-4 is below fp16's smallest subnormal, the CAM comes out all zero), so under
    --amp fp16 the alignment's D pass runs in bf16 (fp32 on GPUs without it)."""
    a = (torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.5).requires_grad_(True)
    for dtype, zero in [(torch.float16, True), (torch.bfloat16, False)]:
        logits = (a.to(dtype) * torch.full_like(a, 1e-4, dtype=dtype)).sum([1, 2, 3]) * torch.tensor(1e-4, dtype=dtype)
        cam = losses.gradcam(logits, {4: a}, [4])[4]
        assert bool((cam == 0).all()) == zero
    real_check = train.check_args
    monkeypatch.setattr(train, 'check_args', lambda args, world, device: real_check(args, world, torch.device('cuda')))
    seen = []
    for name in ('align_loss', 'align_loss_official'):  # the paper's reading and the authors' (--eqgan)
        real = getattr(losses, name)
        monkeypatch.setattr(losses, name, lambda logits, maps, *a, real=real, name=name, **k: seen.append(
            (name, {m.dtype for m in maps.values()})) or real(logits, maps, *a, **k))
    run_train(tmp_path, '--kimg', '0.008', '--amp', 'fp16', '--sel', 'norm')
    run_train(tmp_path, '--kimg', '0.008', '--amp', 'fp16', '--sel', 'norm', '--eqgan', 'paper', name='paper')
    assert seen == [('align_loss_official', {torch.bfloat16}), ('align_loss', {torch.bfloat16})]


def test_training_step_maths_by_hand(tmp_path, monkeypatch):
    """One 4-step run checked against hand values: lazy R1 / path length weights (x interval) and
    their Adam lr x I / (I + 1), the EMA with its ramp-up, the contrastive loss's non-saturating
    warm-up, style mixing at --style-mix 1, references drawn independently of the primaries."""
    calls, kinds, cuts, batches = [], [], [], []
    real_phase_step, real_r1, real_pl = train.phase_step, losses.r1_penalty, losses.path_length_penalty
    monkeypatch.setattr(train, 'phase_step', lambda net, opt, scaler, loss, world: (
        calls.append(loss.item()), real_phase_step(net, opt, scaler, loss, world))[1])
    captured = {}
    monkeypatch.setattr(losses, 'r1_penalty', lambda *a: captured.setdefault('r1', []).append(real_r1(*a)) or captured['r1'][-1])
    monkeypatch.setattr(losses, 'path_length_penalty',
                        lambda *a, **k: captured.setdefault('pl', []).append(real_pl(*a, **k)) or captured['pl'][-1])
    real_d_loss = losses.d_loss
    monkeypatch.setattr(losses, 'd_loss', lambda kind, *a: kinds.append(kind) or real_d_loss(kind, *a))
    real_forward = model.Generator.forward
    monkeypatch.setattr(model.Generator, 'forward', lambda self, *a, **k: (
        cuts.append((int(k['mix_cutoff']), self.num_ws)) if 'mix_cutoff' in k else None, real_forward(self, *a, **k))[1])
    real_next = data.InfiniteLoader.__next__
    monkeypatch.setattr(data.InfiniteLoader, '__next__', lambda self: batches.append(real_next(self)) or batches[-1])
    out = run_train(tmp_path, '--kimg', '0.032', '--snap-kimg', '0.008', '--keep', '5', '--gamma', '3', '--r1-interval', '2',
                    '--pl-weight', '2', '--pl-interval', '2', '--loss', 'contrastive', '--warmup-kimg', '0.016',
                    '--style-mix', '1', '--d-attn', 'ref', '--ema-kimg', '0.01', '--ema-rampup', '0.5')
    # phases: Gmain, Greg (even steps), Dmain, Dreg (even steps): steps 0 and 2 make calls 0-3 and 6-9
    assert len(calls) == 12
    greg, dreg = [calls[1], calls[7]], [calls[3], calls[9]]
    for i in range(2):
        assert greg[i] == pytest.approx(captured['pl'][i].mean().item() * 2 * 2, rel=1e-5)  # pl x weight x interval
        assert dreg[i] == pytest.approx(captured['r1'][i].mean().item() * 3 / 2 * 2, rel=1e-5)  # r1 x gamma/2 x interval
    ck = [load(f'{out}/ckpt-{s:07d}.pt') for s in (1, 2)]
    for opt in ('opt_G', 'opt_D'):  # lazy regularisation, c = 2 / 3
        group = ck[1][opt]['param_groups'][0]
        assert group['lr'] == pytest.approx(2e-3 * 2 / 3) and group['betas'][1] == pytest.approx(0.99 ** (2 / 3))
    assert kinds == ['nonsat', 'nonsat', 'contrastive', 'contrastive']  # warm-up until 16 images
    assert cuts and all(c < n for c, n in cuts)  # --style-mix 1: every batch mixes
    assert not torch.equal(batches[0], batches[1])  # the references are other images than the primaries
    # EMA at step 1: nimg 8, ema_nimg = min(10, 8 x 0.5) = 4, beta = 0.5 ** (8 / 4)
    beta = 0.5 ** 2
    for k, v in ck[1]['G_ema'].items():
        want = ck[1]['G'][k] if k in dict(model.Generator(**{**TINY_G, 'resolution': 16}).named_buffers()) else \
            torch.lerp(ck[0]['G_ema'][k], ck[1]['G'][k], 1 - beta)
        assert torch.allclose(v, want, atol=1e-6), k


def test_style_mixing_cutoffs_cover_every_layer_boundary(tmp_path, monkeypatch):
    """--style-mix 1: the cut-off is uniform over [1, num_ws), as the official random_(1, num_ws):
    over 40 steps (80 draws, Gmain and Dmain) every boundary of the 6 ws at 16 px appears, no other."""
    cuts = []
    real_forward = model.Generator.forward
    monkeypatch.setattr(model.Generator, 'forward', lambda self, *a, **k: (
        cuts.append(int(k['mix_cutoff'])) if 'mix_cutoff' in k else None, real_forward(self, *a, **k))[1])
    run_train(tmp_path, '--kimg', '0.32', '--snap-kimg', '1', '--style-mix', '1')
    assert len(cuts) == 80 and sorted(set(cuts)) == [1, 2, 3, 4, 5]


def test_log_lines_average_the_steps_since_the_last_line(tmp_path, monkeypatch):
    """4 steps under a fake clock that advances 5 s per D step with --log-sec 10, so a log line
    falls after steps 2 and 4: each line's G/loss, D/loss, D/real, D/fake are the
    plain means of the values of its own two steps (by hand from the losses' inputs and outputs),
    D/real_min and D/fake_max the min / max logit over those two steps only, and D/r1 (step 0
    only, --r1-interval 16) appears in the first line only."""
    import time as _time
    steps = []
    real_g, real_d = losses.g_loss, losses.d_loss

    def g_loss(kind, fake, *a):
        out = real_g(kind, fake, *a)
        steps.append(dict(g=out.item()))
        return out

    def d_loss(kind, real, fake):
        out = real_d(kind, real, fake)
        steps[-1].update(d=out.item(), real=real.detach().clone(), fake=fake.detach().clone())
        return out
    monkeypatch.setattr(losses, 'g_loss', g_loss)
    monkeypatch.setattr(losses, 'd_loss', d_loss)
    monkeypatch.setattr(train, 'time', types.SimpleNamespace(time=lambda: 5.0 * len([s for s in steps if 'd' in s]),
                                                             perf_counter=_time.perf_counter))
    out = run_train(tmp_path, '--kimg', '0.032', '--log-sec', '10', '--snap-kimg', '1')
    lines = [json.loads(s) for s in open(f'{out}/log.jsonl')]
    assert len(steps) == 4 and [line['step'] for line in lines] == [2, 4]
    for line, two in zip(lines, (steps[:2], steps[2:])):
        mean = lambda f: sum(f(s) for s in two) / 2
        assert line['G/loss'] == pytest.approx(mean(lambda s: s['g']), abs=1e-4)
        assert line['D/loss'] == pytest.approx(mean(lambda s: s['d']), abs=1e-4)
        assert line['D/real'] == pytest.approx(mean(lambda s: s['real'].mean().item()), abs=1e-4)
        assert line['D/fake'] == pytest.approx(mean(lambda s: s['fake'].mean().item()), abs=1e-4)
        assert line['D/real_min'] == pytest.approx(min(s['real'].min().item() for s in two), abs=1e-4)
        assert line['D/fake_max'] == pytest.approx(max(s['fake'].max().item() for s in two), abs=1e-4)
    assert 'D/r1' in lines[0] and 'D/r1' not in lines[1]


def test_step_randomness_fresh_per_step_and_per_phase(tmp_path, monkeypatch):
    """Every step draws new latents and noise (the generator is seeded by (seed, step)), and within
    a step Gmain, Greg (half the batch) and Dmain each take their own draws; D sees the reals as
    uint8 / 127.5 - 1 (0 -> -1, 255 -> 1), and R1 (step 0, --r1-interval 16) is taken on them."""
    calls, d_inputs, batches, r1_inputs = [], [], [], []
    real_r1 = losses.r1_penalty
    monkeypatch.setattr(losses, 'r1_penalty', lambda img, logits: r1_inputs.append(img.detach().clone()) or real_r1(img, logits))
    real_forward, real_d_forward, real_next = model.Generator.forward, model.Discriminator.forward, data.InfiniteLoader.__next__

    def g_forward(self, z, *a, **k):
        if 'mix_cutoff' in k:  # the training phases (the grids use noise_mode='const' and no latents() dict)
            calls.append(dict(z=z.detach().clone(), noise=[n.clone() for n in k['noise']], ws=k.get('return_ws', False)))
        return real_forward(self, z, *a, **k)
    monkeypatch.setattr(model.Generator, 'forward', g_forward)
    monkeypatch.setattr(model.Discriminator, 'forward', lambda self, img, *a, **k: (
        d_inputs.append(img.detach().clone()), real_d_forward(self, img, *a, **k))[1])
    monkeypatch.setattr(data.InfiniteLoader, '__next__', lambda self: batches.append(real_next(self)) or batches[-1])
    run_train(tmp_path, '--kimg', '0.024', '--snap-kimg', '1', '--pl-weight', '2', '--pl-interval', '2')
    # phases per step: Gmain (8), Greg on even steps (4 = B // 2), Dmain (8)
    assert [(c['z'].shape[0], c['ws']) for c in calls] == [(8, False), (4, True), (8, False), (8, False), (8, False),
                                                           (8, False), (4, True), (8, False)]
    zs = [c['z'] for c in calls]
    for i in range(len(zs)):
        for j in range(i):
            assert not torch.allclose(zs[i][:4], zs[j][:4]), (i, j)  # no two phases or steps share latents
    noise0 = [c['noise'][0] for c in calls if c['z'].shape[0] == 8]
    assert all(n.shape == (8, 1, 4, 4) for n in noise0)
    assert all(not torch.equal(noise0[i], noise0[j]) for i in range(len(noise0)) for j in range(i))
    assert all(abs(z.std().item() - 1) < 0.35 for z in zs)  # N(0, I) draws
    # the reals: batch k of the loader, mapped to [-1, 1], is one of D's inputs at step k
    assert len(batches) == 3
    for u8 in batches:
        want = u8.float() / 127.5 - 1
        assert want.min() >= -1 and want.max() <= 1
        assert any(x.shape == want.shape and torch.allclose(x, want, atol=1e-6) for x in d_inputs)
    assert torch.allclose(torch.tensor([0, 255], dtype=torch.uint8).float() / 127.5 - 1, torch.tensor([-1.0, 1.0]))
    assert len(r1_inputs) == 1 and torch.allclose(r1_inputs[0], batches[0].float() / 127.5 - 1, atol=1e-6)


@pytest.mark.parametrize('batch', [8, 2])
def test_dmain_shared_reference_pass_splits_fakes_and_reals(tmp_path, monkeypatch, batch):
    """Reference-attention D: Dmain runs D once on [fakes; reals] with one batch of references and
    splits the logits; they must equal D(fakes, refs) and D(reals, refs) computed apart (contiguous
    minibatch-std groups), reals being the primary loader's batch and refs the reference loader's.
    Batch 2 < --mbstd-group 4: one joint pass would put fakes and reals in one group of 4, so the
    two passes stay apart (groups of 2) and give the same numbers as computed here."""
    checked, batches, fakes = [], [], []
    real_next, real_forward, real_d = data.InfiniteLoader.__next__, model.Generator.forward, losses.d_loss
    holder = {}
    monkeypatch.setattr(data.InfiniteLoader, '__next__', lambda self: batches.append(real_next(self)) or batches[-1])
    monkeypatch.setattr(model.Generator, 'forward', lambda self, *a, **k: fakes.append(real_forward(self, *a, **k)) or fakes[-1])
    real_build = model.build_networks
    monkeypatch.setattr(model, 'build_networks', lambda a: holder.setdefault('nets', real_build(a)))

    def d_loss(kind, real_logits, fake_logits):
        D = holder['nets'][1]
        real, ref = batches[-2].float() / 127.5 - 1, batches[-1].float() / 127.5 - 1  # primary, then reference loader
        with torch.no_grad():
            want_real, want_fake = D(real, ref), D(fakes[-1].detach(), ref)
        assert torch.allclose(real_logits, want_real, atol=1e-5) and torch.allclose(fake_logits, want_fake, atol=1e-5)
        assert not torch.allclose(real_logits, fake_logits, atol=1e-3)
        checked.append(kind)
        return real_d(kind, real_logits, fake_logits)
    monkeypatch.setattr(losses, 'd_loss', d_loss)
    run_train(tmp_path, '--kimg', str(batch / 1000), '--batch', str(batch), '--snap-kimg', '1', '--d-attn', 'ref', '--gamma', '0')
    assert checked == ['nonsat'] and len(batches) == 2 and not torch.equal(batches[0], batches[1])


def test_run_flags_reach_the_data_losses_and_latents(tmp_path, monkeypatch, capsys):
    """One 4-step run whose flags all show in what the step computes: --max-images 1 with --seed 3
    makes the 1-image synthetic set of seed 3, so the default warm-up is 20 epochs = 20 images
    (0.02 kimg): steps at 0, 8, 16 images are non-saturating, the one at 24 contrastive, where
    --g-form minimax gives G the negated Eq. 2.3 (by hand, as explicit cross-entropies); --mirror
    and --seed reach the loader (the lone image arrives both as is and x-flipped, in the flip
    pattern of seed 3); --style-mix 0 passes no mixing latents; --align-tau / --align-truncation
    reach Eq. 4."""
    kinds, g_checked, mix, aligns, batches = [], [], [], [], []
    real_g, real_align, real_forward, real_next = losses.g_loss, losses.align_loss, model.Generator.forward, data.InfiniteLoader.__next__

    def g_loss(kind, fake, real=None, g_form='swap'):
        kinds.append(kind)
        out = real_g(kind, fake, real, g_form)
        if kind == 'contrastive':
            f, r = fake.detach(), real.detach()
            assert out.item() == pytest.approx(-(ce_matrix(r, f) + ce_matrix(-f, -r)).item(), rel=1e-5, abs=1e-6)
            g_checked.append(g_form)
        return out
    monkeypatch.setattr(losses, 'g_loss', g_loss)
    monkeypatch.setattr(losses, 'align_loss', lambda *a, **k: aligns.append(a[3:5]) or real_align(*a, **k))
    monkeypatch.setattr(model.Generator, 'forward', lambda self, *a, **k: (
        mix.append(k['mix_z']) if 'mix_cutoff' in k else None, real_forward(self, *a, **k))[1])
    monkeypatch.setattr(data.InfiniteLoader, '__next__', lambda self: batches.append(real_next(self)) or batches[-1])
    run_train(tmp_path, '--kimg', '0.032', '--snap-kimg', '1', '--max-images', '1', '--seed', '3', '--loss', 'contrastive',
              '--g-form', 'minimax', '--mirror', '--style-mix', '0', '--sel', 'norm', '--eqgan', 'paper', '--align-tau', '0.1',
              '--align-truncation', 'official', '--align-interval', '4')
    out = capsys.readouterr().out
    assert '1 images (synthetic-seed3-n1)' in out and 'non-saturating warm-up until 0.02 kimg' in out
    assert kinds == ['nonsat', 'nonsat', 'nonsat', 'contrastive'] and g_checked == ['minimax']
    assert len(mix) == 8 and all(m is None for m in mix)
    assert aligns == [(0.1, 'official')]
    img = data.SyntheticShapes(16, 1, seed=3)[0]
    assert not torch.equal(img, img.flip(2))
    got = torch.cat(batches)  # [32, 3, 16, 16]: every position shows item 0, flipped or not
    flipped = torch.tensor([torch.equal(x, img.flip(2)) for x in got])
    assert all(torch.equal(x, img) or f for x, f in zip(got, flipped)) and 0 < flipped.sum() < 32
    want = torch.cat(_data_take(data.InfiniteLoader(data.SyntheticShapes(16, 1, seed=3), 8, seed=3, mirror=True, workers=0), 4))
    assert torch.equal(got, want)
    seed0 = torch.cat(_data_take(data.InfiniteLoader(data.SyntheticShapes(16, 1, seed=3), 8, seed=0, mirror=True, workers=0), 4))
    assert not torch.equal(got, seed0)


def test_wgan_step_adds_ten_times_the_gradient_penalty(tmp_path, monkeypatch):
    """--loss wgan: Dmain minimises E[f] - E[r] + 1e-3 E[r^2] + 10 GP (Gulrajani et al.'s lambda 10),
    by hand from the critic logits and the GP terms the step computed; the log's D/loss holds the
    same sum and D/gp the mean GP."""
    seen, steps = {}, []
    real_d, real_gp, real_step = losses.d_loss, losses.wgan_gp, train.phase_step
    monkeypatch.setattr(losses, 'd_loss', lambda kind, r, f: seen.update(r=r.detach().clone(), f=f.detach().clone()) or real_d(kind, r, f))
    monkeypatch.setattr(losses, 'wgan_gp', lambda *a, **k: seen.setdefault('gp', real_gp(*a, **k)))
    monkeypatch.setattr(train, 'phase_step', lambda net, opt, scaler, loss, world: (
        steps.append(loss.item()), real_step(net, opt, scaler, loss, world))[1])
    out = run_train(tmp_path, '--kimg', '0.008', '--snap-kimg', '1', '--loss', 'wgan', '--gamma', '0')
    r, f, gp = seen['r'], seen['f'], seen['gp'].detach()
    assert gp.shape == (8,) and gp.mean() > 0
    want = f.mean().item() - r.mean().item() + 1e-3 * r.square().mean().item() + 10 * gp.mean().item()
    assert len(steps) == 2 and steps[1] == pytest.approx(want, rel=1e-5, abs=1e-6)  # Gmain, Dmain
    line = [json.loads(s) for s in open(f'{out}/log.jsonl')][-1]
    assert line['D/loss'] == pytest.approx(want, abs=1e-4) and line['D/gp'] == pytest.approx(gp.mean().item(), abs=1e-4)


def test_metrics_and_snapshots_run_once_per_interval(tmp_path):
    out = run_train(tmp_path, '--kimg', '0.04', '--snap-kimg', '0.02', '--metrics', 'di', '--num-gen', '16',
                    '--metrics-kimg', '0.02')  # batch 8: nimg 8, 16, 24 (crosses 20), 32, 40 (crosses 40, the end)
    evals = [json.loads(line)['step'] for line in open(f'{out}/log.jsonl') if 'metrics' in line]
    assert evals == [3, 5] and sorted(os.listdir(out)).count('ckpt-0000003.pt') == 1


def test_write_failure_and_bad_image_mid_run_keep_the_work(tmp_path, capsys, monkeypatch):
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', full_disk)
    err = expect_error(capsys, TINY_FLAGS + ['--out', str(tmp_path / 'full'), '--kimg', '0.008'], 'could not write')
    assert 'No space left' in err and not glob.glob(f'{tmp_path}/full/*.tmp')  # no half-written file left
    monkeypatch.setattr(torch, 'save', lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))  # Ctrl-C twice
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(str(tmp_path / 'full' / 'ckpt-0000009.pt'), {}, keep=3)
    assert not glob.glob(f'{tmp_path}/full/*.tmp')
    monkeypatch.setattr(torch, 'save', real_save)
    monkeypatch.setattr(Image.Image, 'save', lambda self, path, *a, **k: (_ for _ in ()).throw(
        OSError(28, 'No space left on device', str(path))))  # the image grids
    expect_error(capsys, TINY_FLAGS + ['--out', str(tmp_path / 'png'), '--kimg', '0.008'],
                 'reals.png: No space left on device; check the path')
    monkeypatch.undo()
    root = tmp_path / 'imgs'
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(48):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f'{i:02d}.png')
    bad = sorted(root.iterdir())[40]  # past the 32 of reals.png; its header is fine (the start-up scan passes),
    bad.write_bytes(bad.read_bytes()[:100])  # its pixels are cut short
    flags = TINY_FLAGS + ['--out', str(tmp_path / 'run'), '--data', str(root), '--kimg', '0.064', '--snap-kimg', '1']
    expect_error(capsys, flags, 'could not be decoded', '--skip-bad')
    ckpts = glob.glob(f'{tmp_path}/run/ckpt-*.pt')
    assert len(ckpts) == 1 and load(ckpts[0])['step'] >= 1  # the steps before the bad batch are kept
    train.main(flags + ['--skip-bad'])  # --skip-bad is not a run setting: the same command goes on
    assert load(sorted(glob.glob(f'{tmp_path}/run/ckpt-*.pt'))[-1])['step'] == 8


def torchrun(args, nproc, cwd, ok=True):
    cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--master_port', str(29500 + os.getpid() % 1000),
           os.path.join(HERE, 'train.py')] + args
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert (r.returncode == 0) == ok, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def test_ddp_bad_image_on_one_rank_stops_every_rank_in_the_same_step(tmp_path):
    """A truncated image that only one of 2 gloo processes reads: every process learns of it in the
    same step (no rank left waiting in a collective), each says why in one line, and rank 0 alone
    writes the steps done (one checkpoint, no .tmp left)."""
    root = tmp_path / 'imgs'
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(48):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f'{i:02d}.png')
    bad = sorted(root.iterdir())[40]  # past the 32 of reals.png: read in training, by one rank only
    bad.write_bytes(bad.read_bytes()[:100])
    r = torchrun(TINY_FLAGS + ['--out', str(tmp_path / 'run'), '--data', str(root), '--kimg', '0.064', '--snap-kimg', '1'],
                 2, tmp_path, ok=False)
    errors = [line for line in r.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 2, r.stderr[-4000:]  # one line from each rank
    assert sum('could not be decoded' in e for e in errors) == 1 and sum('another process' in e for e in errors) == 1
    ckpts = glob.glob(f'{tmp_path}/run/ckpt-*.pt')
    assert len(ckpts) == 1 and load(ckpts[0])['step'] >= 1 and not glob.glob(f'{tmp_path}/run/*.tmp')


def test_ddp_two_processes_match_one(tmp_path):
    """2 gloo processes with 4 images each == 1 process with the global batch of 8: every random
    number is drawn for the global batch, the contrastive negatives are all-gathered, gradients
    averaged. Covers Gmain, Greg (path length), Dmain, Dreg (R1) and EMA."""
    common = TINY_FLAGS + ['--kimg', '0.024', '--snap-kimg', '1', '--loss', 'contrastive', '--warmup-kimg', '0.008',
                           '--pl-weight', '2', '--pl-interval', '2', '--r1-interval', '2', '--gamma', '1']
    torchrun(common + ['--out', str(tmp_path / 'ddp')], 2, tmp_path)
    train.main(common + ['--out', str(tmp_path / 'one')])
    a, b = load(glob.glob(f'{tmp_path}/ddp/ckpt-*.pt')[0]), load(glob.glob(f'{tmp_path}/one/ckpt-*.pt')[0])
    # w_avg (truncation only) is tracked per process, from its own samples, as in the official code
    assert_same_state(a, b, atol=1e-4, skip=['mapping.w_avg'])  # Adam steps are lr=2e-3
    assert torch.allclose(a['pl_mean'], b['pl_mean'], atol=1e-6)
    logs = [[json.loads(line) for line in open(f'{tmp_path}/{name}/log.jsonl')] for name in ('ddp', 'one')]
    assert [line['step'] for line in logs[0]] == [line['step'] for line in logs[1]] == [1, 2, 3]
    for x, y in zip(*logs):  # the log line holds the whole batch's numbers, not rank 0's half
        for k in ('G/loss', 'D/loss', 'D/r1', 'D/real_min', 'D/fake_max'):
            assert (k in x) == (k in y) and x.get(k, 0) == pytest.approx(y.get(k, 0), rel=1e-3, abs=1e-4), k


def test_stop_signals_save_a_checkpoint_and_the_same_command_resumes(tmp_path):
    """Ctrl-C (SIGINT to the process group) and a cluster's SIGTERM (to every process: loader workers,
    and under torchrun the launcher, which sends it on again): no more batches, a log line and a
    checkpoint of the steps done, exit status 128 + signal (torchrun reports its own), and the same
    command continues from that step."""
    flags = TINY_FLAGS + ['--workers', '1', '--kimg', '100', '--snap-kimg', '50']
    ddp = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port', str(30500 + os.getpid() % 1000)]
    for name, sig, launcher in [('int', signal.SIGINT, [sys.executable]), ('term', signal.SIGTERM, [sys.executable]),
                                ('ddp', signal.SIGTERM, ddp)]:
        out = str(tmp_path / name)
        p = subprocess.Popen(launcher + [os.path.join(HERE, 'train.py'), *flags, '--out', out], cwd=tmp_path, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                             env=dict(os.environ, OMP_NUM_THREADS='1'))
        for line in p.stdout:  # training: the handlers are in place
            if line.startswith('kimg'):
                break
        os.killpg(p.pid, sig)
        stdout, stderr = p.communicate(timeout=120)
        assert f'{sig.name}: stopping after this step' in stderr and 'stopped at kimg' in stdout, (name, stdout, stderr[-3000:])
        assert p.returncode == (128 + sig if name != 'ddp' else 1)
        ckpts = glob.glob(f'{out}/ckpt-*.pt')
        step = load(ckpts[0])['step']
        assert len(ckpts) == 1 and step >= 1
        assert [json.loads(line) for line in open(f'{out}/log.jsonl')][-1]['step'] == step  # logged up to it
        train.main(flags + ['--out', out, '--workers', '0', '--kimg', str((step + 1) * 8 / 1000)])
        assert load(f'{out}/{train.checkpoint_name(step + 1)}')['nimg'] == (step + 1) * 8


def test_stop_requests_ignore_repeats_but_a_later_ctrl_c_stops_at_once(tmp_path, capsys, monkeypatch):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with train.stop_requests(rank=0, world=1) as stop:
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):  # a launcher passing it on; an early Ctrl-C
            os.kill(os.getpid(), sig)
        assert [s for s, _ in stop] == [signal.SIGTERM]
        monkeypatch.setattr(train.time, 'time', lambda: stop[0][1] + 3)
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM never forces
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C more than 2 s later
            train.time.sleep(1)
    clock = itertools.count(0, 3)  # 3 s between signals
    monkeypatch.setattr(train.time, 'time', lambda: next(clock))
    with train.stop_requests(rank=1, world=2) as ddp:  # under DDP no rank leaves on its own
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        train.time.sleep(0.1)
        assert [s for s, _ in ddp] == [signal.SIGINT]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert capsys.readouterr().err.count('SIGTERM: stopping after this step') == 1
    monkeypatch.undo()
    monkeypatch.setattr(train, 'train', lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as e:
        train.main(TINY_FLAGS + ['--out', str(tmp_path / 'r')])
    assert e.value.code == 130 and capsys.readouterr().err == \
        'error: interrupted; the same command resumes from the last checkpoint, if one was written\n'


def expect_error(capsys, argv, *needles):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def test_bad_flags_and_checkpoints_give_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / 'r')
    expect_error(capsys, TINY_FLAGS + ['--out', out, '--resolution', '48'], 'power of two')
    expect_error(capsys, TINY_FLAGS + ['--out', out, '--batch', '6'], '--mbstd-group')
    expect_error(capsys, TINY_FLAGS + ['--out', out, '--g-attn', 'san', '--g-attn-res', '64'], '--g-attn-res 64')
    expect_error(capsys, TINY_FLAGS + ['--out', out, '--g-attn', 'san', '--g-attn-res', '12'], '--g-attn-res 12')
    expect_error(capsys, TINY_FLAGS + ['--out', out, '--d-attn', 'ref', '--d-attn-res', '12'], '--d-attn-res 12')
    expect_error(capsys, TINY_FLAGS + ['--out', out, '--heatmap', 'noise'], '--sel')
    # a flag changed from its default where it does nothing (the user would think it measured something)
    for extra, needle in [(['--cam-weights', 'detached'], '--cam-weights does nothing without the alignment loss'),
                          (['--sel', 'norm', '--no-align', '--align-interval', '4'], '--align-interval does nothing'),
                          (['--sel', 'norm', '--align-weight', '0', '--align-tau', '0.1'], '--align-tau does nothing'),
                          (['--no-align'], '--no-align does nothing without --sel'),
                          (['--sel', 'norm', '--no-align', '--align-weight', '3'], '--align-weight does nothing'),
                          (['--g-form', 'minimax'], 'without --loss contrastive'),
                          (['--loss', 'hinge', '--warmup-kimg', '1'], '--warmup-kimg does nothing'),
                          (['--g-attn-res', '8'], '--g-attn-res does nothing without --g-attn'),
                          (['--d-attn-res', '4'], '--d-attn-res does nothing without --d-attn'),
                          (['--d-attn', 'self', '--ref-attn-eq', '1'], 'without --d-attn ref'),
                          (['--num-gen', '10'], '--num-gen does nothing without --metrics')]:
        expect_error(capsys, TINY_FLAGS + ['--out', out, *extra], needle)
    expect_error(capsys, TINY_FLAGS + ['--out', out, '--metrics', 'swd,fid50k3'], 'unknown metric')
    expect_error(capsys, TINY_FLAGS + ['--out', out, '--amp', 'fp16'], 'bf16')
    expect_error(capsys, TINY_FLAGS + ['--out', out, '--sel', 'norm', '--align-interval', '0'], '--align-interval 0')
    expect_error(capsys, TINY_FLAGS + ['--out', out, '--data', str(tmp_path / 'nowhere')], 'nowhere')
    for flag, value in [('--batch', '0'), ('--keep', '0'), ('--r1-interval', '0'), ('--workers', '-1'), ('--kimg', '0'),
                        ('--seed', '-1'), ('--lr', '-1')]:
        expect_error(capsys, TINY_FLAGS + ['--out', out, flag, value], f'{flag} {value} must be')
    expect_error(capsys, TINY_FLAGS + ['--out', out, '--device', 'gpu0'], '--device gpu0 is not a device')
    (tmp_path / 'file').write_text('')
    expect_error(capsys, TINY_FLAGS + ['--out', str(tmp_path / 'file')], 'is a file')
    expect_error(capsys, TINY_FLAGS + ['--out', str(tmp_path / 'file' / 'run')], 'file/run: Not a directory')
    expect_error(capsys, TINY_FLAGS + ['--out', out, '--resume', str(tmp_path / 'x.pt')], 'no such file')
    run_train(tmp_path, '--kimg', '0.008', name='r')
    expect_error(capsys, TINY_FLAGS + ['--out', out, '--channel-max', '64'], 'another architecture', '--channel-max 32')
    expect_error(capsys, TINY_FLAGS + ['--out', out, '--resume', 'none'], 'already holds checkpoints')
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'not a checkpoint')
    expect_error(capsys, TINY_FLAGS + ['--out', str(tmp_path / 's'), '--resume', str(bad)], 'cannot read checkpoint')
    torch.save({'state_dict': {}}, bad)
    expect_error(capsys, TINY_FLAGS + ['--out', str(tmp_path / 's'), '--resume', str(bad)], 'not a checkpoint of this project')



def test_every_numeric_flag_is_finite_and_in_range_and_blamed_on_itself(tmp_path, capsys):
    out = str(tmp_path / 'r')
    for flag, value, want, extra in [
            ('--snap-kimg', 'nan', 'be finite and positive', []), ('--snap-kimg', '0', 'be positive', []),
            ('--snap-kimg', '-1', 'be positive', []), ('--metrics-kimg', '0', 'be positive', []),
            ('--kimg', '-1', 'be positive', []), ('--kimg', 'nan', 'be finite and positive', []),
            ('--lr', 'inf', 'be finite and positive', []), ('--lr', 'nan', 'be finite and positive', []),
            ('--lr-decay-kimg', '-1', 'lie in [0, --kimg 10]', []), ('--beta2', 'nan', 'be finite and lie in [0, 1)', []),
            ('--gamma', '-1', 'be at least 0', []), ('--gamma', 'inf', 'be finite and at least 0', []),
            ('--pl-weight', '-2', 'be at least 0', []), ('--style-mix', '2', 'lie in [0, 1]', []),
            ('--style-mix', '-0.1', 'lie in [0, 1]', []), ('--ema-kimg', '-1', 'be at least 0', []),
            ('--ema-rampup', 'nan', 'be finite and at least 0', []), ('--log-sec', '-1', 'be at least 0', []),
            ('--max-images', '0', 'be at least 1', []), ('--channel-base', '0', 'be at least 1', []),
            ('--map-layers', '0', 'be at least 1', []), ('--bench-steps', '-1', 'be at least 0', []),
            ('--align-weight', '-1', 'be at least 0', ['--sel', 'norm']),
            ('--align-tau', '1.5', 'lie in [0, 1]', ['--sel', 'norm']),
            ('--warmup-kimg', '-1', 'be at least 0', ['--loss', 'contrastive']),
            ('--num-gen', '0', 'be at least 1', ['--metrics', 'swd'])]:
        err = expect_error(capsys, TINY_FLAGS + ['--out', out, *extra, flag, value], f'{flag} {value} must {want}')
        assert err.count('--') == 1 + want.count('--'), err  # no other flag blamed
    assert not os.path.exists(out)


def test_a_presets_lr_decay_follows_kimg_but_an_explicit_one_must_fit(tmp_path, capsys):
    """quick decays the lr over the last 50 of its 75 kimg: the same share of a shorter or longer run."""
    assert train.parse_args(['--cfg', 'quick']).lr_decay_kimg == 50
    short = train.parse_args(['--cfg', 'quick', '--kimg', '1'])
    assert short.lr_decay_kimg == pytest.approx(2 / 3)
    train.check_args(short, 1, torch.device('cpu'))  # no error
    assert train.parse_args(['--cfg', 'quick', '--kimg', '150']).lr_decay_kimg == pytest.approx(100)
    assert train.parse_args(['--cfg', 'quick', '--kimg', '1', '--lr-decay-kimg', '0']).lr_decay_kimg == 0
    assert train.parse_args(['--cfg', 'cpu', '--kimg', '1']).lr_decay_kimg == 0
    expect_error(capsys, ['--cfg', 'quick'] + SN_FLAGS + ['--out', str(tmp_path / 'q'), '--kimg', '1', '--lr-decay-kimg', '50'],
                 '--lr-decay-kimg 50 must lie in [0, --kimg 1]')
    assert '--cfg quick' in train.__doc__.split('python train.py')[1]  # --help leads with README's first command


def test_one_writer_per_run_and_no_stale_lock_after_kill(tmp_path, capsys):
    """A second train.py on the same --out is refused while the first lives, naming its pid; after the first
    is killed with SIGKILL the kernel has dropped its lock and a run takes the folder, removing the partial
    files the killed one left."""
    out = str(tmp_path / 'run')
    holder = subprocess.Popen([sys.executable, '-c', 'import sys, time, train; lock = train.lock_out(sys.argv[1], 0, 1, "cpu"); '
                               'print("locked", flush=True); time.sleep(600)', out], cwd=HERE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        expect_error(capsys, TINY_FLAGS + ['--out', out, '--kimg', '0.008'], f'--out {out} is in use', f'pid {holder.pid}')
        assert not glob.glob(f'{out}/ckpt-*')
    finally:
        holder.kill()  # SIGKILL: no clean-up in the holder
        holder.wait()
    open(f'{out}/ckpt-0000007.pt.tmp', 'wb').write(b'half a checkpoint')
    run_train(tmp_path, '--kimg', '0.008', name='run')
    assert glob.glob(f'{out}/ckpt-*') == [f'{out}/ckpt-0000001.pt'] and 'removed 1 partial file' in capsys.readouterr().out
    assert open(f'{out}/.lock').read() == f'{os.getpid()}\n'


def flip_bytes(path, n=64):
    """Flip n bytes inside the data of the largest member of a checkpoint's zip (a tensor): torch.load alone reads it."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    raw = bytearray(open(path, 'rb').read())
    start = info.header_offset + 30 + int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], 'little') \
        + int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], 'little')  # past the local header
    for i in range(start, start + n):
        raw[i] ^= 0xFF
    open(path, 'wb').write(raw)


def test_corrupt_checkpoints_are_refused_and_resume_auto_falls_back(tmp_path, capsys):
    out = run_train(tmp_path, '--kimg', '0.016', '--snap-kimg', '0.008', '--keep', '5')
    first, last = f'{out}/ckpt-0000001.pt', f'{out}/ckpt-0000002.pt'
    flip_bytes(last)
    load(last)  # torch.load alone does not notice
    with pytest.raises(ValueError, match='ckpt-0000002.pt is corrupt .*fails its CRC-32 check'):
        model.load_checkpoint(last)  # model.py and metrics.py
    expect_error(capsys, TINY_FLAGS + ['--out', str(tmp_path / 'other'), '--resume', last], 'ckpt-0000002.pt is corrupt')
    run_train(tmp_path, '--kimg', '0.024', '--snap-kimg', '0.008', '--keep', '5')  # --resume auto
    std = capsys.readouterr()
    assert f'warning: {last} is corrupt' in std.err and f'resumed {first} at kimg 0.008' in std.out
    assert os.path.isfile(last + '.corrupt')  # kept, renamed aside
    assert [load(p)['step'] for p in sorted(glob.glob(f'{out}/ckpt-*.pt'))] == [1, 2, 3]
    for p in glob.glob(f'{out}/ckpt-*.pt'):
        flip_bytes(p)
    expect_error(capsys, TINY_FLAGS + ['--out', out, '--kimg', '0.032', '--snap-kimg', '0.008'], 'every checkpoint in')


def test_done_reports_the_time_of_the_whole_run_and_the_eta_is_never_negative(tmp_path, capsys, monkeypatch):
    """The checkpoint keeps the run's seconds so far; a resume adds to them (a checkpoint without them, from
    before, still loads); the ETA (total - seen images at the smoothed speed) is never negative, also when
    the last batch goes past --kimg."""
    out = run_train(tmp_path, '--kimg', '0.008')
    ck = load(f'{out}/ckpt-0000001.pt')
    assert 0 < ck['seconds'] < 600
    torch.save(dict(ck, seconds=3600.0), f'{out}/ckpt-0000001.pt')  # an hour already spent
    capsys.readouterr()
    etas = []
    real_fmt = train.fmt_time
    monkeypatch.setattr(train, 'fmt_time', lambda s: etas.append(s) or real_fmt(s))
    run_train(tmp_path, '--kimg', '0.012')  # two more steps of 8: the last one ends at 16 of 12 images
    assert re.search(r'done: 0.02 kimg in 1:00:\d\d \(0:00:\d\d since the resume\)', capsys.readouterr().out)
    assert load(f'{out}/ckpt-0000002.pt')['seconds'] > 3600 and min(etas) >= 0 and len(etas) >= 3
    ck = load(f'{out}/ckpt-0000002.pt')
    del ck['seconds']
    torch.save(ck, f'{out}/ckpt-0000002.pt')  # a checkpoint written before the seconds were kept
    run_train(tmp_path, '--kimg', '0.02')
    assert re.search(r'done: 0.02 kimg in 0:00:\d\d; checkpoints', capsys.readouterr().out)


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path, capsys, monkeypatch):
    out = run_train(tmp_path, '--kimg', '0.016', '--snap-kimg', '0.008')
    before = sorted(glob.glob(f'{out}/ckpt-*.pt'))
    real_d_loss = losses.d_loss
    monkeypatch.setattr(losses, 'd_loss', lambda *a: real_d_loss(*a) * float('nan'))
    err = expect_error(capsys, TINY_FLAGS + ['--out', out, '--kimg', '0.032', '--snap-kimg', '0.008'], 'non-finite D/loss')
    assert before[-1] in err
    assert sorted(glob.glob(f'{out}/ckpt-*.pt')) == before  # nothing overwritten by a bad state
    assert load(before[-1])['step'] == 2
    err = expect_error(capsys, TINY_FLAGS + ['--out', str(tmp_path / 'new'), '--kimg', '0.032'], 'non-finite D/loss')
    assert 'no checkpoint was written yet' in err and '--amp none' not in err  # nothing to resume, --amp already none


def test_no_checkpoint_from_non_finite_d_weights(tmp_path, capsys, monkeypatch):
    """D's weights count too: G stays finite when D is not (its non-finite gradients are zeroed)."""
    real_step = train.phase_step

    def poison_d(net, *a):
        real_step(net, *a)
        if isinstance(net, model.Discriminator):
            with torch.no_grad():
                net.b4.out.bias.fill_(float('nan'))
    monkeypatch.setattr(train, 'phase_step', poison_d)
    out = str(tmp_path / 'nan-d')  # no log line before the first snapshot: the snapshot's own check
    expect_error(capsys, TINY_FLAGS + ['--out', out, '--kimg', '0.016', '--snap-kimg', '0.008', '--log-sec', '1e9'],
                 'G or D weights became non-finite at kimg 0.01')
    assert not glob.glob(f'{out}/ckpt-*')


def test_keep_freed_memory_sets_glibc_options_unless_the_user_did(monkeypatch):
    """Its effect is measured by the benchmark (README); here: the mallopt calls, and none when a
    MALLOC_* variable is set or libc cannot be loaded."""
    calls = []
    monkeypatch.setattr(train.ctypes, 'CDLL', lambda name: types.SimpleNamespace(mallopt=lambda *a: calls.append(a) or 1))
    for k in [k for k in os.environ if k.startswith('MALLOC_')]:
        monkeypatch.delenv(k)
    train.keep_freed_memory()
    assert calls == [(-3, 32 << 20), (-1, 16 << 30), (-2, 1 << 30)]  # mmap threshold, trim threshold, top pad
    monkeypatch.setenv('MALLOC_ARENA_MAX', '2')
    train.keep_freed_memory()
    assert len(calls) == 3

    def no_glibc(name):
        raise OSError(name)
    monkeypatch.delenv('MALLOC_ARENA_MAX')
    monkeypatch.setattr(train.ctypes, 'CDLL', no_glibc)
    train.keep_freed_memory()  # macOS, musl: nothing to do, no error


def test_benchmark_mode_times_phases(tmp_path, capsys):
    res = train.main(TINY_FLAGS + ['--out', str(tmp_path / 'bench'), '--bench-steps', '4', '--pl-weight', '2',
                                   '--gamma', '1', '--r1-interval', '2'])
    assert res is None
    out = capsys.readouterr().out
    line = json.loads([s for s in out.splitlines() if s.startswith('{')][-1])
    assert line['bench']['img_per_sec'] > 0 and set(line['bench']['phases_ms']) >= {'Gmain', 'Greg', 'Dmain', 'Dreg', 'ema'}
    assert line['bench']['loader_ms_per_step'] >= 0 and 'waiting for the loader (the built-in dataset, --workers 0' in out
    assert 0 < line['bench']['cpu_ms_per_step'] and f"({line['bench']['cpu_ms_per_step']} ms of CPU time)" in out
    assert not os.path.exists(tmp_path / 'bench')  # the benchmark writes nothing
    steps = []
    args = types.SimpleNamespace(bench_steps=2, workers=0)
    train.benchmark(args, lambda i, real, ref: steps.append(i) or {'Gmain': time.perf_counter()}, iter(range(5)), None,
                    torch.device('cpu'), 8, rank=1)
    assert steps == [0, 1, 2, 3, 4] and capsys.readouterr().out == ''  # under torchrun only rank 0 prints


def test_tf32_is_off_in_the_double_backward_regularisers_unless_asked(tmp_path, monkeypatch):
    """--tf32 main (default): the main phases may use TF32, R1 and path length run in full fp32 (the
    official code); --tf32 none: nowhere (the official default). Read in each phase's loss."""
    seen = []
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    for name in ('g_loss', 'd_loss', 'r1_penalty', 'path_length_penalty'):
        real = getattr(losses, name)
        monkeypatch.setattr(losses, name, lambda *a, _real=real, _name=name, **k: seen.append((_name, flags())) or _real(*a, **k))
    for tf32, main, reg in [('main', True, False), ('none', False, False)]:
        seen.clear()
        run_train(tmp_path, '--kimg', '0.008', '--pl-weight', '2', '--tf32', tf32, name=tf32)  # step 0: R1 and path length
        assert sorted(seen) == [('d_loss', (main,) * 2), ('g_loss', (main,) * 2), ('path_length_penalty', (reg,) * 2),
                                ('r1_penalty', (reg,) * 2)]


def test_lazy_alignment_runs_every_n_steps_with_weight_times_n(tmp_path, monkeypatch):
    calls = []
    real_align = losses.align_loss
    monkeypatch.setattr(losses, 'align_loss', lambda *a, **k: calls.append(1) or real_align(*a, **k))
    run_train(tmp_path, '--kimg', '0.048', '--sel', 'norm', '--eqgan', 'paper', '--align-interval', '3', name='six')
    assert len(calls) == 2  # 6 steps: steps 0 and 3
    # one step: interval 3 with weight 1 is the same update as interval 1 with weight 3, not weight 1
    one = ['--kimg', '0.008', '--sel', 'norm', '--eqgan', 'paper']
    a = load(glob.glob(run_train(tmp_path, *one, '--align-interval', '3', name='a') + '/ckpt-*.pt')[0])
    b = load(glob.glob(run_train(tmp_path, *one, '--align-weight', '3', name='b') + '/ckpt-*.pt')[0])
    c = load(glob.glob(run_train(tmp_path, *one, name='c') + '/ckpt-*.pt')[0])
    assert_same_state(a, b, atol=1e-6)
    assert any(not torch.allclose(a['G'][k], c['G'][k], atol=1e-6) for k in a['G'])
    d = load(glob.glob(run_train(tmp_path, *one, '--cam-weights', 'detached', name='d') + '/ckpt-*.pt')[0])
    assert any(not torch.allclose(d['G'][k], c['G'][k], atol=1e-6) for k in c['G'])  # the flag reaches the loss


# ==============================================================================================
# model.py command line: samples, heatmap editing, attention maps

def test_model_and_metrics_command_lines_give_one_line_errors(tmp_path, capsys):
    for script, extra in [('model.py', []), ('metrics.py', ['--metrics', 'swd2k'])]:
        r = subprocess.run([sys.executable, os.path.join(HERE, script), str(tmp_path / 'nope.pt'), *extra],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and r.stderr == f'error: no checkpoint at {tmp_path}/nope.pt; give a ckpt-*.pt written by train.py\n'
    (tmp_path / 'junk.pt').write_bytes(b'junk')
    with pytest.raises(ValueError, match=r'junk.pt \(\w+\): a partial or corrupt file; train.py: delete'):
        model.read_checkpoint(str(tmp_path / 'junk.pt'))
    G, D = tiny()
    ckpt = dict(G=G.state_dict(), D=D.state_dict(), G_ema=G.state_dict(), args=TINY, step=0, nimg=0)
    torch.save({**ckpt, 'D': {k: v for k, v in D.state_dict().items() if k != 'b4.out.bias'}}, tmp_path / 'part.pt')
    with pytest.raises(ValueError, match=r'part.pt: its D does not fit .*b4\.out\.bias.*another version'):
        model.load_checkpoint(str(tmp_path / 'part.pt'))
    torch.save({k: v for k, v in ckpt.items() if k != 'G_ema'}, tmp_path / 'no_ema.pt')
    with pytest.raises(ValueError, match='no_ema.pt is not a checkpoint of this project'):
        model.read_checkpoint(str(tmp_path / 'no_ema.pt'))
    assert model.parse_seeds('0-2,7') == [0, 1, 2, 7] and model.parse_xy(' 0.3, -1') == (0.3, -1.0)
    bad_values = [('--seeds', '5-2', 'names no seeds'), ('--seeds', '0-x', 'names no seeds'), ('--move', '0.4', "is not 'x,y'"),
                  ('--move', '1.2.3,0', "is not 'x,y'"), ('--heatmap-centers', 'a,b', "is not 'x,y'"),
                  ('--heatmap-centers', '1.5,0.5', 'in [0, 1]'), ('--points', '0.1,0.2;1,2,3', "'1,2,3' is not 'x,y'"),
                  ('--points', '0.1,0.2;0.5,-0.1', "'0.5,-0.1' is not 'x,y' (two numbers, in [0, 1])")]
    for flag, value, needle in bad_values:  # argparse: usage, then one line naming the flag
        with pytest.raises(SystemExit) as e:
            model.main(['x.pt', flag, value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f'error: argument {flag}: ' in err and needle in err, err


def test_model_cli_samples_edits_and_attention_maps(tmp_path, capsys):
    out = run_train(tmp_path, '--kimg', '0.008', '--resolution', '32', '--sel', 'norm', '--g-attn', 'san',
                    '--g-attn-res', '16', name='cli')
    ckpt = glob.glob(f'{out}/ckpt-*.pt')[0]
    model.main([ckpt, '--seeds', '0-2', '--trunc', '0.7', '--out', str(tmp_path / 's.png'), '--device', 'cpu'])
    assert Image.open(tmp_path / 's.png').size == (3 * 32, 32)
    model.main([ckpt, '--seeds', '0,5', '--move', '0.4,0', '--steps', '4', '--out', str(tmp_path / 'e.png'), '--device', 'cpu'])
    edit = np.asarray(Image.open(tmp_path / 'e.png'))
    assert edit.shape == (2 * 32, 4 * 32, 3)
    assert not np.array_equal(edit[:32, :32], edit[:32, 96:])  # the moved heatmap changes the image
    model.main([ckpt, '--seeds', '1', '--attn-maps', '--out', str(tmp_path / 'a.png'), '--device', 'cpu'])
    assert Image.open(tmp_path / 'a.png').size == (32, 32)
    other = glob.glob(run_train(tmp_path, '--kimg', '0.008', '--resolution', '32', name='plain') + '/ckpt-*.pt')[0]
    model.main([ckpt, other, '--seeds', '0-2', '--out', str(tmp_path / 'c.png'), '--device', 'cpu', '--zoom', '2'])
    rows = np.asarray(Image.open(tmp_path / 'c.png'))[::2, ::2]  # one row per checkpoint, the same seeds
    assert rows.shape == (2 * 32, 3 * 32, 3) and not np.array_equal(rows[:32], rows[32:])
    model.main([ckpt, '--seeds', '0-2', '--out', str(tmp_path / 's1.png'), '--device', 'cpu'])  # alone: row 1
    assert np.array_equal(rows[:32], np.asarray(Image.open(tmp_path / 's1.png')))
    with pytest.raises(SystemExit, match='one checkpoint'):
        model.main([ckpt, other, '--move', '0.4,0'])
    model.main(['--resolution', '16', '--channel-base', '256'])  # the complexity table
    table = capsys.readouterr().out
    assert '+ SAN in G' in table and '+ ref-attn in D' in table


# ==============================================================================================
# model.py, metrics.py, attention.py: details pinned by hand (each test fails under a one-line bug that
# the tests above let through)

LRELU = lambda t: F.leaky_relu(t, 0.2) * math.sqrt(2)  # noqa: E731


def _fir4():
    f = torch.tensor([1., 3, 3, 1], dtype=torch.float64)
    return torch.outer(f, f) / 64


def _up2(x):
    """Independent 2x upsampler: zero insertion, then the [1,3,3,1] FIR x 4 with padding [2, 1]."""
    B, C, H, W = x.shape
    z = torch.zeros(B, C, 2 * H, 2 * W, dtype=x.dtype)
    z[:, :, ::2, ::2] = x
    return F.conv2d(F.pad(z, [2, 1, 2, 1]), (4 * _fir4()).to(x.dtype).expand(C, 1, 4, 4), groups=C)


# ==============================================================================================
# model.py: synthesis layer noise, routing of ws / noise, skip sum, D epilogue, conv_clamp

def test_synthesis_layer_noise_by_hand():
    """out = lrelu(modconv(x, w) + strength * noise + b) sqrt 2: the noise joins after the conv, before bias
    and activation, scaled by noise_strength; 'const' uses the layer's own [res, res] buffer as is (rows y,
    columns x), an explicit [B, 1, res, res] noise replaces it, 'none' adds nothing."""
    torch.manual_seed(0)
    m = model.SynthesisLayer(4, 5, 6, res=8).double()
    with torch.no_grad():
        m.noise_strength.fill_(0.7)
        m.bias.normal_()
        m.affine.bias.normal_()
    x, w = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    s = w @ m.affine.weight.T / math.sqrt(6) + m.affine.bias
    y = reference_modconv(x, m.weight, s, demodulate=True, up=1)  # [2, 5, 8, 8]
    b = m.bias.view(1, -1, 1, 1)
    noise = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    assert not torch.allclose(m.noise_const, m.noise_const.T)
    close = lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-6)  # demodulation runs in fp32
    assert close(m(x, w, noise_mode='none'), LRELU(y + b))
    assert close(m(x, w, noise_mode='const'), LRELU(y + 0.7 * m.noise_const + b))
    assert close(m(x, w, noise=noise), LRELU(y + 0.7 * noise + b))
    torch.manual_seed(1)  # 'random': one fresh [B, 1, res, res] map, shared by all channels
    got = m(x, w, noise_mode='random')
    torch.manual_seed(1)
    assert close(got, m(x, w, noise=torch.randn(2, 1, 8, 8, dtype=torch.float64)))


def test_initial_values_follow_the_official_code():
    """Style affines start with bias 1 (styles ~ 1), noise strengths at 0, SEL gains alpha at 0."""
    G = tiny_g('norm')
    layers = [m for m in G.modules() if isinstance(m, (model.SynthesisLayer, model.ToRGB))]
    assert len(layers) == 8 and all(torch.equal(m.affine.bias, torch.ones(m.affine.bias.shape)) for m in layers)
    assert all(m.noise_strength.item() == 0 for m in layers if isinstance(m, model.SynthesisLayer))
    assert all(not m.alpha.any() for m in G.modules() if isinstance(m, model.SELNorm))


def test_synthesis_consumes_ws_and_noise_in_stylegan2_order():
    """16x16 G: num_ws = 6 and noise_res = [4, 8, 8, 16, 16]. StyleGAN2's skip G: b4.conv1 takes w0, every
    toRGB takes the w after its block's convs, which the next block's conv0 shares: (b4.conv1 w0 n0,
    b4.torgb w1), (b8.conv0 w1 n1, b8.conv1 w2 n2, b8.torgb w3), (b16.conv0 w3 n3, b16.conv1 w4 n4, b16.torgb w5)."""
    G, _ = tiny()
    ws = torch.randn(2, G.num_ws, 32)
    noise = [torch.randn(2, 1, r, r) for r in G.noise_res]
    seen = []
    for name, m in G.synthesis.named_modules():
        if isinstance(m, (model.SynthesisLayer, model.ToRGB)):
            m.register_forward_pre_hook(lambda mod, args, name=name: seen.append((name, args[1], args[4] if len(args) > 4 else None)))
    G.synthesize(ws, noise=noise)
    want = [('b4.conv1', 0, 0), ('b4.torgb', 1, None), ('b8.conv0', 1, 1), ('b8.conv1', 2, 2), ('b8.torgb', 3, None),
            ('b16.conv0', 3, 3), ('b16.conv1', 4, 4), ('b16.torgb', 5, None)]
    assert [name for name, _, _ in seen] == [name for name, _, _ in want]
    for (name, w, n), (_, wi, ni) in zip(seen, want):
        assert torch.equal(w, ws[:, wi]), name
        assert (n is None) if ni is None else (n is noise[ni]), name


def test_skip_generator_sums_upsampled_torgb_outputs():
    """Skip architecture: img = up(up(rgb4) + rgb8) + rgb16, up = zero insertion + [1,3,3,1] FIR x 4 (pad [2, 1])."""
    G, _ = tiny()
    G = G.double()
    rgb = []
    for r in (4, 8, 16):
        getattr(G.synthesis, f'b{r}').torgb.register_forward_hook(lambda m, i, out: rgb.append(out))
    img = G(torch.randn(2, 32, dtype=torch.float64), noise_mode='const')
    assert torch.allclose(img, _up2(_up2(rgb[0]) + rgb[1]) + rgb[2], atol=1e-12)


def test_discriminator_epilogue_by_hand():
    """b4: minibatch-std channel appended last (groups of 4, biased var, + 1e-8, sqrt, mean), 3x3 conv
    (weights / sqrt((C + 1) 9)) + b, lrelu sqrt 2; flatten (c, y, x); fc / sqrt(16 C) + b, lrelu sqrt 2 = the
    features; logit = features . w_out / sqrt(C) + b_out, linear (no activation)."""
    torch.manual_seed(0)
    C = 4
    m = model.DiscriminatorEpilogue(C, mbstd_group=4).double()
    with torch.no_grad():
        for p in (m.conv.bias, m.fc.bias, m.out.bias):
            p.normal_()
    x = torch.randn(8, C, 4, 4, dtype=torch.float64)
    std = torch.stack([(g.var(0, unbiased=False) + 1e-8).sqrt().mean() for g in x.split(4)])  # [2]
    h = torch.cat([x, std.repeat_interleave(4).view(8, 1, 1, 1).expand(8, 1, 4, 4)], 1)
    h = LRELU(F.conv2d(h, m.conv.weight / math.sqrt((C + 1) * 9), m.conv.bias, padding=1))
    feat = LRELU(h.reshape(8, -1) @ m.fc.weight.T / math.sqrt(16 * C) + m.fc.bias)
    logit = feat @ m.out.weight[0] / math.sqrt(C) + m.out.bias[0]
    got_logit, got_feat = m(x)
    assert torch.allclose(got_feat, feat, atol=1e-12) and torch.allclose(got_logit, logit, atol=1e-12)


def test_minibatch_std_of_identical_samples_is_sqrt_eps():
    """Equal samples in a group: var 0, so the appended channel is sqrt(1e-8) = 1e-4 exactly (per group)."""
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64).repeat_interleave(4, 0)  # groups of 4 equal samples
    x[4:] += torch.randn(4, 3, 4, 4, dtype=torch.float64)  # the 2nd group differs
    y = model.minibatch_std(x, 4)[:, 3]
    assert torch.allclose(y[:4], torch.full((4, 4, 4), 1e-4, dtype=torch.float64), rtol=1e-9)
    assert (y[4:] > 0.1).all()


def test_discriminator_fromrgb_by_hand():
    """The first D block starts with fromrgb = lrelu(1x1 conv / sqrt(3) + b) sqrt 2 (an activated layer)."""
    torch.manual_seed(0)
    m = model.DiscriminatorBlock(0, 4, 6).double()
    with torch.no_grad():
        m.fromrgb.bias.normal_()
    img = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    want = LRELU(torch.einsum('oc,bchw->bohw', m.fromrgb.weight[:, :, 0, 0] / math.sqrt(3), img) + m.fromrgb.bias.view(1, -1, 1, 1))
    assert torch.allclose(m.fromrgb(img), want, atol=1e-12)
    assert torch.allclose(m(None, img), m(want), atol=1e-12)


def test_conv_clamp_by_hand():
    """conv_clamp c: a layer's output is clamped to [-c g, c g] after bias, activation and its gain g (D's
    conv1 and the skip sum use g = sqrt(.5)); both signs are clamped. The skip path (no activation) is not."""
    torch.manual_seed(0)
    m = model.Conv(3, 4, 3, conv_clamp=0.5).double()
    with torch.no_grad():
        m.bias.normal_()
    x = 20 * torch.randn(2, 3, 6, 6, dtype=torch.float64)
    g = math.sqrt(0.5)
    raw = LRELU(F.conv2d(x, m.weight / math.sqrt(27), m.bias, padding=1)) * g
    assert raw.max() > 0.5 * g and raw.min() < -0.5 * g  # both bounds are active
    assert torch.allclose(m(x, gain=g), raw.clamp(-0.5 * g, 0.5 * g), atol=1e-12)
    assert torch.allclose(m(x), (raw / g).clamp(-0.5, 0.5), atol=1e-12)


def test_conv_clamp_reaches_every_layer_of_g_and_d():
    """tiny(conv_clamp=c) with c small enough that every layer saturates: each synthesis conv and toRGB output
    lies in [-c, c] and touches the bound; in D, fromrgb, conv0 and the epilogue conv in [-c, c], conv1 in
    [-c sqrt .5, c sqrt .5]; the 1x1 skip is unclamped."""
    c = 0.02
    G, D = tiny(conv_clamp=c)
    outs = {}
    for net, kinds in ((G, (model.SynthesisLayer, model.ToRGB)), (D, (model.Conv,))):
        for name, m in net.named_modules():
            if isinstance(m, kinds):
                m.register_forward_hook(lambda mod, i, out, name=name, net=net: outs.__setitem__((id(net), name), out))
    img = G(torch.randn(4, 32))
    D(img * 50)
    g_names = [n for (k, n) in outs if k == id(G)]
    d_names = [n for (k, n) in outs if k == id(D)]
    assert len(g_names) == 8 and 'b4.conv' in d_names and 'b16.fromrgb' in d_names
    for (k, name), out in outs.items():
        bound = c * (math.sqrt(0.5) if name.endswith('conv1') and k == id(D) else 1)
        if name.endswith('skip'):
            assert out.abs().max() > bound * 1.2, name
            continue
        assert out.abs().max() <= bound * (1 + 1e-6), name
        assert out.abs().max() >= bound * (1 - 1e-6), name  # the clamp is active there


# ==============================================================================================
# model.py: EqGAN-SA layers, building / loading checkpoints, the command line helpers

def test_sel_concat_by_hand():
    """SEL_concat(F, h) = F + alpha lrelu(W [F; h] / sqrt(C + hidden) + b) sqrt 2: the features first, then the
    encoded heatmap, one 1x1 activated conv, per-channel alpha."""
    torch.manual_seed(0)
    C, hid = 4, 3
    m = model.SELConcat(C, hid).double()
    with torch.no_grad():
        m.alpha.copy_(torch.tensor([-1., 0.5, 2, 1]))
        m.conv.bias.normal_()
    x, h = torch.randn(2, C, 5, 6, dtype=torch.float64), torch.randn(2, hid, 5, 6, dtype=torch.float64)
    W = m.conv.weight[:, :, 0, 0] / math.sqrt(C + hid)  # [C, C + hid]
    y = LRELU(torch.einsum('oc,bchw->bohw', W[:, :C], x) + torch.einsum('oc,bchw->bohw', W[:, C:], h) + m.conv.bias.view(1, -1, 1, 1))
    assert torch.allclose(m(x, h), x + m.alpha.view(1, -1, 1, 1) * y, atol=1e-12)


def test_flatten_heatmaps_and_mapping_extra_input_by_hand():
    """'flatten' (EqGAN-SA Table 4): flat = [h4 (16 values, row-major), h8 (64), h16 (256)]; the mapping
    normalises z and the flat maps separately by their RMS, concatenates [z, maps] and runs the FC layers."""
    sp = sp_make('hier', sel='flatten')
    h = sp_draw(sp, 2)
    flat = sp.flat(h)
    for b, (r, off) in itertools.product(range(2), [(4, 0), (8, 16), (16, 80)]):
        for y, x in [(0, 0), (1, 2), (r - 1, 0), (r - 1, r - 2)]:
            assert flat[b, off + r * y + x] == h[f'h{r}'][b, 0, y, x]
    torch.manual_seed(0)
    m = model.MappingNetwork(8, 5, num_ws=2, layers=2, extra_dim=6).double()
    with torch.no_grad():
        for i in range(2):
            getattr(m, f'fc{i}').bias.normal_(0, 100)
    z, e = 3 * torch.randn(4, 8, dtype=torch.float64), 5 * torch.rand(4, 6, dtype=torch.float64) + 1
    rms = lambda t: (t.square().mean(1, keepdim=True) + 1e-8).sqrt()
    x = torch.cat([z / rms(z), e / rms(e)], 1)
    for i, fan_in in enumerate((14, 5)):
        fc = getattr(m, f'fc{i}')
        x = LRELU(x @ fc.weight.T * 0.01 / math.sqrt(fan_in) + 0.01 * fc.bias)
    assert torch.allclose(m(z, extra=e), x[:, None].expand(4, 2, 5), atol=1e-10)


def test_build_networks_and_checkpoint_round_trip_every_arch_key(tmp_path):
    """Every ARCH_KEY set off its TINY value shows in the built networks; a checkpoint dict as train.py writes
    it loads back into G, D and a separate G_ema with exactly the saved tensors, in eval mode, frozen."""
    a = dict(resolution=16, z_dim=24, w_dim=16, channel_base=128, channel_max=16, map_layers=3, mbstd_group=2,
             conv_clamp=0.3, g_attn='san', g_attn_res=16, d_attn='ref', d_attn_res=8, ref_attn_eq=1,
             sel='concat', heatmap='nonhier', arch='stylegan2', c_dim=3, mbstd_layout='strided', sel_placement='official',
             eqgan='paper', added_layers='plain')  # added_layers: the SN backbones' (test_sn_added_layers_...)
    assert set(a) == set(model.ARCH_KEYS)
    torch.manual_seed(0)
    # eqgan off its default (for TINY, an older checkpoint: 'paper') excludes concat and --sel-placement: built apart
    authors = model.build_networks({**a, 'sel': 'norm', 'heatmap': 'official', 'sel_placement': 'paper', 'eqgan': 'official'})[0]
    assert isinstance(authors.synthesis.b8.conv0.sel, model.SELOfficial) and authors.synthesis.b8.sel is None
    G, D = model.build_networks(a)
    syn = G.synthesis
    assert G.mapping.fc0.weight.shape == (16, 24 + 16) and G.mapping.layers == 3 and hasattr(G.mapping, 'fc2')  # z, embedded c
    assert syn.b4.conv1.weight.shape == (16, 16, 3, 3) and syn.b16.conv0.weight.shape == (8, 16, 3, 3)  # min(128 // r, 16)
    assert isinstance(syn.b16.conv1.attn, attention.SAN) and not hasattr(syn.b8.conv1, 'attn')
    assert isinstance(D.b8.conv0.attn, attention.RefAttention) and D.b8.conv0.attn.eq == 1 and D.b16.conv0.kind is None
    assert D.b4.mbstd_group == 2 and D.needs_ref
    assert {m.conv_clamp for m in G.modules() if isinstance(m, (model.SynthesisLayer, model.ToRGB))} == {0.3}
    assert D.b8.conv1.conv_clamp == D.b16.fromrgb.conv_clamp == D.b4.conv.conv_clamp == 0.3
    assert (G.spatial.sel, G.spatial.mode) == ('concat', 'nonhier') and isinstance(syn.b8.sel[0], model.SELConcat)
    assert isinstance(syn.b8.sel_in, model.SELConcat) and syn.b8.local_rgb and syn.b4.sel_in is None
    assert G.mapping.embed.weight.shape == (16, 3) and D.mapping.embed.weight.shape == (16, 3) and D.b4.cmap_dim == 16
    assert D.b4.mbstd_layout == 'strided'
    G_ema = copy.deepcopy(G)
    with torch.no_grad():
        for p in G_ema.parameters():
            p.add_(0.1 * torch.randn_like(p))
        G_ema.mapping.w_avg.normal_()
    saved = dict(G=G.state_dict(), D=D.state_dict(), G_ema=G_ema.state_dict())
    torch.save(dict(saved, args=a, step=7, nimg=112), tmp_path / 'ckpt.pt')
    out = model.load_checkpoint(str(tmp_path / 'ckpt.pt'))
    assert (out['step'], out['nimg'], out['args']) == (7, 112, a)
    assert out['G'] is not out['G_ema']
    for key in ('G', 'D', 'G_ema'):
        state = out[key].state_dict()
        assert state.keys() == saved[key].keys() and all(torch.equal(state[k], saved[key][k]) for k in state), key
        assert not out[key].training and not any(p.requires_grad for p in out[key].parameters())
    h = G.sample_heatmaps(2, 'cpu', torch.Generator().manual_seed(0))
    z, c = torch.randn(2, 24), torch.eye(3)[:2]
    with torch.no_grad():
        assert torch.equal(out['G_ema'](z, heatmaps=h, noise_mode='const', c=c), G_ema.eval()(z, heatmaps=h, noise_mode='const', c=c))
    # a checkpoint of the version before these keys and the stored resampling filters still loads
    old = {k: v for k, v in a.items() if k not in model.ARCH_DEFAULTS}
    plain = model.build_networks(old)
    strip = lambda net: {k: v for k, v in net.state_dict().items() if not k.endswith('resample_filter')}
    torch.save(dict(G=strip(plain[0]), D=strip(plain[1]), G_ema=strip(plain[0]), args=old, step=1, nimg=8), tmp_path / 'old.pt')
    back = model.load_checkpoint(str(tmp_path / 'old.pt'))
    assert torch.equal(back['G'].synthesis.b8.resample_filter, model.fir_filter()) and back['D'].c_dim == 0


def test_to_uint8_and_image_grid_by_hand(tmp_path):
    """to_uint8: x 127.5 + 128, clamped to [0, 255], truncated (-1 -> 0, 0 -> 128, 1 -> 255, -0.5 -> 64);
    data.save_grid: image k at row k // cols, column k % cols, empty cells black, each pixel a zoom^2 block."""
    x = torch.tensor([-2., -1, -0.5, 0, 0.3, 1, 3])
    assert model.to_uint8(x).tolist() == [0, 0, 64, 128, 166, 255, 255]  # 0.3 -> 166.25
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (5, 3, 2, 3), generator=g, dtype=torch.uint8)  # H = 2, W = 3
    data.save_grid(imgs, tmp_path / 'g.png', cols=3, zoom=2)
    grid = torch.from_numpy(np.asarray(Image.open(tmp_path / 'g.png')).copy())
    assert grid.shape == (2 * 2 * 2, 3 * 3 * 2, 3)
    for k in range(6):
        r, c = divmod(k, 3)
        cell = grid[r * 4:(r + 1) * 4, c * 6:(c + 1) * 6]  # [4, 6, 3]
        want = imgs[k].permute(1, 2, 0) if k < 5 else torch.zeros(2, 3, 3, dtype=torch.uint8)
        assert torch.equal(cell[::2, ::2], want) and torch.equal(cell[1::2, 1::2], want), k


def test_cli_heatmap_centres_and_move(tmp_path, monkeypatch):
    """`model.py CKPT --heatmap-centers X,Y --move DX,DY --steps 3`: per seed s, z = randn(z_dim) and heatmaps
    drawn from Generator().manual_seed(s); level 0 placed at (X, Y), the finer 'hier' centres keeping their
    offsets; column j renders centres + t_j (DX, DY), t = 0, 1/2, 1; the PNG has one row per seed, one column
    per step, each cell to_uint8 of G(z, heatmaps) with const noise."""
    G = tiny_g('norm', 'hier').eval()
    set_alpha(G, 0.5)
    monkeypatch.setattr(model, 'load_checkpoint', lambda path, device: dict(G_ema=G))
    calls = []
    G.register_forward_hook(lambda m, args, kwargs, out: calls.append((args[0], kwargs, out)), with_kwargs=True)
    model.main(['ckpt.pt', '--seeds', '2,5', '--heatmap-centers', '0.3,0.7', '--move', '0.2,-0.1', '--steps', '3',
                '--out', str(tmp_path / 'e.png'), '--device', 'cpu'])
    assert len(calls) == 3
    seeds = [2, 5]
    z = torch.stack([torch.randn(32, generator=torch.Generator().manual_seed(s)) for s in seeds])
    c0 = torch.cat([G.spatial.sample(1, 'cpu', torch.Generator().manual_seed(s))['centers'] for s in seeds])  # [2, 7, 2]
    placed = c0 - c0[:, :1] + torch.tensor([0.3, 0.7])
    grid = torch.from_numpy(np.asarray(Image.open(tmp_path / 'e.png')).copy())
    assert grid.shape == (2 * 16, 3 * 16, 3)
    for j, (zz, kw, out) in enumerate(calls):
        t = j / 2
        assert torch.equal(zz, z) and kw['noise_mode'] == 'const'
        assert torch.allclose(kw['heatmaps']['centers'], placed + t * torch.tensor([0.2, -0.1]), atol=1e-6), j
        want = (out * 127.5 + 128).clamp(0, 255).floor().to(torch.uint8).permute(0, 2, 3, 1)  # [2, 16, 16, 3]
        for i in range(2):
            assert torch.equal(grid[16 * i:16 * (i + 1), 16 * j:16 * (j + 1)], want[i]), (i, j)


# ==============================================================================================
# metrics.py

class _G32(nn.Module):
    """A stub G at 32x32 (two SWD levels) drawing z from the global RNG like the real one."""
    z_dim = 8

    def __init__(self):
        super().__init__()
        self.syn = nn.Linear(8, 3 * 32 * 32)

    def forward(self, z):
        return torch.tanh(2 * self.syn(z)).view(-1, 3, 32, 32)


class _RecD(nn.Module):
    """A per-sample stub D with reference input: logit and 5 features from channel means and stds."""
    needs_ref = True

    def __init__(self):
        super().__init__()
        self.seen, self.refs = [], []

    def forward(self, img, ref=None, return_features=False):
        self.seen.append(img.clone())
        self.refs.append(ref.clone())
        f = torch.cat([img.mean((2, 3)), img.std((2, 3))[:, :2]], 1)  # [B, 5]
        logits = 3 * f[:, 0] - f[:, 3]
        return (logits, f) if return_features else logits


def _stub_feats(x8):  # the stub 'Inception': 4 features of uint8 images
    x = x8.double()
    return torch.stack([x.mean((1, 2, 3)), x[:, 0].mean((1, 2)), x[:, 1].std((1, 2)), (x[:, 2] / 255).square().mean((1, 2))], 1)


def test_evaluate_feeds_each_metric_its_inputs(monkeypatch):
    """evaluate() on 40 reals and 40 fakes in chunks of 16: the Inception net sees the dataset's uint8 images in
    order and the fakes quantised as uint8(clamp(x 127.5 + 128, 0, 255)); D sees reals as x / 127.5 - 1 and
    dataset images (also / 127.5 - 1) as references. Then fid = Frechet distance of the Inception features,
    DI = min real logit - max fake logit (64 >= 40 samples: every draw takes all), FDDF = Frechet distance
    of D's features without the logit column, swd avg = mean of its two levels (32, 16)."""
    seen_inc = []

    def inception(x8, protocol):
        assert x8.dtype == torch.uint8 and protocol == 'stylegan2'
        seen_inc.append(x8.clone())
        return _stub_feats(x8).float()

    monkeypatch.setattr(metrics, '_inception_once', lambda *a: inception)
    monkeypatch.setattr(metrics, '_REAL_CACHE', {})
    torch.manual_seed(0)
    G, D, data = _G32(), _RecD(), TinyData(40, resolution=32, base=8)
    fakes = []
    G.register_forward_hook(lambda m, i, out: fakes.append(out.detach().clone()))
    res = metrics.evaluate(['fid40', 'di', 'fddf', 'swd'], G, D, data, 'cpu', batch=16, num_gen=40, log=lambda s: None)
    reals = data.x
    fake = torch.cat(fakes)[:40]
    fake8 = (fake * 127.5 + 128).clamp(0, 255).floor().to(torch.uint8)
    assert len(seen_inc) == 6  # 3 chunks of reals (indices wrap around), then 3 of fakes
    assert torch.equal(torch.cat(seen_inc[:3])[:40], reals) and torch.equal(torch.cat(seen_inc[3:])[:40], fake8)
    d_real, d_fake = torch.cat(D.seen[:3])[:40], torch.cat(D.seen[3:])[:40]
    assert torch.allclose(d_real, reals.float() / 127.5 - 1) and torch.equal(d_fake, fake)
    flat = (data.x.float() / 127.5 - 1).flatten(1)
    for r in torch.cat(D.refs):
        assert ((flat - r.flatten()).abs().amax(1) < 1e-6).any()  # each reference is a dataset image in [-1, 1]
    fid = metrics.frechet_distance(*metrics.feature_stats(_stub_feats(reals)), *metrics.feature_stats(_stub_feats(fake8)))
    assert res['fid40'] == pytest.approx(fid, rel=1e-5)
    feat = lambda x: torch.cat([x.mean((2, 3)), x.std((2, 3))[:, :2]], 1).double()
    fr, ff = feat(d_real), feat(d_fake)
    logit = lambda f: 3 * f[:, 0] - f[:, 3]
    assert res['di'] == pytest.approx((logit(fr).min() - logit(ff).max()).item(), rel=1e-5)
    assert res['fddf'] == pytest.approx(metrics.frechet_distance(*metrics.feature_stats(fr), *metrics.feature_stats(ff)), rel=1e-4)
    assert set(res['swd']) == {'32', '16', 'avg'}
    assert res['swd']['avg'] == pytest.approx((res['swd']['32'] + res['swd']['16']) / 2, rel=1e-12)


def test_kid_subset_size_is_the_smaller_set():
    """7 distinct fakes, 12 copies of one real r: every subset (size m = min(7, 12) = 7) holds all fakes and 7
    copies of r, so KID = sum_{i != j} k(x_i, x_j) / 42 + k(r, r) - 2 mean_i k(x_i, r), k = (a.b / d + 1)^3."""
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    k = lambda a, b: (a @ b / 3 + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / 42
    hand = xx + k(r, r) - 2 * sum(k(x[i], r) for i in range(7)) / 7
    assert metrics.kernel_inception_distance(r.expand(12, 3), x, num_subsets=4) == pytest.approx(hand.item(), rel=1e-10)


def test_inception_input_grayscale_and_pytorch_fid_resize_by_hand():
    """One-channel images are repeated to RGB. 'pytorch-fid': x / 255 resized by bilinear with half-pixel
    centres (src = (dst + 0.5) in / out - 0.5, clamped at 0, the last pixel repeated), then 2 v - 1."""
    g = torch.Generator().manual_seed(0)
    gray = torch.randint(0, 256, (2, 1, 5, 7), generator=g, dtype=torch.uint8)
    for protocol in metrics.PROTOCOLS:
        assert torch.equal(metrics._inception_input(gray, protocol), metrics._inception_input(gray.expand(2, 3, 5, 7), protocol))

    def mat(n_in, n_out):
        m = torch.zeros(n_out, n_in, dtype=torch.float64)
        for d in range(n_out):
            s = max((d + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = int(math.floor(s))
            i1, fr = min(i0 + 1, n_in - 1), s - i0
            m[d, i0] += 1 - fr
            m[d, i1] += fr
        return m
    x = torch.randint(0, 256, (1, 3, 5, 7), generator=g, dtype=torch.uint8)
    want = (mat(5, 299) @ (x.double() / 255) @ mat(7, 299).T) * 2 - 1
    assert torch.allclose(metrics._inception_input(x, 'pytorch-fid').double(), want, atol=1e-5)


def test_inception_pools_and_batchnorm_follow_the_tf_graph():
    """TF's FID graph: BN with eps 1e-3; the 3x3 average pools (Mixed_5x, 6b-e, 7b) ignore the zero padding (a
    corner averages its 4 in-image values), the pool branch of Mixed_7c is a 3x3 max pool."""
    torch.manual_seed(0)
    bn = metrics._BN(3)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(1e-3, 2e-3)
        bn.weight.normal_()
        bn.bias.normal_()
    x = torch.randn(2, 3, 4, 4)
    want = (x - bn.running_mean.view(1, 3, 1, 1)) / (bn.running_var.view(1, 3, 1, 1) + 1e-3).sqrt() * bn.weight.view(1, 3, 1, 1) + bn.bias.view(1, 3, 1, 1)
    assert torch.allclose(bn(x), want, atol=1e-5)
    y = torch.rand(1, 2, 5, 5)
    p = metrics._avg_pool(y)
    assert torch.allclose(p[..., 0, 0], y[..., :2, :2].mean((2, 3))) and torch.allclose(p[..., 2, 0], y[..., 1:4, :2].mean((2, 3)))
    net = metrics.FIDInception()
    for name, cin, pool in [('Mixed_5b', 192, 'avg'), ('Mixed_6b', 768, 'avg'), ('Mixed_7b', 1280, 'avg'), ('Mixed_7c', 2048, 'max')]:
        block, got = getattr(net, name), []
        h = block.branch_pool.register_forward_pre_hook(lambda m, a: got.append(a[0]))
        x = torch.randn(1, cin, 3, 3)
        with torch.no_grad():
            block(x)
        h.remove()
        want = F.max_pool2d(x, 3, 1, 1) if pool == 'max' else torch.stack(
            [torch.stack([x[..., max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].mean((2, 3)) for j in range(3)], -1) for i in range(3)], -2)
        assert torch.allclose(got[0], want, atol=1e-6), name


def test_swd_descriptors_are_laplacian_patches():
    """Each raw descriptor is the 7x7 patch (C x 49, row-major) of its image's Laplacian level, lying wholly
    inside the level: it equals one column of F.unfold(level, 7) (no padding)."""
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    desc = metrics.swd_descriptors(img, seed=5, patches=16)  # [2, 2, 16, 3, 49]
    levels = metrics.laplacian_pyramid(img.float(), 2)
    assert desc.shape == (2, 2, 16, 3, 49)
    for lv, lap in enumerate(levels):
        cols = F.unfold(lap, 7)  # [2, 3 * 49, L]
        for n in range(2):
            d = (cols[n].T[None] - desc[n, lv].flatten(1)[:, None]).abs().amax(2)  # [16, L]
            assert (d.min(1).values < 1e-4).all(), (lv, n)


def test_inception_distance_feeds_unquantised_0_255_floats():
    """PPL's distance: the net gets cat(a, b) mapped from [-1, 1] to [0, 255] by (x + 1) 127.5, not quantised,
    with the protocol passed on; d = squared L2 distance of the two halves' features."""
    seen = []

    def net(x, protocol):
        seen.append((x.clone(), protocol))
        return x.flatten(1)[:, :6].square()
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1, torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    d = metrics.inception_distance(net, 'pytorch-fid')(a, b)
    x, protocol = seen[0]
    assert protocol == 'pytorch-fid' and torch.allclose(x, torch.cat([(a + 1) * 127.5, (b + 1) * 127.5]), atol=1e-4)
    fa, fb = (((t + 1) * 127.5).flatten(1)[:, :6].square() for t in (a, b))
    assert torch.allclose(d, (fa - fb).square().sum(1), rtol=1e-5)


def test_ppl_uses_exactly_num_pairs():
    """num = 6 pairs in chunks of 4: the 2 surplus pairs of the 2nd chunk are dropped; with 6 values the 'lower'
    1st / 'higher' 99th percentiles are the min and max, so nothing is trimmed: PPL = mean of the first 6."""
    planted = torch.tensor([1., 2, 3, 4, 5, 6, 100, 200], dtype=torch.float64)
    chunks = iter(planted.split(4))

    ppl = metrics.perceptual_path_length(PplStubG(), 6, lambda a, b: next(chunks) * 1e-8, batch=4, epsilon=1e-4, log=lambda *a: None)
    assert ppl == pytest.approx(3.5, rel=1e-9)


# ==============================================================================================
# attention.py (DFN) and model.py's attention maps (thesis Fig. 2.5)

def test_dfn_by_hand():
    """DFN (C = 4, hidden 3): m = mean over H, W of x; h = lrelu(W1 m / sqrt(C) + b1); filters = (W2 h / sqrt(3) + b2)
    / sqrt(9 C), read as per-sample conv weights [C_out, C_in, 3, 3]; out = x + the zero-padded 3x3 conv of x
    with them (as unfold + einsum)."""
    torch.manual_seed(0)
    B, C, H, W = 2, 4, 5, 6
    m = attention.DFN(C, hidden=3).double()
    with torch.no_grad():
        m.fc1.bias.copy_(torch.tensor([-1., 0.5, 1]))
        m.fc2.bias.normal_()
    x = torch.randn(B, C, H, W, dtype=torch.float64) + 0.5 * torch.randn(B, C, 1, 1, dtype=torch.float64)
    pre = x.mean((2, 3)) @ m.fc1.weight[:, :, 0, 0].T / math.sqrt(C) + m.fc1.bias  # [B, 3]
    assert (pre < 0).any() and (pre > 0).any()  # both sides of the leaky ReLU
    h = F.leaky_relu(pre, 0.2)
    filt = (h @ m.fc2.weight[:, :, 0, 0].T / math.sqrt(3) + m.fc2.bias) / math.sqrt(9 * C)     # [B, C * C * 9]
    cols = F.unfold(x, 3, padding=1)                                                            # [B, C * 9, H W]
    y = torch.einsum('bof,bfn->bon', filt.view(B, C, C * 9), cols).view(B, C, H, W)
    assert torch.allclose(m(x), x + y, atol=1e-12)


def test_attention_maps_place_the_kernel_around_the_point():
    """With fc2's output forced to a one-hot kernel at offset (m0, n0) = (5, 7) of the 9 x 9 patch (weights 0,
    bias one-hot per group), the map of point (x, y) = (0.3, 0.6) on the 8x8 SAN layer (row i = int(0.6 * 8) =
    4, column j = int(0.3 * 8) = 2) is 1 at the attended feature pixel (i + m0 - 4, j + n0 - 4) = (5, 5), 0
    elsewhere; bilinearly upsampled to the image it blends red in by 0.6 a; a 3x3 green dot marks the point."""
    G = tiny(g_attn='san', g_attn_res=8)[0].eval()
    san = G.synthesis.b8.conv1.attn
    s, groups = san.patch, san.groups
    with torch.no_grad():
        san.fc2.weight.zero_()
        san.fc2.bias.copy_(F.one_hot(torch.tensor(5 * s + 7), s * s).double().repeat(groups).float())
    z = torch.randn(2, 32)
    with torch.no_grad():
        out = model.attention_maps(G, z, [(0.3, 0.6)])
        base = model.to_uint8(G(z, noise_mode='const')).float()
    canvas = torch.zeros(2, 1, 8, 8)
    canvas[:, :, 5, 5] = 1
    a = F.interpolate(canvas, size=(16, 16), mode='bilinear', align_corners=False)
    want = base * (1 - 0.6 * a) + 0.6 * a * torch.tensor([255., 0, 0]).view(1, 3, 1, 1)
    py, px = int(0.6 * 16), int(0.3 * 16)
    want[:, :, py - 1:py + 2, px - 1:px + 2] = torch.tensor([0., 255, 0]).view(1, 3, 1, 1)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.uint8
    assert (out.float() - want.clamp(0, 255).floor()).abs().max() <= 1
    assert (out[:, 0].float() - base[:, 0]).abs().amax((1, 2)).min() > 20  # the red overlay is really there


def test_style_mixing_truncates_both_latents():
    """G(z, psi, cutoff, mix_z, mix_cutoff): layer l takes w(z) if l < mix_cutoff else w(mix_z), and the truncation
    w_avg + psi (w - w_avg) applies to the first `cutoff` layers whichever latent they came from."""
    G, _ = tiny()
    with torch.no_grad():
        G.mapping.w_avg.normal_()
    z, z2 = torch.randn(3, 32), torch.randn(3, 32)
    w1, w2, avg = G.map(z)[:, 0], G.map(z2)[:, 0], G.mapping.w_avg  # untruncated: [3, 32]
    _, ws = G(z, psi=0.5, cutoff=4, mix_z=z2, mix_cutoff=torch.tensor(2), return_ws=True)
    for layer in range(G.num_ws):
        w = w1 if layer < 2 else w2
        want = avg + 0.5 * (w - avg) if layer < 4 else w
        assert torch.allclose(ws[:, layer], want, atol=1e-6), layer


# ==============================================================================================
# train.py, data.py, metrics.py: details pinned by hand (each test fails under a one-line bug that
# the tests above let through)

def _gmain_z(monkeypatch):  # the z of every G forward that updates w_avg (Gmain), in order
    zs = []
    real_forward = model.Generator.forward
    monkeypatch.setattr(model.Generator, 'forward', lambda self, z, *a, **k: (
        zs.append(z.detach().clone()) if k.get('update_w_avg') else None, real_forward(self, z, *a, **k))[1])
    return zs


def test_training_tracks_w_avg_and_step_seeds_differ_across_runs(tmp_path, monkeypatch):
    """Every phase that runs the mapping updates w_avg (beta 0.995), as the official code: after one
    step from zeros it is lerp(0.005 x Gmain's batch mean of w under the initial mapping, Dmain's batch
    mean under the mapping after G's step, 0.005), in G and G_ema. And (seed, step) name independent
    streams: --seed 1's first step does not reuse --seed 0's second."""
    zs, nets = _gmain_z(monkeypatch), []
    real_build = model.build_networks
    monkeypatch.setattr(model, 'build_networks', lambda a: (lambda G, D: nets.append(copy.deepcopy(G)) or (G, D))(*real_build(a)))
    out = run_train(tmp_path, '--kimg', '0.016', '--snap-kimg', '0.008', '--keep', '5', name='s0')
    ck = load(f'{out}/ckpt-0000001.pt')
    stepped = copy.deepcopy(nets[0])
    stepped.load_state_dict(ck['G'])
    with torch.no_grad():
        first = 0.005 * nets[0].mapping(zs[0])[:, 0].mean(0)
        want = torch.lerp(first, stepped.mapping(zs[1])[:, 0].mean(0), 0.005)
    assert want.abs().max() > 0 and torch.allclose(ck['G']['mapping.w_avg'], want, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(ck['G']['mapping.w_avg'], first, rtol=1e-2)  # Dmain's update counts
    assert torch.equal(ck['G_ema']['mapping.w_avg'], ck['G']['mapping.w_avg'])
    run_train(tmp_path, '--kimg', '0.008', '--seed', '1', name='s1')
    assert len(zs) == 6 and not any(torch.allclose(z, zs[4]) for z in zs[:4])  # Gmain, Dmain per step


def test_presets_follow_the_official_configs():
    """Config E / F (the official TF run_training.py) and stylegan2-ada-pytorch's paper256; style
    mixing 0.9, lazy R1 every 16, path length every 4; an explicit flag wins over the preset."""
    want = {'e': dict(channel_base=16384, batch=32, lr=0.002, gamma=100, ema_kimg=10, mbstd_group=4),
            'f': dict(channel_base=32768, batch=32, lr=0.002, gamma=10, ema_kimg=10, mbstd_group=4),
            'paper256': dict(channel_base=16384, batch=64, lr=0.0025, gamma=1, ema_kimg=20, mbstd_group=8)}
    for cfg, vals in want.items():
        args = train.parse_args(['--cfg', cfg])
        assert {k: getattr(args, k) for k in vals} == vals, cfg
        assert (args.resolution, args.channel_max, args.map_layers, args.pl_weight) == (256, 512, 8, 2), cfg
        assert (args.style_mix, args.r1_interval, args.pl_interval, args.ema_rampup) == (0.9, 16, 4, 0), cfg
    assert train.parse_args(['--cfg', 'paper256', '--gamma', '5']).gamma == 5
    assert len(data.make_dataset(None, 16)) == 50_000  # the built-in set's default size


def test_resume_auto_refuses_a_changed_mirror_and_lazy_scaling_follows_the_official_code(tmp_path, capsys):
    """--mirror changes the data: --resume auto refuses it. The official StyleGAN2 sets both lazy
    intervals always, so c = I / (I + 1) scales Adam even with R1 and path length off (EqGAN-SA's
    --pl_w=0 runs G at lr x 4/5, beta2 0.99 ** (4/5)); the SN backbones scale only while R1 runs."""
    out = run_train(tmp_path, '--kimg', '0.008', '--mirror', '--gamma', '0')
    for opt, c in (('opt_G', 4 / 5), ('opt_D', 16 / 17)):  # the cpu preset has no path length either
        group = load(f'{out}/ckpt-0000001.pt')[opt]['param_groups'][0]
        assert group['lr'] == pytest.approx(2e-3 * c) and group['betas'] == pytest.approx((0.0, 0.99 ** c)), opt
    expect_error(capsys, TINY_FLAGS + ['--out', out, '--kimg', '0.016'], '--mirror True (this run: False)')
    for gamma, c in (('0', 1), ('1', 16 / 17)):
        sn = run_sn(tmp_path, 'sndcgan', '--kimg', '0.008', '--gamma', gamma, name=f'sn{gamma}')
        ck = load(f'{sn}/ckpt-0000001.pt')
        assert ck['opt_G']['param_groups'][0]['betas'] == pytest.approx((0.5, 0.999))
        assert ck['opt_D']['param_groups'][0]['lr'] == pytest.approx(2e-4 * c)
        assert ck['opt_D']['param_groups'][0]['betas'] == pytest.approx((0.5 ** c, 0.999 ** c))


def test_ema_without_rampup(tmp_path):
    """--ema-rampup 0 (the e / f / paper256 presets) means no ramp-up, not "EMA off": at step 2,
    G_ema = lerp(G_ema at step 1, G, 1 - 0.5 ** (batch / (ema_kimg * 1000)))."""
    out = run_train(tmp_path, '--kimg', '0.016', '--snap-kimg', '0.008', '--keep', '5', '--ema-rampup', '0', '--ema-kimg', '0.01')
    one, two = load(f'{out}/ckpt-0000001.pt'), load(f'{out}/ckpt-0000002.pt')
    beta = 0.5 ** (8 / 10)
    params = [k for k, _ in tiny()[0].named_parameters()]
    for k in params:
        assert torch.allclose(two['G_ema'][k], torch.lerp(one['G_ema'][k], two['G'][k], 1 - beta), atol=1e-6), k
    assert any(not torch.allclose(two['G_ema'][k], two['G'][k], atol=1e-6) for k in params)


def test_evaluate_draws_fresh_latents_per_chunk():
    """Generated images: each chunk of `batch` draws its own latents (40 images in chunks of 16: three
    different z batches, not one repeated)."""
    G, D = _met_nets()
    zs, real_forward = [], G.forward
    G.forward = lambda z: (zs.append(z.clone()), real_forward(z))[1]
    metrics.evaluate(['swd'], G, D, TinyData(), 'cpu', log=lambda *a: None, batch=16, num_gen=40)
    assert len(zs) == 3 and all(not torch.allclose(zs[i], zs[j]) for i in range(3) for j in range(i))


def test_ppl_protocol_on_the_real_generator():
    """StyleGAN2's end-point PPL in W, recomputed for a tiny real G: chunk c seeded by (seed, 5, c), one
    heatmap layout per pair, w = map(z) without truncation, const noise (strengths made non-zero so
    that it matters), end point lerp(w0, w1, 1e-4), d / 1e-4^2, trimmed to the 1st-99th percentiles."""
    G = tiny_g('norm').eval()
    with torch.no_grad():
        for name, p in G.named_parameters():
            if 'noise_strength' in name:
                p.fill_(0.5)
    sq = lambda a, b: (a - b).square().flatten(1).sum(1)
    got = metrics.perceptual_path_length(G, 8, sq, batch=4, log=lambda *a: None)
    ds = []
    with torch.no_grad():
        for c in range(2):
            torch.manual_seed(metrics._seed(0, 5, c))
            h = G.sample_heatmaps(4, 'cpu')
            z0, z1 = torch.randn(2, 4, G.z_dim)
            w0, w1 = G.map(z0, heatmaps=h), G.map(z1, heatmaps=h)
            img = lambda w: G.synthesize(w, noise_mode='const', heatmaps=h)
            ds.append(sq(img(w0), img(w0 + 1e-4 * (w1 - w0))).double() / 1e-8)
    d = torch.cat(ds).numpy()
    lo, hi = np.percentile(d, 1, method='lower'), np.percentile(d, 99, method='higher')
    assert got == pytest.approx(d[(d >= lo) & (d <= hi)].mean(), rel=1e-3)  # float rounding ~1e-4


def test_ppl_face_crop_region():
    """crop=True: StyleGAN's FFHQ crop, rows 3/8..7/8 and columns 2/8..6/8 of the image."""
    seen = []

    class G(PplStubG):
        z_dim = 64 * 64
        synthesize = staticmethod(lambda w, noise_mode='const', heatmaps=None: w[:, 0].view(-1, 1, 64, 64))
    metrics.perceptual_path_length(G(), 2, lambda a, b: seen.append(a.clone()) or (a - b).flatten(1).sum(1),
                                   batch=2, crop=True, log=lambda *a: None)
    torch.manual_seed(metrics._seed(0, 5, 0))
    z0 = torch.randn(2, 2, 64 * 64)[0].view(2, 1, 64, 64)
    assert seen[0].shape == (2, 1, 32, 32) and torch.equal(seen[0], z0[:, :, 24:56, 16:48])


def test_di_defaults_are_200_draws_of_64():
    g = torch.Generator().manual_seed(0)
    r, f = torch.randn(500, generator=g), torch.randn(500, generator=g)
    gen, want = torch.Generator().manual_seed(0), []
    for _ in range(200):
        rr, ff = (x.double()[torch.randperm(500, generator=gen)[:64]] for x in (r, f))
        want.append(rr.min() - ff.max())
    assert metrics.disequilibrium_indicator(r, f) == pytest.approx(torch.stack(want).mean().item(), abs=1e-12)


def test_precision_recall_ball_includes_its_boundary():
    """Kynkaanniemi et al.: covered when distance <= radius. Four duplicate reals have a 3rd-neighbour
    radius 0; a fake exactly on them is covered (precision 1/4; 0 with a strict <)."""
    real = torch.tensor([[0.], [0], [0], [0], [50], [51], [52], [53]])
    fake = torch.tensor([[0.], [1000], [2000], [3000]])
    assert metrics.precision_recall(real, fake, k=3)[0] == pytest.approx(0.25)


# ==============================================================================================
# Official stylegan2-ada-pytorch networks: safe loading, equivalence to the tensor, fine-tuning
# (fixtures written by the official code, ../shared/official/README.md; none of its code is imported)

OFFICIAL = os.path.join(HERE, '..', 'shared', 'official')


def official(name):
    """(path of the pickle, its reference outputs as float32 tensors); skipped where the fixtures are not
    beside the checkout (a copy of the project alone), required under CI."""
    path = os.path.join(OFFICIAL, f'{name}.pkl')
    if not os.path.isfile(path):
        assert not os.environ.get('CI'), f'the official fixtures are missing: {OFFICIAL}'
        pytest.skip(f'no official fixtures at {OFFICIAL}')
    ref = np.load(os.path.join(OFFICIAL, f'{name}-ref.npz'))
    return path, {k: torch.from_numpy(ref[k]).float() for k in ref.files}


def official_outputs(ck, ref):
    """Our G_ema / G / D on the fixture's inputs: {name: max abs difference to the official output}."""
    c = ref['c'] if ref['c'].numel() else None
    kw = {} if c is None else {'c': c}
    with torch.no_grad():
        ours = dict(ws=ck['G_ema'].map(ref['z'], **kw),
                    img=ck['G_ema'](ref['z'], noise_mode='const', **kw),
                    img_trunc=ck['G_ema'](ref['z'], psi=0.5, noise_mode='const', **kw),
                    img_G=ck['G'](ref['z'], noise_mode='const', **kw),
                    logits=ck['D'](ref['d_in'], **kw)[:, None])
    return {k: (v - ref[k]).abs().max().item() for k, v in ours.items()}


@pytest.mark.parametrize('name', ['sg2ada-32', 'sg2ada-64-cond'])
def test_official_networks_reproduce_the_official_outputs(name):
    """The fixtures' G_ema (psi 1 and 0.5 towards the pickled w_avg, const noise), G and D (minibatch-std
    in the official strided groups) give the official outputs: ws within 1e-5, images and logits within
    1e-4 (fp32, CPU). Parameter counts and construction arguments as in manifest.json."""
    path, ref = official(name)
    manifest = json.load(open(os.path.join(OFFICIAL, 'manifest.json')))[name]
    ck = model.load_checkpoint(path)
    a = ck['args']
    assert (a['resolution'], a['c_dim'], a['z_dim'], a['w_dim'], a['map_layers'], a['channel_base'], a['channel_max'],
            a['conv_clamp'], a['mbstd_group'], a['mbstd_layout']) == tuple(manifest[k] for k in (
        'resolution', 'c_dim', 'z_dim', 'w_dim', 'mapping_layers', 'channel_base', 'channel_max', 'conv_clamp',
        'mbstd_group_size')) + ('strided',)
    assert train.count(ck['G']) == manifest['G_params'] and train.count(ck['D']) == manifest['D_params']
    diff = official_outputs(ck, ref)
    # logits within 1e-5: the contiguous minibatch-std groups give 5e-5 on these fixtures (next test)
    assert diff['ws'] < 1e-5 and diff['logits'] < 1e-5 and max(diff.values()) < 1e-4, diff
    assert not torch.equal(ck['G'].mapping.fc0.weight, ck['G_ema'].mapping.fc0.weight)  # two generators, not one


def test_official_equivalence_catches_every_kind_of_difference(monkeypatch):
    """The outputs depend on what a loader could get wrong: the strided minibatch-std grouping (D in the
    contiguous one differs), a buffer left at its initial value (noise_const, w_avg, a resampling
    filter), a square weight transposed (no shape check can see it)."""
    path, ref = official('sg2ada-32')
    ck = model.load_checkpoint(path)
    ck['D'].b4.mbstd_layout = 'contiguous'
    assert official_outputs(ck, ref)['logits'] > 2e-5
    real_flatten = model._flatten
    for key, change, output in [('synthesis.b8.conv1.noise_const', lambda t: torch.randn_like(t), 'img'),
                                ('mapping.w_avg', torch.zeros_like, 'img_trunc'),
                                ('synthesis.b16.conv0.resample_filter', lambda t: model.fir_filter(), 'img'),
                                ('synthesis.b32.resample_filter', lambda t: model.fir_filter(), 'img'),
                                ('mapping.fc1.weight', lambda t: t.t(), 'ws')]:
        def flatten(meta, *a, **k):
            tensors, modules = real_flatten(meta, *a, **k)
            if not a and meta['class_name'] == 'Generator':
                tensors[key] = change(tensors[key])
            return tensors, modules
        monkeypatch.setattr(model, '_flatten', flatten)
        assert official_outputs(model.load_checkpoint(path), ref)[output] > 1e-3, key


def test_official_loader_refuses_dropped_misnamed_misshapen_tensors(monkeypatch):
    path, _ = official('sg2ada-64-cond')
    real_flatten = model._flatten
    for edit, needle in [(lambda t: t.pop('mapping.fc3.bias'), "missing ['mapping.fc3.bias']"),
                         (lambda t: t.update({'b8.conv0.weights': t.pop('b8.conv0.weight')}), "unknown tensors ['b8.conv0.weights']"),
                         (lambda t: t.update({'mapping.embed.weight': t['mapping.embed.weight'].t()}), 'mapping.embed.weight'),
                         (lambda t: t.pop('b8.conv1.resample_filter'), "missing ['b8.conv1.resample_filter']")]:  # a used one
        def flatten(meta, *a, **k):
            tensors, modules = real_flatten(meta, *a, **k)
            if not a and meta['class_name'] == 'Discriminator':
                edit(tensors)
            return tensors, modules
        monkeypatch.setattr(model, '_flatten', flatten)
        with pytest.raises(ValueError, match=re.escape(needle)):
            model.load_checkpoint(path)


def test_official_pickle_that_calls_code_is_refused_and_nothing_runs(tmp_path):
    """An ordinary pickle runs whatever its reduce names; ours resolves the allow-list only: a snapshot
    whose reduce calls os.system (at the top, or inside a module's pickled state) is refused with one
    line naming it, and the command never runs."""
    marker = tmp_path / 'ran'

    class Evil:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)

    state = dict(_parameters={}, _buffers={}, _modules={}, payload=Evil())
    for i, obj in enumerate([Evil(), dict(G=dict(class_name='Generator', state=state), D=None, G_ema=None),
                             {'G': eval}]):
        path = tmp_path / f'evil{i}.pkl'
        path.write_bytes(pickle.dumps(obj, protocol=4))
        with pytest.raises(ValueError) as e:
            model.read_checkpoint(str(path))
        msg = str(e.value)
        assert 'not on the allow-list' in msg and ('system' in msg or 'builtins.eval' in msg) and len(msg.splitlines()) == 1
        assert not marker.exists()


def test_official_networks_of_another_architecture_get_one_line(monkeypatch):
    """What this code cannot represent is named: a G architecture other than 'skip', a StyleGAN3-like
    synthesis network, another activation, a D with its own channel base."""
    path, _ = official('sg2ada-32')
    real_flatten = model._flatten
    for edit, needle in [(lambda m: m['synthesis.b8'][1].update(architecture='orig'), "architecture is orig, skip, not 'skip'"),
                         (lambda m: m['synthesis'][1].pop('block_resolutions'), 'StyleGAN3'),
                         (lambda m: m['mapping.fc0'][1].update(activation='relu'), 'activations linear, lrelu, relu'),
                         (lambda m: m[''][1]['_init_kwargs'].update(channel_base=4096), 'its D has channel_base')]:
        def flatten(meta, *a, **k):
            tensors, modules = real_flatten(meta, *a, **k)
            if not a:
                edit_net = meta['class_name'] == ('Discriminator' if 'channel_base' in needle else 'Generator')
                if edit_net:
                    edit(modules)
            return tensors, modules
        monkeypatch.setattr(model, '_flatten', flatten)
        with pytest.raises(ValueError, match=re.escape(needle)):
            model.load_checkpoint(path)


def test_official_pickle_through_the_command_lines(tmp_path, capsys):
    """model.py samples from a pickle (--class for a conditional one) and converts it to a checkpoint
    of ours, which loads to the same networks; metrics.py needs --data for it; a resume from the
    conversion says to use --init."""
    path, ref = official('sg2ada-64-cond')
    with pytest.raises(SystemExit, match=r'--class K with K in \[0, 4\]'):
        model.main([path, '--seeds', '0-1', '--out', str(tmp_path / 's.png')])
    model.main([path, '--seeds', '0-3', '--class', '2', '--out', str(tmp_path / 's.png')])
    assert Image.open(tmp_path / 's.png').size == (4 * 64, 64)
    model.main([path, '--convert', str(tmp_path / 'conv.pt')])
    ck = model.load_checkpoint(str(tmp_path / 'conv.pt'))
    assert max(official_outputs(ck, ref).values()) < 1e-4
    expect_error(capsys, TINY_FLAGS + ['--out', str(tmp_path / 'r'), '--resume', str(tmp_path / 'conv.pt')],
                 'networks only', f'--init {tmp_path / "conv.pt"}')
    monkey = pytest.MonkeyPatch()
    monkey.setattr(sys, 'argv', ['metrics.py', path, '--metrics', 'di'])
    with pytest.raises(SystemExit):
        metrics.main()
    monkey.undo()
    assert 'pass --data' in capsys.readouterr().err



def test_convert_to_an_unwritable_path_or_a_full_disk_says_so_in_one_line(tmp_path, monkeypatch):
    G, D = tiny()
    src, dst = str(tmp_path / 'ckpt.pt'), str(tmp_path / 'conv.pt')
    torch.save(dict(G=G.state_dict(), D=D.state_dict(), G_ema=G.state_dict(), args={**TINY, 'arch': 'stylegan2'},
                    step=0, nimg=0), src)
    with pytest.raises(SystemExit, match=r'^error: could not write .*nowhere/conv.pt .*No such file'):
        model.main([src, '--convert', str(tmp_path / 'nowhere' / 'conv.pt')])
    open(dst, 'wb').write(b'an older conversion')
    real_save = torch.save

    def full_disk(obj, f):
        f.write(b'PK half a checkpoint')
        raise RuntimeError('PytorchStreamWriter failed writing file data/0: file write failed')
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(SystemExit, match=r'^error: could not write .*conv.pt \(PytorchStreamWriter failed'):
        model.main([src, '--convert', dst])
    assert open(dst, 'rb').read() == b'an older conversion' and sorted(os.listdir(tmp_path)) == ['ckpt.pt', 'conv.pt']
    monkeypatch.setattr(torch, 'save', real_save)
    model.main([src, '--convert', dst])
    assert model.load_checkpoint(dst)['step'] == 0


INIT_FLAGS = ['--cfg', 'cpu', '--batch', '4', '--workers', '0', '--metrics', 'none', '--max-images', '16', '--log-sec', '0',
              '--kimg', '0.004']


def test_init_from_an_official_pickle_with_sel_added_starts_as_the_official_network(tmp_path, capsys):
    """--init takes the architecture from the pickle; SEL (alpha 0) and its heatmap encoders are new and
    leave the start equal to the official G_ema (within 1e-4); one step of fine-tuning trains from there
    with the dual contrastive loss. Contradicting architecture flags or --cond get one line."""
    path, ref = official('sg2ada-32')
    out = str(tmp_path / 'ft')
    args = train.parse_args(INIT_FLAGS + ['--init', path, '--sel', 'norm', '--eqgan', 'paper', '--loss', 'contrastive',
                                          '--out', out])
    init = train.init_from(args)
    assert (args.resolution, args.map_layers, args.channel_base, args.channel_max, args.z_dim, args.mbstd_layout) == \
        (32, 2, 2048, 128, 512, 'strided')
    args.c_dim, args.conv_clamp = 0, 256
    G, _ = model.build_networks(vars(args))
    msg = train.load_init(G, init['G_ema'], 'G_ema')
    assert 'new (spatial.enc.16.bias' in msg and 'not used' not in msg
    with torch.no_grad():
        img = G.eval()(ref['z'], noise_mode='const', heatmaps=G.sample_heatmaps(8, 'cpu'))
    assert (img - ref['img']).abs().max() < 1e-4
    train.main(INIT_FLAGS + ['--init', path, '--sel', 'norm', '--eqgan', 'paper', '--loss', 'contrastive', '--warmup-kimg', '0',
                             '--out', out])
    printed = capsys.readouterr().out
    assert printed.count('init from') == 3 and 'D: 29 tensors loaded' in printed
    ck = load(f'{out}/ckpt-0000001.pt')
    assert ck['args']['conv_clamp'] == 256 and ck['args']['init'] == path and ck['step'] == 1
    g_att = train.load_init(model.build_networks({**vars(args), 'sel': 'none', 'g_attn': 'san'})[0], init['G'], 'G')
    assert 'not used (synthesis.b32.conv1.affine.bias' in g_att  # SAN replaces that conv
    for extra, needle in [(['--resolution', '64'], 'has --resolution 32, this run asks for 64'),
                          (['--cond'], 'unconditional: drop --cond')]:
        expect_error(capsys, INIT_FLAGS + ['--init', path, '--out', str(tmp_path / 'x'), *extra], needle)
    path64, _ = official('sg2ada-64-cond')
    expect_error(capsys, INIT_FLAGS + ['--init', path64, '--out', str(tmp_path / 'y')], '5 classes): add --cond')
    expect_error(capsys, INIT_FLAGS + ['--init', path64, '--cond', '--out', str(tmp_path / 'y')], 'has 5 classes, the data 4')


def test_init_keeps_the_minibatch_std_layout(tmp_path, capsys):
    """--init from a checkpoint trained with strided minibatch-std groups fine-tunes with them (an
    architecture flag, as official pickles carry); asking for the other layout gets one line."""
    src = run_train(tmp_path, '--kimg', '0.008', '--mbstd-layout', 'strided', name='src')
    path = f'{src}/ckpt-0000001.pt'
    args = train.parse_args(INIT_FLAGS + ['--init', path, '--out', str(tmp_path / 'ft')])
    train.init_from(args)
    assert args.mbstd_layout == 'strided' and args.resolution == 16
    expect_error(capsys, INIT_FLAGS + ['--init', path, '--mbstd-layout', 'contiguous', '--out', str(tmp_path / 'x')],
                 'has --mbstd-layout strided, this run asks for contiguous')


# ---- EqGAN-SA as its authors built it (--eqgan official): their snapshot, SEL, encoder, sampler, loss
# (fixture written by genforce/eqgan-sa's code, ../shared/eqgan/README.md; none of its code is imported:
# the hand computations below are written from the steps of their code)

EQGAN = os.path.join(HERE, '..', 'shared', 'eqgan')


def eqgan_fixture():
    """(path of eqgan-32.pkl, its reference outputs as float32 tensors); skipped as official() is."""
    path = os.path.join(EQGAN, 'eqgan-32.pkl')
    if not os.path.isfile(path):
        assert not os.environ.get('CI'), f'the EqGAN-SA fixture is missing: {EQGAN}'
        pytest.skip(f'no EqGAN-SA fixture at {EQGAN}')
    ref = np.load(os.path.join(EQGAN, 'eqgan-32-ref.npz'))
    return path, {k: torch.from_numpy(ref[k]).float() for k in ref.files}


def eqgan_outputs(ck, ref):
    """Our networks on the fixture's inputs, the authors' heatmap dict given as it is: {name: max abs difference}."""
    h = {k: ref[f'hm_{k}'] for k in model.OFFICIAL_KEYS}
    with torch.no_grad():
        ours = dict(ws=ck['G_ema'].map(ref['z']),
                    img=ck['G_ema'](ref['z'], heatmaps=h, noise_mode='const'),
                    img_trunc=ck['G_ema'](ref['z'], psi=0.5, heatmaps=h, noise_mode='const'),
                    img_G=ck['G'](ref['z'], heatmaps=h, noise_mode='const'),
                    logits=ck['D'](ref['d_in'])[:, None])
    return {k: (v - ref[k]).abs().max().item() for k, v in ours.items()}


def test_eqgan_snapshot_reproduces_the_authors_outputs():
    """The authors' snapshot loads through the safe reader as --eqgan official networks (sel norm, their
    sampler) and gives their ws and logits within 1e-5, images within 1e-4 (psi 1 and 0.5, G and G_ema),
    with every pickled tensor used (the only ones left are the filters of layers that never resample);
    parameter counts as manifest.json."""
    path, ref = eqgan_fixture()
    manifest = json.load(open(os.path.join(EQGAN, 'manifest.json')))['eqgan-32']
    ck = model.load_checkpoint(path)
    a = ck['args']
    assert (a['eqgan'], a['sel'], a['heatmap'], a['sel_placement'], a['mbstd_layout']) == ('official', 'norm', 'official',
                                                                                           'paper', 'strided')
    assert (a['resolution'], a['z_dim'], a['w_dim'], a['map_layers'], a['channel_base'], a['channel_max'], a['conv_clamp'],
            a['mbstd_group']) == tuple(manifest[k] for k in ('resolution', 'z_dim', 'w_dim', 'mapping_layers', 'channel_base',
                                                             'channel_max', 'conv_clamp', 'mbstd_group_size'))
    assert train.count(ck['G']) == manifest['G_params'] and train.count(ck['D']) == manifest['D_params']
    diff = eqgan_outputs(ck, ref)
    assert diff['ws'] < 1e-5 and diff['logits'] < 1e-5 and max(diff.values()) < 1e-4, diff
    with open(path, 'rb') as f:
        snap = model._SafeUnpickler(f).load()
    tensors, _ = model._flatten(snap['G_ema'])
    left = {k for k in tensors if k.replace('synthesis.hm_conv', 'spatial.hm_conv') not in ck['G_ema'].state_dict()}
    assert left and all(k.endswith('resample_filter') for k in left)  # unused filters only
    assert sum(k.startswith('synthesis.hm_conv') and not k.endswith('filter') for k in tensors) == 12
    assert sum(isinstance(m, model.SELOfficial) for m in ck['G'].modules()) == 3 * 4 - 1  # conv0, conv1, toRGB


def test_eqgan_snapshot_equivalence_catches_permuted_and_swapped_tensors(monkeypatch):
    """The outputs depend on every kind of tensor a loader could mix up where no shape check can see
    it: a square SEL conv transposed, sigma and mu swapped, two levels' encoders swapped, an encoder
    conv of level b32 (used from 16 px up) perturbed."""
    path, ref = eqgan_fixture()
    real_flatten = model._flatten

    def swap(a, b):
        return lambda t: t.update({a: t[b], b: t[a]})
    for edit, output in [(lambda t: t.update({'synthesis.b8.conv1.sel.output.1.weight':
                                              t['synthesis.b8.conv1.sel.output.1.weight'].transpose(0, 1)}), 'img'),
                         (swap('synthesis.b16.torgb.sel.sigma.weight', 'synthesis.b16.torgb.sel.mu.weight'), 'img'),
                         (swap('synthesis.hm_conv1_b8.weight', 'synthesis.hm_conv1_b16.weight'), 'img'),
                         (lambda t: t['synthesis.hm_conv0_b32.bias'].add_(0.5), 'img'),
                         (lambda t: t['synthesis.b32.conv0.sel.shared.0.weight'].mul_(-1), 'img')]:
        def flatten(meta, *a, **k):
            tensors, modules = real_flatten(meta, *a, **k)
            if not a and meta['class_name'] == 'Generator':
                tensors = {k: v.clone() for k, v in tensors.items()}
                edit(tensors)
            return tensors, modules
        monkeypatch.setattr(model, '_flatten', flatten)
        assert eqgan_outputs(model.load_checkpoint(path), ref)[output] > 1e-3


def test_eqgan_snapshot_refuses_dropped_misnamed_tensors_and_other_networks(monkeypatch):
    """A dropped or renamed SEL / encoder tensor, or a snapshot whose SELs our SELOfficial cannot be
    (another InstanceNorm, a layer without SEL, use_sel off), gets one line naming it."""
    path, _ = eqgan_fixture()
    real_flatten = model._flatten
    cases = [(lambda t, m: t.pop('synthesis.b4.torgb.sel.mu.bias'), "missing ['synthesis.b4.torgb.sel.mu.bias']"),
             (lambda t, m: t.update({'synthesis.hm_conv0_b9.weight': t.pop('synthesis.hm_conv0_b8.weight')}),
              "unknown tensors ['spatial.hm_conv0_b9.weight']"),
             (lambda t, m: m['synthesis.b8.conv1.sel.inorm_fn'][1].update(affine=True), 'b8.conv1.sel normalises otherwise'),
             (lambda t, m: m['synthesis.b16.conv0.sel.output.0'][1].update(negative_slope=0.1), 'not a leaky ReLU 0.2'),
             (lambda t, m: m.pop('synthesis.b8.torgb.sel'), 'some of its synthesis layers have no SEL'),
             (lambda t, m: m[''][1]['_init_kwargs'].update(use_sel=False), 'use_sel False')]
    for edit, needle in cases:
        def flatten(meta, *a, **k):
            tensors, modules = real_flatten(meta, *a, **k)
            if not a and meta['class_name'] == 'Generator':
                edit(tensors, modules)
            return tensors, modules
        monkeypatch.setattr(model, '_flatten', flatten)
        with pytest.raises(ValueError, match=re.escape(needle)) as e:
            model.load_checkpoint(path)
        assert len(str(e.value).splitlines()) == 1


def _eqconv(t, layer, act=False, gain=1.0):
    """The authors' Conv2dLayer, written out: conv with weight / sqrt(fan-in), bias, lrelu 0.2 x sqrt 2, x gain."""
    k = layer.weight.shape[-1]
    y = F.conv2d(t, layer.weight / math.sqrt(layer.weight[0].numel()), layer.bias, padding=k // 2)
    return (F.leaky_relu(y, 0.2) * math.sqrt(2) if act else y) * gain


def _their_sel(sel, x, h):
    """Their SEL.forward step by step: resize, InstanceNorm2d, shared conv, sigma / mu, x + 0.1 conv(lrelu(.))."""
    hm = F.interpolate(h, size=x.shape[2:], mode='bilinear', align_corners=True)
    feat = _eqconv(hm, sel.shared[0], act=True)
    dx = F.instance_norm(x, eps=1e-5) * (1 + _eqconv(feat, sel.sigma)) + _eqconv(feat, sel.mu)
    return x + _eqconv(F.leaky_relu(dx, 0.2), sel.output[1]) * 0.1


def eqgan_tiny(**kw):
    torch.manual_seed(0)
    G, D = model.build_networks({**TINY, 'resolution': 32, 'sel': 'norm', 'heatmap': 'official', 'eqgan': 'official', **kw})
    with torch.no_grad():  # off the initial values (zero biases, unit noise strength ...)
        for p in G.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return G, D


def test_official_sel_encoder_and_placement_by_hand():
    """--eqgan official G: each level encoded by two 3x3 convs (the second with gain sqrt(0.5)); a SEL on
    the input of every synthesis layer and toRGB, in forward order; each equals their SEL computed by
    hand on the features of level b{2 res} (b4 <- b8, b8 <- b16, b16 <- b32), from 32 px up on the
    96-channel concatenation."""
    G, _ = eqgan_tiny()
    h = G.sample_heatmaps(2, 'cpu', torch.Generator().manual_seed(0))
    assert {k: tuple(v.shape) for k, v in h.items()} == {'centers': (2, 7, 2), 'widths': (2, 7), 'b8': (2, 1, 32, 32),
                                                        'b16': (2, 2, 32, 32), 'b32': (2, 4, 32, 32)}
    sp = G.spatial
    enc = {k: _eqconv(_eqconv(h[k], getattr(sp, f'hm_conv0_{k}'), act=True), getattr(sp, f'hm_conv1_{k}'), act=True,
                      gain=math.sqrt(0.5)) for k in model.OFFICIAL_KEYS}
    want_feat = {4: enc['b8'], 8: enc['b16'], 16: enc['b32'], 32: torch.cat([enc['b8'], enc['b16'], enc['b32']], 1)}
    got = sp.encode(h)
    assert sorted(got) == [4, 8, 16, 32] and all(torch.allclose(got[r], want_feat[r], atol=1e-5) for r in got)
    seen = []
    for name, m in G.synthesis.named_modules():
        if isinstance(m, model.SELOfficial):
            m.register_forward_hook(lambda mod, args, out, name=name: seen.append((name, mod, *args, out)))
    with torch.no_grad():
        G(torch.randn(2, 32), heatmaps={k: h[k] for k in model.OFFICIAL_KEYS}, noise_mode='const')  # their dict as is
    assert [s[0] for s in seen] == [f'b{r}.{layer}.sel' for r in (4, 8, 16, 32) for layer in ('conv0', 'conv1', 'torgb')
                                    if not (r == 4 and layer == 'conv0')]
    for name, sel, x, hf, out in seen:
        r = int(name.split('.')[0][1:])
        assert hf is got[r] or torch.equal(hf, got[r]), name
        assert torch.allclose(out, _their_sel(sel, x, want_feat[r]), atol=1e-5), name
    assert seen[2][2].shape[-1] == 4 and seen[3][2].shape[-1] == 8  # b8.conv0's SEL sees its 4x4 input


def test_resize_corners_is_bilinear_align_corners():
    """SELOfficial's resize (two matmuls) equals F.interpolate(bilinear, align_corners=True) down, up
    and to one pixel, and hands back the input itself at its own size."""
    h = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for size in (1, 4, 8, 16, 64):
        want = F.interpolate(h, size=(size, size), mode='bilinear', align_corners=True)
        assert torch.allclose(model.resize_corners(h, size), want, atol=1e-12), size
    assert model.resize_corners(h, 32) is h


def test_official_sel_on_the_sn_backbones():
    """The authors' SEL, encoder and sampler on --arch sndcgan / sngan: a SEL on the features of every
    resolution (the rule of the StyleGAN2 blocks), each equal to their SEL by hand; moving the heatmap
    changes every sample."""
    for arch in ('sndcgan', 'sngan'):
        torch.manual_seed(0)
        G, _ = model.build_networks(dict(TINY, arch=arch, resolution=16, z_dim=16, channel_base=64, channel_max=16,
                                         sel='norm', heatmap='official', eqgan='official'))
        G.eval()
        assert sorted(G.sel, key=int) == ['4', '8', '16'] and all(isinstance(m, model.SELOfficial) for m in G.sel.values())
        h = G.sample_heatmaps(3, 'cpu', torch.Generator().manual_seed(1))
        feats, seen = G.spatial.encode(h), []
        for r, m in G.sel.items():
            m.register_forward_hook(lambda mod, args, out, r=int(r): seen.append((r, mod, args[0], out)))
        z = torch.randn(3, 16)
        with torch.no_grad():
            img = G(z, heatmaps=h)
            for r, sel, x, out in seen:
                assert torch.allclose(out, _their_sel(sel, x, feats[r]), atol=1e-5), (arch, r)
            moved = G(z, heatmaps=G.spatial.render(G.spatial.shift(h['centers'], 0.2, 0.1), h['widths']))
        assert ((moved - img).abs().amax((1, 2, 3)) > 1e-4).all()


def test_sn_added_layers_learn_at_the_backbones_pace(tmp_path, capsys):
    """--added-layers plain (the SN backbones' default with --sel / --g-attn / --d-attn) stores every added
    equalized weight at its effective scale, gain 1: the same networks at init as 'equalized', but Adam's
    first step (lr x sign(grad) per parameter) then moves their effective weights by lr, where equalized
    ones move by lr x gain (1/sqrt(fan-in)). A checkpoint without the key builds as 'equalized' and resumes
    only as that; the flag where it does nothing gets one line."""
    kw = dict(SMALL, arch='sndcgan', sel='norm', heatmap='official', eqgan='official', g_attn='san', g_attn_res=8,
              d_attn='self', d_attn_res=8)
    z, nets = torch.randn(3, 16), {}
    for kind in model.ADDED_LAYERS:
        torch.manual_seed(0)
        nets[kind] = model.build_networks(dict(kw, added_layers=kind))
    h = nets['plain'][0].sample_heatmaps(3, 'cpu', torch.Generator().manual_seed(1))
    with torch.no_grad():
        (Gp, Dp), (Ge, De) = nets['plain'], nets['equalized']
        assert torch.equal(Gp.eval()(z, heatmaps=h), Ge.eval()(z, heatmaps=h))
        assert torch.equal(Dp(Gp(z, heatmaps=h)), De(Ge(z, heatmaps=h)))
    layers = lambda G, D: [(G.sel['16'].shared[0], 'weight_gain'), (G.spatial.hm_conv1_b8, 'weight_gain'),
                           (G.attn.key, 'scale'), (D.attn.key, 'scale')]  # SAN's
    moved = {}
    for kind, (G, D) in nets.items():
        before = [(m.weight * getattr(m, g)).detach().clone() for m, g in layers(G, D)]
        opt = torch.optim.Adam([*G.parameters(), *D.parameters()], lr=1e-3, eps=1e-20)  # a step of lr x sign(grad)
        D(G.train()(z, heatmaps=h)).square().mean().backward()
        opt.step()
        moved[kind] = [((m.weight * getattr(m, g)).detach() - b).abs().amax() for (m, g), b in zip(layers(G, D), before)]
    for (m, g), p, e in zip(layers(*nets['equalized']), moved['plain'], moved['equalized']):
        assert abs(p - 1e-3) < 1e-6 and abs(e - 1e-3 * getattr(m, g)) < 1e-6 and getattr(m, g) < 1, (type(m), p, e)
    assert all(getattr(m, g) == 1.0 for m, g in layers(*nets['plain']))
    G_old, _ = model.build_networks({k: v for k, v in kw.items()})  # no 'added_layers': an older checkpoint
    assert G_old.sel['16'].shared[0].weight_gain < 1
    assert train.parse_args(['--cfg', 'quick', '--sel', 'norm']).added_layers == 'plain'
    assert train.parse_args(['--cfg', 'quick']).added_layers == train.parse_args(['--cfg', 'cpu']).added_layers == 'equalized'
    out = run_sn(tmp_path, 'sndcgan', '--kimg', '0.008', '--sel', 'norm', '--added-layers', 'equalized')
    expect_error(capsys, ['--cfg', 'sndcgan-cpu'] + SN_FLAGS + ['--out', out, '--kimg', '0.016', '--sel', 'norm'],
                 'another architecture: --added-layers equalized (this run: plain)')
    expect_error(capsys, ['--cfg', 'sndcgan-cpu'] + SN_FLAGS + ['--out', out, '--added-layers', 'plain'],
                 '--added-layers does nothing without --sel, --g-attn or --d-attn')
    expect_error(capsys, TINY_FLAGS + ['--out', str(tmp_path / 'sg'), '--added-layers', 'plain'],
                 '--added-layers does nothing with --arch stylegan2')


def test_official_heatmap_sampler_by_hand():
    """Their generate_heatmap_multi written out from the same draws (level-0 centre N(0, 0.33) clamped to
    +-0.75 in [-1, 1], sigma (U + 1) / 2 for the batch; offsets U(-0.4, 0.4) and U(-0.8, 0.8), sigmas
    (U + 0.1) / 1.4 and / 2 per centre; exp(-d^2 / sigma) + 0.01, coordinates (y, x) on a grid with the
    pixel centres at -1 and 1): ours gives the same maps, its centres in [0, 1] as (x, y); the paper's
    format renders the same centres and widths, summed per level."""
    B, R = 5, 16
    sp = model.SpatialEncoding('norm', 'official', R, model.channels_per_res(256, 32, R), eqgan='official')
    ours = sp.sample(B, 'cpu', torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # the draws in the order sample_official documents
    c0, s0 = torch.randn(B, 1, 2, generator=g), torch.rand(1, generator=g)
    d2, u2, d3, u3 = (torch.rand(B, 2, 2, generator=g), torch.rand(B, 2, generator=g), torch.rand(B, 4, 2, generator=g),
                      torch.rand(B, 4, generator=g))
    centers = (c0[:, 0] * 0.33).clamp(-0.75, 0.75).flip(1)  # theirs [B, 2]: (y, x)
    sigma = ((s0 + 1.0) * 0.5).item()
    l2_delta, l3_delta = ((d2 - 0.5) * 0.8).flip(2).transpose(1, 2), ((d3 - 0.5) * 1.6).flip(2).transpose(1, 2)  # [B, 2, n]
    sigma2, sigma3 = ((u2 + 0.1) / 1.4).view(B, 1, 1, 2), ((u3 + 0.1) / 2).view(B, 1, 1, 4)
    coord = 2 * torch.arange(R, dtype=torch.float32) / (R - 1) - 1
    yy, xx = coord.view(R, 1).expand(R, R), coord.view(1, R).expand(R, R)
    coords = torch.stack((yy, xx), 0).unsqueeze(0)  # [1, 2, R, R]
    want = {'b8': (torch.exp(-(coords - centers.view(B, 2, 1, 1)).square().sum(1) / sigma) + 0.01).unsqueeze(1)}
    for key, delta, s in (('b16', l2_delta, sigma2), ('b32', l3_delta, sigma3)):
        c = delta + centers.unsqueeze(-1)  # [B, 2, n]
        d = (coords.unsqueeze(-1) - c.view(B, 2, 1, 1, -1)).square().sum(1)  # [B, R, R, n]
        want[key] = (torch.exp(-d / s) + 0.01).permute(0, 3, 1, 2)
    for k in want:
        assert ours[k].shape == want[k].shape and torch.allclose(ours[k], want[k], atol=2e-6), k
    assert torch.allclose(ours['centers'][:, 0], (centers.flip(1) + 1) / 2)
    assert torch.allclose(ours['centers'][:, 1:3], (centers.flip(1).unsqueeze(1) + l2_delta.transpose(1, 2).flip(2) + 1) / 2)
    big = sp.sample(20000, 'cpu', torch.Generator().manual_seed(0))['centers']  # the clamp, the offsets' ranges
    assert big[:, 0].min() >= 0.125 - 1e-6 and big[:, 0].max() <= 0.875 + 1e-6
    assert abs(big[:, 0].std().item() - 0.1625) < 0.005  # 0.33 / 2, a little less for the clamp
    off = big[:, 1:] - big[:, :1]
    assert off[:, :2].abs().max() <= 0.2 + 1e-6 and off[:, 2:].abs().max() <= 0.4 + 1e-6 and off[:, 2:].abs().max() > 0.39
    paper = model.SpatialEncoding('norm', 'official', R, model.channels_per_res(256, 32, R), eqgan='paper')
    h = paper.sample(B, 'cpu', torch.Generator().manual_seed(7))
    assert torch.equal(h['centers'], ours['centers']) and set(h) == {'centers', 'widths', 'h4', 'h8', 'h16'}
    cx, s = ours['centers'][:, 0], ours['widths'][:, 0]  # level 0 at its own 4 x 4 pixel centres, std s
    grid = (torch.arange(4) + 0.5) / 4
    d = (grid.view(1, 4, 1) - cx[:, 1].view(B, 1, 1)).square() + (grid.view(1, 1, 4) - cx[:, 0].view(B, 1, 1)).square()
    assert torch.allclose(h['h4'][:, 0], torch.exp(-d / (2 * s.view(B, 1, 1) ** 2)), atol=1e-6)


def test_official_align_loss_by_hand():
    """Their alignment loss written out for a 'D' linear in its maps (logit_i = sum W A_i, so the
    gradient of sum softplus(-logit) is -sigmoid(-logit_i) W): weights its spatial mean, CAM = sum_c
    relu(w_c A_c), upsampled to R (align_corners), min-max with no epsilon; heatmap level 0 raw, finer
    levels channel mean then min-max; mean of |err| over err > tau if more than one, else over all;
    summed over levels. G's gradient flows through A only (the weights are constants)."""
    torch.manual_seed(0)
    B, R, C = 3, 16, 4
    sp = model.SpatialEncoding('norm', 'official', R, model.channels_per_res(256, 32, R), eqgan='official')
    heat = sp.sample(B, 'cpu', torch.Generator().manual_seed(2))
    W = {r: torch.randn(C, r, r) for r in (4, 8)}
    A = {r: torch.randn(B, C, r, r, requires_grad=True) for r in (4, 8)}
    logits = sum((A[r] * W[r]).sum((1, 2, 3)) for r in A)
    for tau in (0.25, 0.0, 5.0):  # 5: fewer than two above tau, the mean of all
        got = losses.align_loss_official(logits, A, heat, tau)
        want = 0
        for r, key in ((4, 'b8'), (8, 'b16')):
            w = (-torch.sigmoid(-logits.detach())).view(B, 1, 1, 1) * W[r].mean((1, 2)).view(1, C, 1, 1)
            acts = F.interpolate(F.relu(w * A[r]).sum(1, keepdim=True), (R, R), mode='bilinear', align_corners=True)
            acts = acts - acts.amin((2, 3), keepdim=True).detach()
            acts = acts / acts.amax((2, 3), keepdim=True).detach()
            hm = heat[key]
            if hm.shape[1] > 1:
                hm = hm.mean(1, keepdim=True)
                hm = hm - hm.amin((2, 3), keepdim=True)
                hm = hm / hm.amax((2, 3), keepdim=True)
            err = (acts - hm).abs().flatten()
            want = want + (err[err > tau].mean() if (err > tau).sum() > 1 else err.mean())
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
        ga, gw = torch.autograd.grad(got, [A[4], A[8]], retain_graph=True), torch.autograd.grad(want, [A[4], A[8]])
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ga, gw))
    assert heat['b8'].min() > 0.01 - 1e-6 and heat['b8'].max() > 1  # level 0 un-normalised: its floor 0.01 stays
    zero = {4: torch.zeros(B, C, 4, 4, requires_grad=True)}  # a constant CAM: 0 (their nan_to_num), finite gradient
    loss = losses.align_loss_official((zero[4] * W[4]).sum((1, 2, 3)), zero, heat)
    assert loss.isfinite() and torch.autograd.grad(loss, zero[4])[0].isfinite().all()


def test_eqgan_flags_defaults_and_older_checkpoints(tmp_path, capsys):
    """--sel norm trains the authors' networks, sampler and loss unless --eqgan paper; concat / flatten keep
    the paper's reading; a checkpoint written before --eqgan existed (no such key) loads as what it was;
    flags that do nothing in a mode get one line."""
    for argv, want in [(['--sel', 'norm'], ('official', 'official')), (['--sel', 'concat'], ('paper', 'hier')),
                       (['--sel', 'norm', '--eqgan', 'paper'], ('paper', 'hier')),
                       (['--sel', 'norm', '--heatmap', 'hier'], ('official', 'hier')),
                       (['--cfg', 'eqgan256', '--sel', 'norm'], ('official', 'official')), ([], ('paper', 'hier'))]:
        a = train.parse_args(argv)
        assert (a.eqgan, a.heatmap) == want, argv
    G, _ = model.build_networks({**TINY, 'sel': 'norm'})  # the args of an older checkpoint: no 'eqgan'
    assert isinstance(G.synthesis.b4.sel[0], model.SELNorm) and not any(isinstance(m, model.SELOfficial) for m in G.modules())
    ck = dict(args={**TINY, 'sel': 'norm', 'arch': 'stylegan2'}, step=0, nimg=0, G=G.state_dict(), G_ema=G.state_dict(),
              D=model.build_networks({**TINY, 'sel': 'norm'})[1].state_dict())
    torch.save(ck, tmp_path / 'old.pt')
    assert isinstance(model.load_checkpoint(str(tmp_path / 'old.pt'))['G_ema'].synthesis.b8.sel[1], model.SELNorm)
    for extra, needle in [(['--eqgan', 'official'], '--eqgan does nothing without --sel'),
                          (['--sel', 'concat', '--eqgan', 'official'], "has SEL_norm only"),
                          (['--sel', 'norm', '--align-truncation', 'official'], '--align-truncation does nothing without the alignment loss of --eqgan paper'),
                          (['--sel', 'norm', '--sel-placement', 'official'], '--sel-placement does nothing without --eqgan paper')]:
        expect_error(capsys, TINY_FLAGS + ['--out', str(tmp_path / 'x'), *extra], needle)


def test_eqgan_snapshot_through_the_command_lines(tmp_path, capsys):
    """model.py samples and edits (--move) from the authors' snapshot and converts it; train.py --init
    takes every tensor of it (nothing new, nothing unused) and trains a step with their alignment loss."""
    path, ref = eqgan_fixture()
    model.main([path, '--seeds', '0-1', '--move', '0.3,0', '--steps', '2', '--out', str(tmp_path / 'e.png')])
    assert Image.open(tmp_path / 'e.png').size == (2 * 32, 2 * 32)
    model.main([path, '--convert', str(tmp_path / 'conv.pt')])
    assert max(eqgan_outputs(model.load_checkpoint(str(tmp_path / 'conv.pt')), ref).values()) < 1e-4
    out = str(tmp_path / 'ft')
    train.main(INIT_FLAGS + ['--init', path, '--sel', 'norm', '--out', out])
    printed = capsys.readouterr().out
    assert printed.count('init from') == 3 and 'new' not in printed and 'not used' not in printed and 'G/align' in printed
    ck = load(f'{out}/ckpt-0000001.pt')
    assert (ck['args']['eqgan'], ck['args']['heatmap'], ck['args']['z_dim']) == ('official', 'official', 64)


# ---- class-conditional training and labels

def test_conditional_training_grids_resume_and_labels(tmp_path):
    """--cond on the built-in set: 4 classes (1-4 objects), D's projection and G's embedding get
    gradients, the grid has one row of 8 per class, and a resume continues the same run."""
    out = run_train(tmp_path, '--cond', '--kimg', '0.016', '--snap-kimg', '0.008', '--keep', '5')
    ck = load(f'{out}/ckpt-0000002.pt')
    assert ck['args']['c_dim'] == 4 and 'mapping.embed.weight' in ck['D'] and ck['G']['mapping.embed.weight'].shape == (32, 4)
    first = load(f'{out}/ckpt-0000001.pt')
    assert not torch.equal(first['D']['mapping.embed.weight'], ck['D']['mapping.embed.weight'])
    assert Image.open(f'{out}/fakes-0000002.png').size == (8 * 16, 4 * 16)
    resumed = run_train(tmp_path, '--cond', '--kimg', '0.008', '--snap-kimg', '0.008', name='r')
    train.main(TINY_FLAGS + ['--out', resumed, '--cond', '--kimg', '0.016', '--snap-kimg', '0.008'])
    assert_same_state(load(f'{resumed}/ckpt-0000002.pt'), ck)
    ds = data.make_dataset(None, 16, 64)
    assert ds.num_classes == 4 and all(ds.labels[i] == len(ds.scene(i)['objects']) - 1 for i in range(64))


def test_training_draws_generated_labels_from_the_real_ones(tmp_path, monkeypatch):
    """The labels G gets are those of random real images (the official protocol): with a set whose
    labels are all class 2 (of 3), every generated label is 2, and D sees the real images' labels."""
    seen = []
    real_forward = model.Discriminator.forward
    monkeypatch.setattr(model.Discriminator, 'forward', lambda self, img, *a, c=None, **k: (
        seen.append(c.argmax(1).tolist()), real_forward(self, img, *a, c=c, **k))[1])
    root = tmp_path / 'd'
    for i in range(8):
        (root / 'c').mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), 30 * i, np.uint8)).save(root / 'c' / f'{i}.png')
    (root / 'dataset.json').write_text(json.dumps({'labels': [[f'c/{i}.png', 2] for i in range(8)]}))
    run_train(tmp_path, '--cond', '--data', str(root), '--kimg', '0.008', '--max-images', '8')
    assert seen and all(lab == [2] * 8 for lab in seen)


def test_labels_from_dataset_json_and_subfolders_and_their_errors(tmp_path):
    img = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    root = tmp_path / 'folders'
    for cls, n in [('cat', 2), ('dog', 3)]:
        (root / cls).mkdir(parents=True)
        for i in range(n):
            img.save(root / cls / f'{i}.png')
    ds = data.make_dataset(str(root), 8, labels=True)
    assert ds.labels.tolist() == [0, 0, 1, 1, 1] and ds.num_classes == 2
    img.save(root / 'loose.png')
    with pytest.raises(data.DataError, match='outside class subfolders'):
        data.make_dataset(str(root), 8, labels=True)
    assert data.make_dataset(str(root), 8).labels is None  # unconditional: no labels read
    names = ['cat/0.png', 'cat/1.png', 'dog/0.png', 'dog/1.png', 'dog/2.png', 'loose.png']
    for labels, needle in [([[n, 1] for n in names[:-1]], 'no label for 1 image(s): loose.png'),
                           ([[n, 1.5] for n in names], 'not class numbers'), ([[n, True] for n in names], 'not class numbers'),
                           ([[n, -1] for n in names], 'not class numbers'), (None, 'an unlabelled set'),
                           ('oops', 'is not {"labels"')]:
        (root / 'dataset.json').write_text(json.dumps({'labels': labels}))
        with pytest.raises(data.DataError, match=re.escape(needle)):
            data.make_dataset(str(root), 8, labels=True)
    (root / 'dataset.json').write_text(json.dumps({'labels': [[n, i % 3 + 2] for i, n in enumerate(names)]}))
    ds = data.make_dataset(str(root), 8, labels=True)
    assert ds.labels.tolist() == [2, 3, 4, 2, 3, 4] and ds.num_classes == 5  # stylegan2-ada: the largest class + 1
    zpath = tmp_path / 'set.zip'
    with zipfile.ZipFile(zpath, 'w') as z:
        for n in names:
            z.write(root / n, n)
        z.writestr('dataset.json', json.dumps({'labels': [[n, 1] for n in names]}))
    assert data.make_dataset(str(zpath), 8, labels=True).labels.tolist() == [1] * 6


def test_conditional_metrics_draw_labels_of_real_images():
    """evaluate() feeds a conditional G the labels of random real images and D the real images' own
    labels (chunk by chunk, in the loader's order)."""
    class Set(torch.utils.data.Dataset):
        name, resolution, labels, num_classes = 'lab', 16, np.array([0, 1, 2, 1] * 8), 3

        def __len__(self):
            return 32

        def __getitem__(self, i):
            return torch.full((3, 16, 16), 10 * i, dtype=torch.uint8)
    G, D = tiny(c_dim=3)
    seen = {'G': [], 'D': []}
    g_fwd, d_fwd = G.forward, D.forward
    G.forward = lambda z, *a, c=None, **k: seen['G'].append(c) or g_fwd(z, *a, c=c, **k)
    D.forward = lambda img, *a, c=None, **k: seen['D'].append((img, c)) or d_fwd(img, *a, c=c, **k)
    metrics.evaluate(['di'], G.eval(), D, Set(), 'cpu', batch=8, num_gen=16, log=lambda *a: None)
    assert len(seen['G']) == 2 and all(c.shape == (8, 3) and c.sum(1).eq(1).all() for c in seen['G'])
    for img, c in seen['D'][:2]:  # the 2 real chunks first: labels follow the image's index (10 * i)
        idx = (img[:, 0, 0, 0] + 1) * 127.5 / 10
        assert torch.equal(c.argmax(1), torch.as_tensor(Set.labels)[idx.round().long()])
    for (_, c), g in zip(seen['D'][2:], seen['G']):  # D scores each generated image with the label G drew it for
        assert torch.equal(c, g)
    torch.manual_seed(0)  # the draw itself: labels[randint] of the real set
    idx = torch.randint(32, (8,), generator=torch.Generator().manual_seed(metrics._seed(0, 6, 0)))
    assert torch.equal(seen['G'][0].argmax(1), torch.as_tensor(Set.labels)[idx])


def test_sel_official_placement_is_local_to_torgb_and_precedes_conv0(monkeypatch):
    """--sel-placement official (the authors' code): a SEL before conv0 of blocks 8, 16, 32 (on their
    4, 8, 16 px inputs), before conv1 and before toRGB of the level blocks; the toRGB one changes the
    RGB branch only."""
    G, _ = tiny(sel='norm', sel_placement='official', resolution=32)
    syn = G.synthesis
    assert [r for r in (4, 8, 16, 32) if getattr(syn, f'b{r}').sel_in is not None] == [8, 16, 32]
    assert syn.b32.sel is None and syn.b16.sel_in.alpha.shape == (syn.b8.conv1.weight.shape[0],)
    order = []
    for name, m in syn.named_modules():
        if name.count('.') == 1 and name.split('.')[1] in ('sel_in', 'conv0', 'conv1', 'torgb', 'sel'):
            m.register_forward_pre_hook(lambda m, i, name=name: order.append(name))
        if name.endswith(('sel.0', 'sel.1')):
            m.register_forward_pre_hook(lambda m, i, name=name: order.append(name))
    set_alpha(G, 0.5)
    h = G.sample_heatmaps(2, 'cpu', torch.Generator().manual_seed(0))
    ws = G.map(torch.randn(2, 32))
    G.synthesize(ws, noise_mode='const', heatmaps=h)
    assert order[:9] == ['b4.sel.0', 'b4.conv1', 'b4.sel.1', 'b4.torgb', 'b8.sel_in', 'b8.conv0', 'b8.sel.0', 'b8.conv1', 'b8.sel.1']
    hfeats, x4 = G.spatial.encode(h), torch.randn(2, syn.b4.conv1.weight.shape[0], 4, 4)
    with torch.no_grad():
        y_local, img_local = syn.b8(x4, None, ws[:, 1:4], 'const', False, hfeats)
        syn.b8.local_rgb = False  # the 'paper' placement: the features passed on carry the toRGB SEL too
        y_passed, img_passed = syn.b8(x4, None, ws[:, 1:4], 'const', False, hfeats)
    assert torch.equal(img_local, img_passed) and not torch.allclose(y_local, y_passed)
    assert torch.allclose(syn.b8.sel[1](y_local, hfeats[8]), y_passed)


def test_eqgan256_preset_is_the_authors_recipe():
    args = train.parse_args(['--cfg', 'eqgan256'])
    paper = train.parse_args(['--cfg', 'paper256'])
    assert (args.pl_weight, args.style_mix) == (0, 0) and (paper.pl_weight, paper.style_mix) == (2, 0.9)
    assert {k: getattr(args, k) for k in ('batch', 'lr', 'gamma', 'ema_kimg', 'mbstd_group', 'channel_base')} == \
        {k: getattr(paper, k) for k in ('batch', 'lr', 'gamma', 'ema_kimg', 'mbstd_group', 'channel_base')}


# ==============================================================================================
# SN-DCGAN and SNGAN backbones (Miyato et al. 2018)

SMALL = dict(TINY, z_dim=16, channel_base=64, channel_max=16)


def small(arch, **kw):
    torch.manual_seed(0)
    return model.build_networks({**SMALL, 'arch': arch, **kw})


def test_spectral_norm_power_iteration_finds_the_largest_singular_value():
    """Algorithm 1: repeated training forwards converge u, v to the top singular pair: sigma ->
    svdvals(W)[0] and the normalised weight's spectral norm -> 1; an eval forward does not iterate.
    The gradient includes sigma's dependence on W (u, v held constant), checked against autograd of
    W / (u^T W v) written out."""
    torch.manual_seed(0)
    layer = model.SNLayer(6, 5, k=3, padding=1)
    w = layer.weight.detach().flatten(1)
    x = torch.randn(2, 6, 4, 4)
    for _ in range(100):
        layer(x)
    sigma = (layer.u @ w @ layer.v).item()
    assert sigma == pytest.approx(torch.linalg.svdvals(w)[0].item(), rel=1e-4)
    assert torch.linalg.svdvals(w / sigma)[0].item() == pytest.approx(1, rel=1e-4)
    u = layer.u.clone()
    layer.eval()(x)
    assert torch.equal(layer.u, u)
    layer.train()
    wp = layer.weight.detach().clone().requires_grad_(True)
    want = F.conv2d(x, wp / (layer.u @ wp.flatten(1) @ layer.v), layer.bias.detach(), padding=1)
    layer.zero_grad()
    layer.eval()(x).square().sum().backward()
    want.square().sum().backward()
    assert torch.allclose(layer.weight.grad, wp.grad, atol=1e-5)
    lin = model.SNLayer(7, 3)
    for _ in range(100):
        lin(torch.randn(2, 7))
    assert (lin.u @ lin.weight.detach() @ lin.v).item() == pytest.approx(torch.linalg.svdvals(lin.weight.detach())[0].item(), rel=1e-4)


def test_batch_norm_matches_pytorch_and_tracks_running_stats():
    torch.manual_seed(0)
    bn, ref = model.BatchNorm(4), nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.normal_(), bn.bias.normal_()
        ref.weight.copy_(bn.weight), ref.bias.copy_(bn.bias)
    for _ in range(3):
        x = torch.randn(8, 4, 5, 5) * 3 + 1
        assert torch.allclose(bn(x), ref(x), atol=1e-5)
    assert torch.allclose(bn.running_mean, ref.running_mean, atol=1e-6) and torch.allclose(bn.running_var, ref.running_var, atol=1e-5)
    x = torch.randn(8, 4, 5, 5)
    assert torch.allclose(bn.eval()(x), ref.eval()(x), atol=1e-5)
    flat, ref1 = model.BatchNorm(6), nn.BatchNorm1d(6)  # [B, C]: the SN-DCGAN dense output
    x = torch.randn(8, 6)
    assert torch.allclose(flat(x), ref1(x), atol=1e-5)


def test_sn_dcgan_follows_miyato_table_3():
    """G: dense to 4x4 x 512 (BN per feature, ReLU), 4x4 stride-2 deconvolutions to 256, 128, 64 with BN
    and ReLU, a 3x3 conv to RGB and tanh; D: 3x3 / 4x4-stride-2 pairs of 64, 128, 256 channels, a 3x3
    conv of 512, leaky ReLU 0.1, spectral norm everywhere, a linear head (full width at 32 px)."""
    G, D = model.build_networks(dict(SMALL, arch='sndcgan', resolution=32, z_dim=128, channel_base=2048, channel_max=512))
    assert G.fc.weight.shape == (4 * 4 * 512, 128) and G.bn0.weight.shape == (4 * 4 * 512,)
    deconvs = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding) for m in deconvs] == \
        [(512, 256, (4, 4), (2, 2), (1, 1)), (256, 128, (4, 4), (2, 2), (1, 1)), (128, 64, (4, 4), (2, 2), (1, 1))]
    assert G.out[0].weight.shape == (3, 64, 3, 3) and isinstance(G.out[1], nn.Tanh)
    sn = [m for m in D.modules() if isinstance(m, model.SNLayer)]
    assert [(tuple(m.weight.shape), m.stride) for m in sn] == [
        ((64, 3, 3, 3), 1), ((64, 64, 4, 4), 2), ((128, 64, 3, 3), 1), ((128, 128, 4, 4), 2), ((256, 128, 3, 3), 1),
        ((256, 256, 4, 4), 2), ((512, 256, 3, 3), 1), ((1, 4 * 4 * 512), 1)]
    assert {m.negative_slope for m in D.modules() if isinstance(m, nn.LeakyReLU)} == {0.1}
    assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in D.modules())  # every D layer is spectrally normalised
    z = torch.randn(2, 128)
    logits, feat, maps = D(G(z), return_features=True, return_maps=True)
    assert logits.shape == (2,) and feat.shape == (2, 512) and {r: m.shape[1:] for r, m in maps.items()} == {
        32: (64, 32, 32), 16: (128, 16, 16), 8: (256, 8, 8), 4: (512, 4, 4)}


def test_sngan_follows_miyato_table_4_and_its_blocks_by_hand():
    """G: dense to 4x4 x 256, three up-sampling ResBlocks of 256, BN, ReLU, 3x3 conv, tanh; D: an
    optimized block and a down-sampling block to 8x8, two blocks at 8x8, ReLU, global sum pooling, a
    linear head (128 channels). The blocks against their definitions written out."""
    G, D = model.build_networks(dict(SMALL, arch='sngan', resolution=32, z_dim=128, channel_base=8192, channel_max=256))
    assert G.fc.weight.shape == (4 * 4 * 256, 128) and len(G.stages) == 3 and G.bn0 is None
    assert all(s.conv0.weight.shape == (256, 256, 3, 3) for s in G.stages.values())
    assert [len(s) for s in D.stages.values()] == [1, 3] and list(D.stages) == ['16', '8'] and D.head.weight.shape == (1, 128)
    torch.manual_seed(0)
    blk = model._GBlock(4, 6)
    x = torch.randn(2, 4, 3, 3)
    up = lambda t: t.repeat_interleave(2, 2).repeat_interleave(2, 3)
    h = blk.conv1(F.relu(blk.bn1(blk.conv0(up(F.relu(blk.bn0(x)))))))
    assert torch.allclose(blk(x), h + blk.skip(up(x)), atol=1e-6)
    first, down, same = model._DBlock(3, 4, first=True), model._DBlock(4, 5), model._DBlock(5, 5, down=False)
    x = torch.randn(2, 3, 8, 8)
    pool = lambda t: (t[:, :, ::2, ::2] + t[:, :, 1::2, ::2] + t[:, :, ::2, 1::2] + t[:, :, 1::2, 1::2]) / 4
    for m in (first, down, same):
        m.eval()  # fixed u, v: the same normalised weights in both computations
    y = first(x)
    assert torch.allclose(y, pool(first.conv1(F.relu(first.conv0(x)))) + first.skip(pool(x)), atol=1e-6)
    y2 = down(y)
    assert torch.allclose(y2, pool(down.conv1(F.relu(down.conv0(F.relu(y))))) + pool(down.skip(y)), atol=1e-6)
    assert same.skip is None and torch.allclose(same(y2), same.conv1(F.relu(same.conv0(F.relu(y2)))) + y2, atol=1e-6)
    logits, feat = D(torch.randn(2, 3, 32, 32), return_features=True)
    assert torch.allclose(logits, D.head.eval()(feat).squeeze(1), atol=1e-5)


@pytest.mark.parametrize('arch', ['sndcgan', 'sngan'])
@pytest.mark.parametrize('loss', losses.LOSSES)
def test_backbones_train_with_every_loss(tmp_path, arch, loss):
    out = run_sn(tmp_path, arch, '--kimg', '0.024', '--loss', loss, *(['--warmup-kimg', '0.008'] if loss == 'contrastive' else []))
    ck = load(f'{out}/ckpt-0000003.pt')
    assert ck['args']['arch'] == arch and all(torch.isfinite(v).all() for v in ck['G'].values())
    torch.manual_seed(0)  # the run's initial G (--seed 0): its weights moved
    G0 = model.build_networks({**SMALL, 'arch': arch, 'resolution': 16})[0]
    assert all(not torch.allclose(ck['G'][k], v, atol=1e-6) for k, v in G0.named_parameters())


@pytest.mark.parametrize('arch', model.ARCHS)
@pytest.mark.parametrize('loss', losses.LOSSES)
def test_every_backbone_and_loss_trains_under_bf16_autocast(tmp_path, arch, loss):
    """--amp bf16 with every loss on every backbone (the WGAN penalty once met fp32 reals and bf16
    fakes): one step, its losses and the weights finite and fp32. (The regularisers run in fp32, outside autocast.)"""
    extra = ['--kimg', '0.008', '--amp', 'bf16', '--loss', loss, *(['--warmup-kimg', '0'] if loss == 'contrastive' else [])]
    out = run_train(tmp_path, *extra) if arch == 'stylegan2' else run_sn(tmp_path, arch, *extra)
    log = [json.loads(line) for line in open(f'{out}/log.jsonl')]
    assert log[-1]['step'] == 1 and all(math.isfinite(v) for line in log for v in line.values())
    assert ('D/gp' in log[-1]) == (loss == 'wgan')
    ck = load(f'{out}/ckpt-0000001.pt')
    assert all(v.dtype != torch.bfloat16 and torch.isfinite(v).all() for k in ('G', 'D') for v in ck[k].values())


@pytest.mark.parametrize('arch', ['sndcgan', 'sngan'])
@pytest.mark.parametrize('extra', [['--sel', 'norm'], ['--sel', 'norm', '--eqgan', 'paper', '--cam-weights', 'detached'],
                                   ['--sel', 'concat'], ['--sel', 'flatten'], ['--g-attn', 'san', '--g-attn-res', '8', '--d-attn', 'self']])
def test_backbones_with_eqgan_sa_and_attention(tmp_path, monkeypatch, arch, extra):
    """SEL (the authors' or the paper's; + GradCAM alignment on D's 4, 8, 16 maps, or those of them D has)
    and self-attention train; the alignment loss reaches G."""
    seen = []
    for name in ('align_loss', 'align_loss_official'):
        monkeypatch.setattr(losses, name, lambda logits, maps, *a, real=getattr(losses, name), **k: (
            seen.append(sorted(maps)) or real(logits, maps, *a, **k)))
    out = run_sn(tmp_path, arch, '--kimg', '0.016', '--n-dis', '1', *extra)
    log = [json.loads(line) for line in open(f'{out}/log.jsonl')]
    if extra[:2] in (['--sel', 'norm'], ['--sel', 'concat']):
        assert seen and all('G/align' in line for line in log)
        assert seen[0] == ([4, 8, 16] if arch == 'sndcgan' else [8])  # SNGAN's D at 16 px: its 8x8 block only
    G = model.load_checkpoint(glob.glob(f'{out}/ckpt-*.pt')[-1])['G']
    assert G.uses_heatmaps == (extra[0] == '--sel') and all(torch.isfinite(p).all() for p in G.parameters())


@pytest.mark.parametrize('arch', ['sndcgan', 'sngan'])
def test_backbones_resume_exactly(tmp_path, arch):
    """Spectral norm's u, v and batch norm's running stats are in the checkpoint: a resumed run equals
    the uninterrupted one (with R1, which makes D's optimiser lazy, and 2 D steps per G step)."""
    common = ['--snap-kimg', '0.016', '--gamma', '1', '--r1-interval', '2', '--n-dis', '2', '--sel', 'norm']
    a = run_sn(tmp_path, arch, '--kimg', '0.032', *common, name='a')
    b = run_sn(tmp_path, arch, '--kimg', '0.016', *common, name='b')
    run_sn(tmp_path, arch, '--kimg', '0.032', *common, name='b')
    ca, cb = load(f'{a}/ckpt-0000004.pt'), load(f'{b}/ckpt-0000004.pt')
    assert_same_state(ca, cb)
    assert any(k.endswith('.u') for k in ca['D']) and any(k.endswith('running_var') for k in ca['G'])


@pytest.mark.parametrize('arch', ['sndcgan', 'sngan'])
def test_backbones_ddp_two_processes_match_one(tmp_path, arch):
    """2 gloo processes == 1: batch norm's statistics span the global batch (an all_reduce with its
    gradient), spectral norm iterates the same weights on every rank."""
    common = ['--cfg', f'{arch}-cpu'] + SN_FLAGS + ['--kimg', '0.024', '--snap-kimg', '1', '--n-dis', '2', '--loss', 'contrastive',
                                                    '--warmup-kimg', '0.008', '--sel', 'norm']
    torchrun(common + ['--out', str(tmp_path / 'ddp')], 2, tmp_path)
    train.main(common + ['--out', str(tmp_path / 'one')])
    a, b = load(glob.glob(f'{tmp_path}/ddp/ckpt-*.pt')[0]), load(glob.glob(f'{tmp_path}/one/ckpt-*.pt')[0])
    # the authors' SEL ends in a conv bias that batch norm downstream cancels: its gradient is 0 up to rounding,
    # which Adam turns into steps of +-lr (2e-4) either way; every other tensor must agree
    assert_same_state(a, b, atol=1e-4, skip=[f'sel.{r}.output.1.bias' for r in (4, 8, 16)])


def test_backbone_flags_that_cannot_apply_stop_with_one_line(tmp_path, capsys):
    out = str(tmp_path / 'x')
    base = ['--cfg', 'sndcgan-cpu'] + SN_FLAGS + ['--out', out]
    for extra, needle in [(['--style-mix', '0.5'], '--style-mix applies to --arch stylegan2 only'),
                          (['--map-layers', '4'], '--map-layers applies'), (['--pl-weight', '2'], '--pl-weight applies'),
                          (['--mbstd-group', '2'], '--mbstd-group applies'), (['--w-dim', '8'], '--w-dim applies'),
                          (['--cond'], '--cond applies'), (['--mbstd-layout', 'strided'], '--mbstd-layout applies'),
                          (['--pl-interval', '2'], '--pl-interval applies'),
                          (['--sel', 'norm', '--sel-placement', 'official'], '--sel-placement applies'),
                          (['--d-attn', 'ref'], '--d-attn ref needs --arch stylegan2'),
                          (['--d-attn', 'self', '--d-attn-res', '2'], 'is not a D resolution'),
                          (['--metrics', 'ppl2_wend'], 'measures paths in W'),
                          (['--r1-interval', '4'], '--r1-interval does nothing without a positive --gamma'),
                          (['--n-dis', '0'], '--n-dis 0 must be at least 1'),
                          (['--beta1', '1'], 'must lie in [0, 1)')]:
        expect_error(capsys, base + extra, needle)
    expect_error(capsys, ['--arch', 'sngan', '--cfg', 'cpu', '--out', out], '--cfg cpu is a stylegan2 preset', 'sngan-cpu')
    assert train.parse_args(['--arch', 'sngan']).cfg == 'sngan' and train.parse_args([]).cfg == 'e'
    args = train.parse_args(['--cfg', 'sngan'])  # the SN paper's ResNet setting; the -cpu preset takes 1 D step per G step
    assert (args.n_dis, args.beta1, args.beta2, args.lr, args.z_dim, args.batch) == (5, 0.0, 0.9, 2e-4, 128, 64)
    assert train.parse_args(['--cfg', 'sngan-cpu']).n_dis == 1
    quick, base = train.parse_args(['--cfg', 'quick']), train.parse_args(['--cfg', 'sndcgan-cpu'])  # + EMA, lr decay, batch
    assert (quick.arch, quick.ema_kimg, base.ema_kimg, quick.lr_decay_kimg, base.lr_decay_kimg) == ('sndcgan', 5, 0, 50, 0)
    assert (quick.batch, base.batch) == (32, 64)
    own = ('cfg', 'batch', 'ema_kimg', 'ema_rampup', 'lr_decay_kimg', 'kimg', 'metrics_kimg')
    assert {k: v for k, v in vars(quick).items() if k not in own} == {k: v for k, v in vars(base).items() if k not in own}
    args = train.parse_args(['--cfg', 'sndcgan'])
    assert (args.n_dis, args.beta1, args.beta2, args.channel_base, args.channel_max) == (1, 0.5, 0.999, 2048, 512)


def test_backbone_checkpoints_through_model_and_metrics_command_lines(tmp_path, capsys, monkeypatch):
    out = run_sn(tmp_path, 'sndcgan', '--kimg', '0.008')
    ck = glob.glob(f'{out}/ckpt-*.pt')[0]
    model.main([ck, '--seeds', '0-3', '--out', str(tmp_path / 's.png')])
    assert Image.open(tmp_path / 's.png').size == (4 * 16, 16)
    with pytest.raises(SystemExit, match='--trunc needs a mapping network'):
        model.main([ck, '--trunc', '0.7', '--out', str(tmp_path / 't.png')])
    monkeypatch.setattr(sys, 'argv', ['metrics.py', ck, '--metrics', 'swd,di', '--num-gen', '64', '--batch', '32'])
    metrics.main()
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(res) == {'swd', 'di'} and math.isfinite(res['di'])


def test_logged_diagnostics_equal_their_definitions(tmp_path, monkeypatch):
    """One D step and one G step logged: D/acc = share of (real, fake) pairs with the real logit above,
    D/std = std of all logits, D/grad and G/grad = norms of the gradients the optimisers stepped with."""
    logits, norms = [], {}
    real_d_loss, real_phase_step = losses.d_loss, train.phase_step
    monkeypatch.setattr(losses, 'd_loss', lambda kind, r, f: logits.append((r.detach(), f.detach())) or real_d_loss(kind, r, f))

    def phase_step(net, opt, scaler, loss, world):
        out = real_phase_step(net, opt, scaler, loss, world)
        grads = [p.grad.flatten() for p in net.parameters() if p.requires_grad and p.grad is not None]
        norms.setdefault(type(net).__name__, []).append(torch.cat(grads).norm().item())
        return out
    monkeypatch.setattr(train, 'phase_step', phase_step)
    out = run_train(tmp_path, '--kimg', '0.008', '--gamma', '0', '--pl-weight', '0')  # 1 step: Gmain, Dmain only
    line = [r for r in map(json.loads, open(f'{out}/log.jsonl')) if 'D/acc' in r][-1]
    (r, f), = logits
    want = dict(acc=sum(float(a > b) for a in r.tolist() for b in f.tolist()) / (len(r) * len(f)),
                std=np.std(r.tolist() + f.tolist(), ddof=1))  # the log keeps 4 significant digits
    assert line['D/acc'] == pytest.approx(want['acc'], rel=1e-3) and line['D/std'] == pytest.approx(want['std'], rel=1e-3)
    assert line['G/grad'] == pytest.approx(norms['Generator'][0], rel=1e-3)
    assert line['D/grad'] == pytest.approx(norms['Discriminator'][0], rel=1e-3)


def test_evaluation_in_the_loop_leaves_spectral_norm_and_training_unchanged(tmp_path):
    """A mid-run metric evaluation runs D in eval mode: no extra power iterations of spectral norm's u, v
    (they would change every later step), and D is back in training mode after it: the run equals one
    without metrics."""
    flags = ['--kimg', '0.032', '--snap-kimg', '0.032']
    plain = load(f'{run_sn(tmp_path, "sndcgan", *flags, name="plain")}/ckpt-0000004.pt')
    measured = run_sn(tmp_path, 'sndcgan', *flags, '--metrics', 'di,fddf', '--num-gen', '64', '--metrics-kimg', '0.016',
                      name='measured')
    assert [r['kimg'] for r in map(json.loads, open(f'{measured}/log.jsonl')) if 'metrics' in r] == [0.016, 0.032]
    ck = load(f'{measured}/ckpt-0000004.pt')
    for net in ('G', 'D'):
        for k, v in plain[net].items():
            assert torch.equal(v, ck[net][k]), (net, k)


# ==============================================================================================
# model.py's tools for a trained G: projection, latent walks, figures, image folders; train.py --tensorboard

def tiny_ckpt(tmp_path, name='tiny.pt', **kw):
    G, D = tiny(**kw)
    path = str(tmp_path / name)
    torch.save(dict(G=G.state_dict(), D=D.state_dict(), G_ema=G.state_dict(), args={**TINY, **kw}, step=0, nimg=0), path)
    return path, model.load_checkpoint(path)['G_ema']


def same_image(a, b):  # uint8 images; conv kernels may round differently for another batch size: 1 level
    return a.shape == b.shape and (a.int() - b.int()).abs().max().item() <= 1


def png(path):
    return torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)  # [3, H, W] uint8


def test_projector_recovers_the_w_of_a_generated_target_and_is_deterministic():
    """A target made by G from a known w: the distance falls by a large factor, the image comes close and
    w moves most of the way from w_avg to the true w; the same seed gives the same result, another seed another."""
    G, _ = tiny()
    G.eval().requires_grad_(False)
    with torch.no_grad():
        w_true = G.map(torch.randn(1, 32, generator=torch.Generator().manual_seed(5)))  # [1, L, C]
        target = G.synthesize(w_true, noise_mode='const')
    ws, noise, history, dists = model.project(G, target, model.pixel_features, steps=100, w_samples=500)
    assert ws.shape == (1, G.num_ws, 32) and history.shape == (100, G.num_ws, 32) and torch.equal(ws[0], history[-1])
    assert len(noise) == len(G.noise_res) and all(n.shape[-1] == r for n, r in zip(noise, G.noise_res))
    assert dists[-1] < dists[0] / 20
    with torch.no_grad():
        start, img = G.synthesize(history[:1], noise=noise), G.synthesize(ws, noise=noise)
    assert (img - target).abs().mean() < (start - target).abs().mean() / 3
    assert (ws - w_true).norm() < 0.75 * (history[0] - w_true).norm()
    assert torch.equal(ws[0, 0], ws[0, -1])  # W: one w for every layer
    run = lambda seed, w_plus=False: model.project(G, target, model.pixel_features, steps=5, seed=seed, w_samples=100,
                                                   w_plus=w_plus)[0]
    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    assert not torch.equal(run(0, True)[0, 0], run(0, True)[0, -1])  # W+: one per layer


def test_projector_pieces_by_hand():
    """The noise regulariser is the sum of squared one-pixel autocorrelations over the pyramid down to
    8x8; the feature distance sums channels and averages positions; pixel features stop at 8x8."""
    n = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    want = 0
    for m in (n, F.avg_pool2d(n, 2)):
        want += (m * torch.cat([m[..., -1:], m[..., :-1]], 3)).mean() ** 2 + (m * torch.cat([m[..., -1:, :], m[..., :-1, :]], 2)).mean() ** 2
    assert model.noise_regularizer([n]).item() == pytest.approx(want.item(), rel=1e-6)
    a, b = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    assert model.feature_distance([a, a], [b, a]).item() == pytest.approx(((a - b) ** 2).sum().item() / 16, rel=1e-6)
    assert [f.shape[-1] for f in model.pixel_features(torch.zeros(1, 3, 32, 32))] == [32, 16, 8]
    z = F.normalize(torch.randn(2, 8), dim=1)
    mid = model.slerp(z[:1], z[1:], torch.tensor([[0.5]]))  # unit vectors: the midpoint of the arc
    assert torch.allclose(mid, F.normalize(z[:1] + z[1:], dim=1), atol=1e-6)


@pytest.mark.parametrize('sel', ['none', 'norm'])
def test_interpolation_endpoints_frame_count_and_gif(tmp_path, sel):
    """Z (slerp) and W (lerp) walks start and end exactly on the sources' own images (truncated, and with
    their heatmaps for EqGAN-SA), with (K - 1) F + 1 frames, K F with --loop; the GIF holds them."""
    path, G = tiny_ckpt(tmp_path, sel=sel)
    z, heat = model.seed_latents(G, [3, 7, 9], 'cpu')
    own = torch.cat(list(model.sample(G, z=z, heatmaps=heat, psi=0.7)))  # [3, 3, 16, 16] the seeds' images
    ws = G.map(z, 0.7, heatmaps=heat)
    for frames in (model.interpolate(G, z=z[:2], heatmaps=heat and {k: v[:2] for k, v in heat.items()}, psi=0.7, frames=4),
                   model.interpolate(G, ws=ws[:2], heatmaps=heat and {k: v[:2] for k, v in heat.items()}, frames=4)):
        assert frames.shape == (5, 3, 16, 16) and same_image(frames[0], own[0]) and same_image(frames[-1], own[1])
        assert not same_image(frames[2], own[0]) and not same_image(frames[2], own[1])
    looped = model.interpolate(G, z=z, heatmaps=heat, psi=0.7, frames=4, loop=True)
    assert looped.shape[0] == 12 and all(same_image(looped[4 * i], own[i]) for i in range(3))
    t = torch.tensor([[0.0], [1.0]])  # the latents at the ends are the sources' own, bit for bit
    assert torch.equal(model.slerp(z[:1].expand(2, -1), z[1:2].expand(2, -1), t), z[:2])
    assert torch.equal(ws[:1].expand(2, -1, -1).lerp(ws[1:2].expand(2, -1, -1), t.view(2, 1, 1)), ws[:2])
    model.main([path, '--seeds', '3,7,9', '--trunc', '0.7', '--interp', '--frames', '4', '--out', str(tmp_path / 'i.gif')])
    gif = Image.open(tmp_path / 'i.gif')
    assert gif.n_frames == 9 and gif.size == (16, 16)
    first = torch.from_numpy(np.array(gif.convert('RGB'))).permute(2, 0, 1).int()
    assert (first - own[0].int()).abs().float().mean() < 8  # a 256-colour palette: close, not exact
    with pytest.raises(ValueError, match='needs imageio-ffmpeg'):
        sys.modules['imageio_ffmpeg'] = None  # as if it were not installed
        try:
            model.write_video(own, str(tmp_path / 'i.mp4'))
        finally:
            del sys.modules['imageio_ffmpeg']
    assert not os.path.exists(tmp_path / 'i.mp4')


def test_style_mixing_grid_and_truncation_sweep_equal_g_by_hand(tmp_path):
    """Cell (r, k) of the style-mixing grid is G with row r's ws and column k's ws at --mix-layers; the
    first row and column are the sources; the truncation sweep's column p is G(z, psi_p)."""
    path, G = tiny_ckpt(tmp_path)
    model.main([path, '--seeds', '0,1', '--style-mix', '5-7', '--mix-layers', '1-2', '--out', str(tmp_path / 'm.png')])
    grid = png(tmp_path / 'm.png').view(3, 3, 16, 4, 16).permute(1, 3, 0, 2, 4)  # [rows, cols, 3, 16, 16]
    rows, cols = G.map(model.seed_latents(G, [0, 1], 'cpu')[0]), G.map(model.seed_latents(G, [5, 6, 7], 'cpu')[0])
    assert torch.equal(grid[0, 0], torch.zeros(3, 16, 16, dtype=torch.uint8))
    for r in range(2):
        assert same_image(grid[r + 1, 0], model.to_uint8(G.synthesize(rows[r:r + 1], noise_mode='const'))[0])
        for k in range(3):
            w = torch.cat([rows[r, :1], cols[k, 1:3], rows[r, 3:]])[None]  # by hand: ws 1 and 2 from the column
            assert same_image(grid[r + 1, k + 1], model.to_uint8(G.synthesize(w, noise_mode='const'))[0]), (r, k)
            assert not same_image(grid[r + 1, k + 1], grid[r + 1, 0]) and not same_image(grid[r + 1, k + 1], grid[0, k + 1])
    assert same_image(grid[0, 1], model.to_uint8(G.synthesize(cols[:1], noise_mode='const'))[0])
    model.main([path, '--seeds', '2,4', '--trunc-sweep', '1,0.5,0', '--out', str(tmp_path / 't.png')])
    sweep = png(tmp_path / 't.png').view(3, 2, 16, 3, 16).permute(1, 3, 0, 2, 4)  # [seeds, psis, 3, 16, 16]
    z = model.seed_latents(G, [2, 4], 'cpu')[0]
    for p, psi in enumerate((1, 0.5, 0)):
        assert same_image(sweep[:, p], model.to_uint8(G(z, psi=psi, noise_mode='const')))
    assert same_image(sweep[0, 2], sweep[1, 2])  # psi 0: both are w_avg's image


def test_outdir_writes_one_png_per_seed_and_heatmap_walk(tmp_path, capsys):
    """--outdir: one PNG per seed, named by it, equal to that seed's grid image, in batches with a progress
    line; --heatmap-walk: a GIF of the seeds side by side, one turn of the heatmap centre."""
    path, _ = tiny_ckpt(tmp_path, sel='norm')
    ck = torch.load(path, weights_only=True)
    G = tiny(sel='norm')[0]
    set_alpha(G, 1.0)  # SEL starts as the identity: give the heatmaps a say
    torch.save({**ck, 'G_ema': G.state_dict()}, path)
    G = model.load_checkpoint(path)['G_ema']
    model.main([path, '--seeds', '3-7,20', '--outdir', str(tmp_path / 'd'), '--batch', '4'])
    assert sorted(os.listdir(tmp_path / 'd')) == [f'seed{s:06d}.png' for s in (3, 4, 5, 6, 7, 20)]
    assert '4/6 images' in capsys.readouterr().out
    z, heat = model.seed_latents(G, [20], 'cpu')
    assert same_image(png(tmp_path / 'd' / 'seed000020.png'), model.to_uint8(G(z, heatmaps=heat, noise_mode='const'))[0])
    z, heat = model.seed_latents(G, [1, 2], 'cpu')
    frames = model.heatmap_walk(G, z, heat, frames=4)
    assert frames.shape == (4, 3, 16, 32) and not same_image(frames[0], frames[2])
    h = G.spatial.render(G.spatial.shift(heat['centers'], 0.5 - heat['centers'][:, 0, 0], 0.8 - heat['centers'][:, 0, 1]))
    assert same_image(frames[1, :, :, 16:], model.to_uint8(G(z, heatmaps=h, noise_mode='const'))[1])  # a quarter turn: below the centre
    model.main([path, '--seeds', '1,2', '--heatmap-walk', '--frames', '4', '--out', str(tmp_path / 'h.gif')])
    assert Image.open(tmp_path / 'h.gif').n_frames == 4 and Image.open(tmp_path / 'h.gif').size == (32, 16)
    G = tiny(sel='norm', heatmap='official', eqgan='official')[0].eval()  # the authors' sampler: a width per blob
    z, heat = model.seed_latents(G, [1, 2], 'cpu')
    frames = model.heatmap_walk(G, z, heat, frames=4)
    h = G.spatial.render(G.spatial.shift(heat['centers'], 0.5 - heat['centers'][:, 0, 0], 0.8 - heat['centers'][:, 0, 1]),
                         heat['widths'])
    assert same_image(frames[1, :, :, 16:], model.to_uint8(G(z, heatmaps=h, noise_mode='const'))[1])


def test_projection_cli_feeds_w_and_refuses_bad_input(tmp_path, capsys):
    """--project writes target | projection and an .npz that --w reads back (a grid, a W walk whose ends
    are the latents' images); bad targets, foreign or pickled latent files, and W tools on an SN
    generator each get one line, and nothing in a file runs."""
    path, G = tiny_ckpt(tmp_path)
    target = model.to_uint8(G(model.seed_latents(G, [4], 'cpu')[0], noise_mode='const'))[0]
    Image.fromarray(target.permute(1, 2, 0).numpy()).save(tmp_path / 't.png')
    for seed, name in ((0, 'p'), (1, 'q')):
        model.main([path, '--project', str(tmp_path / 't.png'), '--project-steps', '30', '--distance', 'pixels',
                    '--seed', str(seed), '--out', str(tmp_path / f'{name}.png'), '--video', str(tmp_path / f'{name}.gif')])
    assert 'distance' in capsys.readouterr().out
    assert torch.equal(png(tmp_path / 'p.png')[:, :, :16], target) and Image.open(tmp_path / 'p.gif').size == (32, 16)
    ws, heat = model.load_latents(str(tmp_path / 'p.npz'), G, 'cpu')
    assert ws.shape == (1, G.num_ws, 32) and heat is None
    model.main([path, '--w', str(tmp_path / 'p.npz'), str(tmp_path / 'q.npz'), '--out', str(tmp_path / 'g.png')])
    own = png(tmp_path / 'g.png').view(3, 16, 2, 16).permute(2, 0, 1, 3)  # [2, 3, 16, 16]
    both = torch.cat([ws, model.load_latents(str(tmp_path / 'q.npz'), G, 'cpu')[0]])
    assert same_image(own, model.to_uint8(G.synthesize(both, noise_mode='const')))
    walk = model.interpolate(G, ws=both, frames=3)
    assert same_image(walk[0], own[0]) and same_image(walk[-1], own[1])
    # bad input: one line each
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / 'gray.png')
    Image.fromarray(np.zeros((32, 16, 3), np.uint8)).save(tmp_path / 'big.png')
    other, _ = tiny_ckpt(tmp_path, 'other.pt', w_dim=16)
    np.savez(tmp_path / 'evil.npz', w=np.array([Evil(str(tmp_path / 'ran'))], dtype=object))
    sn = tiny_ckpt(tmp_path, 'sn.pt', arch='sndcgan', channel_base=64, channel_max=16)[0]
    r = subprocess.run([sys.executable, 'model.py', path, '--w', str(tmp_path / 'evil.npz')], cwd=HERE, capture_output=True,
                       text=True, timeout=300)  # once through the real command line: exit 1, one line
    assert r.returncode == 1 and r.stderr.count('\n') == 1 and 'pickled objects are refused' in r.stderr, r.stderr
    for argv, needle in [(['--project', str(tmp_path / 'gray.png')], 'a 16x16 L image; this network makes 16x16 RGB'),
                         (['--project', str(tmp_path / 'big.png')], 'a 16x32 RGB image'),
                         (['--project', str(tmp_path / 'p.npz')], 'cannot read'),
                         (['--w', str(tmp_path / 'evil.npz')], 'pickled objects are refused'),
                         (['--w', str(tmp_path / 't.png')], 'as an .npz of numbers'),
                         (['--w', str(tmp_path / 'p.npz'), '--outdir', str(tmp_path / 'x')], '--w feeds'),
                         (['--interp', '--out', str(tmp_path / 'i.png')], 'written as .gif or .mp4'),
                         (['--seeds', '1', '--interp', '--out', str(tmp_path / 'i.gif')], 'at least two sources')]:
        with pytest.raises((ValueError, SystemExit), match=re.escape(needle)):
            model.main([path, *argv])
    with pytest.raises(ValueError, match=r'holds w of shape \[1, 6, 32\] .* takes finite \[N, 6, 16\]: a latent of another network'):
        model.main([other, '--w', str(tmp_path / 'p.npz')])
    for argv in (['--project', str(tmp_path / 't.png')], ['--style-mix', '1'], ['--seeds', '1,2', '--interp', '--space', 'w',
                                                                               '--out', str(tmp_path / 'sn.gif')]):
        with pytest.raises(ValueError, match='needs a W space .* an --arch sndcgan generator has only Z'):
            model.main([sn, *argv])
    model.main([sn, '--seeds', '1,2', '--interp', '--frames', '2', '--out', str(tmp_path / 'sn.gif')])  # Z walks work
    assert Image.open(tmp_path / 'sn.gif').n_frames == 3 and not os.path.exists(tmp_path / 'ran')


class Evil:  # a pickled object that would create a file if unpickled
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_official_pickle_through_the_tools(tmp_path):
    """The W tools on an official stylegan2-ada pickle (read safely): style mixing, a W walk, a short
    projection with its own D's features."""
    path, _ = official('sg2ada-32')
    model.main([path, '--seeds', '0,1', '--style-mix', '2', '--out', str(tmp_path / 'm.png')])
    assert Image.open(tmp_path / 'm.png').size == (2 * 32, 3 * 32)
    model.main([path, '--seeds', '0,1', '--interp', '--space', 'w', '--frames', '2', '--out', str(tmp_path / 'w.gif')])
    model.main([path, '--seeds', '3', '--out', str(tmp_path / 't.png')])
    model.main([path, '--project', str(tmp_path / 't.png'), '--project-steps', '3', '--distance', 'd', '--out', str(tmp_path / 'p.png')])
    assert model.load_latents(str(tmp_path / 'p.npz'), model.load_checkpoint(path)['G_ema'], 'cpu')[0].shape[0] == 1


def test_tensorboard_events_read_back(tmp_path, capsys, monkeypatch):
    """--tensorboard: the log line's scalars, the metrics and the grids read back with tensorboard's own
    reader, at x = images seen; without the package: one line naming pip install tensorboard."""
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = run_train(tmp_path, '--kimg', '0.016', '--snap-kimg', '0.016', '--metrics', 'di', '--num-gen', '16',
                    '--tensorboard', name='tb')
    acc = EventAccumulator(out)
    acc.Reload()
    tags = acc.Tags()
    assert {'G/loss', 'D/loss', 'img_per_sec', 'metrics/di'} <= set(tags['scalars']) and tags['images'] == ['fakes']
    log = [json.loads(line) for line in open(f'{out}/log.jsonl')]
    last = [r for r in log if 'G/loss' in r][-1]
    ev = acc.Scalars('G/loss')[-1]
    assert ev.step == 16 and ev.value == pytest.approx(last['G/loss'], rel=1e-3)  # the log keeps 4 significant digits
    assert acc.Scalars('metrics/di')[-1].value == pytest.approx([r for r in log if 'metrics' in r][-1]['metrics']['di'], rel=1e-6)
    assert not glob.glob(f'{run_train(tmp_path, "--kimg", "0.008", name="plain")}/events.*')  # nothing without the flag
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)  # as if tensorboard were not installed
    expect_error(capsys, TINY_FLAGS + ['--out', str(tmp_path / 'no'), '--tensorboard'], 'pip install tensorboard')


# ==============================================================================================
# Augmentation of D's inputs (ADA, DiffAugment), Freeze-D, D-overfitting diagnostics (issue 25)

NO_AUG = {k: 0 for k in model.ADA_BGC}


def _aug_images(n=16, res=16, seed=0, detail=4):  # smooth random images in [-1, 1], distinct per image
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, detail, detail, generator=g), size=(res, res), mode='bicubic', align_corners=False)
    return (x * 2 - 1).clamp(-1, 1)


def _ada(x, p=1.0, seed=1, **on):  # ADA with only the named transforms (multiplier 1) at strength p
    prm = model.ada_params(torch.Generator().manual_seed(seed), x.shape[0], p, x.shape[2:], {**NO_AUG, **on})
    return model.augment(x, prm), prm


def test_aug_at_p0_is_the_identity_to_the_bit():
    x = _aug_images()
    y, prm = _ada(x, p=0.0, **model.ADA_BGC)
    assert torch.equal(y, x) and not prm['geom_on'].any() and not prm['color_on'].any()
    h = {'b8': torch.rand(16, 1, 16, 16), 4: torch.rand(16, 2, 4, 4), 'centers': torch.rand(16, 7, 2)}
    assert all(torch.equal(v, h[k]) for k, v in model.warp_maps(h, prm).items())
    # p = 0 draws the same numbers as p = 1 (the rest of the step's random numbers do not depend on p)
    g0, g1 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    model.ada_params(g0, 4, 0.0, (16, 16)), model.ada_params(g1, 4, 1.0, (16, 16))
    assert torch.equal(torch.rand(3, generator=g0), torch.rand(3, generator=g1))


def test_aug_flips_quarter_turns_and_whole_pixel_shifts_equal_index_arithmetic():
    """The blits go through the same 2x resampling as every geometric transform, and come out exact:
    [1, 3, 3, 1] up and [-1, 3, 3, -1] / 4 down are biorthogonal, grid_sample lands on pixel centres."""
    x = _aug_images(32)
    y, prm = _ada(x, xflip=1)
    flipped = prm['geom'][:, 0, 0] < 0
    assert 0 < flipped.sum() < 32  # both cases occur
    assert torch.allclose(y, torch.where(flipped[:, None, None, None], x.flip(-1), x), atol=2e-6)
    y, prm = _ada(x, rotate90=1)
    k = (torch.round(torch.atan2(prm['geom'][:, 1, 0], prm['geom'][:, 0, 0]) / (math.pi / 2)) % 4).long()
    assert set(k.tolist()) == {0, 1, 2, 3}
    for i in range(32):  # torch.rot90 k=1: out[y, x] = in[x, W - 1 - y]
        assert torch.allclose(y[i], torch.rot90(x[i], int(k[i]), (1, 2)), atol=2e-6), i
    y, prm = _ada(x, xint=1)
    t = torch.round(-prm['geom'][:, :2, 2] * 16 / 2).long()  # [n, (x, y)] whole pixels: out[i] = in[i - t]
    assert t.abs().max() == 2 and (t != 0).any(1).sum() > 16  # |t| <= round(0.125 x 16)
    mirror = lambda j: torch.where(j < 0, -j - 1, torch.where(j > 15, 31 - j, j))  # d c b a | a b c d (edge repeated)
    for i in range(32):
        rows, cols = mirror(torch.arange(16) - t[i, 1]), mirror(torch.arange(16) - t[i, 0])
        assert torch.allclose(y[i], x[i][:, rows][:, :, cols], atol=2e-6), i


def test_aug_colour_transforms_follow_their_matrix_formulas():
    """Each colour transform alone at p = 1 on 2000 random colours: the output is the hand-written
    formula with one parameter per image, and the parameters follow the official ranges."""
    n = 2000
    x = torch.rand(n, 3, 2, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    v = torch.ones(3) / math.sqrt(3)  # the luma axis
    luma = lambda z: (z * v[:, None, None]).sum(1, keepdim=True)  # [n, 1, h, w]: the component along v
    y, _ = _ada(x, brightness=1)  # out = x + b, b ~ N(0, 0.2)
    b = (y - x)[:, 0, 0, 0]
    assert torch.allclose(y, x + b[:, None, None, None], atol=1e-6) and b.std().item() == pytest.approx(0.2, rel=0.06)
    y, _ = _ada(x, contrast=1)  # out = c x, log2 c ~ N(0, 0.5)
    c = (y / x)[:, 0, 0, 0]
    assert torch.allclose(y, x * c[:, None, None, None], atol=1e-5) and torch.log2(c).std().item() == pytest.approx(0.5, rel=0.06)
    y, _ = _ada(x, lumaflip=1)  # half the images: out = x - 2 (v . x) v (luma negated, chroma kept)
    flipped = ~torch.isclose(y, x, atol=1e-6).flatten(1).all(1)
    want = torch.where(flipped[:, None, None, None], x - 2 * luma(x) * v[:, None, None], x)
    assert torch.allclose(y, want, atol=1e-6) and 0.45 < flipped.float().mean() < 0.55
    y, _ = _ada(x, hue=1)  # Rodrigues about v: out = x cos t + (v x x) sin t + v (v . x)(1 - cos t), t ~ U(-pi, pi)
    chroma = lambda z: z - luma(z) * v[:, None, None]
    c0, c1 = chroma(x)[..., 0, 0], chroma(y)[..., 0, 0]  # [n, 3]
    cos = (c0 * c1).sum(1) / c0.square().sum(1)
    sin = (torch.linalg.cross(c0, c1) @ v) / c0.square().sum(1)
    t = torch.atan2(sin, cos)[:, None, None, None]
    cross = torch.linalg.cross(v.expand(n, 2, 2, 3), x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    want = x * torch.cos(t) + cross * torch.sin(t) + luma(x) * v[:, None, None] * (1 - torch.cos(t))
    assert torch.allclose(y, want, atol=1e-5) and t.abs().mean().item() == pytest.approx(math.pi / 2, rel=0.05)
    y, _ = _ada(x, saturation=1)  # out = luma + s (x - luma), log2 s ~ N(0, 1)
    s = (chroma(y)[:, :, 0, 0].norm(dim=1) / chroma(x)[:, :, 0, 0].norm(dim=1))
    want = luma(x) * v[:, None, None] + s[:, None, None, None] * chroma(x)
    assert torch.allclose(y, want, atol=1e-4) and torch.log2(s).std().item() == pytest.approx(1, rel=0.06)
    y, _ = _ada(x, p=0.3, brightness=1)  # each transform applies with probability p
    assert (~torch.isclose(y, x).flatten(1).all(1)).float().mean().item() == pytest.approx(0.3, abs=0.04)


def test_aug_composed_geometric_matrix_equals_transforms_one_by_one():
    """warp through the product of the inverse matrices = warping once per transform, within the
    resampling error (smooth images, the centre, away from the mirrored borders); and ada_params's
    general transforms have the official kinds: scale (isotropic), rotation, anisotropic (det 1), shift."""
    x = _aug_images(8, 32)
    eye = lambda: torch.eye(3).repeat(8, 1, 1)
    reverse = eye()
    theta = torch.linspace(-0.3, 0.3, 8)
    s = torch.linspace(0.9, 1.1, 8)
    steps = [model._scale(1 / s, 1 / s), model._rotate(torch.cos(theta), torch.sin(theta)), model._scale(s, 1 / s),
             model._translate(torch.full([8], 0.05), torch.full([8], -0.03))]
    one_by_one, M = x, eye()
    for T in steps:  # a transform applied after the others: its inverse composes on the right
        one_by_one, M, reverse = model.warp(one_by_one, T), M @ T, T @ reverse
    once = model.warp(x, M)
    centre = (slice(None), slice(None), slice(8, 24), slice(8, 24))
    err = (once - one_by_one)[centre].abs()
    assert err.max() < 0.03 and err.mean() < 0.005
    assert (once - x)[centre].abs().mean() > 20 * err.mean()  # the transform itself is far larger than the error
    assert (model.warp(x, reverse) - one_by_one)[centre].abs().max() > 0.1  # the other order is another transform
    for key, check in [('scale', lambda m: torch.allclose(m[:, 0, 0], m[:, 1, 1]) and (m[:, 0, 1] == 0).all()),
                       ('aniso', lambda m: torch.allclose(torch.linalg.det(m[:, :2, :2]), torch.ones(8))),
                       ('rotate', lambda m: torch.allclose(m[:, :2, :2] @ m[:, :2, :2].transpose(1, 2), torch.eye(2).expand(8, 2, 2), atol=1e-6)),
                       ('xfrac', lambda m: torch.equal(m[:, :2, :2], torch.eye(2).expand(8, 2, 2)))]:
        _, prm = _ada(x, **{key: 1})
        assert prm['geom_on'].all() and check(prm['geom']), key


def test_aug_gradients_are_exact_and_reach_g_through_every_augmentation():
    x = _aug_images(2, 8).double().requires_grad_(True)
    g = lambda: torch.Generator().manual_seed(5)
    for prm in [model.ada_params(g(), 2, 1.0, (8, 8)),
                *(model.diffaug_params(g(), 2, [p], (8, 8)) for p in model.DIFFAUG_POLICIES)]:
        assert torch.autograd.gradcheck(lambda z: model.augment(z, prm), (x,), eps=1e-6, atol=1e-5)
    G, D = tiny()
    z = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    for prm in [model.ada_params(g(), 4, 1.0, (16, 16)), model.diffaug_params(g(), 4, list(model.DIFFAUG_POLICIES), (16, 16))]:
        G.zero_grad()
        D(model.augment(G(z), prm)).sum().backward()
        grads = [p.grad for p in G.synthesis.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(gr).all() for gr in grads) and sum(gr.abs().sum() for gr in grads) > 0


def test_diffaugment_by_hand():
    x = _aug_images(64)
    prm = model.diffaug_params(torch.Generator().manual_seed(0), 64, ['color'], (16, 16))
    b, s, c = (prm[k][:, None, None, None] for k in ('brightness', 'saturation', 'contrast'))
    assert prm['brightness'].abs().max() <= 0.5 and 0 <= prm['saturation'].min() and prm['saturation'].max() <= 2
    assert 0.5 <= prm['contrast'].min() and prm['contrast'].max() <= 1.5
    y1 = x + b
    y2 = (y1 - y1.mean(1, keepdim=True)) * s + y1.mean(1, keepdim=True)
    assert torch.allclose(model.augment(x, prm), (y2 - y2.mean([1, 2, 3], keepdim=True)) * c + y2.mean([1, 2, 3], keepdim=True), atol=1e-6)
    prm = model.diffaug_params(torch.Generator().manual_seed(0), 64, ['translation'], (16, 16))
    assert set(prm['shift'].flatten().tolist()) == set(range(-2, 3))  # 1/8 of 16
    y = model.augment(x, prm)
    for i in range(64):
        ty, tx = prm['shift'][i].tolist()
        for r in range(16):
            for col in (0, 7, 15):
                inside = 0 <= r + ty < 16 and 0 <= col + tx < 16
                assert y[i, :, r, col].tolist() == (x[i, :, r + ty, col + tx].tolist() if inside else [0.0] * 3)
    prm = model.diffaug_params(torch.Generator().manual_seed(0), 64, ['cutout'], (16, 16))
    y = model.augment(x, prm)
    for i in range(64):
        y0, x0 = prm['cutout'][i].tolist()
        hole = torch.zeros(16, 16, dtype=torch.bool)
        hole[max(y0, 0):y0 + 8, max(x0, 0):x0 + 8] = True  # half the size, clipped by the borders
        assert torch.equal(y[i], x[i] * ~hole)
    with pytest.raises(ValueError, match="unknown DiffAugment policy 'colour'"):
        model.diffaug_params(torch.Generator(), 2, ['colour'], (16, 16))


def test_gradcam_alignment_heatmaps_move_with_the_augmented_fakes(tmp_path, monkeypatch):
    """EqGAN-SA Eq. 4 under augmentation: GradCAM is taken on the augmented fakes, so the target
    heatmaps go through the same geometric transform (warp_maps), at every level's resolution: exact
    for flips and quarter turns; DiffAugment's translation moves them too. In training, the heatmaps
    the alignment loss gets are the step's heatmaps moved by the parameters that augmented the fakes."""
    h = {4: torch.rand(32, 1, 4, 4), 8: torch.rand(32, 2, 8, 8), 'centers': torch.rand(32, 7, 2)}
    _, prm = _ada(_aug_images(32), rotate90=1, xflip=1)
    moved = model.warp_maps(h, prm)
    assert moved['centers'] is h['centers']
    for i in range(32):
        for k in (4, 8):  # one of the 8 symmetries of the square
            cands = [torch.rot90(m, j, (1, 2)) for m in (h[k][i], h[k][i].flip(-1)) for j in range(4)]
            assert any(torch.allclose(moved[k][i], c, atol=1e-6) for c in cands), (i, k)
        img = F.interpolate(h[8][i:i + 1, :1], scale_factor=2, mode='nearest').expand(1, 3, 16, 16)
        img_moved = model.augment(img, {k: v[i:i + 1] for k, v in prm.items()})[:, :1]
        assert torch.allclose(F.interpolate(moved[8][i:i + 1, :1], scale_factor=2, mode='nearest'), img_moved, atol=1e-6)
    prm = model.diffaug_params(torch.Generator().manual_seed(0), 32, ['translation'], (16, 16))
    big = h[8][:, :1].repeat_interleave(2, -1).repeat_interleave(2, -2)  # [32, 1, 16, 16]
    moved = model.warp_maps({16: big}, prm)[16]
    img = model.augment(big.expand(32, 3, 16, 16), prm)[:, :1]
    inside = img != 0  # DiffAugment fills with zeros where the maps mirror
    assert inside.float().mean() > 0.7 and torch.allclose(moved[inside], img[inside], atol=1e-6)
    # training: capture the parameters of the first augmentation in Gmain (the fakes') and the maps Eq. 4 gets
    seen, real_augment, real_align = {}, model.augment, losses.align_loss_official
    monkeypatch.setattr(model, 'augment', lambda x, prm: seen.setdefault('prm', prm) and real_augment(x, prm))
    monkeypatch.setattr(losses, 'align_loss_official', lambda logits, maps, heat, tau: seen.setdefault('heat', heat)
                        and real_align(logits, maps, heat, tau))
    real_sample = model.Generator.sample_heatmaps
    drawn = []  # the snapshot grid's 32, then Gmain's 8
    monkeypatch.setattr(model.Generator, 'sample_heatmaps', lambda self, *a: drawn.append(real_sample(self, *a)) or drawn[-1])
    run_train(tmp_path, '--kimg', '0.008', '--sel', 'norm', '--aug', 'fixed', '--aug-p', '1', '--gamma', '0')
    want = model.warp_maps(next(h for h in drawn if h['b8'].shape[0] == 8), seen['prm'])
    assert seen['prm']['geom_on'].any()
    assert all(torch.equal(seen['heat'][k], want[k]) for k in want)


def test_ada_p_controller_by_hand(tmp_path, monkeypatch):
    """7 steps, --ada-interval 3: p moves after steps 0, 3, 6 by sign(r_t - target) x 8 x 3 /
    (ada_kimg x 1000), clamped at 0, with r_t the mean sign of every real logit since the previous move
    (Dmain's each step, and R1's pass every 2 steps), all as computed here from the logits D gave."""
    signs, real_d_loss, real_r1 = [], losses.d_loss, losses.r1_penalty
    monkeypatch.setattr(losses, 'd_loss', lambda kind, r, f: signs.append(('main', r.detach().sign())) or real_d_loss(kind, r, f))
    monkeypatch.setattr(losses, 'r1_penalty', lambda x, r: signs.append(('r1', r.detach().sign())) or real_r1(x, r))
    out = run_train(tmp_path, '--kimg', '0.056', '--aug', 'ada', '--ada-interval', '3', '--ada-kimg', '0.2',
                    '--ada-target', '0.1', '--r1-interval', '2')
    per_step = [[] for _ in range(7)]
    step = -1
    for kind, s in signs:  # Dmain opens each step
        step += kind == 'main'
        per_step[step].append(s)
    p, since, want = 0.0, [], []
    for step in range(7):
        since += per_step[step]
        if step % 3 == 0:
            r_t = torch.cat(since).mean().item()
            p = max(0.0, p + np.sign(r_t - 0.1) * 8 * 3 / 200)
            since = []
        want.append(p)
    lines = [r for r in map(json.loads, open(f'{out}/log.jsonl')) if 'aug/p' in r]
    assert [r['aug/p'] for r in lines] == pytest.approx(want, abs=1e-6)
    assert len(set(want)) > 1  # p moved
    assert [r['D/rt'] for r in lines] == pytest.approx([per_step[i][0].mean().item() for i in range(7)], abs=1e-4)
    ck = load(glob.glob(f'{out}/ckpt-*.pt')[-1])
    assert ck['aug_p'].item() == pytest.approx(want[-1])
    assert ck['ada_signs'].tolist() == [0.0, 0.0]  # step 6 moved p


def test_ada_p_survives_a_stop_and_resume_exactly(tmp_path):
    """A checkpoint in the middle of an adjustment interval: the resumed run holds the same p, the same
    partial sign sums and the same weights as the uninterrupted one."""
    common = ['--aug', 'ada', '--ada-interval', '3', '--ada-kimg', '0.1', '--ada-target', '-1', '--snap-kimg', '0.024']
    a = run_train(tmp_path, '--kimg', '0.048', *common, name='a')
    b = run_train(tmp_path, '--kimg', '0.024', *common, name='b')
    assert load(f'{b}/ckpt-0000003.pt')['ada_signs'][1] > 0  # stopped with signs counted towards the next move
    run_train(tmp_path, '--kimg', '0.048', *common, name='b')
    ca, cb = load(f'{a}/ckpt-0000006.pt'), load(f'{b}/ckpt-0000006.pt')
    assert_same_state(ca, cb)
    assert torch.equal(ca['aug_p'], cb['aug_p']) and torch.equal(ca['ada_signs'], cb['ada_signs']) and ca['aug_p'] > 0


def test_ddp_two_processes_with_ada_match_one(tmp_path):
    """2 gloo processes == 1 with --aug ada: the augmentation's parameters are drawn for the global batch,
    r_t sums every process's signs, so p moves alike; R1 and the references (--d-attn ref) go through
    the augmentation too."""
    common = TINY_FLAGS + ['--kimg', '0.032', '--snap-kimg', '1', '--aug', 'ada', '--ada-interval', '2', '--ada-kimg', '0.05',
                           '--ada-target', '-1', '--r1-interval', '2', '--gamma', '1', '--d-attn', 'ref']  # -1: p rises
    torchrun(common + ['--out', str(tmp_path / 'ddp')], 2, tmp_path)
    train.main(common + ['--out', str(tmp_path / 'one')])
    a, b = load(glob.glob(f'{tmp_path}/ddp/ckpt-*.pt')[0]), load(glob.glob(f'{tmp_path}/one/ckpt-*.pt')[0])
    assert_same_state(a, b, atol=1e-4, skip=['mapping.w_avg'])
    assert a['aug_p'].item() == pytest.approx(b['aug_p'].item()) and b['aug_p'] > 0
    logs = [[json.loads(line) for line in open(f'{tmp_path}/{name}/log.jsonl')] for name in ('ddp', 'one')]
    assert [r['aug/p'] for r in logs[0]] == pytest.approx([r['aug/p'] for r in logs[1]])
    assert [r['D/rt'] for r in logs[0]] == pytest.approx([r['D/rt'] for r in logs[1]])


# images per phase: Gmain (fakes, references, the contrastive loss's reals), Dmain (fakes, reals, references),
# the WGAN-GP interpolates, Dreg (reals, references)
@pytest.mark.parametrize('extra, batches', [
    (['--aug', 'diffaug', '--loss', 'wgan'], 1 + 2 + 1 + 1),
    (['--aug', 'fixed', '--aug-p', '0.5', '--loss', 'contrastive', '--warmup-kimg', '0', '--d-attn', 'ref'], 3 + 3 + 0 + 2)])
def test_augmented_training_runs_every_phase(tmp_path, monkeypatch, extra, batches):
    """Every image D sees passes through the augmentation, in every phase."""
    calls, real_augment = [], model.augment
    monkeypatch.setattr(model, 'augment', lambda x, prm: calls.append(x.shape[0]) or real_augment(x, prm))
    run_train(tmp_path, '--kimg', '0.008', '--gamma', '1', '--r1-interval', '1', *extra)  # 1 step, every phase
    assert len(calls) == batches and set(calls) == {8}


def test_freeze_d_keeps_the_first_blocks(tmp_path):
    out = run_train(tmp_path, '--kimg', '0.016', '--snap-kimg', '0.008', '--freeze-d', '1', '--gamma', '1', '--r1-interval', '1')
    c1, c2 = load(f'{out}/ckpt-0000001.pt'), load(f'{out}/ckpt-0000002.pt')
    G, D = tiny()  # the initial weights of seed 0
    for k, v in c2['D'].items():
        if k.startswith('b16.'):  # the block at the image: never trained
            assert torch.equal(v, D.state_dict()[k]) and torch.equal(v, c1['D'][k]), k
    assert not torch.equal(c2['D']['b8.conv0.weight'], c1['D']['b8.conv0.weight'])


@pytest.mark.parametrize('cond', [False, True])
def test_holdout_diagnostics_by_hand(tmp_path, cond):
    """--holdout 8 with --max-images 16: D's mean outputs on training images 0-7 and on images 16-23 of
    the built-in set (never trained on), each with its own class under --cond, logged at each evaluation
    and drawn by metrics.py --plot."""
    out = run_train(tmp_path, '--kimg', '0.016', '--max-images', '16', '--holdout', '8', '--metrics-kimg', '0.016',
                    *(['--cond'] if cond else []))
    rec = [r for r in map(json.loads, open(f'{out}/log.jsonl')) if 'metrics' in r][-1]
    ck = load(glob.glob(f'{out}/ckpt-*.pt')[-1])
    _, D = tiny(c_dim=4 if cond else 0)
    D.load_state_dict(ck['D'])
    full = data.SyntheticShapes(16, 24, 0)
    with torch.no_grad():
        for key, idx in (('train', range(8)), ('heldout', range(16, 24))):
            x = torch.stack([full[i] for i in idx]).float() / 127.5 - 1
            c = F.one_hot(torch.as_tensor(full.labels[list(idx)]), 4).float() if cond else None
            assert rec['metrics']['overfit'][key] == pytest.approx(D(x, c=c).mean().item(), abs=1e-5), key
    assert math.isfinite(rec['metrics']['overfit']['fake'])
    if cond:
        assert len(set(full.labels[:24])) > 1  # the classes matter: D's class embedding sees several
        return
    sys_argv = sys.argv
    try:
        sys.argv = ['metrics.py', '--plot', f'{out}/log.jsonl', '--keys', 'overfit,D/rt', '--out', str(tmp_path / 'p.png')]
        metrics.main()
    finally:
        sys.argv = sys_argv
    img = np.asarray(Image.open(tmp_path / 'p.png'))
    assert (img == (214, 39, 40)).all(-1).sum() > 20  # the 4th series (D/rt) drawn after the 3 of 'overfit'


def test_aug_and_limited_data_flags_give_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / 'r')
    for extra, needles in [
            (['--aug', 'fixed', '--aug-p', '1.5'], ['--aug-p 1.5 must lie in [0, 1]']),
            (['--aug', 'diffaug', '--diffaug', 'color,colour'], ["no policy 'colour'", 'color, translation, cutout']),
            (['--aug-p', '0.5'], ['--aug-p does nothing without --aug fixed']),
            (['--aug', 'ada', '--aug-p', '0.5'], ['--aug-p does nothing without --aug fixed']),
            (['--aug', 'fixed'], ['--aug fixed needs --aug-p']),
            (['--ada-target', '0.5'], ['--ada-target does nothing without --aug ada']),
            (['--aug', 'ada', '--ada-kimg', '0'], ['--ada-kimg 0 must be positive']),
            (['--aug', 'ada', '--ada-target', '1.5'], ['--ada-target 1.5 must lie in [-1, 1]']),
            (['--aug', 'ada', '--ada-interval', '0'], ['--ada-interval 0 must be at least 1']),
            (['--diffaug', 'color'], ['--diffaug does nothing without --aug diffaug']),
            (['--holdout', '12'], ['--holdout 12 is not a multiple of --batch 8']),
            (['--freeze-d', '-1'], ['--freeze-d -1 must be at least 0']),
            (['--freeze-d', '3'], ['--freeze-d 3: this D has 2 blocks'])]:
        expect_error(capsys, TINY_FLAGS + ['--out', out, '--kimg', '0.008', *extra], *needles)
    root = tmp_path / 'imgs'
    root.mkdir()
    for i in range(20):
        Image.fromarray(np.full((16, 16, 3), i, np.uint8)).save(root / f'{i:02d}.png')
    expect_error(capsys, TINY_FLAGS + ['--out', out, '--data', str(root), '--max-images', '16', '--holdout', '8'],
                 '--holdout 8: ', 'has 20 usable images', '--max-images 12')
    (root / 'dataset.json').write_text(json.dumps({'labels': [[f'{i:02d}.png', i % 2 if i < 12 else 3] for i in range(20)]}))
    expect_error(capsys, TINY_FLAGS + ['--out', out, '--data', str(root), '--max-images', '12', '--holdout', '8', '--cond'],
                 'a held-out image has class 3, which the training images lack (they have 2)')
