"""Evaluation metrics of this project, and `python metrics.py CKPT` to evaluate a checkpoint.

- FID (Heusel et al., NeurIPS 2017) with the FID InceptionV3 (the TF 2015-12-05 graph as ported by
  pytorch-fid: its weights file loads here unchanged), computed the StyleGAN2 way (Karras et al.,
  CVPR 2020): `fid50k_full` = 50k generated images against all real ones. Two Inception input
  protocols: 'stylegan2' (the default, what the papers' tables used: uint8 images, TF1 bilinear
  resize to 299 without half-pixel shift, (x - 128) / 128) and 'pytorch-fid' (F.interpolate bilinear,
  align_corners=False, on [0, 1], then 2x - 1); they differ by about 0.08 FID.
- KID (Binkowski et al., ICLR 2018), improved precision/recall (Kynkaanniemi et al., NeurIPS 2019;
  on the Inception features: the paper's VGG16 weights are not available offline), PPL (StyleGAN,
  Karras et al., CVPR 2019, in StyleGAN2's W-space end-point protocol; see `inception_distance`).
- SWD, the sliced Wasserstein distance on Laplacian-pyramid patches (ProGAN, Karras et al., ICLR
  2018, Appendix D), reported x 1e3 per level and averaged, as in ProGAN's tables.
- DI, the disequilibrium indicator of EqGAN-SA (Wang et al., CVPR 2022, Sec. 4.1), and FDDF, the
  Frechet distance of discriminator features (Yu, thesis Table 2.2; Yu et al., ICCV 2021).
- `evaluate()`, the one entry point of train.py and of the CLI: work sharded over DDP ranks in
  chunks seeded by (seed, chunk) so any number of GPUs gives the same numbers, real-image
  features cached in memory and on disk, progress lines, and the sample counts printed.

SWD, DI and FDDF need no downloaded weights. FID/KID/PR/PPL need pytorch-fid's Inception weights
(FID_WEIGHTS_URL): `--fid-weights PATH`, else the torch hub cache, else a download (skipped when
the environment variable METRICS_NO_DOWNLOAD is set); without them those metrics say so in one line.

    python metrics.py CKPT --metrics fid50k_full,swd,di [--data PATH] [--fid-weights PATH] [--num-gen N]
    python metrics.py CKPT --metrics swd2k,di2k       # offline: no download
    torchrun --nproc_per_node=8 metrics.py CKPT --metrics fid50k_full
"""
import contextlib
import functools
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import urllib.request

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')
PROTOCOLS = ('stylegan2', 'pytorch-fid')


class MetricUnavailable(RuntimeError):
    """A metric cannot run here (no Inception weights); the message is one line saying how to fix it."""

# ----------------------------------------------------------------------------------------------
# FID InceptionV3. The module names follow pytorch-fid (its state dict loads as is). Differences from
# torchvision's Inception3, all from the TF graph: the pool branch of the A, C and E_1 blocks averages
# without the padding (count_include_pad=False), that of E_2 (Mixed_7c) is a max pool; BN eps 1e-3.

class _BN(nn.Module):  # inference BatchNorm without the num_batches_tracked buffer, absent from the weights file
    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer('running_mean', torch.zeros(c))
        self.register_buffer('running_var', torch.ones(c))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, 1e-3)


class _Conv(nn.Module):  # conv (no bias) -> BN -> ReLU
    def __init__(self, cin, cout, k, stride=1, padding=0):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, k, stride, padding, bias=False), _BN(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):  # TF's 3x3 average pool ignores the padded zeros
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class _BlockA(nn.Module):  # Mixed_5b/c/d: 35x35
    def __init__(self, cin, pool):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 64, 1), _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool(x))], 1)


class _BlockB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 64, 1), _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)


class _BlockC(nn.Module):  # Mixed_6b-e: 17x17, factorised 7x7 convolutions with c7 channels
    def __init__(self, cin, c7):
        super().__init__()
        row, col = dict(k=(1, 7), padding=(0, 3)), dict(k=(7, 1), padding=(3, 0))
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = _Conv(cin, c7, 1), _Conv(c7, c7, **row)
        self.branch7x7_3 = _Conv(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = _Conv(cin, c7, 1), _Conv(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = _Conv(c7, c7, **row), _Conv(c7, c7, **col)
        self.branch7x7dbl_5 = _Conv(c7, 192, **row)
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                          self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)), self.branch_pool(_avg_pool(x))], 1)


class _BlockD(nn.Module):  # Mixed_7a: 17x17 -> 8x8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = _Conv(cin, 192, 1), _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3, self.branch7x7x3_4 = _Conv(192, 192, (7, 1), padding=(3, 0)), _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)


class _BlockE(nn.Module):  # Mixed_7b (E_1, average pool) and Mixed_7c (E_2, max pool): 8x8
    def __init__(self, cin, max_pool):
        super().__init__()
        row, col = dict(k=(1, 3), padding=(0, 1)), dict(k=(3, 1), padding=(1, 0))
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = _Conv(384, 384, **row), _Conv(384, 384, **col)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 448, 1), _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = _Conv(384, 384, **row), _Conv(384, 384, **col)
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b3, dbl = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl), self.branch_pool(pool)], 1)


