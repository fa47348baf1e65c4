"""Attention modules of "Dual Contrastive Loss and Attention for GANs" (Yu et al., ICCV 2021).

Equation numbers follow N. Yu's thesis, ch. 2 (the ICCV paper, expanded) and the paper's supplement.

- SAN:          patch-wise self-attention (Zhao et al., "Exploring Self-attention for Image
                Recognition", CVPR 2020) as the thesis writes it, Eq. 2.4-2.7.
- RefAttention: reference-attention in D, Eq. 2.8, and the supplement's Eq. 1 and Eq. 2 variants;
                it is SAN with the key, query and value taken from different images.
- SAGAN:        non-local softmax attention (Zhang et al., "Self-Attention GANs", ICML 2019).
- DFN:          dynamic filters (Jia et al., "Dynamic Filter Networks", NeurIPS 2016).
- VT:           visual transformer (Wu et al., "Visual Transformers", arXiv 2020).
- self_attention(kind, channels): the factory G uses (thesis Table 2.3);
  flops(module, x_shape): analytic multiply-accumulates (thesis Table 2.4).

Every module maps NCHW [B, C, H, W] to the same shape with a residual shortcut, works at any
H, W >= 1, under torch.autocast (bf16), torch.compile (no data-dependent Python control flow),
channels_last inputs and double backward (R1, path length). This file imports nothing local:
copy it into another project as it is. Run it alone to print the complexity table:

    python attention.py                      # C=512 at 32x32, the G layer SAN replaces
    python attention.py --channels 512 --res 8

Weights are stored N(0, 1) and scaled at run time by 1/sqrt(fan-in) (StyleGAN's equalized learning
rate, as every StyleGAN2 layer), so these layers learn at the pace of their neighbours at lr 0.002.

SAN defaults: patch s=9, reduction=32 (key/query width C'=C/32), share=16 (G=C/16 weight groups),
hidden=C (width of the first FC of Eq. 2.5). The thesis keeps SAN at or below the convolution it
replaces (Table 2.4: G+D 48.77M -> 48.43M, 0.34M fewer, same FLOPs); in G that is the 3x3 modulated
conv at 32x32 with its style affine. SAN's own patch-wise default is s=7; the thesis only says s is
"much larger than 3x3", and with these widths s=9 meets the budget almost exactly. At C=512:
    K, Q  2 (C C' + C')            =    16,416      V    C^2 + C            =   262,656
    FC1   (s^2 C' + C') D + D      =   672,256      FC2  D s^2 G + s^2 G    = 1,329,696
    SAN total 2,281,024 = 9*512^2 + 512^2 + 512 - 340,928    (conv 2,359,296 + affine 262,144 + its bias)
    MACs per position: 2 C C' + C^2 + (s^2 C' + C') D + D s^2 G + s^2 C (aggregation)
                     = 2,318,848 <= 9 C^2 = 2,359,296 (the 3x3 conv); x 1024 positions at 32x32.

Counting convention of flops(): multiply-accumulates (one multiply-add = 1) of convolutions (zero
padding included, like a dense conv), linear layers and matrix products, SAN's aggregation
included; biases, activations, softmax and normalisation are not counted; per forward pass of the
whole batch. The thesis does not say what its "FLOPS (G)" count: 1.08 G for StyleGAN2 G+D at
256x256 cannot be per-image multiply-adds (the single 3x3 512->512 conv at 32x32 is 2.42 GMACs and
G alone is ~15 GMACs), so compare its rows by ratio, and compare ours with the conv they replace.
"""

import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------
# Equalized-learning-rate convolution / linear layer (StyleGAN), the building block of all modules.


