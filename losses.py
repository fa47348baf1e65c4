"""
Every adversarial loss the papers compare, on raw D logits (larger = more real), and the regularisers.

  nonsat       non-saturating logistic (Goodfellow et al. 2014; StyleGAN2's default)
  sat          saturating / minimax logistic
  wgan         Wasserstein with gradient penalty (Gulrajani et al. 2017, lambda 10) and drift 1e-3
  hinge        hinge (Lim & Ye 2017; Miyato et al. 2018)
  contrastive  dual contrastive loss, "Dual Contrastive Loss and Attention for GANs"
               (Yu et al., ICCV 2021; thesis Sec. 2.3.1, Eq. 2.1-2.3)

plus R1 (Mescheder et al. 2018) and path-length regularisation (Karras et al. 2020), and GradCAM on D
with the alignment loss of EqGAN-SA (Wang et al., CVPR 2022, Sec. 3.2, Eq. 4), as the paper's text
reads it and as the authors' code computes it.

Conventions: every loss returns a scalar that its player minimises (the mean over this process's
samples); in DDP the contrastive negatives span the global batch through a differentiable all-gather,
so the loss and its averaged gradients do not depend on the number of processes.
This file imports nothing local: D and G are passed in.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

LOSSES = ('nonsat', 'sat', 'wgan', 'hinge', 'contrastive')


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums the gradients of every rank (all_reduce) and keeps this
    rank's slice: works on gloo and NCCL, unlike reduce_scatter-based versions."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # autograd may hold `grad` elsewhere: reduce a copy
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def all_gather(x):
    """[b, ...] on each rank -> [world * b, ...], differentiable; identity without DDP."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _AllGather.apply(x)
    return x


# ----------------------------------------------------------------------------------------------
# Eq. 2.1 / 2.2: one-against-a-batch softmax cross-entropy.
#   for each i: -log( e^{pos_i} / (e^{pos_i} + sum_j e^{neg_j}) ) = softplus(logsumexp_j(neg_j) - pos_i)
# (the softmax over [pos_i, neg_1..neg_M], computed in O(B) instead of building the [B, M+1] matrix).

def one_vs_batch(pos, neg):
    return F.softplus(torch.logsumexp(neg.float(), 0) - pos.float())  # [B]


def contrastive_d(real, fake):
    """Eq. 2.3 for D: L_real (Eq. 2.1, each real against all fakes) + L_fake (Eq. 2.2, each fake,
    negated, against all reals negated)."""
    l_real = one_vs_batch(real, all_gather(fake))   # Eq. 2.1
    l_fake = one_vs_batch(-fake, -all_gather(real))  # Eq. 2.2
    return l_real.mean() + l_fake.mean()


def d_loss(kind, real, fake):
    """D's loss from real logits [b] and fake logits [b] (the WGAN gradient penalty is separate).
    In fp32 whatever D's precision: under fp16 the drift term's square overflows above 256."""
    real, fake = real.float(), fake.float()
    if kind in ('nonsat', 'sat'):  # -log sigmoid(r) - log(1 - sigmoid(f))
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if kind == 'wgan':  # critic: E[f] - E[r], plus the drift term that keeps logits near 0
        return fake.mean() - real.mean() + 1e-3 * real.square().mean()
    if kind == 'hinge':
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == 'contrastive':
        return contrastive_d(real, fake)
    raise ValueError(f'unknown loss {kind!r}; choose one of {", ".join(LOSSES)}')


def g_loss(kind, fake, real=None, g_form='swap'):
    """G's loss from fake logits [b]; the contrastive loss also needs the (detached) real logits.

    contrastive, g_form='swap' (default): D's loss with the roles of real and fake swapped, the
      non-saturating analogue (each fake should win against the batch of reals, and each real
      should lose against the batch of fakes);
    contrastive, g_form='minimax': G minimises the negated D objective, Eq. 2.3 as written.
    In fp32 whatever D's precision, as d_loss."""
    fake, real = fake.float(), (real.float() if real is not None else None)
    if kind == 'nonsat':
        return F.softplus(-fake).mean()
    if kind == 'sat':  # minimises log(1 - sigmoid(f))
        return -F.softplus(fake).mean()
    if kind in ('wgan', 'hinge'):
        return -fake.mean()
    if kind == 'contrastive':
        if g_form == 'swap':
            return contrastive_d(fake, real)
        if g_form == 'minimax':
            return -contrastive_d(real, fake)
        raise ValueError(f'unknown --g-form {g_form!r}; choose swap or minimax')
    raise ValueError(f'unknown loss {kind!r}; choose one of {", ".join(LOSSES)}')


# ----------------------------------------------------------------------------------------------
# Regularisers

def input_grad_sq(outputs, inputs):
    """Per-sample squared norm of d sum(outputs) / d inputs, differentiable: [B]."""
    (grad,) = torch.autograd.grad(outputs.sum(), inputs, create_graph=True)
    return grad.square().flatten(1).sum(1)