class FIDInception(nn.Module):
    """uint8 images [N, C, H, W] of any size (or floats in [0, 255]) -> pool3 features [N, 2048]."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = _Conv(3, 32, 3, stride=2), _Conv(32, 32, 3)
        self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = _Conv(32, 64, 3, padding=1), _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _BlockA(192, 32), _BlockA(256, 64), _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = (_BlockC(768, c) for c in (128, 160, 160, 192))
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = _BlockD(768), _BlockE(1280, False), _BlockE(2048, True)
        self.fc = nn.Linear(2048, 1008)  # the TF graph's classifier: in the weights file, unused for FID

    def forward(self, x, protocol='stylegan2'):
        x = _inception_input(x, protocol).contiguous(memory_format=torch.channels_last)  # [N, 3, 299, 299]
        x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, 2)  # [N, 64, 73, 73]
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)               # [N, 192, 35, 35]
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)                                                                 # ... [N, 2048, 8, 8]
        return x.mean((2, 3))                                                            # [N, 2048]


@functools.lru_cache(maxsize=16)  # built once per size and device, not for every Inception batch (read only)
def _tf1_resize_matrix(n_in, n_out, device):  # [n_out, n_in] weights of TF1 resize_bilinear(align_corners=False)
    src = torch.arange(n_out, dtype=torch.float32) * (n_in / n_out)  # dst * in / out, no half-pixel shift, float32 as TF
    i0 = src.floor().long()
    frac, rows = src - i0, torch.arange(n_out)
    m = torch.zeros(n_out, n_in)
    m[rows, i0] += 1 - frac
    m[rows, (i0 + 1).clamp(max=n_in - 1)] += frac  # the last source pixel repeats past the edge
    return m.to(device)


def resize_tf1(x, h, w):
    """TF1 bilinear resize (StyleGAN2's FID input) as two matmuls: [N, C, H, W] float -> [N, C, h, w]."""
    return _tf1_resize_matrix(x.shape[2], h, x.device) @ x @ _tf1_resize_matrix(x.shape[3], w, x.device).T


def _inception_input(x, protocol):  # [N, C, H, W] in [0, 255] -> [N, 3, 299, 299] in [-1, 1]
    x = x.float().expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.float()
    if protocol == 'stylegan2':
        return (resize_tf1(x, 299, 299) - 128) / 128
    if protocol == 'pytorch-fid':
        return F.interpolate(x / 255, size=(299, 299), mode='bilinear', align_corners=False) * 2 - 1
    raise ValueError(f'protocol must be one of {PROTOCOLS}, not {protocol!r}')


def _few(keys, k=3):  # 'a, b, c and 5 more' (or 'none')
    return ', '.join(keys[:k]) + (f' and {len(keys) - k} more' if len(keys) > k else '') if keys else 'none'


def load_inception(weights=None, device='cpu'):
    """FIDInception with pytorch-fid's weights from the file `weights`, else the torch hub cache, else a download
    (10 s timeout; not tried when METRICS_NO_DOWNLOAD is set). Raises MetricUnavailable when none works."""
    hub = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(FID_WEIGHTS_URL))
    path = weights or hub
    if weights is None and not os.path.isfile(path) and not os.environ.get('METRICS_NO_DOWNLOAD'):
        _download(FID_WEIGHTS_URL, path)
    if not os.path.isfile(path):
        raise MetricUnavailable(f'no FID Inception weights at {path}: download {FID_WEIGHTS_URL} and pass '
                                f'--fid-weights PATH (or save it as {hub})')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
        state = {k: v for k, v in state.items() if not k.endswith('num_batches_tracked')}  # BN counters: unused
    except Exception as e:  # truncated download, another format: one line, training goes on without FID
        raise MetricUnavailable(f'{path} is not a readable state dict ({type(e).__name__}): download '
                                f'{FID_WEIGHTS_URL} again') from None
    net = FIDInception()
    own = net.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shape = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or shape:
        raise MetricUnavailable(f'{path} is not the pytorch-fid Inception: missing {_few(missing)}; '
                                f'unexpected {_few(unexpected)}; wrong shape {_few(shape)}')
    net.load_state_dict(state)
    return net.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)  # faster in oneDNN and cuDNN


def _download(url, path):  # best effort: on any failure the caller reports the missing file
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.{os.getpid()}.part'
    print(f'downloading {url}', file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=10) as r, open(tmp, 'wb') as f:
            shutil.copyfileobj(r, f)
        with open(tmp, 'rb') as f:  # torch hub convention: the name ends with the sha256 prefix
            if hashlib.sha256(f.read()).hexdigest().startswith(url.rsplit('-', 1)[1].split('.')[0]):
                os.replace(tmp, path)
            else:
                print('download failed: checksum mismatch', file=sys.stderr)
    except OSError as e:
        print(f'download failed: {e}', file=sys.stderr)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

# ----------------------------------------------------------------------------------------------
# Frechet distance, KID, precision/recall: on feature matrices [N, F].

def feature_stats(x):
    """Mean [F] and unbiased covariance [F, F] of features [N, F]: float64, on x's device."""
    x = torch.as_tensor(x).double()
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (len(x) - 1)


def _clip_roundoff(lam):  # eigenvalues below round-off level (F * eps * largest) -> 0: the square root would amplify them
    return torch.where(lam > lam.max() * len(lam) * torch.finfo(lam.dtype).eps, lam, 0.0)