class Conv(nn.Module):
    """k x k conv, stride 1, zero padding k // 2; `linear` applies a 1x1 one to [..., c_in] tokens."""

    def __init__(self, c_in, c_out, kernel=1, bias=True, fan_in=None, gain=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self.scale = gain / math.sqrt(fan_in or c_in * kernel * kernel)

    def forward(self, x):  # [B, c_in, H, W] -> [B, c_out, H, W]
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.weight.shape[-1] // 2)

    def linear(self, x):  # [..., c_in] -> [..., c_out]
        return F.linear(x, self.weight.flatten(1) * self.scale, self.bias)


def lrelu(x):
    return F.leaky_relu(x, 0.2)


def softmax(x, dim):
    # Softmax in (at least) fp32 even under bf16 autocast; back to the input dtype for the next matmul.
    return x.softmax(dim, dtype=torch.promote_types(x.dtype, torch.float32)).to(x.dtype)

# ----------------------------------------------------------------------------
# SAN's aggregation (Eq. 2.6) and its adjoints, with hand-written gradients of any order.
#
# v: values [B, share, G, H, W] (channel c = share index * G + group), w: weights [B, G, s*s, H, W].
#   agg(v, w)   = sum_k shift_k(v) * w_k                  -> [B, share, G, H, W]  (Eq. 2.6)
#   agg_t(g, w) = sum_k shift_k^T(g * w_k)                -> v's shape   (d agg / d v, transposed)
#   corr(v, g)  = [sum_share shift_k(v) * g]_k            -> w's shape   (d agg / d w, transposed)
# shift_k(v)(i, j) = v(i + m - s//2, j + n - s//2), zero outside, k = m s + n. The three are bilinear
# and each one's gradients are the others (the *_backward functions below), so R1 / path length
# (double backward) work.
# A loop over the s*s offsets accumulating in place: plain autograd over sliced views would allocate
# and zero a padded-input-sized gradient buffer per offset (measured 1.5x slower on the CPU), and
# unfolding v would store s*s copies of it. Sums run in fp32 under bf16 autocast. Each offset is one
# pass over memory, so on the CPU the groups are processed in blocks of about BLOCK elements of v,
# small enough that v, the output and an offset's weights stay in cache across the s*s passes
# (2-core EPYC, 32 MB L3; agg + agg_t + corr at [16, 512, 32, 32]: 817 -> 321 ms, at [16, 128, 32, 32]:
# 94 -> 77 ms). GPUs take one block: more, smaller kernels would only add launches there.

BLOCK = 1 << 20


def _blocks(x):
    """Slices of the group dim of x [B, share, G, H, W], about BLOCK elements each on the CPU."""
    G = x.shape[2]
    n = min(G, -(-x.numel() // BLOCK)) if x.device.type == 'cpu' else 1
    step = -(-G // n)
    return [slice(i, i + step) for i in range(0, G, step)]


def _agg(v, w, s):
    B, S, G, H, W = v.shape
    out = torch.zeros(B, S, G, H, W, dtype=torch.promote_types(v.dtype, torch.float32), device=v.device)
    for gs in _blocks(v):
        o, vb, wb = out[:, :, gs], F.pad(v[:, :, gs], [s // 2] * 4), w[:, None, gs]
        for k in range(s * s):
            m, n = divmod(k, s)
            o.addcmul_(vb[..., m:m + H, n:n + W], wb[:, :, :, k])
    return out.to(v.dtype)


def _agg_t(g, w, s):
    B, S, G, H, W = g.shape
    p = s // 2
    out = torch.zeros(B, S, G, H + 2 * p, W + 2 * p, dtype=torch.promote_types(g.dtype, torch.float32),
                      device=g.device)
    for gs in _blocks(g):
        o, gb, wb = out[:, :, gs], g[:, :, gs], w[:, None, gs]
        for k in range(s * s):
            m, n = divmod(k, s)
            o[..., m:m + H, n:n + W].addcmul_(gb, wb[:, :, :, k])
    return out[..., p:p + H, p:p + W].to(g.dtype)


def _corr(v, g, s):
    B, S, G, H, W = v.shape
    acc = torch.promote_types(v.dtype, torch.float32)
    out = torch.empty(B, G, s * s, H, W, dtype=acc, device=v.device)  # contiguous, as fc2's output
    for gs in _blocks(v):
        vb, gb = F.pad(v[:, :, gs], [s // 2] * 4), g[:, :, gs]
        prod = torch.empty(gb.shape, dtype=acc, device=v.device)  # reused: a fresh buffer per offset is slow
        for k in range(s * s):
            m, n = divmod(k, s)
            out[:, gs, k] = torch.mul(vb[..., m:m + H, n:n + W], gb, out=prod).sum(1)
    return out.to(v.dtype)


# The three as custom ops: torch.compile keeps them opaque and runs these loops as they are (traced,
# inductor's CPU code for them was 3.5x slower than eager); each one's gradients are the others.
# Inputs are made contiguous once: channels_last ones would be read with a stride of C in each pass.
@torch.library.custom_op('dca_san::agg', mutates_args=())
def agg(v: torch.Tensor, w: torch.Tensor, s: int) -> torch.Tensor:
    return _agg(v.contiguous(), w.contiguous(), s)


@torch.library.custom_op('dca_san::agg_t', mutates_args=())
def agg_t(g: torch.Tensor, w: torch.Tensor, s: int) -> torch.Tensor:
    return _agg_t(g.contiguous(), w.contiguous(), s).contiguous()


@torch.library.custom_op('dca_san::corr', mutates_args=())
def corr(v: torch.Tensor, g: torch.Tensor, s: int) -> torch.Tensor:
    return _corr(v.contiguous(), g.contiguous(), s)


agg.register_fake(lambda v, w, s: v.new_empty(v.shape))
agg_t.register_fake(lambda g, w, s: g.new_empty(g.shape))
corr.register_fake(lambda v, g, s: v.new_empty(v.shape[0], v.shape[2], s * s, *v.shape[3:]))


def _setup(ctx, inputs, output):
    a, b, ctx.s = inputs
    ctx.save_for_backward(a, b)


def _needed(ctx, grad_a, grad_b):  # compute only the gradients autograd asks for
    return (*(f() if need else None for f, need in zip((grad_a, grad_b), ctx.needs_input_grad)), None)


def _agg_backward(ctx, h):  # agg(v, w): dv = agg_t(h, w), dw = corr(v, h)
    v, w = ctx.saved_tensors
    return _needed(ctx, lambda: agg_t(h, w, ctx.s), lambda: corr(v, h, ctx.s))


def _agg_t_backward(ctx, h):  # agg_t(g, w): dg = agg(h, w), dw = corr(h, g)
    g, w = ctx.saved_tensors
    return _needed(ctx, lambda: agg(h, w, ctx.s), lambda: corr(h, g, ctx.s))


def _corr_backward(ctx, h):  # corr(v, g), h shaped like w: dv = agg_t(g, h), dg = agg(v, h)
    v, g = ctx.saved_tensors
    return _needed(ctx, lambda: agg_t(g, h, ctx.s), lambda: agg(v, h, ctx.s))


agg.register_autograd(_agg_backward, setup_context=_setup)
agg_t.register_autograd(_agg_t_backward, setup_context=_setup)
corr.register_autograd(_corr_backward, setup_context=_setup)


# ----------------------------------------------------------------------------
# SAN patch-wise self-attention, Eq. 2.4-2.7 (the machinery RefAttention reuses for Eq. 2.8).


class SAN(nn.Module):
    """O = attn(K(T), Q(T), V(T)) + T (Eq. 2.7). At init the residual holds and the attention branch
    is nonzero (std ~0.33 for a unit-variance input): no zero-init, as neither SAN nor the thesis has one."""

    def __init__(self, channels, patch=9, reduction=32, share=16, hidden=None):
        super().__init__()
        if patch % 2 != 1:
            raise ValueError(f'SAN patch size must be odd (a patch centred on each position), got {patch}')
        C, s = channels, patch
        Ck = max(1, C // reduction)                   # key/query channels C'
        G = max(1, C // share)                        # weight groups: channel c uses group c % G (SAN's share_planes)
        D = hidden or C                               # width of the first FC of Eq. 2.5
        if C % G:
            raise ValueError(f'SAN: channels {C} not divisible into {G} weight groups (share={share})')
        self.patch, self.groups = s, G
        self.key, self.query, self.value = Conv(C, Ck), Conv(C, Ck), Conv(C, C)  # Eq. 2.4: 1x1 conv + bias (+ lrelu)
        # Eq. 2.5, first FC on p = concat(flatten(k), q) with M_w1 in R^{(s^2 C' + C') x D}: the k-part of
        # that product at every position is exactly an s x s conv of K (zero padded), the q-part a 1x1 conv
        # of Q. This avoids unfolding K into [B, s*s*C', H*W] and runs as a dense conv on CPU and GPU.
        self.fc1_k = Conv(Ck, D, kernel=s, fan_in=s * s * Ck + Ck)
        self.fc1_q = Conv(Ck, D, bias=False, fan_in=s * s * Ck + Ck)
        # Eq. 2.5, second FC: one s x s weight per group. Eq. 2.6 sums s^2 weighted values like a conv of
        # fan-in s^2, so the weights get the matching 1/s run-time scale (folded into M_w2).
        self.fc2 = Conv(D, s * s * G, gain=1 / s)

    def attend(self, k_src, q_src, v_src, res, return_weights=False):
        """attn(K(k_src), Q(q_src), V(v_src)) + res; all [B, C, H, W]. Weights: [B, G, s*s, H, W]."""
        assert k_src.shape == q_src.shape == v_src.shape == res.shape, 'SAN sources must have equal shapes'
        B, C, H, W = v_src.shape
        k = lrelu(self.key(k_src))                                 # Eq. 2.4  [B, C', H, W]
        q = lrelu(self.query(q_src))                               # Eq. 2.4  [B, C', H, W]
        v = lrelu(self.value(v_src))                               # [B, C, H, W]
        w_hat = lrelu(self.fc1_k(k) + self.fc1_q(q))               # Eq. 2.5  [B, D, H, W]
        w = self.fc2(w_hat).reshape(B, self.groups, self.patch ** 2, H, W)  # Eq. 2.5-2.6  [B, G, s*s, H, W]
        out = res + self.aggregate(v, w)  # Eq. 2.7 (2.8: res = T_pri); res first: out keeps its layout
        return (out, w) if return_weights else out

    def aggregate(self, v, w):
        """Eq. 2.6: o(i, j) = sum_{m,n} w(m, n) v(i + m - s//2, j + n - s//2), zero padded at the
        borders (a position near the edge sees zeros, as in SAN's zero-pad aggregation kernel)."""
        B, C, H, W = v.shape
        out = agg(v.reshape(B, C // self.groups, self.groups, H, W), w, self.patch)
        return out.reshape(B, C, H, W)

    def forward(self, x, return_weights=False):
        """x: [B, C, H, W]. With return_weights also w [B, G, s*s, H, W]; thesis Fig. 2.5 shows, for a
        position (i, j), w[b, :, :, i, j].norm(dim=0).view(s, s): the map over the patch around it."""
        return self.attend(x, x, x, x, return_weights)  # Eq. 2.7

    def macs(self, h, w):
        s, G, D = self.patch, self.groups, self.fc1_k.weight.shape[0]
        C, Ck = self.value.weight.shape[0], self.key.weight.shape[0]
        return h * w * (2 * C * Ck + C * C + (s * s * Ck + Ck) * D + D * s * s * G + s * s * C)

# ----------------------------------------------------------------------------
# Reference-attention in D, Eq. 2.8 (and supplement Eq. 1, Eq. 2): SAN with routed sources.


class RefAttention(SAN):
    """eq=8 (Eq. 2.8):  attn(K(T_ref), Q(T_ref), V(T_pri)) + T_pri   (the paper's choice, supp. Table 3)
    eq=1 (supp. Eq. 1): attn(K(T_pri), Q(T_ref), V(T_ref)) + T_pri
    eq=2 (supp. Eq. 2): attn(K(T_pri), Q(T_ref), V(T_pri)) + T_pri
    The residual is always the primary: after this layer only the fused primary stream goes on."""

    ROUTES = {8: ('ref', 'ref', 'pri'), 1: ('pri', 'ref', 'ref'), 2: ('pri', 'ref', 'pri')}  # sources of K, Q, V

    def __init__(self, channels, eq=8, **san_kwargs):
        if eq not in self.ROUTES:
            raise ValueError(f'RefAttention eq must be 8 (Eq. 2.8), 1 or 2 (supplement Eq. 1, 2), got {eq!r}')
        super().__init__(channels, **san_kwargs)
        self.eq = eq

    def forward(self, pri, ref, return_weights=False):
        """pri, ref: [B, C, H, W] features of the primary and reference images (same D layers)."""
        src = {'pri': pri, 'ref': ref}
        k, q, v = (src[name] for name in self.ROUTES[self.eq])  # fixed at init: no data-dependent branch
        return self.attend(k, q, v, pri, return_weights)

# ----------------------------------------------------------------------------
# SAGAN non-local attention (Zhang et al. 2019): o = v(softmax(g^T f) h), out = gamma o + x.


class SAGAN(nn.Module):
    """f, g: C/8 channels; h: C/2 values and a 1x1 conv v back to C (the SAGAN authors' code; the
    paper writes h at C/8). No 2x2 max-pool of f/h (the code has one, the paper none). gamma = 0 at
    init, so the module starts as the identity; f, g, h, v are in the graph (zero gradients then)."""

    def __init__(self, channels):
        super().__init__()
        C = channels
        Cq, Cv = max(1, C // 8), max(1, C // 2)
        self.f, self.g, self.h, self.v = Conv(C, Cq), Conv(C, Cq), Conv(C, Cv), Conv(Cv, C)
        self.gamma = nn.Parameter(torch.zeros([]))

    def forward(self, x):
        B, C, H, W = x.shape
        key = self.f(x).flatten(2)                                  # [B, C/8, HW]
        query = self.g(x).flatten(2).transpose(1, 2)                # [B, HW, C/8]
        val = self.h(x).flatten(2).transpose(1, 2)                  # [B, HW, C/2]
        # Softmax over the attended positions i of f(x_i)^T g(x_j) (SAGAN has no 1/sqrt(d) scale);
        # explicit matmuls, not scaled_dot_product_attention, whose fused kernels lack double backward.
        with torch.autocast(x.device.type, enabled=False):  # logits and softmax in fp32 under mixed precision
            beta = (query.float() @ key.float()).softmax(-1).to(val.dtype)  # [B, HW(j), HW(i)]
        o = (beta @ val).transpose(1, 2).reshape(B, -1, H, W)       # [B, C/2, H, W]
        return x + self.gamma * self.v(o)

    def macs(self, h, w):
        n, (Cq, C) = h * w, self.f.weight.shape[:2]
        Cv = self.h.weight.shape[0]
        return n * (2 * C * Cq + 2 * C * Cv) + n * n * (Cq + Cv)

# ----------------------------------------------------------------------------
# DFN dynamic filters (Jia et al. 2016): a filter-generating branch predicts the conv filters.


class DFN(nn.Module):
    """Jia et al.'s "dynamic convolutional layer": per-sample 3x3 C->C filters predicted from the
    globally average-pooled input by a 2-layer MLP (C -> C/8 -> 9 C^2), applied to the input as one
    grouped conv over the batch (groups = B), plus the residual. The second FC's bias is a static
    3x3 kernel. Cost: the MLP holds C/8 * 9 C^2 weights (151M at C=512, thesis Table 2.4: DFN is the
    heavy one) but adds few MACs per image; the conv itself costs what the replaced conv cost. The
    per-position variant ("dynamic local filtering") would need 9 C^2 filter values per position."""

    def __init__(self, channels, kernel=3, hidden=None):
        super().__init__()
        C, self.kernel = channels, kernel
        self.fc1 = Conv(C, hidden or max(1, C // 8))
        self.fc2 = Conv(self.fc1.weight.shape[0], C * C * kernel * kernel)
        self.filter_scale = 1 / math.sqrt(C * kernel * kernel)     # generated filters: He scale of a C-in conv

    def forward(self, x):
        B, C, H, W = x.shape
        k = self.kernel
        h = lrelu(self.fc1.linear(x.mean((2, 3))))                  # [B, C/8]
        filters = self.fc2.linear(h) * self.filter_scale            # [B, C*C*k*k]
        y = F.conv2d(x.reshape(1, B * C, H, W), filters.reshape(B * C, C, k, k), padding=k // 2, groups=B)
        return x + y.reshape(B, C, H, W)                            # [1, B*C, H, W] -> [B, C, H, W]

    def macs(self, h, w):
        D, C = self.fc1.weight.shape[:2]
        return C * D + D * C * C * self.kernel ** 2 + h * w * C * C * self.kernel ** 2

# ----------------------------------------------------------------------------
# VT visual transformer (Wu et al. 2020): tokenizer -> transformer layer -> projector, residual.


class VT(nn.Module):
    """Filter-based tokenizer T = softmax_HW(X W_A)^T X (L tokens of width C); one pre-norm
    transformer layer over the tokens (multi-head self-attention + GELU MLP, ratio 4); projector
    X + softmax_L((X W_Q)(T W_K)^T) T back to the feature map (VT's equations; we scale the logits
    by 1/sqrt(d)). Heads default to C/64 (width 64 each), at least 1."""

    def __init__(self, channels, tokens=16, heads=None, mlp_ratio=4):
        super().__init__()
        C = channels
        self.heads = heads or max(1, C // 64)
        if C % self.heads:
            raise ValueError(f'VT: channels {C} not divisible by {self.heads} heads')
        self.tokenizer = Conv(C, tokens)                            # W_A
        self.norm1, self.norm2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.qkv, self.proj = Conv(C, 3 * C), Conv(C, C)
        self.mlp1, self.mlp2 = Conv(C, mlp_ratio * C), Conv(mlp_ratio * C, C)
        self.proj_q, self.proj_k = Conv(C, C), Conv(C, C)           # projector W_Q (pixels), W_K (tokens)

    def forward(self, x):
        B, C, H, W = x.shape
        a = softmax(self.tokenizer(x).flatten(2), -1)               # [B, L, HW], spatial softmax per token
        t = a @ x.flatten(2).transpose(1, 2)                        # [B, L, C]
        L, nh, d = t.shape[1], self.heads, C // self.heads
        q, k, v = self.qkv.linear(self.norm1(t)).reshape(B, L, 3, nh, d).permute(2, 0, 3, 1, 4)  # each [B, nh, L, d]
        att = softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v               # [B, nh, L, d]
        t = t + self.proj.linear(att.transpose(1, 2).reshape(B, L, C))              # [B, L, C]
        t = t + self.mlp2.linear(F.gelu(self.mlp1.linear(self.norm2(t))))
        xq = self.proj_q(x).flatten(2).transpose(1, 2)              # [B, HW, C]
        a = softmax(xq @ self.proj_k.linear(t).transpose(1, 2) / math.sqrt(C), -1)  # [B, HW, L]
        return x + (a @ t).transpose(1, 2).reshape(B, C, H, W)

    def macs(self, h, w):
        n, C, L = h * w, self.qkv.weight.shape[1], self.tokenizer.weight.shape[0]
        r = self.mlp1.weight.shape[0] // C
        tokenizer = n * C * L * 2                                   # X W_A and A^T X
        transformer = L * C * C * (4 + 2 * r) + 2 * L * L * C       # qkv, proj, MLP; QK^T and AV
        projector = n * C * C + L * C * C + 2 * n * L * C           # X W_Q, T W_K; logits and A T
        return tokenizer + transformer + projector

# ----------------------------------------------------------------------------
# Factory for G's self-attention (thesis Table 2.3) and the analytic complexity (Table 2.4).

KINDS = {'san': SAN, 'sagan': SAGAN, 'dfn': DFN, 'vt': VT}


def self_attention(kind, channels, **kwargs):
    if kind not in KINDS:
        raise ValueError(f'unknown self-attention kind {kind!r}; valid kinds: {", ".join(KINDS)}')
    return KINDS[kind](channels, **kwargs)


def flops(module, x_shape):
    """Multiply-accumulates of one forward pass on an input of shape [B, C, H, W] (see the top)."""
    B, _, H, W = x_shape
    if isinstance(module, nn.Conv2d):  # the stride-1 convolution an attention module replaces
        return B * H * W * module.weight.numel()
    return B * module.macs(H, W)


def count_params(module):
    return sum(p.numel() for p in module.parameters())


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='Parameters and MACs of each attention module.')
    parser.add_argument('--channels', type=int, default=512, help='feature channels C (thesis: 512 at 32x32)')
    parser.add_argument('--res', type=int, default=32, help='feature resolution H = W (thesis: 32 in G, 8 in D)')
    parser.add_argument('--w-dim', type=int, default=512, help='StyleGAN2 latent width (style affine of the conv)')
    args = parser.parse_args()
    C, shape = args.channels, (1, args.channels, args.res, args.res)
    with torch.device('meta'):  # counts without allocating (DFN has ~150M parameters at C=512)
        rows = [('3x3 conv C->C', nn.Conv2d(C, C, 3, padding=1, bias=False))]
        rows += [(kind, self_attention(kind, C)) for kind in KINDS] + [('ref-attention', RefAttention(C))]
    base_params = 9 * C * C + args.w_dim * C + C  # conv weight + style affine (weight, bias)
    base_macs = flops(rows[0][1], shape)
    print(f'C={C} at {args.res}x{args.res}, per image; the conv row counts its {args.w_dim}x{C} style affine too')
    print(f'{"module":<16}{"params":>14}{"vs conv":>9}{"GMACs":>9}{"vs conv":>9}')
    for name, m in rows:
        p = base_params if name.startswith('3x3') else count_params(m)
        f = flops(m, shape)
        print(f'{name:<16}{p:>14,}{p / base_params:>9.3f}{f / 1e9:>9.3f}{f / base_macs:>9.3f}')