def r1_penalty(real_img, real_logits):
    """R1 = ||grad_x D(x)||^2 on reals ([B]; multiply by gamma / 2). real_img must require grad."""
    return input_grad_sq(real_logits, real_img)


def wgan_gp(D, real, fake, ref=None, t=None, c=None):
    """WGAN-GP: (||grad D(x_hat)|| - 1)^2 on random interpolates of real and fake ([B]; times 10).
    t: the interpolation weights [B, 1, 1, 1] ~ U(0, 1) (default: a fresh draw); ref, c: D's
    references and (class-conditional D) the labels of the interpolates."""
    t = torch.rand(real.shape[0], 1, 1, 1, device=real.device) if t is None else t
    # in fp32 (the fakes may come from a bf16/fp16 G): the penalty is a regulariser, outside autocast
    x_hat = torch.lerp(real.detach().float(), fake.detach().float(), t.float()).requires_grad_(True)
    logits = D(x_hat, **{k: v for k, v in (('ref', ref), ('c', c)) if v is not None})
    return (input_grad_sq(logits, x_hat) + 1e-12).sqrt().sub(1).square()


def path_length_penalty(img, ws, pl_mean, decay=0.01, noise=None):
    """StyleGAN2 path-length regulariser: (||J_w^T y|| - a)^2 with y ~ N(0, I) / sqrt(H W) and `a`
    the running mean of the lengths (decay 0.01; averaged over DDP ranks). Updates pl_mean. [B].
    noise: the N(0, I) draw, shaped like img (default: a fresh one)."""
    noise = (torch.randn_like(img) if noise is None else noise) / math.sqrt(img.shape[2] * img.shape[3])
    (grad,) = torch.autograd.grad((img * noise).sum(), ws, create_graph=True)  # [B, num_ws, w_dim]
    lengths = grad.float().square().sum(2).mean(1).sqrt()  # [B]
    mean = lengths.detach().mean()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(mean)
        mean /= dist.get_world_size()
    pl_mean.copy_(pl_mean.lerp(mean, decay))
    return (lengths - pl_mean).square()


# ----------------------------------------------------------------------------------------------
# EqGAN-SA (Wang et al., CVPR 2022): GradCAM on D (Sec. 2.2) and the alignment loss (Sec. 3.2, Eq. 4)

TRUNCATIONS = ('paper', 'official')
CAM_WEIGHTS = ('graph', 'detached')


def minmax(x, eps=1e-8):
    """Per-sample min-max normalisation of [B, ...] to [0, 1] (all zeros for a constant sample)."""
    flat = x.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo + eps)).view_as(x)


def gradcam(logits, maps, levels, weights='graph'):
    """GradCAM (Selvaraju et al. 2017) of D at the block outputs maps[r], r in levels: {r: [B, 1, r, r]}.

    Score: the logit, i.e. the gradient of "maximising D's output" (Sec. 2.2; the authors' code uses
    the G non-saturating loss, whose per-sample gradient is the logit's times -sigmoid(-logit) / B:
    the opposite sign). Weights w_c = spatial mean of d sum(logits) / dA_c; CAM = ReLU(sum_c w_c A_c),
    min-max normalised per sample. weights='graph': one autograd.grad with create_graph=True, so a
    loss on the CAM reaches G through A and through the weights w_c (the whole derivative of Eq. 4, a
    double backward through D); 'detached': w_c are constants, as in the authors' code (their weights
    come from a separate backward and are detached), so the loss reaches G through A only and costs
    one first-order backward of D above the maps (the graph is kept for the G loss's backward).
    D's parameters get no gradient when frozen (requires_grad_(False), as train.py does in Gmain).
    Samples couple only through D's minibatch-std.
    Reference-attention D: maps above the fusion hold [primaries; references] (2B rows): both rows
    take part in the gradient, then the first B are kept."""
    B = logits.shape[0]
    feats = [maps[r] for r in levels]
    if weights not in CAM_WEIGHTS:
        raise ValueError(f'unknown GradCAM weights {weights!r}; choose one of {", ".join(CAM_WEIGHTS)}')
    grads = torch.autograd.grad(logits.float().sum(), feats, create_graph=weights == 'graph', retain_graph=True)
    cams = {}
    for r, a, g in zip(levels, feats, grads):
        a, g = a[:B].float(), g[:B].float()  # [B, C, r, r]
        w = g.mean([2, 3], keepdim=True)  # [B, C, 1, 1]: importance weight of each channel
        cams[r] = minmax(F.relu((w * a).sum(1, keepdim=True)))  # [B, 1, r, r]
    return cams


