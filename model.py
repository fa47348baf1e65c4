"""
StyleGAN2 generator and discriminator (Karras et al., CVPR 2020, configs E and F), with

  - self-attention in G (SAN, SAGAN, DFN, VT) and self-/reference-attention in D from
    "Dual Contrastive Loss and Attention for GANs" (Yu et al., ICCV 2021; thesis Sec. 2.3.2-2.3.3),
  - hierarchical heatmaps and spatial encoding layers (SEL) in G from "Improving GAN Equilibrium by
    Raising Spatial Awareness" (EqGAN-SA, Wang et al., CVPR 2022; Sec. 3.1, Eq. 3), as the paper's
    text reads and as the authors' code (genforce/eqgan-sa) builds them,
  - the SN-DCGAN and SNGAN backbones (Miyato et al., ICLR 2018) the papers also report on,
  - the augmentation of every image D sees for limited data: ADA's 'bgc' pipeline (Karras et al.,
    NeurIPS 2020) and DiffAugment (Zhao et al., NeurIPS 2020),
  - safe reading of official stylegan2-ada-pytorch network pickles, and of the EqGAN-SA authors'
    (no code from the pickle runs).

Plain PyTorch, no custom ops. Parameter names follow the official code (mapping.fc0,
synthesis.b32.conv1.affine, b64.skip, b4.out, ...). Conventions: images are NCHW float in [-1, 1];
D returns one raw logit per image, shape [B], larger = more real.

Run alone:
  python model.py                                     # parameter counts (config E, 256x256) and shapes
  python model.py CKPT --seeds 0-15 --trunc 0.7 --out grid.png        # samples from a checkpoint
  python model.py CKPT1 CKPT2 --seeds 0-7 --out compare.png           # one row per run, same latents
  python model.py CKPT --heatmap-centers 0.5,0.5 --move 0.2,0 --out edit.png   # EqGAN-SA editing
  python model.py CKPT --attn-maps --out attn.png     # SAN attention maps (thesis Fig. 2.5)
  python model.py network-snapshot.pkl --convert net.pt  # an official pickle -> this project's checkpoint
  python model.py CKPT --project target.png --out proj.png  # its latent in W (proj.npz); --w proj.npz reuses it
  python model.py CKPT --seeds 1,5,9 --interp --loop --out walk.gif  # latent walk (--space z|w; .mp4 with imageio-ffmpeg)
  python model.py CKPT --seeds 0-5 --style-mix 10-15 --out mix.png  # also --trunc-sweep 1,0.5,0 and --heatmap-walk
  python model.py CKPT --seeds 0-49999 --outdir fakes/  # one PNG per seed, for external FID tools
"""
import argparse
import collections
import contextlib
import copy
import io
import math
import os
import pickle
import re
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import attention

SQRT2 = math.sqrt(2)


# ----------------------------------------------------------------------------------------------
# Low-level ops: bias + activation, the [1,3,3,1] FIR filter, resampling convolutions.

def bias_act(x, b, act=True, gain=1.0, clamp=None):
    """x + b, then leaky ReLU (slope 0.2) with gain sqrt(2) if act, times gain, clamped."""
    if b is not None:
        x = x + b.to(x.dtype).view(1, -1, *([1] * (x.ndim - 2)))
    if act:
        x = F.leaky_relu(x, 0.2)
        gain = gain * SQRT2
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


def fir_filter():
    f = torch.tensor([1.0, 3.0, 3.0, 1.0])
    f = torch.outer(f, f)
    return f / f.sum()  # [4, 4], sums to 1


def blur(x, f, padding, gain=1.0):
    """Depthwise 2D FIR filtering, a true convolution with f (the official upfirdn2d: the filter is
    flipped, which matters for the asymmetric filters a loaded network may hold):
    [B, C, H, W] -> [B, C, H + 2p - 3, W + 2p - 3]."""
    return _Blur.apply(x, f.flip([0, 1]) * gain, padding)


class _Blur(torch.autograd.Function):
    """Depthwise conv with one k x k filter for all channels. Its gradient is the same filtering with
    the flipped filter and padding k - 1 - p, so every derivative order stays one depthwise conv:
    PyTorch's own double backward of a grouped conv (R1, path length, GradCAM) runs one conv per
    channel, 3-8x slower on the CPU."""

    @staticmethod
    def forward(ctx, x, f, padding):
        ctx.save_for_backward(f)
        ctx.padding = padding
        return F.conv2d(x, f.to(x.dtype).expand(x.shape[1], 1, *f.shape), padding=padding, groups=x.shape[1])

    @staticmethod
    def backward(ctx, g):
        f, = ctx.saved_tensors
        return _Blur.apply(g, f.flip([0, 1]), f.shape[-1] - 1 - ctx.padding), None, None


def upsample2d(x, f):
    """Zero-insertion upsampling + FIR with gain 4 (a true convolution, as blur), as one depthwise
    transposed conv: [B, C, 2H, 2W]."""
    C = x.shape[1]
    return F.conv_transpose2d(x, (f * 4).to(x.dtype).expand(C, 1, 4, 4), stride=2, padding=1, groups=C)