# Heusel et al. 2017: d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))
def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (numpy or torch), in float64.

    tr (S1 S2)^(1/2) is the sum of the square roots of the eigenvalues of M = R^T S2 R for any R with
    R R^T = S1: M is similar to S2 S1 (and shares its nonzero eigenvalues when S1 is singular) but
    symmetric PSD, so eigvalsh is stable, no complex parts arise and no eps is added to the covariances.
    R is the Cholesky factor (cheap; of S2 with the roles swapped when only S1 is singular, e.g. fewer
    generated samples than features), or when both are singular the symmetric root of S1 from eigh. Eigenvalues at round-off level (tiny, even negative) are set to 0 before square
    roots, so that a singular set scores ~1e-15 rather than ~1e-8 against itself."""
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, sigma1, mu2, sigma2))
    for a, b in ((sigma1, sigma2), (sigma2, sigma1)):         # tr (S1 S2)^(1/2) = tr (S2 S1)^(1/2)
        root, info = torch.linalg.cholesky_ex(a)              # [F, F], a = L L^T
        if not info:
            break
    else:                                                     # both singular
        lam, u = torch.linalg.eigh(sigma1)
        root, b = (u * _clip_roundoff(lam).sqrt()) @ u.T, sigma2  # S1^(1/2)
    m = root.T @ b @ root
    tr_covmean = _clip_roundoff(torch.linalg.eigvalsh((m + m.T) / 2)).sqrt().sum()
    return ((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_covmean).item()


# KID (Binkowski et al. 2018): unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, mean over 100 subsets of up to 1000
def kernel_inception_distance(real, fake, num_subsets=100, max_subset_size=1000, seed=0):
    real, fake = real.double(), fake.double()                 # [N, d], [M, d]
    d, m = real.shape[1], min(len(real), len(fake), max_subset_size)
    g, total = torch.Generator().manual_seed(seed), 0.0
    for _ in range(num_subsets):
        x = fake[torch.randperm(len(fake), generator=g)[:m].to(fake.device)]
        y = real[torch.randperm(len(real), generator=g)[:m].to(real.device)]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        total += (within - 2 * kxy.mean()).item()
    return total / num_subsets


# Kynkaanniemi et al. 2019: a sample is covered by a set when it lies in the ball of some member whose radius is
# the distance from that member to its k-th nearest neighbour in the set; precision = share of fakes covered by
# the reals, recall = share of reals covered by the fakes.
def precision_recall(real, fake, k=3, block=4096):
    def radii(x):                                             # [N] distance to the k-th nearest other point
        out = []
        for i in range(0, len(x), block):
            best = x.new_empty(len(x[i:i + block]), 0)
            for j in range(0, len(x), block):                # keep the k + 1 smallest (the point itself is one)
                best = torch.cat([best, torch.cdist(x[i:i + block], x[j:j + block])], 1)
                best = best.topk(min(k + 1, best.shape[1]), 1, largest=False).values
            out.append(best[:, k])
        return torch.cat(out)

    def covered(p, x, r):                                    # [P] share of p inside any ball (x_j, r_j)
        hits = []
        for i in range(0, len(p), block):
            hit = torch.zeros(len(p[i:i + block]), dtype=torch.bool, device=p.device)
            for j in range(0, len(x), block):
                hit |= (torch.cdist(p[i:i + block], x[j:j + block]) <= r[j:j + block]).any(1)
            hits.append(hit)
        return torch.cat(hits).float().mean().item()

    assert len(real) > k and len(fake) > k, 'precision/recall needs more than k samples per set'
    real, fake = real.float(), fake.float()
    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))

# ----------------------------------------------------------------------------------------------
# SWD (Karras et al. 2018, App. D): Laplacian pyramid from full resolution down to 16x16, 128 random 7x7
# patches per image and level; per level, each set's descriptors normalised per colour channel with its own
# mean and std, then the mean over 4 x 128 random unit directions of the 1-D Wasserstein-1 distance between
# the sorted projections (equal set sizes).

_GAUSS = torch.tensor([1., 4., 6., 4., 1.]).outer(torch.tensor([1., 4., 6., 4., 1.])) / 256  # [5, 5] binomial


def _blur(x, kernel):  # depthwise 5x5, mirrored borders (scipy's 'mirror' = torch's 'reflect'), as ProGAN
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode='reflect'), kernel.to(x).expand(x.shape[1], 1, 5, 5), groups=x.shape[1])


def laplacian_pyramid(x, levels):
    """[N, C, H, W] float -> `levels` tensors, finest first: band-pass differences, then the coarse residual."""
    pyramid = []
    for _ in range(levels - 1):
        down = _blur(x, _GAUSS)[:, :, ::2, ::2]               # [N, C, H/2, W/2]
        up = torch.zeros_like(x)
        up[:, :, ::2, ::2] = down
        pyramid.append(x - _blur(up, 4 * _GAUSS))
        x = down
    return pyramid + [x]


def swd_resolutions(res):  # ProGAN's levels: res, res/2, ... down to 16 (one level below 32)
    return [res >> i for i in range(max(1, int(math.log2(res)) - 3))]


def swd_descriptors(images, seed, patches=128, size=7):
    """uint8 [N, C, H, W] -> raw patch descriptors [N, levels, patches, C, size^2] at random positions (seeded)."""
    g, h, out = torch.Generator().manual_seed(seed), size // 2, []
    off = torch.arange(-h, h + 1, device=images.device)
    for lap in laplacian_pyramid(images.float(), len(swd_resolutions(images.shape[-1]))):
        n, c, H, W = lap.shape
        ys = torch.randint(h, H - h, (n, patches, 1, 1, 1), generator=g).to(images.device) + off[:, None]
        xs = torch.randint(h, W - h, (n, patches, 1, 1, 1), generator=g).to(images.device) + off
        i, ch = torch.arange(n, device=images.device), torch.arange(c, device=images.device)
        out.append(lap[i[:, None, None, None, None], ch[:, None, None], ys, xs].flatten(3))  # [N, P, C, size^2]
    return torch.stack(out, 1)


def sliced_wasserstein(desc_a, desc_b, seed=0, repeats=4, dirs=128, device=None, rows=16384, cols=32):
    """Descriptors [N, levels, P, C, S] of two sets of N images -> SWD per level (list of floats; x 1e3 in reports).
    Memory beyond the descriptors stays bounded, whatever N: each set is standardised and projected on `device`
    (default: the descriptors') `rows` descriptors at a time, onto `cols` of the directions at a time, so that
    only those columns' projections of all N P descriptors ([N P, cols] per set, what W1 sorts) exist at once."""
    assert desc_a.shape == desc_b.shape, 'SWD compares sets of equal size'
    device = desc_a.device if device is None else torch.device(device)
    g, out = torch.Generator().manual_seed(seed), []
    for level in range(desc_a.shape[1]):
        sets = [(d[:, level], *(t.to(device) for t in _channel_stats(d[:, level]))) for d in (desc_a, desc_b)]
        total = torch.zeros([], dtype=torch.float64, device=device)  # of |sorted a - sorted b| over every direction
        for _ in range(repeats):
            v = torch.randn(desc_a[0, 0, 0].numel(), dirs, generator=g)
            v /= v.norm(dim=0)                                # unit directions [C * S, dirs]
            for j in range(0, dirs, cols):
                a, b = (_sort0(_project(*s, v[:, j:j + cols].to(device), rows)) for s in sets)  # [N * P, cols] sorted
                total += (a - b).abs_().sum(dtype=torch.float64)
        out.append(total.item() / (repeats * dirs * desc_a.shape[0] * desc_a.shape[2]))  # the mean over N P x dirs x repeats
    return out


def _channel_stats(d):  # [N, P, C, S] -> mean and std [C, 1] per colour channel over descriptors and values (ddof 0)
    # (each set normalised with its own statistics, as ProGAN's finalize_descriptors)
    var, mean = torch.var_mean(d.float(), (0, 1, 3), correction=0)
    return mean[:, None], var.sqrt()[:, None]


def _project(d, mean, std, v, rows):  # [N, P, C, S] standardised by mean, std [C, 1], times v [C * S, k] -> [N * P, k]
    n, p = d.shape[:2]
    out, step = v.new_empty(n * p, v.shape[1]), max(1, rows // p)  # images per chunk
    for i in range(0, n, step):
        x = d[i:i + step].to(v.device).float() - mean  # [step, P, C, S] (a new tensor: divided in place)
        x /= std
        torch.matmul(x.flatten(2).flatten(0, 1), v, out=out[i * p:(i + step) * p])
    return out


def _sort0(x):  # along dim 0; on CPU in place, where numpy's SIMD sort is ~13x faster than torch's (SWD time is sorting)
    if x.device.type != 'cpu':
        return x.sort(0).values
    x.numpy().sort(axis=0)
    return x

# ----------------------------------------------------------------------------------------------
# Discriminator-based metrics (from precomputed logits / features) and PPL.

# DI (Wang et al. 2022, Sec. 4.1): DI = min(s_r) - max(s_g) over 64 real and 64 generated raw logits, mean of 200 draws
def disequilibrium_indicator(real_logits, fake_logits, draws=200, size=64, seed=0):
    real, fake = real_logits.double().cpu(), fake_logits.double().cpu()  # [N], [M]
    g = torch.Generator().manual_seed(seed)
    draw = lambda x: x[torch.randperm(len(x), generator=g)[:size]]  # without replacement
    di = [draw(real).min() - draw(fake).max() for _ in range(draws)]
    return torch.stack(di).mean().item()


# FDDF (Yu, thesis Table 2.2): Frechet distance between D's last-layer features of real and generated images
def fddf(real_features, fake_features):
    return frechet_distance(*feature_stats(real_features), *feature_stats(fake_features))


def inception_distance(net, protocol='stylegan2'):
    """PPL's default distance: LPIPS (VGG16) weights are not available offline, so the squared L2 distance between
    FID Inception features, images [B, 3, H, W] in [-1, 1] -> [B]. Its PPL is NOT comparable with published
    (LPIPS) numbers, only between models measured here; pass any callable of the same form instead."""
    def distance(a, b):
        fa, fb = net(torch.cat([a, b]).add(1).mul(127.5), protocol).chunk(2)  # not quantised, as in StyleGAN2's PPL
        return (fa - fb).square().sum(1)
    return distance


@contextlib.contextmanager
def _no_tf32():  # full fp32 on GPUs: PPL's differences (~1e-4 of the image) would drown in TF32 (cuDNN's default)
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@contextlib.contextmanager
def _eval_mode(*nets):  # batch norm's running stats and spectral norm's power iteration (u, v) stay as training left them
    modes = [(m, m.training) for net in nets for m in net.modules()]
    for net in nets:
        net.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _fork_rng(device):  # seeding per chunk must not change the caller's RNG stream (a resumed training relies on it)
    device = torch.device(device)
    return torch.random.fork_rng(devices=[device] if device.type == 'cuda' else [])


# PPL (Karras et al. 2019, Eq. 4; StyleGAN2's W-space end-point protocol): d(g(w0), g(lerp(w0, w1, eps))) / eps^2
# for t = 0, eps = 1e-4, in full precision, then the mean without the 1% and 99% tails.
def perceptual_path_length(G, num, distance, batch=64, device='cpu', seed=0, epsilon=1e-4, crop=False,
                           rank=0, world_size=1, log=print, labels=None):
    """labels: for a class-conditional G, the real labels [N] both end points of a pair draw theirs from."""
    def chunk(c):
        torch.manual_seed(_seed(seed, 5, c))
        heatmaps = G.sample_heatmaps(batch, device)  # one layout for both end points (None without spatial encoding)
        cls = _draw_labels(labels, G, batch, _seed(seed, 6, c), device)  # one label for both end points
        w0, w1 = (G.map(z, psi=1.0, heatmaps=heatmaps, **_label_kw(cls)) for z in torch.randn(2, batch, G.z_dim, device=device))
        img0, img1 = (G.synthesize(w, noise_mode='const', heatmaps=heatmaps).float() for w in (w0, w0.lerp(w1, epsilon)))
        if crop:  # StyleGAN's FFHQ face crop
            s = img0.shape[2] // 8
            img0, img1 = img0[:, :, 3 * s:7 * s, 2 * s:6 * s], img1[:, :, 3 * s:7 * s, 2 * s:6 * s]
        return distance(img0, img1).double() / epsilon ** 2  # [B]

    with torch.no_grad(), _no_tf32(), _fork_rng(device):
        d = _sharded(num, batch, rank, world_size, chunk, {'d': (num, lambda d, c: d.cpu())}, log, 'ppl pairs')['d']
    d = d.numpy()
    lo, hi = np.percentile(d, 1, method='lower'), np.percentile(d, 99, method='higher')
    return float(d[(d >= lo) & (d <= hi)].mean())

# ----------------------------------------------------------------------------------------------
# evaluate(): the entry point. Work is cut into chunks of `batch` items, chunk c seeded by (seed, c) and
# handled by rank c % world_size; all_gather puts the results back in chunk order, so every rank ends up with
# the same arrays whatever world_size is, and computes the same numbers from them.

_DEFAULT_NUM = dict(fid=50000, kid=50000, pr=50000, swd=16384, fddf=50000, di=12800, ppl=50000, ppl_crop=50000)  # di: 200 draws x 64
_FULL_CAP = dict(kid=1000000, pr=200000)  # StyleGAN2's caps on 'all real images'
_NAME = re.compile(r'(?P<kind>fid|kid|pr|swd|fddf|di)(?P<num>\d+)?(?P<k>k)?(?P<nhood>(?<=k)3)?(?P<full>_full)?|ppl(?P<ppl2>2?)_wend')
_INCEPTION = ('fid', 'kid', 'pr', 'ppl', 'ppl_crop')
_SOURCE = dict(fid='inc', kid='inc', pr='inc', swd='swd', di='d', fddf='d')  # which features each metric uses
_REAL_CACHE = {}  # real Inception features of this process, by cache key
_NETS = {}  # (weights, device) -> FIDInception or its MetricUnavailable


def _parse(name, num_gen, n_data):  # -> (kind, generated count, real count)
    m = _NAME.fullmatch(name)
    if not m or (m['nhood'] and m['kind'] != 'pr'):
        raise ValueError(f'unknown metric {name!r}: use fid50k_full, fid10k, fid2000, kid50k_full, pr50k3_full, '
                         'ppl2_wend, ppl_wend, swd, di, fddf (counts like 10k in the name, _full = all real images)')
    kind = m['kind'] or ('ppl' if m['ppl2'] else 'ppl_crop')  # stylegan2-ada: ppl2_wend uncropped, ppl_wend cropped
    n = num_gen or (int(m['num']) * (1000 if m['k'] else 1) if m['num'] else _DEFAULT_NUM[kind])
    if kind.startswith('ppl'):
        return kind, n, 0
    n_real = min(n_data, _FULL_CAP.get(kind, n_data)) if m['full'] else min(n, n_data)
    return kind, (n_real if kind == 'swd' else n), n_real


def _draw_labels(labels, G, n, seed, device):
    """One-hot labels [n, c_dim] of n random real images (the official protocol for generated images),
    or None for an unconditional G."""
    if not getattr(G, 'c_dim', 0):
        return None
    idx = torch.randint(len(labels), (n,), generator=torch.Generator().manual_seed(seed))
    return F.one_hot(torch.as_tensor(labels)[idx], G.c_dim).float().to(device)


def _label_kw(cls):  # networks without labels take no c argument
    return {} if cls is None else {'c': cls}


def _seed(seed, stream, chunk):  # independent, reproducible seed per (run seed, use, chunk)
    return int(np.random.SeedSequence([seed, stream, chunk]).generate_state(1, np.uint64)[0])


def _all_ranks(flag, world_size):  # True when flag holds on every rank
    if world_size == 1:
        return flag
    t = torch.tensor([int(flag)], device='cuda' if dist.get_backend() == 'nccl' else 'cpu')
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _gather(x, world_size):  # this rank's chunks [m, batch, ...] -> all chunks in order [m * world_size * batch, ...]
    if world_size == 1:
        return x.flatten(0, 1)
    x = x.cuda() if dist.get_backend() == 'nccl' else x.cpu()  # NCCL moves CUDA tensors only
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.stack(parts, 1).flatten(0, 2).cpu()          # [m, world_size, batch, ...]: chunk i * world_size + r


def _sharded(n, batch, rank, world_size, produce, consumers, log, what):
    """Runs produce(c) for this rank's chunks c = rank, rank + world_size, ... and feeds each result to every
    consumer {key: (n_k, fn(inp, c) -> [batch, ...])} that needs chunk c; returns {key: [n_k, ...]} in item order.
    Chunks are full and each consumer runs on a multiple of world_size chunks (surplus dropped), so that all ranks
    gather equal shapes."""
    per_rank = {k: math.ceil(math.ceil(nk / batch) / world_size) for k, (nk, _) in consumers.items()}
    steps, outs = max(per_rank.values(), default=0), {}
    t0 = last = time.perf_counter()
    for i in range(steps):
        c = rank + i * world_size
        inp = produce(c)
        for k, (_, fn) in consumers.items():
            if i < per_rank[k]:
                x = fn(inp, c)
                if i == 0:  # filled in place: a list stacked at the end would hold the results twice
                    outs[k] = x.new_empty([per_rank[k], *x.shape])  # [chunks, batch, ...]
                outs[k][i] = x
        if time.perf_counter() - last > 5:  # in-loop metrics must not look like a hang
            done, last = (i + 1) * world_size * batch, time.perf_counter()
            log(f'{min(done, n)}/{n} {what}, {done / (last - t0):.0f}/s')
    return {k: _gather(v, world_size)[:consumers[k][0]].cpu() for k, v in outs.items()}  # one sync each


def _inception_once(weights, device, rank, world_size):
    """load_inception once per process and device (a failed download is not retried at every evaluation);
    rank 0 first, as it may download, then the others. Raises MetricUnavailable unless every rank has it."""
    key = (weights, str(device))
    if key not in _NETS:
        if rank > 0:
            dist.barrier()
        try:
            _NETS[key] = load_inception(weights, device)
        except MetricUnavailable as e:
            _NETS[key] = e
        finally:
            if rank == 0 and world_size > 1:
                dist.barrier()
    net = _NETS[key]
    if not _all_ranks(isinstance(net, FIDInception), world_size):  # all ranks must run the same passes
        raise net if isinstance(net, MetricUnavailable) else MetricUnavailable(
            'FID Inception weights missing on another rank: pass --fid-weights PATH')
    return net


def _autocast(device, amp):  # G and D in the precision they trained in: fp32 unless --amp
    return torch.autocast(device.type, dtype=torch.float16 if amp == 'fp16' else torch.bfloat16, enabled=amp != 'none')


def evaluate(names, G, D, dataset, device, rank=0, world_size=1, batch=64, num_gen=None, fid_weights=None,
             cache_dir=None, protocol='stylegan2', seed=0, amp='none', log=print, worker_init_fn=None):
    """{metric name: float or dict} for names like fid50k_full, kid50k_full, pr50k3_full, ppl2_wend, swd, di, fddf;
    the same on every rank. G: G_ema (G(z) -> [B, 3, H, W] in [-1, 1]); D: the plain (not DDP-wrapped) discriminator;
    dataset: uint8 [3, H, W] items. num_gen overrides the counts in the names. amp: 'none' (fp32), 'bf16' or 'fp16'
    autocast of G and D (train.py passes its --amp). Metrics that cannot run (no Inception weights) are logged in
    one line and left out. worker_init_fn: of the real-image loader's workers (GPU only). The global RNG state is
    restored on return."""
    device = torch.device(device)
    log = log if rank == 0 else (lambda *_: None)
    specs = {name: _parse(name, num_gen, len(dataset)) for name in names}
    # Inception runs in full fp32 (no TF32), as the reference numbers; G and D in fp32 unless amp says otherwise;
    # G and D in eval mode: evaluating must not change what training continues with
    with torch.no_grad(), _no_tf32(), _fork_rng(device), _eval_mode(G, D):
        inception = None
        if any(kind in _INCEPTION for kind, _, _ in specs.values()):
            try:
                inception = _inception_once(fid_weights, device, rank, world_size)
            except MetricUnavailable as e:
                log(f'skipping {", ".join(n for n, s in specs.items() if s[0] in _INCEPTION)}: {e}')
                specs = {n: s for n, s in specs.items() if s[0] not in _INCEPTION}

        def most(source, i):  # the largest count (i = 1: generated, 2: real) of a source; smaller ones use a prefix
            return max([s[i] for s in specs.values() if _SOURCE.get(s[0]) == source], default=0)

        def d_features(stream):  # chunk -> [batch, 1 + F]: D's logit, then its last-layer features
            def fn(inp, c):  # inp: (images in [-1, 1], uint8 images, one-hot labels or None)
                ref = None
                if D.needs_ref:  # reference images: real, drawn independently of the primary ones
                    g = torch.Generator().manual_seed(_seed(seed, stream, c))
                    idx = torch.randint(len(dataset), (batch,), generator=g).tolist()
                    ref = torch.stack([torch.as_tensor(dataset[i]) for i in idx]).to(device).float() / 127.5 - 1
                with _autocast(device, amp):
                    logits, feats = D(inp[0], ref=ref, return_features=True, **_label_kw(inp[2]))
                return torch.cat([logits.float()[:, None], feats.float().flatten(1)], 1)  # on the device until the end
            return fn

        def extractors(n_inc, n_swd, n_d, stream):  # {key: (count, chunk fn)} for _sharded
            out = {}
            if n_inc:
                out['inc'] = (n_inc, lambda inp, c: inception(inp[1], protocol))  # [B, 2048], on the device until the end
            if n_swd:  # to the host per chunk: at 256 px the descriptors of 16k images take ~6 GB
                out['swd'] = (n_swd, lambda inp, c: swd_descriptors(inp[1], _seed(seed, stream, c)).cpu())
            if n_d:
                out['d'] = (n_d, d_features(stream + 1))
            return out

        # Real images: Inception features (cached in memory and on disk), SWD descriptors, D logits and features.
        n_inc = most('inc', 2)
        key = f'{dataset.name}-{dataset.resolution}px-{n_inc}-{protocol}'
        stem = re.sub(r'[^\w.-]', '_', dataset.name)  # the hash tells counts and protocols apart
        path = cache_dir and os.path.join(cache_dir, f'{stem}-{hashlib.md5(key.encode()).hexdigest()[:12]}.pt')
        if n_inc and key not in _REAL_CACHE and _all_ranks(bool(path) and os.path.isfile(path), world_size):
            _REAL_CACHE[key] = torch.load(path, weights_only=True)
            log(f'real Inception features from {path}')
        consumers = extractors(0 if key in _REAL_CACHE else n_inc, most('swd', 2), most('d', 2), 1)
        n = max([nk for nk, _ in consumers.values()], default=0)
        steps = math.ceil(math.ceil(n / batch) / world_size)  # every chunk full: indices wrap around the data
        idx = [((rank + i * world_size) * batch + j) % len(dataset) for i in range(steps) for j in range(batch)]
        loader = iter(torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=batch,
                                                  num_workers=3 if device.type == 'cuda' and idx else 0,
                                                  worker_init_fn=worker_init_fn))

        def reals(c):
            x8 = next(loader).to(device)                      # [B, 3, H, W] uint8
            cls = None
            if getattr(G, 'c_dim', 0):                        # this chunk's labels: the same indices as the loader's
                chunk = torch.as_tensor(dataset.labels[idx[(c // world_size) * batch:(c // world_size + 1) * batch]])
                cls = F.one_hot(chunk, G.c_dim).float().to(device)
            return x8.float() / 127.5 - 1, x8, cls

        real = _sharded(n, batch, rank, world_size, reals, consumers, log, 'real images')
        if 'inc' in real:
            _REAL_CACHE[key] = real['inc']
            if path and rank == 0:
                os.makedirs(cache_dir, exist_ok=True)
                torch.save(real['inc'], f'{path}.{os.getpid()}.tmp')
                os.replace(f'{path}.{os.getpid()}.tmp', path)  # atomic: a killed run leaves no half file
        real['inc'] = _REAL_CACHE.get(key)

        # Generated images: the same extractors on G(z), z and G's own noise/heatmaps seeded per chunk.
        def fakes(c):
            torch.manual_seed(_seed(seed, 0, c))
            cls = _draw_labels(dataset.labels if getattr(G, 'c_dim', 0) else None, G, batch, _seed(seed, 6, c), device)
            with _autocast(device, amp):
                x = G(torch.randn(batch, G.z_dim, device=device), **_label_kw(cls)).float()  # [B, 3, H, W]
            return x, (x * 127.5 + 128).clamp(0, 255).to(torch.uint8), cls

        consumers = extractors(most('inc', 1), most('swd', 1), most('d', 1), 3)
        n = max([nk for nk, _ in consumers.values()], default=0)
        fake = _sharded(n, batch, rank, world_size, fakes, consumers, log, 'generated images')

        results = {}
        for name, (kind, n, n_real) in specs.items():
            t = time.perf_counter()
            if kind in _SOURCE:                                # features of the n_real real and n generated images
                r, f = real[_SOURCE[kind]][:n_real], fake[_SOURCE[kind]][:n]
                if kind != 'swd':  # (SWD's descriptors stay on the host: it takes them to the device in chunks)
                    r, f = r.to(device), f.to(device)
            if kind == 'fid':
                v = frechet_distance(*feature_stats(r), *feature_stats(f))
            elif kind == 'kid':
                v = kernel_inception_distance(r, f, seed=seed)
            elif kind == 'pr':
                v = dict(zip(('precision', 'recall'), precision_recall(r, f)))
            elif kind == 'swd':
                levels = sliced_wasserstein(r, f, seed=seed, device=device)
                v = {str(res): 1e3 * x for res, x in zip(swd_resolutions(dataset.resolution), levels)}
                v['avg'] = sum(levels) * 1e3 / len(levels)
            elif kind == 'di':
                v = disequilibrium_indicator(r[:, 0], f[:, 0], seed=seed)
            elif kind == 'fddf':
                v = fddf(r[:, 1:], f[:, 1:])
            else:
                v = perceptual_path_length(G, n, inception_distance(inception, protocol), batch, device, seed,
                                           crop=kind == 'ppl_crop', rank=rank, world_size=world_size, log=log,
                                           labels=dataset.labels if getattr(G, 'c_dim', 0) else None)
            results[name] = v
            shown = ', '.join(f'{k} {x:.4g}' for k, x in v.items()) if isinstance(v, dict) else f'{v:.4g}'
            counts = f'{n} generated' + (f' vs {n_real} real' if n_real else '')
            log(f'{name}: {shown}  ({counts}; {time.perf_counter() - t:.1f}s)')
    return results


def plot_curves(series, path, title='', xlabel='kimg', size=(720, 400), beside=None):
    """A line plot with Pillow alone: series = [(label, xs, ys)] or [(label, xs, ys, lo, hi)] (a band drawn
    under the line, e.g. +-1 std over seeds) -> PNG (e.g. EqGAN-SA Fig. 1's curves); beside: a PNG (e.g.
    sample grids) placed to the left of the plot in the same file."""
    from PIL import Image, ImageDraw
    W, H, L, R, T, B = *size, 56, 200, 28, 36
    xs = [x for _, sx, *_ in series for x in sx]
    ys = [y for _, _, *bands in series for band in bands for y in band]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    pad = 0.05 * (y1 - y0 or 1)
    y0, y1 = y0 - pad, y1 + pad
    px = lambda x: L + (x - x0) / (x1 - x0 or 1) * (W - L - R)
    py = lambda y: H - B - (y - y0) / (y1 - y0) * (H - T - B)
    img = Image.new('RGB', size, 'white')
    d = ImageDraw.Draw(img)
    d.rectangle([L, T, W - R, H - B], outline='black')
    for i in range(5):  # ticks and labels
        x, y = x0 + i * (x1 - x0) / 4, y0 + i * (y1 - y0) / 4
        d.line([(px(x), H - B), (px(x), H - B + 4)], fill='black')
        d.text((px(x) - 10, H - B + 6), f'{x:g}', fill='black')
        d.line([(L - 4, py(y)), (L, py(y))], fill='black')
        d.text((4, py(y) - 5), f'{y:.2f}', fill='black')
    if y0 < 0 < y1:
        d.line([(L, py(0)), (W - R, py(0))], fill=(200, 200, 200))
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    for k, (label, sx, sy, *band) in enumerate(series):
        c = colours[k % len(colours)]
        if band:
            d.polygon([(px(x), py(y)) for x, y in [*zip(sx, band[0]), *reversed(list(zip(sx, band[1])))]],
                      fill=tuple(255 - (255 - v) // 4 for v in c))
    for k, (label, sx, sy, *band) in enumerate(series):
        c = colours[k % len(colours)]
        d.line([(px(x), py(y)) for x, y in zip(sx, sy)], fill=c, width=2)
        if len(sx) == 1:  # one evaluation: a line of one point draws nothing
            d.ellipse([px(sx[0]) - 3, py(sy[0]) - 3, px(sx[0]) + 3, py(sy[0]) + 3], fill=c)
        d.text((W - R + 10, T + 16 * k), label, fill=c)
    d.text((L, 8), title, fill='black')
    d.text(((W - R + L) // 2 - 10, H - 16), xlabel, fill='black')
    if beside:
        left = Image.open(beside).convert('RGB')
        both = Image.new('RGB', (left.width + W, max(left.height, H)), 'white')
        both.paste(left, (0, 0))
        both.paste(img, (left.width, 0))
        img = both
    img.save(path)


def read_log(log):
    """train.py's log.jsonl -> its lines, metric lines flattened ('di2k', 'swd2k/avg', 'pr50k3_full/precision')."""
    return [dict(r, **_flat(r.pop('metrics', {}))) for r in map(json.loads, open(log))]


def run_name(log, seeds=False):  # the run folder; seeds: without its '-s<seed>' suffix (runs that differ only by seed)
    run = os.path.basename(os.path.dirname(os.path.abspath(log)))
    return _unseeded(run) if seeds else run


def _unseeded(run):  # 'sngan-nonsat-s2' -> 'sngan-nonsat': the name shared by runs that differ only by seed
    return re.sub(r'-s\d+$', '', run)


def plot_logs(logs, keys, path, title='', seeds=False, beside=None):
    """Curves of train.py's log.jsonl files: one series per (run, key), labelled by the run folder;
    seeds=True: the runs that differ only by their '-s<seed>' suffix as one mean curve with a +-1 std
    band, at the kimg all of them logged the key."""
    groups, seen = {}, set()
    for log in logs:
        rows = read_log(log)
        seen.update(k for r in rows for k in r if k not in ('kimg', 'step'))
        groups.setdefault(run_name(log, seeds), []).append(rows)
    series = []
    for run, runs in groups.items():
        for key in keys:
            pts = [{r['kimg']: r[key] for r in rows if key in r} for rows in runs]
            xs = sorted(set.intersection(*(set(p) for p in pts)))
            if not xs:
                continue
            v = np.array([[p[x] for x in xs] for p in pts])  # [runs, points]
            label = f'{run} {key}' + (f' ({len(runs)} seed{"s" * (len(runs) > 1)})' if seeds else '')
            series.append((label, xs, v.mean(0)) + ((v.mean(0) - v.std(0), v.mean(0) + v.std(0)) if seeds else ()))
    if not series:
        raise ValueError(f'none of --keys {",".join(keys)} in {", ".join(logs)}; they hold {", ".join(sorted(seen))}')
    plot_curves(series, path, title, beside=beside)


def summarize(log):
    """One run's record: its last kimg, training seconds (from the logged sec/kimg), metric seconds, and
    every metric evaluation (kimg and values), the last one also as 'final'."""
    rows = read_log(log)
    evals = [r for r in rows if 'sec_per_kimg' not in r]  # the metric lines
    seconds, last = 0.0, 0.0
    for r in rows:
        if 'sec_per_kimg' in r:  # a log line: its sec/kimg over the kimg since the previous one
            seconds, last = seconds + (r['kimg'] - last) * r['sec_per_kimg'], r['kimg']
    snaps = [{k: v for k, v in r.items() if k not in ('step', 'seconds')} for r in evals]
    return dict(run=run_name(log), kimg=last, train_seconds=round(seconds, 1),
                metric_seconds=round(sum(r.get('seconds', 0) for r in evals), 1), snapshots=snaps, final=snaps[-1] if snaps else {})


def _run_value(summary, key, best=''):
    """A run's final value of key, or ('min' / 'max') its best over the run's evaluations; None if absent."""
    if not best:
        return summary['final'].get(key)
    values = [s[key] for s in summary['snapshots'] if key in s]
    return (min if best == 'min' else max)(values) if values else None


def table(summaries, keys):
    """Markdown rows 'run | seeds | mean +- std of each key' over the runs that differ only by seed: a key's
    final value, or with 'min:' / 'max:' before it (e.g. min:swd2k/avg) its best over the run's evaluations."""
    groups = {}
    for sm in summaries:
        groups.setdefault(_unseeded(sm['run']), []).append(sm)
    rows = []
    for run, sms in groups.items():
        cells = []
        for key in keys:
            best, _, name = key.rpartition(':')
            if best not in ('', 'min', 'max'):
                raise ValueError(f"--keys {key}: write KEY, min:KEY or max:KEY")
            v = np.array([x for x in (_run_value(sm, name, best) for sm in sms) if x is not None])
            if not len(v):  # a metric these runs did not compute
                cells.append('-')
                continue
            cell = f'{v.mean():.1f} +- {v.std():.1f}' if abs(v.mean()) >= 10 else f'{v.mean():.2f} +- {v.std():.2f}'
            cells.append(cell + (f' ({len(v)} of {len(sms)} seeds)' if len(v) < len(sms) else ''))
        rows.append(f'| {run} | {len(sms)} | ' + ' | '.join(cells) + ' |')
    return '\n'.join([f'| run | seeds | {" | ".join(keys)} |', '| --- | --- |' + ' --- |' * len(keys)] + rows)


def _flat(d, prefix=''):  # {'swd2k': {'avg': 1}} -> {'swd2k/avg': 1}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f'{prefix}{k}/') if isinstance(v, dict) else {f'{prefix}{k}': v})
    return out


# --keys shorthands: train.py --holdout's D outputs (ADA Fig. 1b), and ADA's r_t with its p (Fig. 5)
KEY_GROUPS = {'overfit': 'overfit/train,overfit/heldout,overfit/fake', 'ada': 'D/rt,aug/p'}

OFFLINE = ('swd2k, di2k and fddf2k need no download (the count in the name: swd10k, di, fddf5k; '
           '_full = all real images)')


def main():
    import argparse
    import data  # only the CLI needs the other files
    import model
    p = argparse.ArgumentParser(description='Evaluate a train.py checkpoint; prints one JSON line (progress on stderr). '
                                            'Or plot log.jsonl curves with --plot.')
    p.add_argument('ckpt', nargs='?', help='a train.py checkpoint, or an official stylegan2-ada / EqGAN-SA network pickle')
    p.add_argument('--plot', nargs='+', metavar='LOG', help='log.jsonl files to plot (instead of evaluating)')
    p.add_argument('--seeds', action='store_true', help="--plot: runs named NAME-s<seed> as one mean curve and a +-1 std band")
    p.add_argument('--summary', metavar='LOG', help="print a run's summary (kimg, seconds, every metric evaluation) as JSON")
    p.add_argument('--table', nargs='+', metavar='JSON', help='summaries (--summary) -> a markdown table of --keys, '
                   "mean +- std over the seeds of each run of each key's final value (min:KEY / max:KEY: its best over the run)")
    p.add_argument('--keys', default='D/real_min,D/fake_max',
                   help='--plot / --table: log keys (default: EqGAN-SA Fig. 1); overfit: D on training reals, held-out reals '
                        'and fakes (train.py --holdout); ada: r_t and p (train.py --aug)')
    p.add_argument('--title', default='', help='--plot: title')
    p.add_argument('--beside', metavar='PNG', help='--plot: put this image (e.g. sample grids of the runs) left of the curves')
    p.add_argument('--out', default='curves.png', help='--plot: output PNG')
    p.add_argument('--metrics', default='fid50k_full',
                   help='comma-separated: fid50k_full, fid10k, kid50k_full, pr50k3_full, ppl2_wend (ppl_wend: with '
                        f"StyleGAN's face crop), which need the Inception weights; {OFFLINE}")
    p.add_argument('--data', help='dataset folder or zip (default: the checkpoint\'s own --data)')
    p.add_argument('--max-images', type=int, help='real images: the first N of the dataset (default: the '
                   'checkpoint\'s own --max-images; e.g. 50000 scores a limited-data run against the whole built-in set)')
    p.add_argument('--fid-weights', help=f'pytorch-fid Inception weights (default: hub cache, else {FID_WEIGHTS_URL})')
    p.add_argument('--num-gen', type=int, help='generated images per metric (default: the count in its name)')
    p.add_argument('--batch', type=int, default=64, help='images per forward pass per GPU')
    p.add_argument('--protocol', default='stylegan2', choices=PROTOCOLS,
                   help='Inception input: stylegan2 (TF1 resize, as in the papers) or pytorch-fid')
    p.add_argument('--cache-dir', default=os.path.expanduser('~/.cache/gan_metrics'),
                   help='where real-image Inception features are cached')
    p.add_argument('--seed', type=int, default=0, help='seed of the latents and of every random draw')
    p.add_argument('--amp', choices=['none', 'bf16', 'fp16'], help="autocast of G and D (default: the checkpoint's --amp)")
    p.add_argument('--device', default='auto', help='auto (cuda if available), cpu, cuda, mps')
    a = p.parse_args()
    a.keys = ','.join(KEY_GROUPS.get(k, k) for k in a.keys.split(','))
    if a.summary:
        print(json.dumps(summarize(a.summary)))
        return
    if a.table:
        print(table([json.load(open(f)) for f in a.table], a.keys.split(',')))
        return
    if a.plot:
        plot_logs(a.plot, a.keys.split(','), a.out, a.title, a.seeds, a.beside)
        print(f'wrote {a.out}')
        return
    if a.ckpt is None:
        p.error('give a checkpoint to evaluate, or --plot LOG ...')
    for flag, value in [('--batch', a.batch), ('--num-gen', a.num_gen), ('--max-images', a.max_images)]:
        if value is not None and value < 1:
            p.error(f'{flag} {value} must be at least 1')
    rank, world_size = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))  # set by torchrun
    device = a.device if a.device != 'auto' else 'cuda' if torch.cuda.is_available() else 'cpu'
    if world_size > 1:
        if device == 'cuda':
            device = f'cuda:{os.environ["LOCAL_RANK"]}'
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    ckpt = model.load_checkpoint(a.ckpt, device)
    args = ckpt['args']
    amp = a.amp or args.get('amp', 'none')
    if amp == 'fp16' and not device.startswith('cuda'):
        p.error('--amp fp16 is for CUDA GPUs (emulated on the CPU, ~50x slower); pass --amp bf16 or none')
    if 'data' not in args and not a.data:  # an official pickle or its conversion: no record of its training set
        p.error(f'{a.ckpt} does not say which images it was trained on: pass --data with them')
    group, names = min(args.get('mbstd_group') or 1, a.batch), a.metrics.split(',')
    if a.batch % group and any(_SOURCE.get(_parse(n, None, 1)[0]) == 'd' for n in names):
        p.error(f"--batch {a.batch} is not a multiple of this D's minibatch-std group {group} (di, fddf): use e.g. {16 * group}")
    dataset = data.make_dataset(a.data or args.get('data'), resolution=args['resolution'],
                                max_images=a.max_images or (None if a.data else args.get('max_images')),
                                seed=args.get('seed', 0), skip_bad=args.get('skip_bad', False), labels=bool(args.get('c_dim')))
    results = evaluate(names, ckpt['G_ema'], ckpt['D'], dataset, device, rank, world_size, a.batch,
                       a.num_gen, a.fid_weights, a.cache_dir, a.protocol, a.seed, amp,
                       log=lambda s: print(s, file=sys.stderr))
    if rank == 0:
        print(json.dumps(results))
    if world_size > 1:
        dist.destroy_process_group()
    if not results:
        raise SystemExit(f'error: no metric could be computed (the reason is printed above); {OFFLINE}')


if __name__ == '__main__':
    try:
        main()
    except (ValueError, OSError) as e:  # a missing checkpoint, a bad --data (DataError), an unwritable --out
        raise SystemExit(f'error: {e}')