def truncated_l1(err, tau=0.25, truncation='paper'):
    """Mean |err| with the truncation of Eq. 4 ("we truncate the L_align values if smaller than tau").
    'paper': elements with |err| <= tau count as 0, the mean is over all elements (a dead zone: the
      plain reading; the loss stays on one scale whatever the number of misaligned elements);
    'official' (the authors' code): the mean over the elements with |err| > tau only, or over all
      elements when fewer than two exceed tau (no host sync: torch.where). Under DDP the counts span
      all processes and each returns world x its share, so the averaged gradients are those of the
      global batch's mean, as one process would take it (a per-process mean over a per-process count
      would not be)."""
    e = err.abs()
    over = e > tau
    if truncation == 'paper':
        return torch.where(over, e, 0).mean()
    if truncation == 'official':
        counts = torch.stack([over.sum().float(), torch.tensor(float(e.numel()), device=e.device)])  # [2]
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:
            dist.all_reduce(counts)
        n, total = counts.unbind()
        return world * torch.where(n >= 2, torch.where(over, e, 0).sum() / n.clamp(min=1), e.sum() / total)
    raise ValueError(f'unknown truncation {truncation!r}; choose one of {", ".join(TRUNCATIONS)}')


def align_loss(logits, maps, heatmaps, tau=0.25, truncation='paper', cam_weights='graph'):
    """Eq. 4: L_align = || GradCAM_D[G(H, z)] - H ||_1, truncated below tau, from the same D forward as
    the adversarial loss: `logits, maps = D(fake, ref, return_maps=True)`. heatmaps: G's dict
    ({'h4': [B, 1, 4, 4], 'h8', 'h16'}); compared at the levels D has maps for (4, 8 and, from 32 px, 16),
    each min-max normalised per sample (maps[r] and 'h{r}' are both r x r); the loss is
    the sum over levels of each level's truncated mean (weight 1 per level, as the authors' code).
    cam_weights: 'graph' or 'detached', see gradcam."""
    levels = [r for r in sorted(maps) if f'h{r}' in heatmaps]
    if not levels:
        raise ValueError(f'no heatmap level matches a D map (maps at {sorted(maps)}, heatmaps {sorted(heatmaps)})')
    cams = gradcam(logits, maps, levels, cam_weights)
    loss = 0
    for r in levels:
        h = minmax(heatmaps[f'h{r}'].float())  # [B, 1, r, r], as cams[r]
        loss = loss + truncated_l1(cams[r] - h, tau, truncation)
    return loss


# The authors' alignment loss (genforce/eqgan-sa training/loss.py), for --eqgan official's networks and
# heatmaps (full resolution R, keys 'b8' / 'b16' / 'b32'). It differs from the paper-text reading above:
OFFICIAL_LEVELS = {4: 'b8', 8: 'b16', 16: 'b32'}  # D block output (4x4 after D block b8, ...) -> heatmap level


def align_loss_official(logits, maps, heatmaps, tau=0.25):
    """Eq. 4 as the authors compute it, from the same D forward as the adversarial loss. Per level
    (the D maps at 4, 8, 16 that exist):
      weights w_c = spatial mean of d sum_i softplus(-logit_i) / dA_c (their G loss as the GradCAM
        score: the opposite sign of the logit's gradient, scaled by sigmoid(-logit)), detached;
      CAM = sum_c ReLU(w_c A_c) (ReLU per channel, before the sum), upsampled bilinearly
        (align_corners=True) to R x R, then (CAM - min) / max with min and max per sample detached and
        no epsilon (a constant CAM gives 0, as their nan_to_num);
      heatmap: level 0 ('b8', one channel) as it is, values in (0.01, 1.01]; finer levels averaged over
        their channels, then (H - min) / max per sample (no epsilon);
      the L1 error truncated as truncated_l1(.., 'official'): the mean over the elements above tau, or
        over all when fewer than two are.
    The levels' losses are summed (weight 1 each). G gets gradients through A only."""
    levels = [r for r in sorted(maps) if r in OFFICIAL_LEVELS and OFFICIAL_LEVELS[r] in heatmaps]
    if not levels:
        raise ValueError(f'no D map at 4, 8 or 16 matches a heatmap level (maps at {sorted(maps)}, heatmaps {sorted(heatmaps)})')
    B, R = logits.shape[0], heatmaps['b8'].shape[-1]
    feats = [maps[r] for r in levels]
    grads = torch.autograd.grad(F.softplus(-logits.float()).sum(), feats, retain_graph=True)
    scale = lambda x: x / torch.where(x.amax([2, 3], keepdim=True) > 0, x.amax([2, 3], keepdim=True), 1).detach()
    shift = lambda x: x - x.amin([2, 3], keepdim=True).detach()
    loss = 0
    for r, a, g in zip(levels, feats, grads):
        w = g[:B].float().mean([2, 3], keepdim=True)  # [B, C, 1, 1], detached (autograd.grad without a graph)
        cam = F.relu(w * a[:B].float()).sum(1, keepdim=True)  # [B, 1, r, r]
        cam = scale(shift(F.interpolate(cam, size=(R, R), mode='bilinear', align_corners=True)))  # [B, 1, R, R]
        h = heatmaps[OFFICIAL_LEVELS[r]].float()  # [B, n, R, R]
        if h.shape[1] > 1:
            h = scale(shift(h.mean(1, keepdim=True)))
        loss = loss + truncated_l1(cam - h, tau, 'official')
    return loss