def conv2d_resample(x, w, f=None, up=1, down=1, groups=1):
    """Convolution with optional 2x up (transposed stride-2 conv, then FIR with gain 4) or 2x down
    (FIR, then stride-2 conv), as in the official StyleGAN2; w is [O, I/groups, k, k]."""
    k = w.shape[-1]
    if up == 2:
        assert k == 3
        O = w.shape[0]
        # conv_transpose2d wants [I, O/groups, k, k]
        w = w.reshape(groups, O // groups, -1, k, k).transpose(1, 2).reshape(-1, O // groups, k, k)
        x = F.conv_transpose2d(x, w, stride=2, groups=groups)  # [B, O, 2H+1, 2W+1]
        return blur(x, f, padding=1, gain=4)  # [B, O, 2H, 2W]
    if down == 2:
        x = blur(x, f, padding=(k + 1) // 2)
        return F.conv2d(x, w, stride=2, groups=groups)  # [B, O, H/2, W/2]
    return F.conv2d(x, w, padding=k // 2, groups=groups)


def modulated_conv2d(x, weight, styles, demodulate=True, up=1, f=None, fused=False):
    """StyleGAN2 modulated convolution (Karras et al. 2020, Eq. 1-3), batched.

    fused=False (training): scale the input by the styles, one shared conv, scale the output by the
    demodulation coefficients; its backward is fast in cuDNN/oneDNN (the official training path).
    fused=True (inference): per-sample weights as one grouped conv over the batch.
    x [B, I, H, W], weight [O, I, k, k], styles [B, I] -> [B, O, H', W'].
    """
    B, I = styles.shape
    O, _, k, _ = weight.shape
    w = weight.to(x.dtype)
    styles = styles.to(x.dtype)
    dev = x.device.type
    if demodulate and (x.dtype == torch.float16 or torch.is_autocast_enabled(dev) and
                       torch.get_autocast_dtype(dev) == torch.float16):
        # fp16 (the official code): bound weights and styles against overflow; demodulation undoes it
        w = w * (1 / math.sqrt(I * k * k) / w.norm(float('inf'), dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.norm(float('inf'), dim=1, keepdim=True)
    if demodulate:  # Eq. 3: sigma_j = sqrt(sum_{i,k} (s_i w_ijk)^2); via [B, I] @ [I, O], in fp32
        with torch.autocast(dev, enabled=False):
            dcoefs = (styles.float().square() @ w.float().square().sum([2, 3]).t() + 1e-8).rsqrt()  # [B, O]
    if not fused:
        x = x * styles.view(B, I, 1, 1)
        x = conv2d_resample(x, w, f, up=up)
        return x * dcoefs.to(x.dtype).view(B, O, 1, 1) if demodulate else x
    w = w.unsqueeze(0) * styles.view(B, 1, I, 1, 1)  # [B, O, I, k, k]
    if demodulate:
        w = w * dcoefs.to(w.dtype).view(B, O, 1, 1, 1)
    x = conv2d_resample(x.reshape(1, B * I, *x.shape[2:]), w.reshape(B * O, I, k, k), f, up=up, groups=B)
    return x.reshape(B, O, *x.shape[2:])


NUM_FP16_RES = 4  # the official num_fp16_res: mixed precision in the 4 highest resolutions only


def fp16_resolution(resolution):
    """The lowest block resolution that runs under the caller's autocast (the official fp16_resolution)."""
    return max(resolution // 2 ** (NUM_FP16_RES - 1), 8)


def full_precision(on, device_type):
    """Autocast off where `on` and autocast is active: StyleGAN2's mapping, its blocks below
    fp16_resolution and D's epilogue run in fp32 under --amp, as the official code (whose fp16 covers
    only the 4 highest resolutions; the low-resolution layers are cheap and the logits need the range)."""
    return torch.autocast(device_type, enabled=False) if on and torch.is_autocast_enabled(device_type) else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# Equalized-learning-rate layers: weights stored N(0, 1), scaled by He's constant at run time.

class FC(nn.Module):
    def __init__(self, cin, cout, act=False, bias_init=0.0, lr_mul=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / lr_mul)
        self.bias = nn.Parameter(torch.full([cout], float(bias_init)))
        self.act, self.weight_gain, self.lr_mul = act, lr_mul / math.sqrt(cin), lr_mul

    def forward(self, x):  # [B, cin] -> [B, cout]
        w = (self.weight * self.weight_gain).to(x.dtype)
        b = (self.bias * self.lr_mul).to(x.dtype)
        if not self.act:
            return torch.addmm(b, x, w.t())
        return bias_act(x @ w.t(), b)


class Conv(nn.Module):
    """Conv + bias + leaky ReLU (D and the spatial encoders). `attn` replaces the convolution by
    SAN self-attention ('self') or reference-attention ('ref'), keeping bias and activation."""

    def __init__(self, cin, cout, k, act=True, bias=True, down=1, conv_clamp=None, attn=None, ref_eq=8):
        super().__init__()
        if attn is None:
            self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
            self.weight_gain = 1 / math.sqrt(cin * k * k)
        elif attn == 'self':
            self.attn = attention.SAN(cin)
        else:
            self.attn = attention.RefAttention(cin, eq=ref_eq)
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.act, self.down, self.conv_clamp, self.kind = act, down, conv_clamp, attn
        # the FIR filter, a buffer as in the official code (a loaded network brings its own); None: not resampling
        self.register_buffer('resample_filter', fir_filter() if down == 2 else None)

    def forward(self, x, gain=1.0, ref=None):
        if self.kind is None:
            x = conv2d_resample(x, (self.weight * self.weight_gain).to(x.dtype), self.resample_filter, down=self.down)
        elif self.kind == 'self':
            x = self.attn(x)
        else:
            x = self.attn(x, ref)  # Eq. 2.8
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, act=self.act, gain=gain, clamp=clamp)


# ----------------------------------------------------------------------------------------------
# Generator

class MappingNetwork(nn.Module):
    """(z, c) -> w: 2nd-moment normalisation of z and of the embedded one-hot label c (class-conditional
    networks, as the official code), `layers` FC layers with lr multiplier 0.01. G's tracks w_avg and
    broadcasts w to num_ws; D's (z_dim 0, num_ws None) is the label embedding of its projection epilogue."""

    def __init__(self, z_dim, w_dim, num_ws, layers=8, c_dim=0, lr_mul=0.01, w_avg_beta=0.995, extra_dim=0):
        super().__init__()
        self.z_dim, self.c_dim, self.num_ws, self.layers, self.w_avg_beta = z_dim, c_dim, num_ws, layers, w_avg_beta
        if c_dim:
            self.embed = FC(c_dim, w_dim)
        cin = z_dim + (w_dim if c_dim else 0) + extra_dim  # extra: the flattened heatmap of EqGAN-SA's 'flatten'
        for i in range(layers):
            setattr(self, f'fc{i}', FC(cin if i == 0 else w_dim, w_dim, act=True, lr_mul=lr_mul))
        if num_ws:
            self.register_buffer('w_avg', torch.zeros(w_dim))

    def forward(self, z, c=None, psi=1.0, cutoff=None, update_w_avg=False, extra=None):
        norm = lambda t: t * (t.square().mean(1, keepdim=True) + 1e-8).rsqrt()
        parts = ([norm(z)] if self.z_dim else []) + ([norm(self.embed(c.to(torch.float32)))] if self.c_dim else [])
        x = torch.cat(parts + ([norm(extra)] if extra is not None else []), 1)  # [B, z_dim (+ w_dim) (+ extra)]
        for i in range(self.layers):
            x = getattr(self, f'fc{i}')(x)  # [B, w_dim]
        if not self.num_ws:
            return x
        if update_w_avg:
            self.w_avg.copy_(x.detach().float().mean(0).lerp(self.w_avg, self.w_avg_beta))
        ws = x.unsqueeze(1).repeat(1, self.num_ws, 1)  # [B, num_ws, w_dim]
        if psi != 1:  # truncation trick, on the first `cutoff` layers (all by default)
            n = self.num_ws if cutoff is None else cutoff
            ws[:, :n] = self.w_avg.to(ws.dtype).lerp(ws[:, :n], psi)
        return ws


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (or a self-attention module in its place), noise, bias, leaky ReLU; sel: the
    authors' EqGAN-SA SEL on the input (SELOfficial, --eqgan official), h its heatmap features."""

    def __init__(self, cin, cout, w_dim, res, up=1, conv_clamp=None, attn='none', sel=None):
        super().__init__()
        if attn == 'none':
            self.affine = FC(w_dim, cin, bias_init=1)  # styles start at 1
            self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
        else:  # thesis Sec. 2.3.2: the attention replaces the convolution of this layer
            assert cin == cout and up == 1
            self.attn = attention.self_attention(attn, cin)
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.register_buffer('noise_const', torch.randn(res, res))
        self.register_buffer('resample_filter', fir_filter() if up == 2 else None)
        self.up, self.res, self.conv_clamp, self.kind, self.sel = up, res, conv_clamp, attn, sel

    def forward(self, x, w, noise_mode='random', fused=False, noise=None, h=None):
        if self.sel is not None:
            x = self.sel(x, h)
        if self.kind == 'none':
            x = modulated_conv2d(x, self.weight, self.affine(w), up=self.up, f=self.resample_filter, fused=fused)
        else:
            x = self.attn(x)  # residual inside (Eq. 2.7)
        if noise is not None:  # given by the caller, e.g. train.py's per-step generator; [B, 1, res, res]
            x = x + noise.to(x.dtype) * self.noise_strength
        elif noise_mode == 'random':  # added after the conv, before bias and activation
            x = x + torch.randn(x.shape[0], 1, self.res, self.res, device=x.device, dtype=x.dtype) * self.noise_strength
        elif noise_mode == 'const':
            x = x + (self.noise_const * self.noise_strength).to(x.dtype)
        return bias_act(x, self.bias, clamp=self.conv_clamp)


class ToRGB(nn.Module):
    """1x1 modulated conv without demodulation, styles scaled by 1/sqrt(C_in)."""

    def __init__(self, cin, w_dim, conv_clamp=None, sel=None):
        super().__init__()
        self.affine = FC(w_dim, cin, bias_init=1)
        self.weight = nn.Parameter(torch.randn(3, cin, 1, 1))
        self.bias = nn.Parameter(torch.zeros(3))
        self.weight_gain, self.conv_clamp, self.sel = 1 / math.sqrt(cin), conv_clamp, sel

    def forward(self, x, w, fused=False, h=None):
        if self.sel is not None:  # --eqgan official: as SynthesisLayer
            x = self.sel(x, h)
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused=fused)
        return bias_act(x, self.bias, act=False, clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the skip generator: [const | up-conv0], conv1, toRGB added to the
    upsampled image. SEL (EqGAN-SA, the blocks of the heatmap levels): sel = [before conv1, before
    toRGB]; with local_rgb (--sel-placement official, the authors' code) the second one changes the
    toRGB input only, not the features passed on, and sel_in precedes conv0 (on its res/2 input).
    layer_sel (--eqgan official): channels -> a SELOfficial, one on the input of each of conv0, conv1
    and toRGB, all fed this block's heatmap features hfeats[res]."""

    def __init__(self, cin, cout, w_dim, res, conv_clamp=None, attn='none', sel=None, sel_in=None, local_rgb=False,
                 layer_sel=None):
        super().__init__()
        self.cin, self.res, self.num_conv = cin, res, (1 if cin == 0 else 2)
        layer_sel = layer_sel or (lambda channels: None)
        if cin == 0:
            self.const = nn.Parameter(torch.randn(cout, 4, 4))
        else:
            self.conv0 = SynthesisLayer(cin, cout, w_dim, res, up=2, conv_clamp=conv_clamp, sel=layer_sel(cin))
        self.conv1 = SynthesisLayer(cout, cout, w_dim, res, conv_clamp=conv_clamp, attn=attn, sel=layer_sel(cout))
        self.torgb = ToRGB(cout, w_dim, conv_clamp=conv_clamp, sel=layer_sel(cout))
        self.sel, self.sel_in, self.local_rgb = sel, sel_in, local_rgb
        self.register_buffer('resample_filter', fir_filter() if cin else None)  # upsamples the image from below

    def forward(self, x, img, ws, noise_mode='random', fused=False, hfeats=None, noise=(None, None)):
        # ws [B, num_conv + 1, w_dim]; noise: one [B, 1, res, res] tensor (or None) per conv; hfeats {res: encoding}
        if self.cin == 0:
            x = self.const.to(ws.dtype).unsqueeze(0).expand(ws.shape[0], -1, -1, -1)  # [B, C, 4, 4]
        else:
            if self.sel_in is not None:
                x = self.sel_in(x, hfeats[self.res // 2])
            x = self.conv0(x, ws[:, 0], noise_mode, fused, noise[0], h=hfeats.get(self.res))  # [B, C, res, res]
        if self.sel is not None:
            x = self.sel[0](x, hfeats[self.res])
        x = self.conv1(x, ws[:, self.num_conv - 1], noise_mode, fused, noise[-1], h=hfeats.get(self.res))
        rgb_in = x
        if self.sel is not None:
            rgb_in = self.sel[1](x, hfeats[self.res])
            x = x if self.local_rgb else rgb_in
        y = self.torgb(rgb_in, ws[:, self.num_conv], fused, h=hfeats.get(self.res))  # [B, 3, res, res]
        y = y.to(torch.promote_types(y.dtype, torch.float32))  # fp32 (fp64 stays fp64)
        # the RGB skip sum in fp32 under mixed precision too (the official code): in bf16 the final
        # image would carry 8 mantissa bits summed over every resolution
        with torch.autocast(y.device.type, enabled=False):
            img = y if img is None else upsample2d(img, self.resample_filter) + y
        return x, img


def channels_per_res(channel_base, channel_max, resolution):
    return {r: min(channel_base // r, channel_max) for r in [2 ** i for i in range(2, int(math.log2(resolution)) + 1)]}


class Generator(nn.Module):
    """StyleGAN2 skip generator. G(z) samples images (G(z, c) with a one-hot label c [B, c_dim] when
    class-conditional); G.map / G.synthesize are the two halves."""

    def __init__(self, resolution, z_dim=512, w_dim=512, channel_base=16384, channel_max=512, map_layers=8,
                 conv_clamp=None, g_attn='none', g_attn_res=32, sel='none', heatmap='hier', c_dim=0, sel_placement='paper',
                 eqgan='paper'):
        super().__init__()
        if resolution < 8 or resolution & (resolution - 1):  # not a power of two
            raise ValueError(f'--resolution {resolution}: G and D need a power of two >= 8; use e.g. 32, 64 or 256')
        self.z_dim, self.w_dim, self.c_dim, self.img_resolution = z_dim, w_dim, c_dim, resolution
        ch = channels_per_res(channel_base, channel_max, resolution)
        if g_attn != 'none' and not (g_attn_res >= 8 and g_attn_res in ch):
            raise ValueError(f'--g-attn-res {g_attn_res} is not a G resolution; use a power of two in [8, {resolution}]')
        if sel_placement not in SEL_PLACEMENTS:
            raise ValueError(f'unknown --sel-placement {sel_placement!r}; choose one of {", ".join(SEL_PLACEMENTS)}')
        if eqgan == 'official' and sel_placement != 'paper':
            raise ValueError('--sel-placement places the SELs of --eqgan paper; --eqgan official puts one before every '
                             'layer, as the authors\' code: drop --sel-placement')
        self.spatial = SpatialEncoding(sel, heatmap, resolution, ch, eqgan=eqgan) if sel != 'none' else None  # EqGAN-SA
        self.synthesis = nn.Module()
        self.res_list = sorted(ch)
        official = sel_placement == 'official'
        authors = self.spatial is not None and eqgan == 'official'  # their SEL on every layer's input
        for res in self.res_list:
            sel_layers = self.spatial.sel_layers if self.spatial is not None and not authors else lambda r, n: None
            sel_in = sel_layers(res // 2, 1) if official and res > 4 else None
            layer_sel = (lambda channels, r=res: self.spatial.sel_official(channels, r)) if authors else None
            block = SynthesisBlock(ch[res // 2] if res > 4 else 0, ch[res], w_dim, res, conv_clamp,
                                   attn=g_attn if res == g_attn_res else 'none', sel=sel_layers(res, 2),
                                   sel_in=sel_in[0] if sel_in else None, local_rgb=official, layer_sel=layer_sel)
            setattr(self.synthesis, f'b{res}', block)
        self.num_ws = 2 * int(math.log2(resolution)) - 2
        extra = self.spatial.flat_dim if self.spatial is not None else 0
        self.mapping = MappingNetwork(z_dim, w_dim, self.num_ws, map_layers, c_dim, extra_dim=extra)

    @property
    def uses_heatmaps(self):
        return self.spatial is not None

    def sample_heatmaps(self, batch, device, generator=None):
        return self.spatial.sample(batch, device, generator) if self.spatial is not None else None

    def map(self, z, psi=1.0, cutoff=None, update_w_avg=False, heatmaps=None, c=None):
        extra = self.spatial.flat(heatmaps) if self.spatial is not None else None
        with full_precision(True, z.device.type):
            return self.mapping(z, c, psi, cutoff, update_w_avg, None if extra is None else extra.float())

    @property
    def noise_res(self):
        """The resolution of each noise input, in the order synthesize() consumes a `noise` list."""
        return [r for r in self.res_list for _ in range(1 if r == 4 else 2)]

    def synthesize(self, ws, noise_mode='random', fused=None, heatmaps=None, noise=None):
        """ws [B, num_ws, w_dim] -> images [B, 3, R, R]. fused defaults to the grouped conv in eval on
        GPUs (as the official code); on the CPU the non-fused form is 2.4x faster, in eval too.
        noise: optional list of [B, 1, r, r] tensors for r in noise_res (else per noise_mode)."""
        fused = (not self.training and ws.device.type == 'cuda') if fused is None else fused
        hfeats = self.spatial.encode(heatmaps) if self.spatial is not None else {}
        x = img = None
        w_idx = n_idx = 0
        for res in self.res_list:
            block = getattr(self.synthesis, f'b{res}')
            block_noise = noise[n_idx:n_idx + block.num_conv] if noise is not None else (None, None)
            with full_precision(res < fp16_resolution(self.img_resolution), ws.device.type):  # (fp32 blocks come first)
                x, img = block(x, img, ws[:, w_idx:w_idx + block.num_conv + 1], noise_mode, fused, hfeats, block_noise)
            w_idx += block.num_conv
            n_idx += block.num_conv
        return img

    def forward(self, z, psi=1.0, cutoff=None, noise_mode='random', heatmaps=None, mix_z=None, mix_cutoff=None,
                update_w_avg=False, return_ws=False, noise=None, c=None):
        """z [B, z_dim] (and c [B, c_dim]) -> images [B, 3, R, R] (and ws). Style mixing: layers >=
        mix_cutoff (a 0-dim tensor, so no host sync) take their w from mix_z (same label). Heatmaps are
        sampled when G needs them."""
        if self.spatial is not None and heatmaps is None:
            heatmaps = self.sample_heatmaps(z.shape[0], z.device)
        ws = self.map(z, psi, cutoff, update_w_avg, heatmaps, c)  # [B, num_ws, w_dim]
        if mix_z is not None:
            layer = torch.arange(self.num_ws, device=z.device).view(1, -1, 1)
            ws = torch.where(layer < mix_cutoff, ws, self.map(mix_z, psi, cutoff, heatmaps=heatmaps, c=c))
        img = self.synthesize(ws, noise_mode, heatmaps=heatmaps, noise=noise)
        return (img, ws) if return_ws else img


# ----------------------------------------------------------------------------------------------
# Discriminator

class DiscriminatorBlock(nn.Module):
    """Residual D block: conv0 (or attention), stride-2 conv1, 1x1 stride-2 skip; both paths x sqrt(.5)."""

    def __init__(self, cin, tmp, cout, conv_clamp=None, attn=None, ref_eq=8):
        super().__init__()
        self.first = cin == 0
        if self.first:
            self.fromrgb = Conv(3, tmp, 1, conv_clamp=conv_clamp)
        self.conv0 = Conv(tmp, tmp, 3, conv_clamp=conv_clamp, attn=attn, ref_eq=ref_eq)
        self.conv1 = Conv(tmp, cout, 3, down=2, conv_clamp=conv_clamp)
        self.skip = Conv(tmp, cout, 1, act=False, bias=False, down=2)

    def forward(self, x, img=None, ref=None):
        if x is None:
            x = self.fromrgb(img)
        y = self.skip(x, gain=math.sqrt(0.5))
        x = self.conv0(x, ref=ref)
        x = self.conv1(x, gain=math.sqrt(0.5))
        return y + x  # [B, cout, res/2, res/2]


MBSTD_LAYOUTS = ('contiguous', 'strided')


def minibatch_std(x, group_size, num_channels=1, layout='contiguous'):
    """Std of each feature over groups of `group_size` samples, appended as a channel. 'contiguous'
    groups consecutive samples: a rank's slice of a DDP batch then forms the same groups as in a
    single-process run with the same global batch. 'strided' is the official code's grouping (sample
    i joins group i mod N/G): for official networks, whose logits on a given batch it reproduces."""
    N, C, H, W = x.shape
    G = min(group_size, N)
    assert N % G == 0, f'batch {N} must be a multiple of the minibatch-std group {G}'
    shape = (N // G, G) if layout == 'contiguous' else (G, N // G)
    y = x.float().reshape(*shape, num_channels, C // num_channels, H, W)
    member = 1 if layout == 'contiguous' else 0  # the axis over which a group's members lie
    y = (y.var(dim=member, unbiased=False) + 1e-8).sqrt()  # [n, F, c, H, W]
    y = y.mean(dim=[2, 3, 4])  # [n, F]
    y = y.repeat_interleave(G, 0) if layout == 'contiguous' else y.repeat(G, 1)  # [N, F]: each sample's group
    return torch.cat([x, y.reshape(N, num_channels, 1, 1).expand(N, num_channels, H, W).to(x.dtype)], 1)  # [N, C + F, H, W]


class DiscriminatorEpilogue(nn.Module):
    """4x4: minibatch-std, 3x3 conv, FC; then the logit, or with cmap_dim (class-conditional) the
    official projection: (out(x) . cmap) / sqrt(cmap_dim), cmap the embedding of the label."""

    def __init__(self, cin, mbstd_group=4, conv_clamp=None, cmap_dim=0, mbstd_layout='contiguous'):
        super().__init__()
        if mbstd_layout not in MBSTD_LAYOUTS:
            raise ValueError(f'unknown --mbstd-layout {mbstd_layout!r}; choose one of {", ".join(MBSTD_LAYOUTS)}')
        self.mbstd_group, self.mbstd_layout, self.cmap_dim = mbstd_group, mbstd_layout, cmap_dim
        self.conv = Conv(cin + 1, cin, 3, conv_clamp=conv_clamp)
        self.fc = FC(cin * 16, cin, act=True)
        self.out = FC(cin, cmap_dim or 1)

    def forward(self, x, cmap=None):
        x = self.conv(minibatch_std(x, self.mbstd_group, layout=self.mbstd_layout))  # [B, C, 4, 4]
        feat = self.fc(x.flatten(1))  # [B, C]: the "last-layer features" of FDDF (thesis Table 2.2)
        out = self.out(feat)  # [B, 1] or [B, cmap_dim]
        if self.cmap_dim:
            return (out * cmap.to(out.dtype)).sum(1) * (1 / math.sqrt(self.cmap_dim)), feat
        return out.squeeze(1), feat


class Discriminator(nn.Module):
    """Residual StyleGAN2 D. d_attn='self' puts SAN in place of conv0 of block b{d_attn_res};
    d_attn='ref' makes D Siamese: D(primary, reference) runs both images through the shared layers
    above that block, fuses them there by reference-attention (Eq. 2.8), and continues once.
    c_dim > 0: class-conditional, D(img, c=one_hot) with the projection epilogue and an 8-layer label
    mapping (the official D's)."""

    def __init__(self, resolution, channel_base=16384, channel_max=512, mbstd_group=4, conv_clamp=None,
                 d_attn='none', d_attn_res=8, ref_attn_eq=8, c_dim=0, mbstd_layout='contiguous'):
        super().__init__()
        ch = channels_per_res(channel_base, channel_max, resolution)
        self.resolution, self.res_list = resolution, sorted((r for r in ch if r >= 8), reverse=True)
        if d_attn != 'none' and d_attn_res not in self.res_list:
            raise ValueError(f'--d-attn-res {d_attn_res} is not a D resolution; use a power of two in [8, {resolution}]')
        self.needs_ref, self.attn_res, self.c_dim = d_attn == 'ref', d_attn_res, c_dim
        for res in self.res_list:
            attn = {'none': None, 'self': 'self', 'ref': 'ref'}[d_attn] if res == d_attn_res else None
            block = DiscriminatorBlock(ch[res] if res < resolution else 0, ch[res], ch[res // 2],
                                       conv_clamp, attn=attn, ref_eq=ref_attn_eq)
            setattr(self, f'b{res}', block)
        if c_dim:
            self.mapping = MappingNetwork(0, ch[4], None, 8, c_dim, w_avg_beta=None)
        self.b4 = DiscriminatorEpilogue(ch[4], mbstd_group, conv_clamp, ch[4] if c_dim else 0, mbstd_layout)

    def forward(self, img, ref=None, return_features=False, return_maps=False, c=None):
        """img [B, 3, R, R] (and ref [B / n, 3, R, R] when needs_ref: n batches of primaries, e.g.
        [fakes; reals], may share one batch of references; c [B, c_dim] one-hot when conditional) ->
        logits [B] (+ last-layer features [B, C]) (+ {res: block output} for GradCAM, when asked)."""
        B = img.shape[0]
        if self.needs_ref:
            if ref is None or B % ref.shape[0]:
                raise ValueError('this D has reference-attention: call D(img, ref) with a batch of real references '
                                 '(img may hold several batches that share them: [fakes; reals])')
            img = torch.cat([img, ref])  # Siamese: one pass of the shared layers for all
        if self.c_dim and (c is None or c.shape != (B, self.c_dim)):
            raise ValueError(f'this D is class-conditional: call D(img, c=one_hot) with c of shape [{B}, {self.c_dim}]')
        x, maps, dev = None, {}, img.device.type
        for res in self.res_list:
            block = getattr(self, f'b{res}')
            fp32 = res < fp16_resolution(self.resolution)
            with full_precision(fp32, dev):
                x = x.float() if fp32 and x is not None else x
                if self.needs_ref and res == self.attn_res:  # Eq. 2.8: the streams fuse here
                    x = block.fromrgb(img) if x is None else x  # (here: at the top resolution)
                    x = block(x[:B], ref=x[B:].repeat(B // (x.shape[0] - B), 1, 1, 1))
                else:
                    x = block(x, img)
            maps[res // 2] = x
        with full_precision(True, dev):
            logits, feat = self.b4(x.float(), self.mapping(None, c) if self.c_dim else None)
        out = (logits, feat) if return_features else (logits,)
        return (*out, maps) if return_maps else (out[0] if len(out) == 1 else out)


# ==============================================================================================
# SN-DCGAN and SNGAN (Miyato et al., ICLR 2018): the small backbones the papers also report on
# (supplement Table 1: SNGAN; EqGAN-SA Table 2: SN-DCGAN). Spectral normalisation on every D layer,
# batch norm in G; no mapping network, noise inputs, style mixing or truncation. EqGAN-SA's SEL
# (one per heatmap level, on the G features at that resolution), self-attention (an extra residual
# layer on the features at --g-attn-res / --d-attn-res, SAGAN's placement) and GradCAM (on D's last
# features at 4, 8, 16) work on them as on StyleGAN2. Channels at resolution r: min(channel_base / r,
# channel_max), as above (SNGAN: G's at every r, D half of them, Miyato et al. Table 4's 256 / 128).

class _AllReduceSum(torch.autograd.Function):
    """Sum over DDP ranks whose gradient is again the sum over ranks (each rank's loss depends on every
    rank's input through the sum); the identity without DDP."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g)
        return g


class BatchNorm(nn.Module):
    """Batch norm over every dim but 1, whose statistics span the global batch under DDP (like
    SyncBatchNorm, on any backend): N processes train exactly as one. Eval mode: the running stats."""

    def __init__(self, channels, momentum=0.1, eps=1e-5):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))
        self.register_buffer('running_mean', torch.zeros(channels))
        self.register_buffer('running_var', torch.ones(channels))
        self.momentum, self.eps = momentum, eps

    def forward(self, x):  # [B, C, ...]
        shape = [1, -1] + [1] * (x.ndim - 2)
        if not self.training:
            mean, var = self.running_mean, self.running_var
        else:
            xf, dims, n = x.float(), [0] + list(range(2, x.ndim)), x.numel() // x.shape[1]
            sums = torch.stack([xf.sum(dims), xf.square().sum(dims)])  # [2, C]
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                sums, n = _AllReduceSum.apply(sums), n * dist.get_world_size()
            mean = sums[0] / n
            var = (sums[1] / n - mean.square()).clamp_min(0)  # biased, as batch norm normalises with
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / max(n - 1, 1), self.momentum)  # unbiased, as PyTorch's
        y = (x.float() - mean.view(shape)) * (var.view(shape) + self.eps).rsqrt()
        return (y * self.weight.view(shape) + self.bias.view(shape)).to(x.dtype)


class SNLayer(nn.Module):
    """Conv (k >= 1) or linear (k = 0) layer with spectral normalisation (Miyato et al. 2018, Eq. 8):
    W / sigma(W), sigma = u^T W v with u, v from one power iteration per training forward (their
    Algorithm 1), kept as buffers. u and v are constants of the graph; sigma's dependence on W is
    differentiated, as in their gradient (Eq. 12)."""

    def __init__(self, cin, cout, k=0, stride=1, padding=0, bias=True, std=None, gain=1.0):
        super().__init__()
        w = torch.empty((cout, cin, k, k) if k else (cout, cin))
        nn.init.normal_(w, 0, std) if std else nn.init.xavier_uniform_(w, gain)  # DCGAN's N(0, 0.02) / SNGAN's Glorot
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.register_buffer('u', F.normalize(torch.randn(cout), dim=0))
        self.register_buffer('v', F.normalize(torch.randn(w[0].numel()), dim=0))
        self.k, self.stride, self.padding = k, stride, padding

    @torch.compiler.disable  # see forward
    def power_iteration(self, w):  # Algorithm 1: v <- W^T u / |W^T u|, u <- W v / |W v|; returns copies of the new u, v
        with torch.no_grad():
            self.v.copy_(F.normalize(w.t() @ self.u, dim=0))
            self.u.copy_(F.normalize(w @ self.v, dim=0))
        return self.u.clone(), self.v.clone()  # a later forward updates u, v in place before this one's backward

    def forward(self, x):
        w = self.weight.flatten(1)  # [out, in * k * k]
        with torch.autocast(x.device.type, enabled=False):  # power iteration and sigma in fp32 under mixed precision
            # The power iteration runs outside torch.compile's graph: compiled, its in-place update of u
            # became an input the backward recomputed v from, and D's second forward (reals after fakes)
            # changed it before the first one's backward (a RuntimeError at the first step)
            u, v = self.power_iteration(w) if self.training else (self.u, self.v)
            sigma = u @ w @ v
        w = (self.weight / sigma).to(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.conv2d(x, w, b, self.stride, self.padding) if self.k else F.linear(x, w, b)


def _conv(cin, cout, k, gain=SQRT2, bias=False):
    """G's plain convolutions (SNGAN: Glorot-uniform, gain sqrt 2 on residual paths). No bias where batch
    norm follows: it would cancel it, and Adam would amplify its rounding-noise gradient to +-lr steps."""
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)
    nn.init.xavier_uniform_(conv.weight, gain)
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


class _GBlock(nn.Module):
    """SNGAN's G block (Miyato et al. Fig. 8a): BN, ReLU, 2x nearest upsampling, 3x3 conv, BN, ReLU,
    3x3 conv; shortcut: upsampling and a 1x1 conv."""

    def __init__(self, cin, cout):
        super().__init__()
        self.bn0, self.conv0, self.bn1, self.conv1 = BatchNorm(cin), _conv(cin, cout, 3), BatchNorm(cout), _conv(cout, cout, 3)
        self.skip = _conv(cin, cout, 1, gain=1.0)

    def forward(self, x):
        up = lambda t: F.interpolate(t, scale_factor=2, mode='nearest')
        y = self.conv1(F.relu(self.bn1(self.conv0(up(F.relu(self.bn0(x)))))))
        return y + self.skip(up(x))


class _DBlock(nn.Module):
    """SNGAN's D block (Miyato et al. Fig. 8b): [ReLU,] 3x3 conv, ReLU, 3x3 conv, [2x2 average pool];
    shortcut: 1x1 conv and pool when the shape changes. first: the 'optimized' first block (no
    leading ReLU; its shortcut pools before the 1x1 conv)."""

    def __init__(self, cin, cout, down=True, first=False):
        super().__init__()
        self.conv0, self.conv1 = SNLayer(cin, cout, 3, padding=1, gain=SQRT2), SNLayer(cout, cout, 3, padding=1, gain=SQRT2)
        self.skip = SNLayer(cin, cout, 1) if first or down or cin != cout else None
        self.down, self.first = down, first

    def forward(self, x):
        pool = (lambda t: F.avg_pool2d(t, 2)) if self.down else (lambda t: t)
        y = pool(self.conv1(F.relu(self.conv0(x if self.first else F.relu(x)))))
        if self.skip is None:
            return y + x
        return y + (self.skip(pool(x)) if self.first else pool(self.skip(x)))


ADDED_LAYERS = ('plain', 'equalized')


def plain_weights(*modules):
    """The layers the SN backbones gain (EqGAN-SA's heatmap encoders and SELs, attention in G or D) in
    their backbone's parametrization: every equalized-lr weight (stored N(0, 1) and scaled at run time
    by 1/sqrt(fan-in), StyleGAN's form) stored at its effective scale instead, gain 1. The same function
    at initialisation; but Adam steps each parameter by about lr whatever its size, so at the SN lr of
    2e-4 equalized weights of size 1 move ~30x slower, relative to their size, than the backbone's own
    (N(0, 0.02) / Glorot) layers, and in a 500 kimg run barely leave their random start."""
    for m in (m for root in modules if root is not None for m in root.modules()):
        if isinstance(m, Conv) and m.kind is None:
            m.weight.data.mul_(m.weight_gain)
            m.weight_gain = 1.0
        elif isinstance(m, attention.Conv):
            m.weight.data.mul_(m.scale)
            m.scale = 1.0


class SmallGenerator(nn.Module):
    """G of SN-DCGAN (Miyato et al. Table 3a): z -> dense -> 4x4, BN, ReLU; per doubling a 4x4
    stride-2 deconvolution, BN, ReLU; a 3x3 conv to RGB, tanh. SNGAN (Table 4a): z -> dense -> 4x4;
    per doubling a _GBlock; BN, ReLU, 3x3 conv, tanh. G(z) -> images [B, 3, R, R] in [-1, 1]."""

    def __init__(self, arch, resolution, z_dim=128, channel_base=2048, channel_max=512, g_attn='none', g_attn_res=32,
                 sel='none', heatmap='hier', eqgan='paper', added_layers='plain'):
        super().__init__()
        if resolution < 8 or resolution & (resolution - 1):
            raise ValueError(f'--resolution {resolution}: G and D need a power of two >= 8; use e.g. 32 or 64')
        ch = channels_per_res(channel_base, channel_max, resolution)
        if g_attn != 'none' and not (g_attn_res >= 8 and g_attn_res in ch):
            raise ValueError(f'--g-attn-res {g_attn_res} is not a G resolution; use a power of two in [8, {resolution}]')
        self.arch, self.z_dim, self.c_dim, self.img_resolution, self.attn_res = arch, z_dim, 0, resolution, g_attn_res
        self.noise_res, self.num_ws = [], 0  # nothing to mix or to add noise to
        self.spatial = SpatialEncoding(sel, heatmap, resolution, ch, eqgan=eqgan) if sel != 'none' else None
        dcgan = arch == 'sndcgan'
        self.fc = nn.Linear(z_dim + (self.spatial.flat_dim if self.spatial is not None else 0), 16 * ch[4], bias=False)
        nn.init.normal_(self.fc.weight, 0, 0.02) if dcgan else nn.init.xavier_uniform_(self.fc.weight)
        self.bn0 = BatchNorm(16 * ch[4]) if dcgan else None  # Table 3a normalises the dense output per feature
        self.stages = nn.ModuleDict()
        for res in sorted(ch)[1:]:
            if dcgan:
                deconv = nn.ConvTranspose2d(ch[res // 2], ch[res], 4, 2, 1, bias=False)  # BN follows (see _conv)
                nn.init.normal_(deconv.weight, 0, 0.02)
                self.stages[str(res)] = nn.Sequential(deconv, BatchNorm(ch[res]), nn.ReLU())
            else:
                self.stages[str(res)] = _GBlock(ch[res // 2], ch[res])
        self.out = nn.Sequential(*([] if dcgan else [BatchNorm(ch[resolution]), nn.ReLU()]),
                                 _conv(ch[resolution], 3, 3, gain=1.0, bias=True), nn.Tanh())
        if dcgan:
            nn.init.normal_(self.out[0].weight, 0, 0.02)
        if self.spatial is not None and eqgan == 'official':  # the authors' SEL on the features of every resolution
            self.sel = nn.ModuleDict({str(r): self.spatial.sel_official(ch[r], r) for r in sorted(ch)})
        else:
            self.sel = nn.ModuleDict({str(r): self.spatial.sel_layers(r, 1)[0] for r, _, _ in self.spatial.levels}
                                     if self.spatial is not None and sel != 'flatten' else {})
        self.attn = attention.self_attention(g_attn, ch[g_attn_res]) if g_attn != 'none' else None
        if added_layers == 'plain':
            plain_weights(self.spatial, self.sel, self.attn)

    @property
    def uses_heatmaps(self):
        return self.spatial is not None

    def sample_heatmaps(self, batch, device, generator=None):
        return self.spatial.sample(batch, device, generator) if self.spatial is not None else None

    def forward(self, z, heatmaps=None, noise_mode=None):
        """z [B, z_dim] -> [B, 3, R, R]; heatmaps are sampled when G needs them (noise_mode: accepted
        for the common interface; these G have no noise inputs)."""
        if self.spatial is not None and heatmaps is None:
            heatmaps = self.sample_heatmaps(z.shape[0], z.device)
        flat = self.spatial.flat(heatmaps) if self.spatial is not None else None
        x = self.fc(z if flat is None else torch.cat([z, flat * (flat.square().mean(1, keepdim=True) + 1e-8).rsqrt()], 1))
        if self.bn0 is not None:
            x = F.relu(self.bn0(x))
        x = x.view(z.shape[0], -1, 4, 4)  # [B, ch(4), 4, 4]
        hfeats = self.spatial.encode(heatmaps) if self.spatial is not None else {}
        for res in [4] + [int(r) for r in self.stages]:
            if res > 4:
                x = self.stages[str(res)](x)  # [B, ch(res), res, res]
            if str(res) in self.sel:
                x = self.sel[str(res)](x, hfeats[res])
            if self.attn is not None and res == self.attn_res:
                x = self.attn(x)
        return self.out(x)


class SmallDiscriminator(nn.Module):
    """D of SN-DCGAN (Miyato et al. Table 3b): per resolution a 3x3 conv, then a 4x4 stride-2 conv,
    leaky ReLU 0.1 after each, a 3x3 conv at 4x4, a linear head; or of SNGAN (Table 4b): an optimized
    _DBlock, down-sampling _DBlocks to 8x8, two more at 8x8, ReLU, global sum pooling, a linear head.
    Spectral norm on every layer. D(img) -> logits [B] (+ features [B, C]: the pooled last features)
    (+ {res: the last features at res}, for GradCAM)."""

    def __init__(self, arch, resolution, channel_base=2048, channel_max=512, d_attn='none', d_attn_res=8,
                 added_layers='plain'):
        super().__init__()
        ch = channels_per_res(channel_base, channel_max, resolution)
        self.arch, self.needs_ref, self.c_dim, self.attn_res = arch, False, 0, d_attn_res
        self.stages = nn.ModuleDict()
        lrelu = nn.LeakyReLU(0.1)
        if arch == 'sndcgan':
            for res in sorted(ch, reverse=True):
                conv = lambda cin, cout, k, s: SNLayer(cin, cout, k, s, padding=1, std=0.02)
                self.stages[str(res)] = nn.Sequential(conv(3, ch[res], 3, 1), lrelu) if res == resolution else \
                    nn.Sequential(conv(ch[2 * res], ch[2 * res], 4, 2), lrelu, conv(ch[2 * res], ch[res], 3, 1), lrelu)
            self.head = SNLayer(16 * ch[4], 1, std=0.02)
        else:
            ch = {r: c // 2 for r, c in ch.items()}
            for res in [r for r in sorted(ch, reverse=True) if 8 <= r < resolution]:
                blocks = [_DBlock(3, ch[res], first=True)] if res == resolution // 2 else [_DBlock(ch[2 * res], ch[res])]
                blocks += [_DBlock(ch[8], ch[8], down=False) for _ in range(2)] if res == 8 else []
                self.stages[str(res)] = nn.Sequential(*blocks)
            self.head = SNLayer(ch[8], 1)
        if d_attn not in ('none', 'self'):
            raise ValueError(f'--d-attn {d_attn} needs --arch stylegan2 (a Siamese D); use --d-attn self or none')
        if d_attn == 'self' and str(d_attn_res) not in self.stages:
            raise ValueError(f'--d-attn-res {d_attn_res} is not a D resolution of --arch {arch}; use one of '
                             f'{", ".join(self.stages)}')
        self.attn = attention.SAN(ch[d_attn_res]) if d_attn == 'self' else None
        if added_layers == 'plain':
            plain_weights(self.attn)

    def forward(self, img, ref=None, return_features=False, return_maps=False, c=None):
        if ref is not None or c is not None:
            raise ValueError(f'--arch {self.arch} has neither reference-attention nor class labels')
        x, maps = img, {}
        for res, stage in self.stages.items():
            x = stage(x)
            if self.attn is not None and int(res) == self.attn_res:
                x = self.attn(x)
            maps[int(res)] = x
        if self.arch == 'sndcgan':
            feat, logits = x.mean([2, 3]), self.head(x.flatten(1))
        else:
            feat = F.relu(x).sum([2, 3])  # [B, C]
            logits = self.head(feat)
        out = (logits.squeeze(1), feat) if return_features else (logits.squeeze(1),)
        return (*out, maps) if return_maps else (out[0] if len(out) == 1 else out)


# ----------------------------------------------------------------------------------------------
# Augmentation of every image D sees: ADA (Karras et al., "Training Generative Adversarial Networks
# with Limited Data", NeurIPS 2020; its 'bgc' pipeline) and DiffAugment (Zhao et al., "Differentiable
# Augmentation for Data-Efficient GAN Training", NeurIPS 2020). Reals and fakes go through the same
# random transforms, all differentiable, so G learns through them and D's outputs on augmented images
# do not leak the augmentation into G's images (ADA Sec. 2). The parameters are drawn for a whole
# batch first (ada_params / diffaug_params: train.py draws them for the global batch from the step's
# generator and gives each process its slice), then applied (augment).

AUG_KINDS = ('none', 'ada', 'fixed', 'diffaug')
# 'bgc': blit (xflip, rotate90, xint), geometric (scale, rotate, aniso, xfrac), colour; each transform
# applies to an image with probability p x its multiplier. Ranges: the official defaults (ADA Appendix B).
ADA_BGC = dict(xflip=1, rotate90=1, xint=1, scale=1, rotate=1, aniso=1, xfrac=1,
               brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)
ADA_XINT_MAX, ADA_SCALE_STD, ADA_ROTATE_MAX, ADA_ANISO_STD, ADA_XFRAC_STD = 0.125, 0.2, 1.0, 0.2, 0.125
ADA_BRIGHTNESS_STD, ADA_CONTRAST_STD, ADA_HUE_MAX, ADA_SATURATION_STD = 0.2, 0.5, 1.0, 1.0
DIFFAUG_POLICIES = ('color', 'translation', 'cutout')


def _affine(a, b, c, d, e, f):  # [n] tensors -> [n, 3, 3] matrices [[a, b, c], [d, e, f], [0, 0, 1]]
    o = torch.zeros_like(a)
    return torch.stack([a, b, c, d, e, f, o, o, o + 1], -1).view(-1, 3, 3)


def _translate(tx, ty):
    return _affine(torch.ones_like(tx), 0 * tx, tx, 0 * tx, torch.ones_like(tx), ty)


def _scale(sx, sy):
    return _affine(sx, 0 * sx, 0 * sx, 0 * sx, sy, 0 * sx)


def _rotate(cos, sin):  # counter-clockwise in (x right, y down) pixel coordinates: clockwise on screen
    return _affine(cos, -sin, 0 * cos, sin, cos, 0 * cos)


def ada_params(gen, n, p, size, which=ADA_BGC, device='cpu'):
    """Random parameters of the 'bgc' pipeline for n images of size (H, W) at strength p (a float or a
    0-dim tensor; ADA's p lives on the device): {'geom': [n, 3, 3] inverse geometric transforms (output
    -> input) in grid_sample's normalised coordinates, 'color': [n, 4, 4] colour transforms (homogeneous
    RGB), 'geom_on', 'color_on': [n] bool, False where the transform is the identity}. Every value is
    drawn whatever p and `which` (probability multipliers, 0 turns a transform off): the draws, and so
    the rest of the step's random numbers, do not depend on them."""
    H, W = size
    uni = lambda *s: torch.rand([n, *s], generator=gen, device=device)
    nrm = lambda *s: torch.randn([n, *s], generator=gen, device=device)
    p = torch.as_tensor(p, dtype=torch.float32, device=device)
    gate = lambda prob: uni() < prob  # [n] bool: this transform applies to this image
    eye3, eye4 = torch.eye(3, device=device), torch.eye(4, device=device)
    M, geom_on = eye3.expand(n, 3, 3), torch.zeros(n, dtype=torch.bool, device=device)

    def then(T, on):  # M <- M @ T where on: the inverses compose output -> input, in the official order
        nonlocal M, geom_on
        M, geom_on = torch.where(on[:, None, None], M @ T, M), geom_on | on
    # pixel blitting: exact on the pixel grid (test_all checks them against index arithmetic)
    i = torch.floor(uni() * 2)
    then(_scale(1 - 2 * i, torch.ones_like(i)), gate(which['xflip'] * p) & (i > 0))
    i = torch.floor(uni() * 4).long()
    quarter = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], device=device)[i]  # exact cos, sin of i x 90°
    then(_rotate(quarter[:, 0], quarter[:, 1]), gate(which['rotate90'] * p) & (i > 0))
    t = torch.round((uni(2) * 2 - 1) * ADA_XINT_MAX * torch.tensor([W, H], device=device))  # [n, 2] whole pixels
    then(_translate(-t[:, 0], -t[:, 1]), gate(which['xint'] * p))
    # general geometric transforms; the rotation is split in two (before and after the anisotropic scaling),
    # each with probability 1 - sqrt(1 - p) so that one of them applies with probability p (as the official code)
    s = torch.exp2(nrm() * ADA_SCALE_STD)
    then(_scale(1 / s, 1 / s), gate(which['scale'] * p))
    p_rot = 1 - torch.sqrt((1 - which['rotate'] * p).clamp(0, 1))
    theta = (uni() * 2 - 1) * math.pi * ADA_ROTATE_MAX
    then(_rotate(torch.cos(theta), torch.sin(theta)), gate(p_rot))
    s = torch.exp2(nrm() * ADA_ANISO_STD)
    then(_scale(1 / s, s), gate(which['aniso'] * p))
    theta = (uni() * 2 - 1) * math.pi * ADA_ROTATE_MAX
    then(_rotate(torch.cos(theta), torch.sin(theta)), gate(p_rot))
    t = nrm(2) * ADA_XFRAC_STD * torch.tensor([W, H], device=device)
    then(_translate(-t[:, 0], -t[:, 1]), gate(which['xfrac'] * p))
    # pixel units (origin at the image centre) -> grid_sample's [-1, 1]: conjugate by diag(2 / W, 2 / H)
    S = torch.diag(torch.tensor([2 / W, 2 / H, 1.0], device=device))
    geom = S @ M @ torch.linalg.inv(S)

    # colour: C maps homogeneous RGB [r, g, b, 1] (in [-1, 1]) to the output colour; each step left-multiplies
    C, color_on = eye4.expand(n, 4, 4), torch.zeros(n, dtype=torch.bool, device=device)

    def first(T, on):  # C <- T @ C where on
        nonlocal C, color_on
        C, color_on = torch.where(on[:, None, None], T @ C, C), color_on | on
    v = torch.tensor([1.0, 1.0, 1.0, 0.0], device=device) / math.sqrt(3)  # the luma axis
    vv = torch.outer(v, v)
    b = nrm() * ADA_BRIGHTNESS_STD
    bright = eye4.repeat(n, 1, 1)
    bright[:, :3, 3] = b[:, None]  # adds b to r, g and b
    first(bright, gate(which['brightness'] * p))
    c = torch.exp2(nrm() * ADA_CONTRAST_STD)
    first(torch.diag_embed(torch.stack([c, c, c, torch.ones_like(c)], -1)), gate(which['contrast'] * p))
    i = torch.floor(uni() * 2)
    first(eye4 - 2 * vv * i[:, None, None], gate(which['lumaflip'] * p) & (i > 0))  # Householder reflection
    theta = (uni() * 2 - 1) * math.pi * ADA_HUE_MAX
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    cross = torch.tensor([[0.0, -1, 1, 0], [1, 0, -1, 0], [-1, 1, 0, 0], [0, 0, 0, 0]], device=device) / math.sqrt(3)  # [v]_x
    hue = vv + (eye4 - vv) * cos + cross * sin  # Rodrigues: rotation by theta about v (the 4th row/column stay)
    hue[:, 3, 3] = 1
    first(hue, gate(which['hue'] * p))
    s = torch.exp2(nrm() * ADA_SATURATION_STD)[:, None, None]
    first(vv + (eye4 - vv) * s, gate(which['saturation'] * p))
    return dict(geom=geom, color=C, geom_on=geom_on, color_on=color_on)


def _symmetric_pad(x, k):  # mirror with the edge pixel repeated (d c b a | a b c d ...), as grid_sample's 'reflection'
    x = torch.cat([x[..., :k, :].flip(-2), x, x[..., -k:, :].flip(-2)], -2)
    return torch.cat([x[..., :k].flip(-1), x, x[..., -k:].flip(-1)], -1)


# The down-sampling partner of the [1, 3, 3, 1] up-sampling filter: with [-1, 3, 3, -1] / 4 after it,
# down(up(x)) = x exactly (the pair is biorthogonal), so an identity, a flip, a quarter turn or a whole-
# pixel shift passes through the 2x resampling unchanged, while other transforms are sampled at 2x and
# low-passed back (the official code's non-leaking design uses the orthogonal sym6 wavelet for both).
def _down_filter():
    f = torch.tensor([-1.0, 3.0, 3.0, -1.0]) / 4
    return torch.outer(f, f)  # [4, 4], sums to 1


def warp(x, geom):
    """x [n, C, h, w] resampled through the inverse transforms geom [n, 3, 3] (normalised coordinates,
    output -> input): mirror-padded, 2x up-sampled with the [1, 3, 3, 1] FIR, bilinear grid_sample
    (mirroring outside the image), then 2x down-sampled with its biorthogonal partner -> [n, C, h, w].
    The normalised matrices work at any resolution: images and EqGAN-SA heatmaps share them."""
    n, C, h, w = x.shape
    big = upsample2d(_symmetric_pad(x, 2), fir_filter().to(x))[..., 4:-4, 4:-4]  # [n, C, 2h, 2w]
    # the 2x grid's pixel centres in [-1, 1], with one more ring for the down-sampling filter
    ys = (torch.arange(-1, 2 * h + 1, device=x.device, dtype=x.dtype) + 0.5) / h - 1
    xs = (torch.arange(-1, 2 * w + 1, device=x.device, dtype=x.dtype) + 0.5) / w - 1
    yy, xx = torch.meshgrid(ys, xs, indexing='ij')
    pts = torch.stack([xx, yy, torch.ones_like(xx)]).view(3, -1)  # [3, P]
    grid = (geom[:, :2].to(x.dtype) @ pts).view(n, 2, 2 * h + 2, 2 * w + 2).permute(0, 2, 3, 1)  # [n, 2h+2, 2w+2, 2]
    big = F.grid_sample(big, grid, mode='bilinear', padding_mode='reflection', align_corners=False)
    return F.conv2d(big, _down_filter().to(x).expand(C, 1, 4, 4), stride=2, groups=C)  # [n, C, h, w]


def warp_maps(maps, prm):
    """EqGAN-SA heatmaps {level: [n, k, r, r]} (any r) moved by the geometric part of the augmentation
    parameters prm (ADA's composed transform, DiffAugment's translation): GradCAM on an augmented image
    (Eq. 4) then finds its objects where the target says. Colour transforms and cutout move nothing; entries
    that are not maps (the authors' sampler's centres and widths) stay as they are."""
    if 'geom' not in prm:
        return maps
    on = prm['geom_on'][:, None, None, None]
    move = lambda v: torch.where(on, warp(v.float(), prm['geom']), v.float()).to(v.dtype)
    return {k: move(v) if v.ndim == 4 else v for k, v in maps.items()}


def diffaug_params(gen, n, policies, size, device='cpu'):
    """DiffAugment's random parameters for n images of size (H, W), in the order of `policies` (Zhao et
    al.'s ranges): color: brightness + U(-0.5, 0.5), saturation x U(0, 2), contrast x U(0.5, 1.5);
    translation: whole pixels in [-s, s], s = 1/8 of the size (rounded); cutout: a square of half the size
    (rounded) at a uniform centre, clipped by the borders."""
    H, W = size
    uni = lambda *s: torch.rand([n, *s], generator=gen, device=device)
    prm = {}
    for policy in policies:
        if policy == 'color':
            prm.update(brightness=uni() - 0.5, saturation=uni() * 2, contrast=uni() + 0.5)
        elif policy == 'translation':
            sy, sx = int(H * 0.125 + 0.5), int(W * 0.125 + 0.5)
            prm['shift'] = torch.stack([torch.randint(-sy, sy + 1, [n], generator=gen, device=device),
                                        torch.randint(-sx, sx + 1, [n], generator=gen, device=device)], 1)  # [n, 2] (y, x)
            t = prm['shift'].float() * torch.tensor([2 / H, 2 / W], device=device)  # out(u) = in(u + t): as a matrix,
            prm.update(geom=_translate(t[:, 1], t[:, 0]), geom_on=(prm['shift'] != 0).any(1))  # for warp_maps
        elif policy == 'cutout':
            cy, cx = int(H * 0.5 + 0.5), int(W * 0.5 + 0.5)
            centre = torch.stack([torch.randint(0, H + (1 - cy % 2), [n], generator=gen, device=device),
                                  torch.randint(0, W + (1 - cx % 2), [n], generator=gen, device=device)], 1)
            prm['cutout'] = centre - torch.tensor([cy // 2, cx // 2], device=device)  # [n, 2] top-left corner (y, x)
        else:
            raise ValueError(f'unknown DiffAugment policy {policy!r}; choose from {", ".join(DIFFAUG_POLICIES)}')
    return dict(prm, policies=tuple(policies))


def augment(x, prm):
    """Images x [n, 3, H, W] in [-1, 1] through the transforms of ada_params or diffaug_params (this
    process's n images), in fp32 (or fp64) whatever the autocast."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.double() if x.dtype == torch.float64 else x.float()
        if 'color' in prm:  # ADA: one resampling for the composed geometric transform, then one colour matrix
            x = torch.where(prm['geom_on'][:, None, None, None], warp(x, prm['geom']), x)
            C = prm['color'].to(x.dtype)
            y = torch.einsum('nij,njhw->nihw', C[:, :3, :3], x) + C[:, :3, 3, None, None]
            return torch.where(prm['color_on'][:, None, None, None], y, x)
        n, _, H, W = x.shape
        for policy in prm['policies']:  # DiffAugment, in the order of its policies
            if policy == 'color':
                x = x + prm['brightness'][:, None, None, None]
                mean = x.mean(1, keepdim=True)
                x = (x - mean) * prm['saturation'][:, None, None, None] + mean
                mean = x.mean([1, 2, 3], keepdim=True)
                x = (x - mean) * prm['contrast'][:, None, None, None] + mean
            elif policy == 'translation':  # out[i, j] = x[i + ty, j + tx], zero outside
                iy = torch.arange(H, device=x.device) + prm['shift'][:, :1]  # [n, H]
                ix = torch.arange(W, device=x.device) + prm['shift'][:, 1:]  # [n, W]
                inside = ((iy >= 0) & (iy < H))[:, None, :, None] & ((ix >= 0) & (ix < W))[:, None, None, :]
                rows = torch.arange(n, device=x.device)[:, None, None]
                x = x[rows, :, iy.clamp(0, H - 1)[:, :, None], ix.clamp(0, W - 1)[:, None, :]]  # [n, H, W, C]
                x = x.permute(0, 3, 1, 2) * inside
            else:  # cutout: zero a square
                y0, x0 = prm['cutout'][:, 0, None], prm['cutout'][:, 1, None]  # [n, 1]
                iy, ix = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
                cy, cx = int(H * 0.5 + 0.5), int(W * 0.5 + 0.5)
                hole = ((iy >= y0) & (iy < y0 + cy))[:, None, :, None] & ((ix >= x0) & (ix < x0 + cx))[:, None, None, :]
                x = x * ~hole
        return x


# ----------------------------------------------------------------------------------------------
# Building networks from the training flags, and loading checkpoints written by train.py

ARCH_KEYS = ('arch', 'resolution', 'z_dim', 'w_dim', 'channel_base', 'channel_max', 'map_layers', 'mbstd_group',
             'conv_clamp', 'g_attn', 'g_attn_res', 'd_attn', 'd_attn_res', 'ref_attn_eq', 'sel', 'heatmap', 'c_dim',
             'mbstd_layout', 'sel_placement', 'eqgan', 'added_layers')
# keys older checkpoints lack, with what those checkpoints were (eqgan: before the authors' networks were added)
ARCH_DEFAULTS = dict(arch='stylegan2', c_dim=0, mbstd_layout='contiguous', sel_placement='paper', eqgan='paper',
                     added_layers='equalized')
ARCHS = ('stylegan2', 'sndcgan', 'sngan')


def build_networks(a):
    """(G, D) from a dict holding ARCH_KEYS (train.py's flags, or a checkpoint's 'args')."""
    a = {**ARCH_DEFAULTS, **a}
    if a['arch'] != 'stylegan2':
        if a['arch'] not in ARCHS:
            raise ValueError(f'unknown --arch {a["arch"]!r}; choose one of {", ".join(ARCHS)}')
        return (SmallGenerator(a['arch'], a['resolution'], a['z_dim'], a['channel_base'], a['channel_max'], a['g_attn'],
                               a['g_attn_res'], a['sel'], a['heatmap'], a['eqgan'], a['added_layers']),
                SmallDiscriminator(a['arch'], a['resolution'], a['channel_base'], a['channel_max'], a['d_attn'], a['d_attn_res'],
                                   a['added_layers']))
    G = Generator(a['resolution'], a['z_dim'], a['w_dim'], a['channel_base'], a['channel_max'], a['map_layers'],
                  a['conv_clamp'], a['g_attn'], a['g_attn_res'], a['sel'], a['heatmap'], a['c_dim'], a['sel_placement'],
                  a['eqgan'])
    D = Discriminator(a['resolution'], a['channel_base'], a['channel_max'], a['mbstd_group'], a['conv_clamp'],
                      a['d_attn'], a['d_attn_res'], a['ref_attn_eq'], a['c_dim'], a['mbstd_layout'])
    return G, D


def load_weights(net, state, assign=False):
    """net.load_state_dict(state), also for checkpoints of earlier versions, which did not store the
    resampling filters (then the fixed [1, 3, 3, 1] FIR, which the new buffers start as). assign: net
    is on the meta device and takes state's tensors themselves (no second copy in memory)."""
    own = net.state_dict()
    state = {**{k: fir_filter() for k in own if k.endswith('resample_filter') and k not in state}, **state}
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise RuntimeError(f'missing {missing[:3]}, unexpected {unexpected[:3]}')
    net.load_state_dict(state, assign=assign)


def read_checkpoint(path, device='cpu'):
    """The raw dict of a train.py checkpoint (weights_only: no pickled code), or of an official network
    pickle (read_network_pickle: none of its code runs); ValueError in one line for an unreadable file
    or one written by something else."""
    if os.path.isfile(path) and not zipfile.is_zipfile(path):  # torch.save writes zips; a pickle starts with PROTO
        with open(path, 'rb') as f:
            if f.read(1) == b'\x80':
                return read_network_pickle(path)
    elif os.path.isfile(path):
        verify_zip(path)
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise ValueError(f'no checkpoint at {path}; give a ckpt-*.pt written by train.py') from None
    except Exception as e:  # torch's own text would suggest weights_only=False: not for a corrupt file
        raise ValueError(f'cannot read checkpoint {path} ({type(e).__name__}): a partial or corrupt file; '
                         f'train.py: delete it to resume from the one before') from None
    if not isinstance(ckpt, dict) or 'args' not in ckpt or 'G_ema' not in ckpt:
        raise ValueError(f'{path} is not a checkpoint of this project; pass a ckpt-*.pt written by train.py')
    return ckpt


def verify_zip(path):
    """torch.load does not check the CRC-32 of each member of a checkpoint's zip: flipped bytes inside a
    tensor load silently (and a resume then fails on something else). Read every member against its
    CRC once; ValueError in one line naming the file when one fails."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # the first member whose CRC does not match, or None
    except Exception as e:  # a damaged directory or header: BadZipFile, EOFError, zlib.error, ...
        bad = f'its zip structure is damaged: {type(e).__name__}: {" ".join(str(e).split())[:80]}'
    else:
        bad = bad and f'{bad} fails its CRC-32 check'
    if bad:
        raise ValueError(f'checkpoint {path} is corrupt ({bad}): a damaged copy; use an earlier checkpoint '
                         f'(train.py --resume auto falls back to one by itself)')


def load_checkpoint(path, device='cpu'):
    """{'G', 'D', 'G_ema', 'args', 'step', 'nimg'} from a train.py checkpoint, networks rebuilt from its args."""
    ckpt = read_checkpoint(path, device)
    out = dict(args=ckpt['args'], step=ckpt['step'], nimg=ckpt['nimg'])
    with torch.device('meta'):  # the networks take the checkpoint's tensors: one copy in memory, not two
        G, D = build_networks(ckpt['args'])
    for key, net in [('G', G), ('D', D), ('G_ema', copy.deepcopy(G))]:
        try:
            load_weights(net, ckpt[key], assign=True)
        except (KeyError, RuntimeError) as e:  # missing / unexpected / misshapen tensors
            raise ValueError(f'{path}: its {key} does not fit the networks its args describe '
                             f'({" ".join(str(e).split())[:200]}); a checkpoint of another version of this code?') from None
        out[key] = net.to(device).eval().requires_grad_(False)
    return out


# ----------------------------------------------------------------------------------------------
# Official stylegan2-ada-pytorch network pickles (network-snapshot-*.pkl and the released models),
# read without executing anything in them. Their modules are "persistent" pickles that carry their
# own source code, which pickle.load (and the official legacy.load_network_pkl) runs: anyone who hands
# you such a file runs code on your machine. Here the unpickler resolves an explicit allow-list only:
# tensor and storage rebuilds (each storage is a nested torch.save, read with weights_only=True),
# OrderedDict, numpy scalars, and the persistence reconstructor, mapped to a function that returns
# the pickled module state as plain data; the EqGAN-SA authors' snapshots (their code is
# stylegan2-ada-pytorch's with SEL layers) also hold three standard torch.nn modules inside each SEL,
# InstanceNorm2d, Sequential and LeakyReLU, read the same way (their state as data, no torch class
# built). Every other global is refused. (The TF-era pickles that legacy.py converts are another
# format, not read here.)

def _numpy_dtype(code, align=False, copy=True):  # numpy.dtype('f8', ...): plain kinds only
    if not re.fullmatch(r'[<>|=]?[fiub][1248]', str(code)):
        raise pickle.UnpicklingError(f'numpy dtype {code!r} is not a plain number type')
    return _DType(code)


class _DType:  # the dtype's pickled state carries its byte order
    def __init__(self, code):
        self.code, self.order = code, '='

    def __setstate__(self, state):
        self.order = state[1]


def _numpy_scalar(dtype, data):  # numpy.core.multiarray.scalar(dtype, bytes) -> a Python number
    return np.frombuffer(data, np.dtype(dtype.code).newbyteorder(dtype.order))[0].item()


def _storage(data):  # torch.storage._load_from_bytes: one storage, saved by the legacy torch.save
    return torch.load(io.BytesIO(data), weights_only=True)


class _PlainModule(dict):
    """A pickled standard torch.nn module (NEWOBJ with no arguments, then its __dict__ as state) as the
    same plain data the persistence reconstructor gives: {'class_name', 'state'}."""
    class_name = None

    def __setstate__(self, state):
        self.update(class_name=self.class_name, state=state)


_TORCH_MODULES = {('torch.nn.modules.instancenorm', 'InstanceNorm2d'), ('torch.nn.modules.container', 'Sequential'),
                  ('torch.nn.modules.activation', 'LeakyReLU')}  # those the EqGAN-SA snapshots hold


class _SafeUnpickler(pickle.Unpickler):
    ALLOWED = {('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
               ('torch._utils', '_rebuild_parameter'): lambda data, requires_grad, hooks: data,
               ('torch.storage', '_load_from_bytes'): _storage,
               ('collections', 'OrderedDict'): collections.OrderedDict,
               ('torch_utils.persistence', '_reconstruct_persistent_obj'): lambda meta: meta,  # {'class_name', 'state', ...}
               ('numpy', 'dtype'): _numpy_dtype,
               ('numpy.core.multiarray', 'scalar'): _numpy_scalar, ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
               ('dnnlib.util', 'EasyDict'): dict,
               **{key: type(key[1], (_PlainModule,), dict(class_name=key[1])) for key in _TORCH_MODULES}}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f'it refers to {module}.{name}, which is not on the allow-list of a network '
                                         f'snapshot (tensors, storages, OrderedDict, numpy scalars, persistent modules, '
                                         f'InstanceNorm2d / Sequential / LeakyReLU)')
        return self.ALLOWED[(module, name)]


def _flatten(meta, prefix='', tensors=None, modules=None):
    """A persistent module's pickled state -> ({name: tensor}, {path: (class name, attributes)})."""
    tensors, modules = {} if tensors is None else tensors, {} if modules is None else modules
    if not (isinstance(meta, dict) and isinstance(meta.get('state'), dict) and '_modules' in meta['state']):
        raise ValueError(f'{prefix.rstrip(".") or "a network"} is not a pickled PyTorch module')
    st = meta['state']
    modules[prefix.rstrip('.')] = (meta.get('class_name'), {k: v for k, v in st.items() if not k.startswith('_') or k == '_init_kwargs'})
    for k, v in [*st['_parameters'].items(), *st['_buffers'].items()]:
        if v is not None:
            tensors[prefix + k] = v
    for k, v in st['_modules'].items():
        _flatten(v, f'{prefix}{k}.', tensors, modules)
    return tensors, modules


def _official_args(gm, dm, path):
    """Our architecture flags for an official G and D (their {path: (class, attributes)}), or
    ValueError naming what this code cannot represent."""
    def need(ok, what):
        if not ok:
            raise ValueError(f'{path}: {what}; this code represents StyleGAN2 networks (a skip G and a residual D, '
                             f'as stylegan2-ada-pytorch trains them, and with SEL as the EqGAN-SA authors\' code does)')
    (gcls, g), (dcls, d) = gm[''], dm['']
    need((gcls, dcls) == ('Generator', 'Discriminator'), f'its networks are a {gcls} and a {dcls}')
    need(gm.get('synthesis', ('',))[0] == 'SynthesisNetwork' and 'block_resolutions' in gm['synthesis'][1],
         "its synthesis network is not StyleGAN2's (StyleGAN3's has no blocks)")
    need(g.get('img_channels') == 3 and d.get('img_channels') == 3, f'its images have {g.get("img_channels")} channels, not 3')
    for net, cls, want in ((gm, 'SynthesisBlock', 'skip'), (dm, 'DiscriminatorBlock', 'resnet')):
        kinds = sorted({str(a.get('architecture')) for c, a in net.values() if c == cls})
        need(kinds == [want], f"its {'G' if net is gm else 'D'} architecture is {', '.join(kinds)}, not '{want}'")
    acts = sorted({str(a['activation']) for c, a in [*gm.values(), *dm.values()] if 'activation' in a})
    need(set(acts) <= {'lrelu', 'linear'}, f'it uses the activations {", ".join(acts)}, not leaky ReLU')
    need(all(a.get('use_noise') for c, a in gm.values() if c == 'SynthesisLayer'), 'its synthesis layers have no noise inputs')
    mapping = gm['mapping'][1]
    need(mapping.get('w_avg_beta') == 0.995, f'its w_avg decay is {mapping.get("w_avg_beta")}, not 0.995')
    need(all(a.get('bias_gain') == 0.01 for p, (c, a) in gm.items() if p.startswith('mapping.fc')),
         'its mapping network has another learning-rate multiplier than 0.01')
    c_dim, mbstd = g['c_dim'], dm['b4.mbstd'][1]
    need(d.get('c_dim') == c_dim, f'its G has {c_dim} classes, its D {d.get("c_dim")}')
    need(mbstd.get('num_channels') == 1 and isinstance(mbstd.get('group_size'), int),
         f'its minibatch-std layer has group {mbstd.get("group_size")} and {mbstd.get("num_channels")} channels (not an int and 1)')
    gk, dk = g.get('_init_kwargs', {}), d.get('_init_kwargs', {})
    syn = gk.get('synthesis_kwargs', {})
    base, cmax = syn.get('channel_base', 32768), syn.get('channel_max', 512)  # the official defaults
    need((dk.get('channel_base', 32768), dk.get('channel_max', 512)) == (base, cmax),
         f'its D has channel_base / max {dk.get("channel_base", 32768)} / {dk.get("channel_max", 512)}, G {base} / {cmax}')
    if c_dim:
        need(dm['mapping'][1].get('num_layers') == 8 and dm['b4'][1].get('cmap_dim') == min(base // 4, cmax),
             "its D's label mapping is not the default one (8 layers to channels(4))")
    eqgan = _eqgan_args(gm, g, need)
    heat = lambda p: '.sel.' in p or p.startswith('synthesis.hm_conv')  # EqGAN-SA: never clamped (checked there)
    clamps = {a.get('conv_clamp') for p, (c, a) in [*gm.items(), *dm.items()] if not heat(p) and (
              c in ('SynthesisLayer', 'ToRGBLayer') or c == 'Conv2dLayer' and a.get('activation') == 'lrelu')}
    need(len(clamps) == 1, f'its layers clamp at several values ({clamps})')
    return dict(ARCH_DEFAULTS, arch='stylegan2', resolution=g['img_resolution'], z_dim=g['z_dim'], w_dim=g['w_dim'],
                channel_base=base, channel_max=cmax, map_layers=mapping['num_layers'], mbstd_group=mbstd['group_size'],
                conv_clamp=clamps.pop(), g_attn='none', g_attn_res=32, d_attn='none', d_attn_res=8, ref_attn_eq=8,
                **{'sel': 'none', 'heatmap': 'hier', **eqgan}, c_dim=c_dim, mbstd_layout='strided')


def _eqgan_args(gm, g, need):
    """{} for a stylegan2-ada G; for an EqGAN-SA authors' G (use_sel, heatmap encoders) our flags of
    their networks (sel norm, heatmap official, eqgan official), after checking what SELOfficial and
    the encoders assume of every SEL: their InstanceNorm (eps 1e-5, no affine, no running stats), lrelu
    slopes, no clamping, the 64 hidden channels (the tensors' shapes check the rest when they load)."""
    encoders = sorted(p for p in gm if p.startswith('synthesis.hm_conv'))
    use_sel = g.get('_init_kwargs', {}).get('use_sel')
    if not encoders and not use_sel:
        return {}
    need(use_sel, "its G has the EqGAN-SA heatmap encoders but use_sel False (the authors' code cannot run it either)")
    layers = [p for p, (c, a) in gm.items() if c in ('SynthesisLayer', 'ToRGBLayer')]
    need(all(gm.get(f'{p}.sel', ('',))[0] == 'SEL' for p in layers), 'some of its synthesis layers have no SEL')
    for p in [p for p, (c, a) in gm.items() if c == 'SEL']:
        inorm, lrelu = gm[f'{p}.inorm_fn'], gm[f'{p}.output.0']
        need(inorm[0] == 'InstanceNorm2d' and inorm[1].get('eps') == 1e-5 and not inorm[1].get('affine')
             and not inorm[1].get('track_running_stats'), f'{p} normalises otherwise ({inorm[1]})')
        need(lrelu[0] == 'LeakyReLU' and lrelu[1].get('negative_slope') == 0.2, f'{p}.output.0 is not a leaky ReLU 0.2')
        acts = [gm[f'{p}.{q}'][1].get('activation') for q in ('shared.0', 'sigma', 'mu', 'output.1')]
        need(acts == ['lrelu', 'linear', 'linear', 'linear'], f'{p} has the activations {acts}')
    need(all(a.get('conv_clamp') is None for p, (c, a) in gm.items() if c == 'Conv2dLayer'),
         'its SEL or heatmap-encoder convolutions clamp')
    return dict(sel='norm', heatmap='official', eqgan='official')


def read_network_pickle(path):
    """An official stylegan2-ada-pytorch snapshot (or an EqGAN-SA one, written by the authors' code:
    --eqgan official) -> a checkpoint dict like train.py's: 'args' (our flags, read from the pickled
    modules; 'strided' minibatch-std, the official grouping), 'G', 'D', 'G_ema' (state dicts in our
    names: the official ones, the heatmap encoders under 'spatial.'), step and nimg 0. ValueError in one line for a pickle that
    refers to anything off the allow-list, or whose networks this code cannot represent."""
    try:
        with open(path, 'rb') as f:
            snap = _SafeUnpickler(f).load()
    except FileNotFoundError:
        raise ValueError(f'no network pickle at {path}') from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f'refused to read {path}: {e}; nothing in it was run') from None
    if not (isinstance(snap, dict) and all(k in snap for k in ('G', 'D', 'G_ema'))):
        raise ValueError(f'{path} is not a stylegan2-ada network snapshot (a dict with G, D and G_ema)')
    nets = {k: _flatten(snap[k]) for k in ('G', 'D', 'G_ema')}
    args = _official_args(nets['G'][1], nets['D'][1], path)
    with torch.device('meta'):  # only the names and shapes: no memory
        G, D = build_networks(args)
    out = dict(args=args, step=0, nimg=0, official=True)
    ours_name = lambda k: 'spatial.' + k[len('synthesis.'):] if k.startswith('synthesis.hm_conv') else k  # EqGAN-SA encoders
    for key, ours in (('G', G), ('D', D), ('G_ema', G)):
        tensors, modules = ({ours_name(k): v for k, v in d.items()} for d in nets[key])
        out[key] = _official_state(tensors, modules, ours.state_dict(), f'{path}: {key}')
    return out


def _official_state(tensors, modules, own, where):
    """The official tensors as a state dict of ours (the names are the official ones), checked both
    ways: every tensor of ours is present with its shape, and the only official tensors left over are
    the filters of layers that do not resample (the official code never reads them)."""
    unused = [k for k in tensors.keys() - own.keys() if k.endswith('.resample_filter') or k == 'resample_filter']
    for k in unused:
        owner = k.rsplit('.', 1)[0] if '.' in k else ''
        cls, attrs = modules[owner]
        if attrs.get('up', 1) != 1 or attrs.get('down', 1) != 1 or (cls == 'SynthesisBlock' and attrs.get('in_channels')):
            raise ValueError(f'{where}: {k} resamples in the official network but not in ours')
    extra, missing = sorted(tensors.keys() - own.keys() - set(unused)), sorted(own.keys() - tensors.keys())
    shape = sorted(k for k in own.keys() & tensors.keys() if tuple(own[k].shape) != tuple(tensors[k].shape))
    if extra or missing or shape:
        raise ValueError(f'{where} does not map onto this code\'s network: unknown tensors {extra[:3]}, missing {missing[:3]}, '
                         f'other shapes {[(k, tuple(tensors[k].shape), tuple(own[k].shape)) for k in shape[:2]]}')
    return {k: tensors[k].detach().float().contiguous() for k in own}


# ----------------------------------------------------------------------------------------------
# EqGAN-SA: hierarchical heatmaps and spatial encoding layers (Wang et al., CVPR 2022, Sec. 3.1, 4.1)
#
# Two readings, chosen by --eqgan (an architecture flag):
# 'official' (the default with --sel norm): the networks of the authors' code (genforce/eqgan-sa), which
#   produced the paper's tables; their pickles load into it (read_network_pickle). Heatmaps at the full
#   image resolution R, one channel per centre: {'b8': [B, 1, R, R], 'b16': [B, 2, R, R], 'b32': [B, 4, R, R]}
#   (their names: level l feeds the G block at half that resolution), exp(-d^2 / sigma) + 0.01 on a
#   [-1, 1] grid with the pixel centres at the ends; each level encoded by two 3x3 convs (1/2/4 -> 16
#   -> 32, lrelu, the second with gain sqrt(0.5)); features at resolution r use level b{2r}, from 32 px
#   up the 96-channel concatenation of all three; a SELOfficial on the input of every synthesis layer
#   and toRGB (SN backbones: on the features of every resolution).
# 'paper' (the paper's text; checkpoints written before --eqgan existed are this): one map per level at
#   its own resolution, 'h4' / 'h8' / 'h16': [B, 1, r, r], the level's Gaussians summed (Eq. 2; levels
#   above the G resolution dropped); one shared 3x3 conv per level; SELNorm / SELConcat at 4-16 px.
# Either way the dict also holds 'centers' [B, K, 2] ((x, y) in [0, 1] image units, x to the right, y
# down; K = 1 + 2 (+ 4)) and, from samplers with random widths ('official'), 'widths' [B, K] (each
# blob's standard deviation in image units); 'noise' heatmaps have only the maps. The sampler (--heatmap)
# is independent of the reading: each renders its centres in the network's format.

SEL_KINDS = ('none', 'norm', 'concat', 'flatten')
SEL_PLACEMENTS = ('paper', 'official')
EQGAN_MODES = ('official', 'paper')
HEATMAP_KINDS = ('hier', 'nonhier', 'noise', 'official')
HEAT_LEVELS = ((4, 1), (8, 2), (16, 4))  # (resolution, number of Gaussian centres), Sec. 4.1
# The paper only says the spread shrinks level by level; we take one cell of each level's own grid
# (1/4, 1/8, 1/16 of the image): one blob covers the 4x4 map, finer blobs mark smaller parts.
HEAT_SIGMAS = (1 / 4, 1 / 8, 1 / 16)
HEAT_HIDDEN = 32  # channels of the shared heatmap encoder (SPADE's mlp_shared, made lighter)
OFFICIAL_KEYS = ('b8', 'b16', 'b32')  # the authors' names of the three levels
OFFICIAL_FEAT = 32  # channels of the authors' per-level heatmap features (96 concatenated)
# The authors' sampler, in their [-1, 1] units: level-0 centre N(0, 0.33^2) clamped to +-0.75, sigma
# (U + 1) / 2 for the whole batch; finer centres = level-0 centre + U(-a, a) (a = 0.4, 0.8), sigma
# (U + 0.1) / 1.4 and (U + 0.1) / 2 per centre; maps exp(-d^2 / sigma) (+ 0.01 in their format).
OFFICIAL_OFFSETS, OFFICIAL_WIDTH_DIV = (0.0, 0.4, 0.8), (None, 1.4, 2.0)


def truncated_normal(u, mean, std, lo=0.0, hi=1.0):
    """N(mean, std^2) restricted to [lo, hi] from u ~ U(0, 1) by the inverse CDF: the exact law of
    "re-draw while outside the image" (Sec. 4.1), vectorised, one uniform per draw."""
    cdf = lambda t: 0.5 * (1 + math.erf((t - mean) / (std * SQRT2)))
    p = cdf(lo) + u * (cdf(hi) - cdf(lo))
    return (mean + std * torch.special.ndtri(p)).clamp(lo, hi)


def instance_norm(x, eps=1e-5):
    """(x - mean) / sqrt(var + eps) per sample and channel over the pixels (biased variance, as
    nn.InstanceNorm2d without affine): [B, C, H, W]."""
    return (x - x.mean([2, 3], keepdim=True)) * (x.var([2, 3], keepdim=True, unbiased=False) + eps).rsqrt()


def conv_pair(a, b, x):
    """Two 1-output-channel Convs without activation on the same input, as one 2-channel conv (a
    1-channel conv costs as much as a 2-channel one); both outputs in fp32, [B, r, r] each."""
    weight = torch.cat([a.weight, b.weight]) * a.weight_gain  # [2, cin, k, k]
    bias = torch.cat([a.bias, b.bias]).view(1, 2, 1, 1)
    return (F.conv2d(x, weight.to(x.dtype), padding=a.weight.shape[-1] // 2) + bias).float().unbind(1)


class SELNorm(nn.Module):
    """Eq. 3: SEL_norm(F, H) = phi_sigma(H) (F - mu(F)) / sigma(F) + phi_mu(H), with a residual
    (Fig. 4): out = F + alpha * SEL_norm(F, H). mu, sigma: per-sample, per-channel (instance norm);
    phi_sigma = 1 + conv3x3(h), phi_mu = conv3x3(h): one-channel (h, w, 1) maps from the shared
    encoding h of the heatmap (SPADE-style; "1 +" as in SPADE and the authors' code). alpha is a
    per-channel gain starting at 0 (ReZero): at init the layer is exactly the identity, so G starts as
    the StyleGAN2 baseline, and alpha gets gradients at once. The authors' code instead adds
    0.1 * conv3x3(lrelu(.)), a C x C conv per SEL (+2.4M parameters per SEL at 512 channels)."""

    def __init__(self, channels, hidden=HEAT_HIDDEN):
        super().__init__()
        self.gamma = Conv(hidden, 1, 3, act=False)
        self.beta = Conv(hidden, 1, 3, act=False)
        self.alpha = nn.Parameter(torch.zeros(channels))

    def forward(self, x, h):  # x [B, C, r, r], h [B, hidden, r, r]
        xf = x.float()  # statistics in fp32 under mixed precision
        x_hat = instance_norm(xf)
        gamma, beta = conv_pair(self.gamma, self.beta, h)
        y = (1 + gamma[:, None]) * x_hat + beta[:, None]  # Eq. 3, [B, C, r, r]
        return x + (self.alpha.view(1, -1, 1, 1) * y).to(x.dtype)


class SELConcat(nn.Module):
    """SEL_concat: out = F + alpha * lrelu(conv1x1([F, h])), h the encoded heatmap concatenated to the
    features; alpha per channel, starting at 0 (identity at init). 1x1 rather than 3x3: h already has
    a 3x3 receptive field, and a 3x3 conv over C + hidden channels would cost as much as a synthesis conv."""

    def __init__(self, channels, hidden=HEAT_HIDDEN):
        super().__init__()
        self.conv = Conv(channels + hidden, channels, 1)
        self.alpha = nn.Parameter(torch.zeros(channels))

    def forward(self, x, h):  # x [B, C, r, r], h [B, hidden, r, r]
        y = self.conv(torch.cat([x, h.to(x.dtype)], 1))  # [B, C, r, r]
        return x + self.alpha.to(x.dtype).view(1, -1, 1, 1) * y


def resize_corners(h, size):
    """Bilinear resize of square maps [..., R, R] to [..., size, size] with align_corners=True, as two
    matmuls with the [size, R] interpolation matrix (the separable form of F.interpolate's; on CPUs its
    kernel is ~10x slower for NCHW tensors), h itself when the size already matches."""
    R = h.shape[-1]
    if size == R:
        return h
    pos = torch.linspace(0, R - 1, size, device=h.device, dtype=torch.float64)  # source coordinate per output pixel
    i0 = pos.floor().clamp(max=R - 2)
    frac = (pos - i0).to(h.dtype)[:, None]  # [size, 1]
    left = torch.arange(R, device=h.device) - i0.long()[:, None]  # [size, R]: 0 at the left neighbour, 1 at the right
    A = (left == 0) * (1 - frac) + (left == 1) * frac  # [size, R]
    return A @ h @ A.T


class SELOfficial(nn.Module):
    """The authors' SEL (their SEL class; Eq. 3 with their residual): the heatmap features h resized
    bilinearly (align_corners=True) to the input's size, f = lrelu(conv3x3_{->64}(h)), then
    out = x + 0.1 * conv3x3_{CxC}(lrelu_0.2(IN(x) * (1 + sigma(f)) + mu(f))), sigma and mu one-channel
    3x3 convs. Not the identity at initialisation (0.1 is their "empirical parameter for stability").
    Tensor names as theirs (shared.0, sigma, mu, output.1), so their snapshots load as they are."""

    def __init__(self, channels, feat_channels, hidden=64):
        super().__init__()
        self.shared = nn.Sequential(Conv(feat_channels, hidden, 3))
        self.sigma = Conv(hidden, 1, 3, act=False)
        self.mu = Conv(hidden, 1, 3, act=False)
        self.output = nn.Sequential(nn.LeakyReLU(0.2), Conv(channels, channels, 3, act=False))

    def forward(self, x, h):  # x [B, C, r, r], h [B, 32 or 96, R, R]
        h = resize_corners(h.to(x.dtype), x.shape[-1])  # [B, 32|96, r, r]
        f = self.shared(h)  # [B, 64, r, r]
        sigma, mu = conv_pair(self.sigma, self.mu, f)
        y = instance_norm(x.float()) * (1 + sigma[:, None]) + mu[:, None]  # Eq. 3, in fp32
        return x + 0.1 * self.output(y.to(x.dtype))


class SpatialEncoding(nn.Module):
    """Heatmap sampling (Sec. 3.1 Eq. 2, Sec. 4.1) and the heatmap encoders of G.

    heatmap='hier' (the paper's text): level-0 centre ~ N((1/2, 1/2), (1/3)^2) re-drawn while outside
      the image (exactly, by truncated_normal); level-1/2 centres ~ N(level-0 centre, (1/6)^2), left
      untruncated (the paper only re-draws level 0; a finer blob may lie partly outside the image);
      widths HEAT_SIGMAS;
    'nonhier' (Table 3 "Non-Hie"): every centre drawn independently like level 0;
    'official' (the authors' generate_heatmap_multi; see OFFICIAL_OFFSETS): their centres and random widths;
    'noise' (Table 3 "Gau. Noise"): N(0, 1) maps, no centres.
    eqgan='paper': each level's map H = sum_i exp(-|p - c_i|^2 / (2 s_i^2)) (Eq. 2 with peak 1 instead
    of the density's normalisation) on the level's pixel centres p = (j + 0.5) / r; sel='norm' /
    'concat': SELs in the G blocks at 4, 8, 16 (the levels; Sec. 4.1 encodes only these), one after
    conv0 (or the const) and one after conv1; sel='flatten' (Table 4): no SEL, the flattened maps join
    z at the mapping network's input. eqgan='official': see the section's head (SEL_norm only)."""

    def __init__(self, sel, heatmap, resolution, channels, hidden=HEAT_HIDDEN, eqgan='paper'):
        super().__init__()
        if sel not in SEL_KINDS[1:]:
            raise ValueError(f'unknown --sel {sel!r}; choose one of {", ".join(SEL_KINDS)}')
        if heatmap not in HEATMAP_KINDS:
            raise ValueError(f'unknown --heatmap {heatmap!r}; choose one of {", ".join(HEATMAP_KINDS)}')
        if eqgan not in EQGAN_MODES:
            raise ValueError(f'unknown --eqgan {eqgan!r}; choose one of {", ".join(EQGAN_MODES)}')
        if eqgan == 'official' and sel != 'norm':
            raise ValueError(f"--sel {sel}: the authors' code has SEL_norm only; use --sel norm, or --eqgan paper "
                             f"for the paper's SEL_concat / flatten")
        self.sel, self.mode, self.hidden, self.channels, self.eqgan = sel, heatmap, hidden, dict(channels), eqgan
        self.resolution = resolution
        # the authors' code encodes all three levels whatever the resolution; the paper's drops those above it
        self.levels = [(r, n, s) for (r, n), s in zip(HEAT_LEVELS, HEAT_SIGMAS) if r <= resolution or eqgan == 'official']
        self.num_centers = sum(n for _, n, _ in self.levels)
        self.flat_dim = sum(r * r for r, _, _ in self.levels) if sel == 'flatten' else 0
        if eqgan == 'official':  # their hm_conv0_bX / hm_conv1_bX (under 'synthesis.' in their pickles)
            for key, (_, n, _) in zip(OFFICIAL_KEYS, self.levels):
                setattr(self, f'hm_conv0_{key}', Conv(n, OFFICIAL_FEAT // 2, 3))
                setattr(self, f'hm_conv1_{key}', Conv(OFFICIAL_FEAT // 2, OFFICIAL_FEAT, 3))
        elif sel in ('norm', 'concat'):  # shared per level: computed once per forward, used by both SELs
            self.enc = nn.ModuleDict({str(r): Conv(1, hidden, 3) for r, _, _ in self.levels})

    def sample(self, batch, device, generator=None):
        """A batch of heatmaps in this network's format (see the section's head), all from `generator`."""
        if self.mode == 'noise':
            if self.eqgan == 'official':
                R = self.resolution
                return {k: torch.randn([batch, n, R, R], generator=generator, device=device)
                        for k, (_, n, _) in zip(OFFICIAL_KEYS, self.levels)}
            return {f'h{r}': torch.randn([batch, 1, r, r], generator=generator, device=device) for r, _, _ in self.levels}
        if self.mode == 'official':
            return self.render(*self.sample_official(batch, device, generator))
        u = torch.rand([batch, self.num_centers, 2], generator=generator, device=device)
        n = torch.randn([batch, self.num_centers, 2], generator=generator, device=device)  # drawn in every mode
        c0 = truncated_normal(u[:, :1], 0.5, 1 / 3)  # [B, 1, 2], Sec. 4.1: mean (h/2, w/2), std (h/3, w/3)
        if self.mode == 'hier':
            rest = c0 + n[:, 1:] / 6  # [B, K-1, 2]: mean c0, std (h/6, w/6)
        else:
            rest = truncated_normal(u[:, 1:], 0.5, 1 / 3)
        return self.render(torch.cat([c0, rest], 1))

    def sample_official(self, batch, device, generator=None):
        """The authors' sampler (OFFICIAL_OFFSETS), converted to our units: centres [B, K, 2] in [0, 1]
        (theirs c in [-1, 1]: (c + 1) / 2) and widths [B, K] (their exp(-d^2 / sigma) in [-1, 1] units
        is exp(-d'^2 / (2 s^2)) in [0, 1] units with s = sqrt(sigma / 8)). Draw order: level-0 centre,
        its sigma, then per finer level the offsets and the sigmas."""
        draw = lambda *shape, normal=False: (torch.randn if normal else torch.rand)(shape, generator=generator, device=device)
        c0 = (draw(batch, 1, 2, normal=True) * 0.33).clamp(-0.75, 0.75)  # [B, 1, 2]
        sigmas = [((draw(1) + 1) / 2).expand(batch, 1)]  # [B, 1]: one width for the whole batch
        centers = [c0]
        for (_, n, _), a, div in list(zip(self.levels, OFFICIAL_OFFSETS, OFFICIAL_WIDTH_DIV))[1:]:
            centers.append(c0 + (draw(batch, n, 2) - 0.5) * (2 * a))  # [B, n, 2]: U(-a, a) around c0
            sigmas.append((draw(batch, n) + 0.1) / div)  # [B, n]
        return (torch.cat(centers, 1) + 1) / 2, (torch.cat(sigmas, 1) / 8).sqrt()

    def render(self, centers, widths=None):
        """The heatmap dict for given centres [B, K, 2] (x, y in [0, 1]; level 0 is centres[:, :1],
        level 1 centres[:, 1:3], level 2 centres[:, 3:7]) and widths [B, K] (default HEAT_SIGMAS)."""
        if self.mode == 'noise':
            raise ValueError("--heatmap noise has no centres to render or move; use --heatmap hier, nonhier or official")
        if centers.ndim != 3 or centers.shape[1:] != (self.num_centers, 2):
            raise ValueError(f'centers must be [B, {self.num_centers}, 2] (x, y in [0, 1]); got {list(centers.shape)}')
        out, i = {'centers': centers}, 0
        if widths is not None:
            out['widths'] = widths
        for key, (r, n, s) in zip(OFFICIAL_KEYS, self.levels):
            c = centers[:, i:i + n].float()  # [B, n, 2]
            s = s if widths is None else widths[:, i:i + n, None].float()  # a float or [B, n, 1]
            if self.eqgan == 'official':  # full resolution, the pixel centres at 0 and 1, one channel per centre
                grid = torch.linspace(0, 1, self.resolution, device=c.device)  # [R]
            else:
                grid = (torch.arange(r, device=c.device, dtype=torch.float32) + 0.5) / r  # [r] pixel centres
            gx = torch.exp(-(grid - c[..., 0:1]).square() / (2 * s * s))  # [B, n, r] along x (columns)
            gy = torch.exp(-(grid - c[..., 1:2]).square() / (2 * s * s))  # [B, n, r] along y (rows)
            maps = gy.unsqueeze(3) * gx.unsqueeze(2)  # [B, n, r, r]
            if self.eqgan == 'official':
                out[key] = maps + 0.01  # the authors' floor
            else:
                out[f'h{r}'] = maps.sum(1, keepdim=True)  # Eq. 2: H = sum_i H_i, [B, 1, r, r]
            i += n
        return out

    def shift(self, centers, dx, dy, level=0):
        """Centres with those of `level` moved by (dx, dy) (image units); moving level 0 of hierarchical
        heatmaps moves the finer centres with it (they were drawn around it, Sec. 4.1). dx, dy: floats
        or [B] tensors (e.g. target - centers[:, 0, 0] to place level 0 at a given point)."""
        starts = np.cumsum([0] + [n for _, n, _ in self.levels])
        lo, hi = starts[level], (starts[-1] if level == 0 and self.mode in ('hier', 'official') else starts[level + 1])
        d = torch.stack(torch.broadcast_tensors(*[torch.as_tensor(v, dtype=centers.dtype, device=centers.device)
                                                  for v in (dx, dy)]), -1)  # [2] or [B, 2]
        out = centers.clone()
        out[:, lo:hi] += d.view(-1, 1, 2)
        return out

    def flat(self, heatmaps):
        """'flatten' (Table 4): the maps as one vector [B, flat_dim] for the mapping network, else None."""
        if self.sel != 'flatten':
            return None
        return torch.cat([heatmaps[f'h{r}'].flatten(1) for r, _, _ in self.levels], 1)

    def encode(self, heatmaps):
        """'paper': {res: h [B, hidden, res, res]}, the shared 3x3 conv + lrelu of phi_sigma / phi_mu
        (SPADE). 'official': {res: features [B, 32 or 96, R, R]} for every feature resolution 4..R:
        level b{2 res}'s two-conv encoding, the concatenation of all three from 32 px up."""
        if self.sel == 'flatten':
            return {}
        if self.eqgan == 'paper':
            return {r: self.enc[str(r)](heatmaps[f'h{r}']) for r, _, _ in self.levels}
        R, feats = self.resolution, {}
        for key, (_, n, _) in zip(OFFICIAL_KEYS, self.levels):
            h = heatmaps.get(key)
            if h is None or h.ndim != 4 or tuple(h.shape[1:]) != (n, R, R):
                got = 'none' if h is None else list(h.shape)
                raise ValueError(f"--eqgan official heatmaps are {{'b8': [B, 1, {R}, {R}], 'b16': [B, 2, {R}, {R}], "
                                 f"'b32': [B, 4, {R}, {R}]}} (full resolution); {key!r} is {got}")
            feats[key] = getattr(self, f'hm_conv1_{key}')(getattr(self, f'hm_conv0_{key}')(h), gain=math.sqrt(0.5))
        cat = torch.cat([feats[k] for k in OFFICIAL_KEYS], 1)  # [B, 96, R, R]
        return {r: feats.get(f'b{2 * r}', cat) for r in [2 ** i for i in range(2, int(math.log2(R)) + 1)]}

    def sel_layers(self, res, n):
        """n new SELs for features at resolution res (a heatmap level), or None (--eqgan paper)."""
        if self.sel == 'flatten' or res not in [r for r, _, _ in self.levels]:
            return None
        kind = SELNorm if self.sel == 'norm' else SELConcat
        return nn.ModuleList([kind(self.channels[res], self.hidden) for _ in range(n)])

    def sel_official(self, channels, res):
        """A new SELOfficial for a layer of the G block at res (its features: 32 channels up to 16 px, then 96)."""
        return SELOfficial(channels, OFFICIAL_FEAT * (3 if res > 16 else 1))


# ----------------------------------------------------------------------------------------------
# Command line: parameter counts, samples, heatmap editing (EqGAN-SA Fig. 5), attention maps (Fig. 2.5)

def count_flops(net, *inputs):
    """FLOPs (2 x multiply-accumulates of conv/matmul ops, torch's FlopCounterMode) of one forward."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        net(*inputs)
    return fc.get_total_flops()


@torch.enable_grad()  # FlopCounterMode follows modules through autograd (model.py's command line runs without it)
def complexity_table(resolution=256, channel_base=16384):
    """Parameters and GFLOPs (per image) of G and D for the baseline and each attention option."""
    base = dict(resolution=resolution, z_dim=512, w_dim=512, channel_base=channel_base, channel_max=512, map_layers=8,
                mbstd_group=4, conv_clamp=None, g_attn='none', g_attn_res=min(32, resolution), d_attn='none', d_attn_res=8,
                ref_attn_eq=8, sel='none', heatmap='hier')
    rows = [('StyleGAN2', {})] + [(f'+ {k.upper()} in G', dict(g_attn=k)) for k in ('san', 'sagan', 'dfn', 'vt')] + \
           [('+ self-attn in D', dict(d_attn='self')), ('+ ref-attn in D', dict(d_attn='ref')), ('+ SEL_norm', dict(sel='norm')),
            ("+ SEL_norm, authors'", dict(sel='norm', heatmap='official', eqgan='official'))]
    out = []
    for name, kw in rows:
        torch.manual_seed(0)
        G, D = build_networks({**base, **kw})
        G.eval()
        z, img = torch.randn(1, 512), torch.randn(1, 3, resolution, resolution)
        d_in = (img, img) if D.needs_ref else (img,)
        n = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
        out.append((name, n(G), n(D), count_flops(G, z) / 1e9, count_flops(D, *d_in) / 1e9))
    return out


def parse_seeds(s):  # argument types: argparse names the flag and the value in its one-line error
    """'0-3,7' -> [0, 1, 2, 3, 7]"""
    ok = re.fullmatch(r'\d+(-\d+)?(,\d+(-\d+)?)*', s)
    seeds = [i for part in s.split(',') for i in range(int(part.split('-')[0]), int(part.split('-')[-1]) + 1)] if ok else []
    if not seeds:
        raise argparse.ArgumentTypeError(f"{s!r} names no seeds; write e.g. '0-15' or '1,5,9'")
    return seeds


def parse_xy(s, inside=False):
    """'x,y' -> (x, y); inside: both in [0, 1] (a point of the image)"""
    number = r' *[-+]?(\d+\.?\d*|\.\d+) *'
    xy = tuple(float(v) for v in s.split(',')) if re.fullmatch(f'{number},{number}', s) else ()
    if not xy or inside and not all(0 <= v <= 1 for v in xy):
        raise argparse.ArgumentTypeError(f"{s!r} is not 'x,y' (two numbers{', in [0, 1]' if inside else ''})")
    return xy


def to_uint8(img):
    return (img * 127.5 + 128).clamp(0, 255).to(torch.uint8).cpu()


def attention_maps(G, z, points, heatmaps=None, c=None):
    """Thesis Fig. 2.5: for each image and point (x, y in [0, 1]), the norm over channels of SAN's
    per-position weight kernel w (s x s), drawn as a red overlay around the point. [N, 3, R, R]."""
    san = [m for m in G.modules() if isinstance(m, attention.SAN)]
    if not san:
        raise ValueError('this generator has no SAN layer: train with --g-attn san to draw attention maps')
    seen = {}
    hook = san[0].register_forward_hook(lambda m, inp, out: seen.update(w=m.forward(inp[0], return_weights=True)[1]))
    img = G(z, noise_mode='const', heatmaps=heatmaps, c=c)
    hook.remove()
    w = seen['w'].float()  # [N, groups, s*s, h, w]
    N, _, ss, h, wd = w.shape
    s, R = int(math.isqrt(ss)), img.shape[-1]
    out = to_uint8(img).float()
    for x, y in points:
        i, j = min(int(y * h), h - 1), min(int(x * wd), wd - 1)
        m = w[:, :, :, i, j].norm(dim=1).view(N, 1, s, s)  # norm over channel groups per offset
        m = m / m.amax(dim=[2, 3], keepdim=True).clamp_min(1e-8)
        p = s // 2  # the s x s map centred on (i, j) of an h x wd canvas: zero padding, negative = cropping
        canvas = F.pad(m, [j - p, wd - 1 - j - p, i - p, h - 1 - i - p])
        a = F.interpolate(canvas, size=(R, R), mode='bilinear', align_corners=False)
        out = out * (1 - 0.6 * a) + 0.6 * a * torch.tensor([255.0, 0, 0]).view(1, 3, 1, 1)
        py, px = min(int(y * R), R - 1), min(int(x * R), R - 1)
        out[:, :, max(py - 1, 0):py + 2, max(px - 1, 0):px + 2] = torch.tensor([0.0, 255, 0]).view(1, 3, 1, 1)
    return out.clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# Tools for a trained generator: one batched sampling path (grids, image folders, videos, figures),
# projection of an image into W (StyleGAN2 paper Sec. 5, the recipe of stylegan2-ada-pytorch's
# projector), latent walks in Z or W, style mixing, truncation sweeps, heatmap walks. The SN backbones
# (SmallGenerator) have no W: they sample, walk in Z and walk heatmaps; the W tools say so.

def seed_latents(G, seeds, device):
    """z [N, z_dim] and heatmaps (None when G takes none) of each seed: one seed, one image, in every command."""
    z = torch.stack([torch.randn(G.z_dim, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)
    if not G.uses_heatmaps:
        return z, None
    hs = [G.sample_heatmaps(1, device, torch.Generator(device).manual_seed(s)) for s in seeds]
    return z, {k: torch.cat([h[k] for h in hs]) for k in hs[0]}


def sample(G, z=None, ws=None, heatmaps=None, c=None, psi=1.0, cutoff=None, noise=None, batch=32, progress=None):
    """The one sampling path of every tool: uint8 images, one [b, 3, R, R] chunk of `batch` at a time (a
    folder of 50k never sits in memory), from z [N, z_dim] (mapped, truncated by psi on the first `cutoff`
    ws) or from ws [N, num_ws, w_dim] (synthesised as given), with heatmaps {key: [N, ...]} and labels
    c [N, c_dim]. Constant noise (or `noise`, a list of [1, 1, r, r]): an image is a function of its
    latents alone. progress(done, N) after each chunk."""
    n = (z if ws is None else ws).shape[0]
    for i in range(0, n, batch):
        h = None if heatmaps is None else {k: v[i:i + batch] for k, v in heatmaps.items()}
        if ws is not None:
            img = G.synthesize(ws[i:i + batch], noise_mode='const', heatmaps=h, noise=noise)
        elif isinstance(G, Generator):
            img = G(z[i:i + batch], psi=psi, cutoff=cutoff, noise_mode='const', heatmaps=h,
                    c=None if c is None else c[i:i + batch])
        else:
            img = G(z[i:i + batch], heatmaps=h)
        if progress:
            progress(min(i + batch, n), n)
        yield to_uint8(img)


def need_w(G, what):
    if not isinstance(G, Generator):
        raise ValueError(f'{what} needs a W space (a mapping network); an --arch {G.arch} generator has only Z')


def save_latents(path, ws, heatmaps=None):
    """ws [N, num_ws, w_dim] as 'w' (the official projector's key) and, for EqGAN-SA generators, the
    heatmaps they were drawn with, in an .npz (numbers only: np.load needs no pickle to read it)."""
    import data  # the command line's helpers: atomic_write
    arrays = {'w': ws.detach().cpu().numpy(), **{f'heatmap_{k}': v.cpu().numpy() for k, v in (heatmaps or {}).items()}}
    data.atomic_write(path, lambda f: np.savez(f, **arrays))


def load_latents(path, G, device):
    """(ws [N, num_ws, w_dim], heatmaps or None) from an .npz of --project (or the official projector's
    projected_w.npz), checked against G. allow_pickle=False: nothing in the file is run."""
    need_w(G, f'--w {path}')
    try:
        with np.load(path, allow_pickle=False) as f:  # an .npy (one array) is no context manager: TypeError
            arrays = {k: f[k] for k in f.files}  # arrays are read here: an object (pickled) array raises ValueError
    except FileNotFoundError:
        raise ValueError(f'no latent file at {path}; write one with --project') from None
    except (ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f'cannot read {path} as an .npz of numbers ({type(e).__name__}); give a file written by '
                         f'--project (pickled objects are refused, never loaded)') from None
    if 'w' not in arrays:
        raise ValueError(f"{path} holds no 'w' array; give an .npz written by --project")
    w, want = arrays.pop('w'), (G.num_ws, G.w_dim)
    if w.ndim != 3 or w.shape[1:] != want or w.dtype.kind != 'f' or not np.isfinite(w).all():
        raise ValueError(f'{path} holds w of shape {list(w.shape)} ({w.dtype}); this network takes finite [N, {want[0]}, {want[1]}]: '
                         f'a latent of another network?')
    heat = {k[len('heatmap_'):]: torch.from_numpy(v).to(device) for k, v in arrays.items() if k.startswith('heatmap_')}
    own = G.sample_heatmaps(1, device)
    if (own is None) != (not heat) or own and any(k not in heat or heat[k].shape[1:] != own[k].shape[1:] for k in own):
        raise ValueError(f'{path} was projected with {"no" if not heat else "other"} heatmaps; this network '
                         f'{"takes none" if own is None else "takes its own (EqGAN-SA)"}: a latent of another network?')
    return torch.from_numpy(w).float().to(device), ({k: v.float() for k, v in heat.items()} if heat else None)


def slerp(a, b, t):
    """Spherical interpolation from a [N, D] (t = 0) to b [N, D] (t = 1, both exactly) by t [N, 1]."""
    omega = F.cosine_similarity(a, b, dim=-1).clamp(-1, 1).acos().unsqueeze(-1)  # [N, 1]
    so = omega.sin()
    arc = ((1 - t) * omega).sin() / so * a + (t * omega).sin() / so * b
    return torch.where(so < 1e-6, a.lerp(b, t), arc)  # (anti)parallel: no plane to turn in


def walk(k, frames, loop):
    """A walk through k keyframes, `frames` per step: (from [T], to [T], t [T]); T = (k - 1) frames + 1,
    or k frames with loop (back to the first, whose frame is then not repeated)."""
    pairs = [(i, i + 1) for i in range(k - 1)] + ([(k - 1, 0)] if loop else [])
    steps = [(i, j, f / frames) for i, j in pairs for f in range(frames)] + ([] if loop else [(k - 2, k - 1, 1.0)])
    i, j, t = zip(*steps)
    return torch.tensor(i), torch.tensor(j), torch.tensor(t)


def mix_heatmaps(G, h, i, j, t):
    """Heatmaps between h[i] and h[j] [T]: the centres move (re-rendered); noise maps (no centres) cross-fade."""
    if h is None:
        return None
    if 'centers' in h:
        return G.spatial.render(h['centers'][i].lerp(h['centers'][j], t.view(-1, 1, 1)))
    return {k: v[i].lerp(v[j], t.view(-1, 1, 1, 1)) for k, v in h.items()}


def interpolate(G, z=None, ws=None, heatmaps=None, c=None, psi=1.0, cutoff=None, frames=30, loop=False, batch=32):
    """Frames uint8 [T, 3, R, R] of a walk through the sources in order: seeds' z [K, z_dim] by slerp in Z
    (truncation after the mapping, per frame), or ws [K, num_ws, w_dim] by lerp in W."""
    k = (z if ws is None else ws).shape[0]
    if k < 2:
        raise ValueError('an interpolation needs at least two sources (--seeds 0,1 or two --w files)')
    i, j, t = walk(k, frames, loop)
    h, cc = mix_heatmaps(G, heatmaps, i, j, t), None if c is None else c[i]
    if ws is None:
        return torch.cat(list(sample(G, z=slerp(z[i], z[j], t[:, None].to(z)), heatmaps=h, c=cc, psi=psi, cutoff=cutoff, batch=batch)))
    return torch.cat(list(sample(G, ws=ws[i].lerp(ws[j], t.view(-1, 1, 1).to(ws)), heatmaps=h, batch=batch)))


def style_mix(row_ws, col_ws, layers):
    """Style-mixing figure (StyleGAN Fig. 3): cell (r, k) takes the ws of row r with `layers` (indices)
    from column k. [R, L, C], [K, L, C] -> [R * K, L, C], row-major."""
    ws = row_ws.unsqueeze(1).repeat(1, col_ws.shape[0], 1, 1)  # [R, K, L, C]
    ws[:, :, layers] = col_ws[:, layers].unsqueeze(0)
    return ws.flatten(0, 1)


def heatmap_walk(G, z, heatmaps, c=None, psi=1.0, cutoff=None, frames=30, radius=0.3, batch=32):
    """EqGAN-SA: frames [T, 3, R, N R] of N seeds side by side while their level-0 heatmap centre circles the
    image centre (the finer centres follow it in 'hier' heatmaps), one turn in T frames."""
    if not G.uses_heatmaps:
        raise ValueError('this generator has no heatmap input: train with --sel norm for a heatmap walk')
    if 'centers' not in heatmaps:
        raise ValueError('--heatmap noise has no centres to move; a heatmap walk needs --heatmap hier or nonhier')
    n, angle = z.shape[0], torch.arange(frames, device=z.device) * (2 * math.pi / frames)
    x, y = (0.5 + radius * angle.cos()).repeat_interleave(n), (0.5 + radius * angle.sin()).repeat_interleave(n)  # [T N]
    centers = heatmaps['centers'].repeat(frames, 1, 1)  # [T N, K, 2]
    widths = heatmaps['widths'].repeat(frames, 1) if 'widths' in heatmaps else None  # [T N, K]: the authors' sampler
    h = G.spatial.render(G.spatial.shift(centers, x - centers[:, 0, 0], y - centers[:, 0, 1]), widths)
    imgs = torch.cat(list(sample(G, z=z.repeat(frames, 1), heatmaps=h, c=None if c is None else c.repeat(frames, 1),
                                 psi=psi, cutoff=cutoff, batch=batch)))  # [T N, 3, R, R]
    return imgs.view(frames, n, *imgs.shape[1:]).permute(0, 2, 3, 1, 4).flatten(3)  # [T, 3, R, N R]


def write_video(frames, path, fps=30, zoom=1):
    """uint8 frames [T, 3, H, W] -> an animated GIF (Pillow; loops forever) or, for .mp4, H.264 through
    imageio-ffmpeg when it is installed. Written to a temporary file, then renamed."""
    frames = frames.repeat_interleave(zoom, 2).repeat_interleave(zoom, 3).permute(0, 2, 3, 1).contiguous().numpy()  # [T, H, W, 3]
    root, ext = os.path.splitext(path)
    tmp = f'{root}.tmp{ext}'
    if ext.lower() == '.mp4':
        try:
            import imageio_ffmpeg
        except ImportError:
            raise ValueError(f'writing {path} needs imageio-ffmpeg: pip install imageio-ffmpeg (or write a .gif)') from None
        writer = imageio_ffmpeg.write_frames(tmp, (frames.shape[2], frames.shape[1]), fps=fps, macro_block_size=1)
        writer.send(None)  # starts ffmpeg
        for frame in frames:
            writer.send(frame)
        writer.close()
    else:
        from PIL import Image
        # Pillow merges identical consecutive frames into one longer frame; distinct frames stay as given
        ims = [Image.fromarray(f) for f in frames]
        ims[0].save(tmp, format='GIF', save_all=True, append_images=ims[1:], duration=max(20, round(1000 / fps)), loop=0)
    os.replace(tmp, path)


def video_path(path):
    if os.path.splitext(path)[1].lower() not in ('.gif', '.mp4'):
        raise ValueError(f'{path}: a video is written as .gif or .mp4; name the output e.g. walk.gif')
    return path


# Projection (StyleGAN2 paper Sec. 5; stylegan2-ada-pytorch projector.py's defaults): the distance is
# taken between feature lists; PROJECT_DISTANCES names the offline ones (no download).

def pixel_features(img):
    """Multi-scale pixels: the image and its 2x2-average pyramid down to 8x8, [1, 3, r, r] each."""
    feats = [img]
    while feats[-1].shape[-1] > 8:
        feats.append(F.avg_pool2d(feats[-1], 2))
    return feats


def d_features(D, c=None, ref=None):
    """The run's own D as a perceptual network (LPIPS without learned weights): each block's output,
    unit-normalised over channels at every position. ref: the reference image of a Siamese D."""
    def feats(img):
        maps = D(img, ref=ref, c=c, return_maps=True)[-1]
        return [m * (m.square().sum(1, keepdim=True) + 1e-10).rsqrt() for m in maps.values()]
    return feats


def feature_distance(a, b):
    """Sum over feature maps of the squared difference summed over channels, averaged over positions."""
    return sum((x - y).square().sum(1).mean() for x, y in zip(a, b))


def noise_regularizer(noise):
    """Squared autocorrelations of each noise map at one-pixel shifts, over its pyramid down to 8x8: keeps
    the noise from carrying the image (the projector's noise regularisation)."""
    reg = 0
    for n in noise:
        while True:
            reg = reg + (n * n.roll(1, 3)).mean().square() + (n * n.roll(1, 2)).mean().square()
            if n.shape[2] <= 8:
                break
            n = F.avg_pool2d(n, 2)
    return reg


@torch.enable_grad()
def project(G, target, features, steps=1000, w_plus=False, seed=0, heatmaps=None, c=None, w_samples=10000, lr=0.1,
            noise_factor=0.05, noise_ramp=0.75, lr_rampdown=0.25, lr_rampup=0.05, noise_weight=1e5, log=None):
    """target [1, 3, R, R] in [-1, 1] -> (ws [1, num_ws, w_dim], noise [[1, 1, r, r] per noise input],
    ws after every step [steps, num_ws, w_dim], distance at every step [steps]). W: one w for all layers;
    w_plus: one per layer. Starts at w_avg of w_samples mapped z; Adam on w and the noise maps, lr
    ramped up over the first 5% and down by a half cosine over the last 25%; Gaussian noise of
    noise_factor x the spread of W is added to w, decaying to 0 (quadratically) over the first 75%.
    Deterministic given seed (noise maps and w noise); the mapped z use the fixed seed 123."""
    need_w(G, '--project')
    dev, L = target.device, G.num_ws
    gen = torch.Generator(dev).manual_seed(seed)
    with torch.no_grad():
        z = torch.randn(w_samples, G.z_dim, generator=torch.Generator().manual_seed(123)).to(dev)
        rep = lambda t: None if t is None else t.expand(w_samples, *t.shape[1:])
        w = G.map(z, heatmaps=None if heatmaps is None else {k: rep(v) for k, v in heatmaps.items()}, c=rep(c))[:, :1]  # [N, 1, C]
        w_avg = w.mean(0, keepdim=True)  # [1, 1, C]
        w_std = ((w - w_avg).square().sum() / w_samples).sqrt().item()  # the spread: sqrt(E ||w - w_avg||^2)
        goal = [f.detach() for f in features(target)]
    w_opt = w_avg.repeat(1, L if w_plus else 1, 1).requires_grad_()  # [1, 1 or L, C]
    noise = [torch.randn(1, 1, r, r, generator=gen, device=dev).requires_grad_() for r in G.noise_res]
    opt = torch.optim.Adam([w_opt] + noise, lr=lr, betas=(0.9, 0.999))
    history, dists = [], []
    for step in range(steps):
        t = step / steps
        w_noise_scale = w_std * noise_factor * max(0.0, 1 - t / noise_ramp) ** 2
        ramp = 0.5 - 0.5 * math.cos(min(1.0, (1 - t) / lr_rampdown) * math.pi)  # half cosine down at the end
        for g in opt.param_groups:
            g['lr'] = lr * ramp * min(1.0, t / lr_rampup)  # linear up at the start
        ws = (w_opt + torch.randn(w_opt.shape, generator=gen, device=dev) * w_noise_scale).expand(-1, L, -1)  # [1, L, C]
        img = G.synthesize(ws, heatmaps=heatmaps, noise=noise)  # [1, 3, R, R]
        dist = feature_distance(features(img), goal)
        loss = dist + noise_weight * noise_regularizer(noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for n in noise:  # back to zero mean, unit variance
                n -= n.mean()
                n *= n.square().mean().rsqrt()
        history.append(w_opt.detach().expand(-1, L, -1)[0].clone())
        dists.append(dist.item())
        if log and (step + 1) % max(1, steps // 10) == 0:
            log(f'step {step + 1}/{steps}: distance {dists[-1]:.4f}')
    return history[-1][None], [n.detach() for n in noise], torch.stack(history), torch.tensor(dists)


def read_target(path, resolution, device):
    """An RxR RGB image file -> [1, 3, R, R] in [-1, 1]; ValueError in one line for another size or mode."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.load()
    except FileNotFoundError:
        raise ValueError(f'no target image at {path}') from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f'cannot read {path} as an image ({type(e).__name__})') from None
    if im.size != (resolution, resolution) or im.mode != 'RGB':
        raise ValueError(f'{path} is a {im.size[0]}x{im.size[1]} {im.mode} image; this network makes {resolution}x{resolution} RGB: '
                         f'crop and resize it to that (e.g. PIL: im.convert("RGB").resize(...)) first')
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None].to(device)  # [1, 3, R, R] uint8
    return x.float() / 127.5 - 1


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description='Parameter counts (no CKPT), or samples / edits / attention maps from a '
                                            'checkpoint or an official network pickle, or --convert a pickle.')
    p.add_argument('ckpt', nargs='*', help='ckpt-*.pt written by train.py, or a stylegan2-ada network-snapshot-*.pkl '
                   '(read safely); several: one row of the same seeds each (compare runs)')
    p.add_argument('--seeds', default='0-15', type=parse_seeds, help="latent seeds, e.g. '0-15' or '1,5,9'")
    p.add_argument('--class', dest='cls', type=int, help='class-conditional networks: the class to draw')
    p.add_argument('--trunc', type=float, default=1.0, help='truncation psi (1 = none)')
    p.add_argument('--trunc-cutoff', type=int, help='truncate only the first N ws')
    p.add_argument('--out', help='output PNG (default samples.png), or video (.gif / .mp4)')
    p.add_argument('--convert', metavar='OUT_PT', help="write the networks as this project's checkpoint (G, D, G_ema, args) "
                   'for metrics.py, model.py and train.py --init')
    p.add_argument('--zoom', type=int, default=1, help='enlarge the PNG N times (nearest neighbour), for small images')
    p.add_argument('--heatmap-centers', type=lambda s: parse_xy(s, inside=True),
                   help="EqGAN-SA editing: level-0 heatmap centre 'x,y' in [0, 1] (default: sampled)")
    p.add_argument('--move', type=parse_xy, help="EqGAN-SA editing: move the heatmaps by 'dx,dy' (image fractions) over --steps columns")
    p.add_argument('--steps', type=int, default=5, help='columns of the editing grid')
    p.add_argument('--attn-maps', action='store_true', help='SAN attention maps around --points (thesis Fig. 2.5)')
    p.add_argument('--points', type=lambda s: [parse_xy(q, inside=True) for q in s.split(';')], default='0.3,0.3;0.7,0.6',
                   help="points 'x,y;x,y' in [0, 1] for --attn-maps")
    p.add_argument('--outdir', help='write one PNG per seed here (seed000123.png; --class, --trunc), e.g. for clean-fid')
    p.add_argument('--batch', type=int, default=32, help='images per forward pass of G')
    p.add_argument('--w', nargs='+', metavar='NPZ', help='latents written by --project, used in place of --seeds '
                   '(grids, --interp in W, the rows of --style-mix); always with the constant noise')
    p.add_argument('--interp', action='store_true', help='a latent walk through the seeds (or --w files) in order, '
                   'to --out .gif or .mp4 (default interp.gif)')
    p.add_argument('--space', choices=('z', 'w'), default='z', help='--interp: slerp in Z or lerp in W (--w files: W)')
    p.add_argument('--frames', type=int, default=30, help='--interp: frames per step between sources; --heatmap-walk: frames per turn')
    p.add_argument('--loop', action='store_true', help='--interp: walk back to the first source (a seamless loop)')
    p.add_argument('--fps', type=int, default=30, help='frames per second of videos')
    p.add_argument('--style-mix', type=parse_seeds, metavar='SEEDS', help="style-mixing grid: these column seeds' "
                   '--mix-layers replace those of the row --seeds (or --w)')
    p.add_argument('--mix-layers', type=parse_seeds, help="--style-mix: the ws taken from the columns, e.g. '0-3' "
                   '(default: the coarse half, 0 to num_ws / 2 - 1)')
    p.add_argument('--trunc-sweep', type=lambda s: [float(v) for v in s.split(',')], metavar='PSIS',
                   help="a row per seed, a column per truncation psi, e.g. '1,0.7,0.5,0'")
    p.add_argument('--heatmap-walk', action='store_true', help="EqGAN-SA: a video of the seeds while the heatmap's centre "
                   'circles the image centre (--out .gif or .mp4, default walk.gif)')
    p.add_argument('--project', metavar='TARGET', help='find the latent of this RxR RGB image; writes --out (default '
                   'projected.png: target | projection), its .npz (for --w) and, with --video, the optimisation')
    p.add_argument('--project-steps', type=int, default=1000, help='--project: optimisation steps (official: 1000)')
    p.add_argument('--w-plus', action='store_true', help='--project: one w per layer (W+) instead of one for all (W)')
    p.add_argument('--distance', choices=('pixels', 'd'), default='pixels', help="--project: multi-scale pixels, or the "
                   "features of the run's own D ('d', unit-normalised like LPIPS; measured worse, see the README)")
    p.add_argument('--seed', type=int, default=0, help='--project: seed of the noise maps and of the noise added to w')
    p.add_argument('--video', help='--project: also write the optimisation as this .gif or .mp4')
    p.add_argument('--resolution', type=int, default=256, help='without CKPT: resolution of the table')
    p.add_argument('--channel-base', type=int, default=16384, help='without CKPT: channel base (config E: 16384)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    a = p.parse_args(argv)
    if not a.ckpt:
        print(f'config E widths (channel_base {a.channel_base}, channel_max 512, 8 mapping layers) at {a.resolution}x{a.resolution}')
        print(f'{"":21s} {"G params":>9s} {"D params":>9s} {"total":>8s} {"G GFLOPs":>9s} {"D GFLOPs":>9s}')
        for name, g, d, gf, df in complexity_table(a.resolution, a.channel_base):
            print(f'{name:21s} {g:8.2f}M {d:8.2f}M {g + d:7.2f}M {gf:9.2f} {df:9.2f}')
        return
    import data  # only the command line needs it (PNG grids, atomic writes)
    if a.convert:
        if len(a.ckpt) > 1:
            raise SystemExit('error: --convert takes one network pickle')
        ckpt = read_checkpoint(a.ckpt[0])
        save = {k: ckpt[k] for k in ('G', 'D', 'G_ema', 'args', 'step', 'nimg')}
        try:  # atomic_write: never a half-written file, no .tmp left behind
            data.atomic_write(a.convert, lambda f: torch.save(save, f))
        except (OSError, RuntimeError) as e:  # no such folder, permissions, a full disk
            raise SystemExit(f'error: could not write {a.convert} ({" ".join(str(e).split())[:160]}): check the '
                             f'path and the free space') from None
        print(f'wrote {a.convert} (networks only: train.py --init {a.convert} fine-tunes from it)')
        return
    tools = [flag for flag, on in (('--move', a.move), ('--heatmap-centers', a.heatmap_centers), ('--attn-maps', a.attn_maps),
                                   ('--outdir', a.outdir), ('--interp', a.interp), ('--style-mix', a.style_mix),
                                   ('--trunc-sweep', a.trunc_sweep), ('--heatmap-walk', a.heatmap_walk),
                                   ('--project', a.project)) if on]
    tool = tools[0] if tools else None
    if len({'--move' if t == '--heatmap-centers' else t for t in tools}) > 1:  # --move with --heatmap-centers is one edit
        raise SystemExit(f'error: {" and ".join(tools)}: one tool at a time')
    if len(a.ckpt) > 1 and tools:
        raise SystemExit(f'error: {tool} takes one checkpoint; several only sample')
    for flag, v in (('--steps', a.steps), ('--frames', a.frames), ('--batch', a.batch), ('--fps', a.fps),
                    ('--project-steps', a.project_steps)):
        if v < 1:
            raise SystemExit(f'error: {flag} {v} must be at least 1')
    if a.w and tool not in (None, '--interp', '--style-mix'):
        raise SystemExit(f'error: --w feeds sample grids, --interp and --style-mix, not {tool}; use --seeds')
    if a.w and a.trunc != 1:
        raise SystemExit('error: --trunc applies to seeds; a --w latent is used as it is: drop --trunc')
    if a.trunc_sweep and a.trunc != 1:
        raise SystemExit('error: --trunc-sweep sets psi per column: drop --trunc')
    out = a.out or {'--interp': 'interp.gif', '--heatmap-walk': 'walk.gif', '--project': 'projected.png'}.get(tool, 'samples.png')
    if tool in ('--interp', '--heatmap-walk'):
        video_path(out)
    if a.video:
        video_path(a.video)
    dev, seeds, rows = torch.device(a.device), a.seeds, []
    for path in a.ckpt:
        nets = load_checkpoint(path, dev)
        G = nets['G_ema']
        c_dim = getattr(G, 'c_dim', 0)
        if c_dim and not (a.cls is not None and 0 <= a.cls < c_dim):
            raise SystemExit(f'error: {path} is class-conditional: pass --class K with K in [0, {c_dim - 1}]')
        if a.cls is not None and not c_dim:
            raise SystemExit(f'error: {path} is unconditional: drop --class')
        stylegan = isinstance(G, Generator)
        if not stylegan and (a.trunc != 1 or a.trunc_cutoff is not None):
            raise SystemExit(f'error: --trunc needs a mapping network; {path} is an --arch {G.arch} generator')
        trunc = dict(psi=a.trunc, cutoff=a.trunc_cutoff) if stylegan else {}
        label = lambda n: F.one_hot(torch.full([n], a.cls), c_dim).float().to(dev) if c_dim else None  # [n, c_dim]
        if a.w:  # projected latents in place of seeds
            loaded = [load_latents(f, G, dev) for f in a.w]
            ws, heat = torch.cat([w for w, _ in loaded]), ({k: torch.cat([h[k] for _, h in loaded]) for k in loaded[0][1]}
                                                            if G.uses_heatmaps else None)
            z, c = None, None
        else:
            z, heat = seed_latents(G, seeds, dev)
            ws, c = None, label(len(seeds))
        if not tools:
            rows.append(torch.cat(list(sample(G, z=z, ws=ws, heatmaps=heat, c=c, batch=a.batch, **trunc))))
    if a.move or a.heatmap_centers:
        if not G.uses_heatmaps:
            raise SystemExit('error: this generator has no heatmap input: train with --sel norm to edit by heatmaps')
        centers = heat['centers']  # [N, n, 2], x right, y down, in [0, 1]
        if a.heatmap_centers:  # place level 0 there ('hier': the finer centres follow)
            x, y = a.heatmap_centers
            centers = G.spatial.shift(centers, x - centers[:, 0, 0], y - centers[:, 0, 1])
        dx, dy = a.move or (0, 0)
        cols = []
        for t in torch.linspace(0, 1, a.steps if a.move else 1).tolist():
            h = G.spatial.render(G.spatial.shift(centers, t * dx, t * dy), heat.get('widths'))
            cols.append(torch.cat(list(sample(G, z=z, heatmaps=h, c=c, batch=a.batch, **trunc))))
        imgs = torch.stack(cols, 1).flatten(0, 1)  # rows: seeds, columns: heatmap positions
        data.save_grid(imgs, out, len(cols), a.zoom)
    elif a.attn_maps:
        data.save_grid(attention_maps(G, z, a.points, heat, c), out, min(len(seeds), 8), a.zoom)
    elif a.outdir:
        from PIL import Image
        os.makedirs(a.outdir, exist_ok=True)
        done, progress = 0, lambda i, n: print(f'\r{i}/{n} images', end='', flush=True)
        for chunk in sample(G, z=z, heatmaps=heat, c=c, batch=a.batch, progress=progress, **trunc):
            for img in chunk.permute(0, 2, 3, 1).numpy():  # [R, R, 3] each
                Image.fromarray(img).save(os.path.join(a.outdir, f'seed{seeds[done]:06d}.png'))
                done += 1
        print()
        out = f'{done} PNGs to {a.outdir}'
    elif a.interp:
        if a.w or a.space == 'w':
            need_w(G, '--space w')
            frames = interpolate(G, ws=ws if a.w else G.map(z, a.trunc, a.trunc_cutoff, heatmaps=heat, c=c), heatmaps=heat,
                                 frames=a.frames, loop=a.loop, batch=a.batch)
        else:
            frames = interpolate(G, z=z, heatmaps=heat, c=c, frames=a.frames, loop=a.loop, batch=a.batch, **trunc)
        write_video(frames, out, a.fps, a.zoom)
        out = f'{out} ({frames.shape[0]} frames)'
    elif a.style_mix:
        need_w(G, '--style-mix')
        layers = a.mix_layers or list(range(G.num_ws // 2))
        if max(layers) >= G.num_ws:
            raise SystemExit(f'error: --mix-layers: this network has the ws 0-{G.num_ws - 1}')
        row_ws = ws if a.w else G.map(z, a.trunc, a.trunc_cutoff, heatmaps=heat, c=c)  # [R, L, C]
        cz, ch = seed_latents(G, a.style_mix, dev)
        col_ws = G.map(cz, a.trunc, a.trunc_cutoff, heatmaps=ch, c=label(len(a.style_mix)))  # [K, L, C]
        R, K = row_ws.shape[0], col_ws.shape[0]
        img = lambda w, h: torch.cat(list(sample(G, ws=w, heatmaps=h, batch=a.batch)))
        cells = img(style_mix(row_ws, col_ws, layers), heat and {k: v.repeat_interleave(K, 0) for k, v in heat.items()})
        grid = torch.zeros(R + 1, K + 1, *cells.shape[1:], dtype=torch.uint8)  # the corner stays black
        grid[0, 1:], grid[1:, 0], grid[1:, 1:] = img(col_ws, ch), img(row_ws, heat), cells.view(R, K, *cells.shape[1:])
        data.save_grid(grid.flatten(0, 1), out, K + 1, a.zoom)
    elif a.trunc_sweep:
        need_w(G, '--trunc-sweep')
        P = len(a.trunc_sweep)
        sweep = torch.stack([G.map(z, psi, a.trunc_cutoff, heatmaps=heat, c=c) for psi in a.trunc_sweep], 1)  # [N, P, L, C]
        h = heat and {k: v.repeat_interleave(P, 0) for k, v in heat.items()}
        data.save_grid(torch.cat(list(sample(G, ws=sweep.flatten(0, 1), heatmaps=h, batch=a.batch))), out, P, a.zoom)
    elif a.heatmap_walk:
        frames = heatmap_walk(G, z, heat, c, frames=a.frames, batch=a.batch, **trunc)
        write_video(frames, out, a.fps, a.zoom)
    elif a.project:
        need_w(G, '--project')
        target = read_target(a.project, G.img_resolution, dev)
        h1, c1 = heat and {k: v[:1] for k, v in heat.items()}, label(1)  # EqGAN-SA: the first seed's heatmaps
        D = nets['D']
        features = d_features(D, c1, target if D.needs_ref else None) if a.distance == 'd' else pixel_features
        ws, noise, history, dists = project(G, target, features, a.project_steps, a.w_plus, a.seed, h1, c1, log=print)
        proj = torch.cat(list(sample(G, ws=ws, heatmaps=h1, noise=noise)))
        data.save_grid(torch.cat([to_uint8(target), proj]), out, 2, a.zoom)
        npz = os.path.splitext(out)[0] + '.npz'
        save_latents(npz, ws, h1)
        if a.video:  # at most 100 frames: target | projection at that step (with the final noise maps)
            idx = torch.linspace(0, len(history) - 1, min(len(history), 100)).round().long()
            hv = h1 and {k: v.expand(len(idx), *v.shape[1:]) for k, v in h1.items()}
            steps = torch.cat(list(sample(G, ws=history[idx], heatmaps=hv, noise=noise, batch=a.batch)))
            write_video(torch.cat([to_uint8(target).expand_as(steps), steps], 3), a.video, a.fps, a.zoom)
        out = f'{out} and {npz}' + (f' and {a.video}' if a.video else '') + f' (distance {dists[0]:.4f} -> {dists[-1]:.4f})'
    elif len({r.shape[-1] for r in rows}) > 1:
        raise SystemExit('error: these checkpoints make images of different sizes; compare runs of one --resolution')
    else:  # one checkpoint: rows of 8; several: one row each
        n = rows[0].shape[0]
        data.save_grid(torch.cat(rows), out, min(n, 8) if len(rows) == 1 else n, a.zoom)
    print(f'wrote {out}')

if __name__ == '__main__':
    try:
        main()
    except (ValueError, OSError) as e:  # a missing or foreign checkpoint, an unwritable --out
        raise SystemExit(f'error: {e}')
