"""
Train StyleGAN2 with the dual contrastive loss and attention (Yu et al., ICCV 2021) and EqGAN-SA
spatial awareness (Wang et al., CVPR 2022). One explicit loop: Gmain, Greg (path length, lazy),
Dmain, Dreg (R1, lazy), EMA, logs, snapshots, in-loop metrics.

  python train.py --cfg quick --out runs/quick              # built-in dataset, ~7 min on 2 CPU cores
  python train.py --data ffhq256.zip --cfg paper256 --loss contrastive --out runs/ffhq   # 1 GPU
  torchrun --nproc_per_node=8 train.py --data ffhq256.zip --cfg paper256 --out runs/ffhq # 1 node
  torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 \\
           --nproc_per_node=8 train.py ...                                                # 2 nodes
  python train.py --cfg cpu --bench-steps 20                # speed benchmark, no files written

To resume, run the same command again (--resume auto is the default): the run continues with the
same step, optimizer state, EMA, data order and random numbers, as if it had never stopped. Ctrl-C or
SIGTERM (a cluster's preemption) ends a run after its current step with a checkpoint.
"""
import argparse
import contextlib
import copy
import ctypes
import fcntl
import glob
import json
import math
import os
import resource
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import losses
import metrics
import model

# Presets: per-config defaults; an explicit flag always wins. 'e' and 'f' are the StyleGAN2 paper's
# configs (TF run_training.py), 'paper256' is stylegan2-ada-pytorch's (EqGAN-SA's baseline), 'eqgan256'
# the EqGAN-SA authors' training command on top of it (no path length, no style mixing), 'cpu' a small
# network that learns the built-in dataset in minutes on 2 CPU cores. 'sndcgan' / 'sngan': the SN
# paper's CIFAR-10 networks and Adam settings (Miyato et al. 2018: SN-DCGAN with Table 1's setting C,
# the ResNet with lr 2e-4, betas (0, 0.9), 5 D steps per G step), '-cpu': narrower versions for CPUs.
# 'quick' (README's first command): sndcgan-cpu with an EMA generator and batch 32 for 75 kimg, the lr decaying to 0
# over the last 50 (without the decay SWD plateaus from about 50 kimg and rises and falls between evaluations; batch
# 32, twice the steps of 64 for the same images, ends lower: SWD 68.9 vs 80.4 over 3 seeds).
STYLEGAN2 = dict(arch='stylegan2', z_dim=512, w_dim=512, style_mix=0.9, beta1=0.0, beta2=0.99, n_dis=1, lr_decay_kimg=0)
SN = dict(z_dim=128, w_dim=None, map_layers=None, mbstd_group=None, style_mix=0.0, pl_weight=0, gamma=0, ema_kimg=0,
          ema_rampup=0, lr=0.0002, lr_decay_kimg=0, batch=64, resolution=32)  # no mapping, minibatch-std, mixing, path length, R1, EMA
PAPER256 = dict(STYLEGAN2, resolution=256, channel_base=16384, channel_max=512, map_layers=8, batch=64, lr=0.0025, gamma=1,
                ema_kimg=20, ema_rampup=0, pl_weight=2, mbstd_group=8, kimg=25000, snap_kimg=50, metrics='fid50k_full,di')
SNDCGAN_CPU = dict(SN, arch='sndcgan', channel_base=512, channel_max=128, beta1=0.5, beta2=0.999, n_dis=1, kimg=100,
                   snap_kimg=10, metrics='swd2k,di2k', metrics_kimg=20)
CONFIGS = {
    'cpu':         dict(STYLEGAN2, resolution=32, channel_base=4096, channel_max=256, map_layers=2, batch=16, lr=0.002,
                        gamma=0.05, ema_kimg=5, ema_rampup=0.05, pl_weight=0, mbstd_group=4, kimg=10, snap_kimg=2,
                        metrics='swd2k,di2k', metrics_kimg=5),
    'e':           dict(STYLEGAN2, resolution=256, channel_base=16384, channel_max=512, map_layers=8, batch=32, lr=0.002,
                        gamma=100, ema_kimg=10, ema_rampup=0, pl_weight=2, mbstd_group=4, kimg=25000, snap_kimg=50,
                        metrics='fid50k_full,di'),
    'f':           dict(STYLEGAN2, resolution=256, channel_base=32768, channel_max=512, map_layers=8, batch=32, lr=0.002,
                        gamma=10, ema_kimg=10, ema_rampup=0, pl_weight=2, mbstd_group=4, kimg=25000, snap_kimg=50,
                        metrics='fid50k_full,di'),
    'paper256':    PAPER256,
    'eqgan256':    dict(PAPER256, pl_weight=0, style_mix=0.0),
    'sndcgan':     dict(SN, arch='sndcgan', channel_base=2048, channel_max=512, beta1=0.5, beta2=0.999, n_dis=1, kimg=6400,
                        snap_kimg=100, metrics='fid50k_full,di'),
    'sndcgan-cpu': SNDCGAN_CPU,
    'quick':       dict(SNDCGAN_CPU, batch=32, ema_kimg=5, ema_rampup=0.05, lr_decay_kimg=50, kimg=75, metrics_kimg=25),
    'sngan':       dict(SN, arch='sngan', channel_base=8192, channel_max=256, beta1=0.0, beta2=0.9, n_dis=5, kimg=16000,
                        snap_kimg=100, metrics='fid50k_full,di'),
    'sngan-cpu':   dict(SN, arch='sngan', channel_base=1024, channel_max=32, beta1=0.0, beta2=0.9, n_dis=1, kimg=100,
                        snap_kimg=10, metrics='swd2k,di2k', metrics_kimg=20),
}
STYLEGAN2_ONLY = ('w_dim', 'map_layers', 'mbstd_group', 'style_mix', 'pl_weight')  # preset flags the other backbones lack


def make_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # data and run
    a('--data', help='image folder or .zip (default: the built-in synthetic CLEVR-like dataset)')
    a('--max-images', type=int, help='use only the first N images (synthetic: its size; default 50000)')
    a('--skip-bad', action='store_true', help='skip unreadable/too-small images instead of stopping')
    a('--mirror', action='store_true', help='random x-flips of the training images')
    a('--out', default='runs/default', help='output folder: checkpoints, grids, log.jsonl')
    a('--resume', default='auto', help="'auto' (latest checkpoint in --out, if any), a path, or 'none'")
    a('--seed', type=int, default=0, help='seed of weights, latents, data order')
    a('--cfg', choices=sorted(CONFIGS), help="preset for the flags below left unset (quick: README's first command, "
                                             "minutes on a CPU; default: e, or the --arch's own)")
    a('--init', help='fine-tune from these networks: a stylegan2-ada network-snapshot-*.pkl or a ckpt-*.pt '
                     '(G, D, G_ema; fresh optimisers and step 0; the architecture flags come from it)')
    a('--cond', action='store_true', help='class-conditional: labels from dataset.json or class subfolders '
                                          '(built-in set: the number of objects)')
    a('--kimg', type=float, help='training length in thousands of real images shown to D')
    a('--device', default='auto', help="auto, cpu, cuda (torchrun: cuda:LOCAL_RANK)")
    a('--workers', type=int, default=2, help='data-loading processes per GPU/process')
    # architecture (stored in the checkpoint)
    a('--arch', choices=model.ARCHS, help='backbone: stylegan2 (default), sndcgan or sngan (Miyato et al. 2018)')
    a('--resolution', type=int, help='image size, a power of two (cpu, sn*: 32, others: 256)')
    a('--channel-base', type=int, help='channels at resolution r: min(channel_base / r, channel_max)')
    a('--channel-max', type=int, help='maximum channels per layer (512 in the papers)')
    a('--map-layers', type=int, help='mapping network depth (8 in the papers)')
    a('--z-dim', type=int, help='latent size (stylegan2: 512, sn*: 128)')
    a('--w-dim', type=int, help='intermediate latent size (512)')
    a('--mbstd-group', type=int, help='minibatch-std group size (4; paper256: 8)')
    a('--mbstd-layout', choices=model.MBSTD_LAYOUTS,
      help="minibatch-std groups: consecutive samples (default; DDP-invariant) or the official code's strided ones "
           "(--init keeps its network's)")
    a('--g-attn', default='none', choices=['none', 'san', 'sagan', 'dfn', 'vt'], help='self-attention in G (thesis Table 2.3)')
    a('--g-attn-res', type=int, default=32, help='G resolution whose conv the attention replaces (paper: 32)')
    a('--d-attn', default='none', choices=['none', 'self', 'ref'], help='SAN self-attention or reference-attention in D (Table 2.5)')
    a('--d-attn-res', type=int, default=8, help='D resolution of the attention (paper: 8)')
    a('--ref-attn-eq', type=int, default=8, choices=[8, 1, 2], help='K/Q/V sources: Eq. 2.8 (main paper) or supplement Eq. 1 / 2')
    a('--sel', default='none', choices=['none', 'norm', 'concat', 'flatten'], help='EqGAN-SA spatial encoding in G (Table 4)')
    a('--eqgan', choices=model.EQGAN_MODES,
      help="EqGAN-SA as the authors' code builds it ('official', the default with --sel norm: their SEL before every "
           "layer, full-resolution heatmaps, their sampler and alignment loss) or as the paper's text reads ('paper', "
           "the default with --sel concat / flatten)")
    a('--heatmap', choices=model.HEATMAP_KINDS,
      help="EqGAN-SA heatmap sampling: the paper's 'hier' (default with --eqgan paper), 'nonhier', 'noise' (Table 3), "
           "or the authors' 'official' (default with --eqgan official)")
    a('--added-layers', choices=model.ADDED_LAYERS,
      help="sn* with --sel / --g-attn / --d-attn: the added layers' weights stored at their scale like the backbone's "
           "own ('plain', default) or equalized as in StyleGAN2 (at the SN lr they barely train; checkpoints before the "
           "flag)")
    a('--sel-placement', default='paper', choices=model.SEL_PLACEMENTS,
      help="--eqgan paper: SELs after each conv ('paper') or before every conv at 4-16 px plus one local to toRGB "
           "(an earlier reading of the authors' code)")
    # losses and optimisation
    a('--loss', default='nonsat', choices=losses.LOSSES, help='adversarial loss (thesis Table 2.1)')
    a('--g-form', default='swap', choices=['swap', 'minimax'], help='G side of the contrastive loss (see README)')
    a('--warmup-kimg', type=float, help='contrastive: non-saturating warm-up length (default: 20 epochs of the data)')
    a('--batch', type=int, help='global batch size (split across processes)')
    a('--lr', type=float, help='Adam learning rate of G and D')
    a('--lr-decay-kimg', type=float, help='decay the lr linearly to 0 over the last N kimg of the run (0: constant; '
                                          "quick: 50 of its 75, the same share of another --kimg)")
    a('--beta1', type=float, help='Adam beta1 (stylegan2: 0, sndcgan: 0.5, sngan: 0)')
    a('--beta2', type=float, help='Adam beta2 (stylegan2: 0.99, sndcgan: 0.999, sngan: 0.9)')
    a('--n-dis', type=int, help='D steps per G step (sngan: 5, others: 1)')
    a('--gamma', type=float, help='R1 weight (e: 100, f: 10, paper256: 1); 0 disables')
    a('--r1-interval', type=int, default=16, help='lazy R1 every N steps')
    a('--pl-weight', type=float, help='path-length weight (2 in the papers; 0 disables)')
    a('--pl-interval', type=int, default=4, help='lazy path length every N steps')
    a('--style-mix', type=float, help='style-mixing probability (stylegan2: 0.9; eqgan256: 0)')
    a('--ema-kimg', type=float, help='G EMA half-life in kimg')
    a('--ema-rampup', type=float, help='EMA ramp-up: half-life <= rampup * images seen (0 = off)')
    a('--align-weight', type=float, default=1.0, help='EqGAN-SA alignment loss weight (with --sel)')
    a('--align-tau', type=float, default=0.25, help='EqGAN-SA truncation threshold tau (Eq. 4)')
    a('--align-truncation', default='paper', choices=['paper', 'official'],
      help="--eqgan paper, Eq. 4 truncation: 'paper' zeroes errors <= tau; 'official' averages only errors > tau "
           "(authors' code)")
    a('--cam-weights', default='graph', choices=losses.CAM_WEIGHTS,
      help="--eqgan paper, GradCAM weights in Eq. 4: 'graph' differentiates through them (double backward); 'detached' "
           "treats them as constants (authors' code, cheaper)")
    a('--align-interval', type=int, default=1,
      help='EqGAN-SA: alignment loss every N G steps with weight x N (lazy, like R1; 1 = every step, the paper)')
    a('--no-align', action='store_true', help='SEL without the GradCAM alignment loss (Table 1: "+SEL")')
    # augmentation of D's inputs and limited data (ADA: Karras et al., NeurIPS 2020; DiffAugment: Zhao et al., NeurIPS 2020)
    a('--aug', default='none', choices=model.AUG_KINDS,
      help="augment every image D sees: 'ada' (the official 'bgc' pipeline, p adapted to --ada-target), 'fixed' (bgc at "
           "--aug-p), 'diffaug' (DiffAugment, --diffaug), or 'none' (the papers' runs)")
    a('--aug-p', type=float, help='--aug fixed: the probability of each bgc transform, in [0, 1]')
    a('--ada-target', type=float, default=0.6, help='--aug ada: the target of r_t = E[sign(D(real))] (official: 0.6)')
    a('--ada-interval', type=int, default=4, help='--aug ada: adjust p every N steps (official: 4)')
    a('--ada-kimg', type=float, default=500, help='--aug ada: kimg for p to move by 1 (official: 500; 100 when fine-tuning)')
    a('--diffaug', default='color,translation,cutout',
      help=f'--aug diffaug: comma list of policies, applied in that order ({", ".join(model.DIFFAUG_POLICIES)})')
    a('--freeze-d', type=int, default=0, help="Freeze-D (Mo et al. 2020): D's first N blocks from the image side keep "
                                              'their weights (with --init; the official --freezed counts layers)')
    a('--holdout', type=int, default=0,
      help="D-overfitting diagnostics: N real images the run never trains on (the N after the training set, e.g. "
           "--max-images 1000 --holdout 1000); D's mean output on them, on N training images and on N fakes, at every "
           'metrics evaluation (a multiple of --batch)')
    # speed
    a('--amp', default='none', choices=['none', 'bf16', 'fp16'], help='autocast the main phases')
    a('--compile', action='store_true', help='torch.compile G and D for the main phases')
    a('--channels-last', action='store_true', help='channels_last memory format (weights, gradients, optimizer state, G_ema, images)')
    a('--adam', default='auto', choices=['auto', 'foreach', 'fused'],
      help="Adam's implementation: 'auto' is fused on CUDA (no GradScaler host syncs), PyTorch's default elsewhere")
    a('--tf32', default='main', choices=['main', 'all', 'none'],
      help="TF32 matmuls and convolutions (Ampere+ GPUs): in the main phases only, with the double-backward "
           "regularisers (R1, path length) in full fp32 as the official code; everywhere; or nowhere (the official default)")
    a('--bench-steps', type=int, default=0, help='benchmark: time N steps after 3 warm-up steps on the built-in '
                                                 'dataset (through the loader, --workers), write nothing')
    # logging, snapshots, metrics
    a('--log-sec', type=float, default=10, help='seconds between log lines')
    a('--snap-kimg', type=float, help='kimg between snapshots: grid, checkpoint (per preset: README)')
    a('--keep', type=int, default=3, help='checkpoints to keep')
    a('--metrics', help="comma list: fid50k_full, fid10k, kid50k_full, pr50k3_full, ppl2_wend, ppl_wend, swd2k, di2k, "
                        "fddf2k (the count in the name), or 'none' (per preset: README)")
    a('--metrics-kimg', type=float, help='kimg between metric evaluations (per preset: README)')
    a('--num-gen', type=int, help='override the number of generated images of every metric')
    a('--fid-weights', help='path of the pytorch-fid Inception weights (pt_inception-2015-12-05-6726825d.pth)')
    a('--tensorboard', action='store_true', help='also write the log lines, metrics and image grids as TensorBoard events '
                                                  'in --out (x axis: images seen; needs: pip install tensorboard)')
    return p


def parse_args(argv=None):
    """The flags, with the preset (--cfg, by default e or the --arch's own) filling those left unset;
    args.explicit lists the preset flags given on the command line."""
    args = make_parser().parse_args(argv)
    args.explicit = sorted(k for k in set().union(*CONFIGS.values()) if getattr(args, k) is not None)
    if args.cfg is None:
        args.cfg = 'e' if args.arch in (None, 'stylegan2') else args.arch
    preset = CONFIGS[args.cfg]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if 'lr_decay_kimg' not in args.explicit and 'kimg' in args.explicit and args.kimg > 0:
        args.lr_decay_kimg = preset['lr_decay_kimg'] * args.kimg / preset['kimg']  # the preset's share of the run
    # flags whose defaults are set here count as explicit only when given (--init and --sel check them).
    # EqGAN-SA: the authors' networks unless asked otherwise (they produced the paper's tables); their code
    # has SEL_norm only, so concat / flatten (and runs without SEL) keep the paper's reading
    args.explicit += [k for k in ('eqgan', 'heatmap', 'mbstd_layout', 'added_layers') if getattr(args, k) is not None]
    args.mbstd_layout = args.mbstd_layout or 'contiguous'
    args.added_layers = args.added_layers or default_added_layers(args.arch, args)
    if args.eqgan is None:
        args.eqgan = 'official' if args.sel == 'norm' else 'paper'
    if args.heatmap is None:
        args.heatmap = 'official' if args.eqgan == 'official' else 'hier'
    return args


def has_added_layers(a):  # a: the flags, or a checkpoint's args (older ones may lack keys)
    return any(a.get(k, 'none') != 'none' for k in ('sel', 'g_attn', 'd_attn'))


def default_added_layers(arch, args):  # StyleGAN2 is equalized throughout; an SN backbone without added layers: either
    return 'plain' if arch != 'stylegan2' and has_added_layers(vars(args)) else 'equalized'


class UserError(Exception):
    """A problem with the flags, the checkpoint or the run that the user can fix; printed as one line."""


def check_args(args, world, device):
    stylegan = args.arch == 'stylegan2'
    if CONFIGS[args.cfg]['arch'] != args.arch:
        raise UserError(f'--cfg {args.cfg} is a {CONFIGS[args.cfg]["arch"]} preset, not one for --arch {args.arch}; use '
                        f'--cfg {" or ".join(k for k, v in CONFIGS.items() if v["arch"] == args.arch)}, or drop --cfg')
    if not stylegan:
        given = [k for k in STYLEGAN2_ONLY if k in args.explicit and getattr(args, k)]
        given += [k for k, on in (('cond', args.cond), ('mbstd_layout', args.mbstd_layout != 'contiguous'),
                                  ('sel_placement', args.sel_placement != 'paper'), ('ref_attn_eq', args.ref_attn_eq != 8),
                                  ('pl_interval', args.pl_interval != 4)) if on]
        if given:
            raise UserError(f'--{given[0].replace("_", "-")} applies to --arch stylegan2 only (this run: --arch {args.arch}, '
                            f'which has no mapping network, noise, minibatch-std or labels); drop it')
        if args.metrics and any(m.startswith('ppl') for m in args.metrics.split(',')):
            raise UserError(f'--metrics ppl measures paths in W, which --arch {args.arch} has not; drop it')
    # Every number finite and in its range, the message naming the flag as written (None: unset, no value needed).
    # --kimg before --lr-decay-kimg, whose range it sets.
    for keys, ok, want in [
            ('kimg', lambda v: v > 0, 'be positive (the length of the run in thousands of images)'),
            ('lr snap_kimg metrics_kimg ada_kimg', lambda v: v > 0, 'be positive'),
            ('lr_decay_kimg', lambda v: 0 <= v <= args.kimg, f'lie in [0, --kimg {args.kimg:g}]'),
            ('beta1 beta2', lambda v: 0 <= v < 1, 'lie in [0, 1)'),
            ('style_mix align_tau aug_p', lambda v: 0 <= v <= 1, 'lie in [0, 1]'),
            ('ada_target', lambda v: -1 <= v <= 1, 'lie in [-1, 1], as r_t = E[sign(D(real))]'),
            ('gamma pl_weight ema_kimg ema_rampup align_weight warmup_kimg log_sec workers seed bench_steps freeze_d holdout',
             lambda v: v >= 0, 'be at least 0'),
            ('batch max_images num_gen mbstd_group z_dim w_dim map_layers channel_base channel_max n_dis keep '
             'r1_interval pl_interval align_interval ada_interval', lambda v: v >= 1, 'be at least 1')]:
        for key in keys.split():
            v = getattr(args, key)
            if v is not None and not (math.isfinite(v) and ok(v)):
                want = want if math.isfinite(v) else 'be finite and ' + want.removeprefix('be ')
                raise UserError(f'--{key.replace("_", "-")} {v:g} must {want}')
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f'--out {args.out} is a file; give a folder for checkpoints, grids and the log')
    if args.batch % world:
        raise UserError(f'--batch {args.batch} is not divisible by the {world} processes; use a multiple of {world}')
    b = args.batch // world
    if stylegan and b % min(args.mbstd_group, b):
        raise UserError(f'per-process batch {b} is not a multiple of --mbstd-group {args.mbstd_group}; change one of them')
    unknown = [k for k in args.diffaug.split(',') if k not in model.DIFFAUG_POLICIES]
    if unknown:
        raise UserError(f'--diffaug {args.diffaug}: no policy {unknown[0]!r}; use a comma list of '
                        f'{", ".join(model.DIFFAUG_POLICIES)}')
    if args.aug == 'fixed' and args.aug_p is None:
        raise UserError('--aug fixed needs --aug-p P (the probability of each transform, e.g. 0.2); or use --aug ada')
    if args.holdout and args.holdout % args.batch:
        raise UserError(f'--holdout {args.holdout} is not a multiple of --batch {args.batch} (D sees it in whole batches); '
                        f'use e.g. {args.holdout // args.batch * args.batch or args.batch}')
    for name in args.metrics.split(','):
        if name not in ('', 'none'):
            try:
                metrics._parse(name, None, 1)
            except ValueError as e:
                raise UserError(f'--metrics: {e}') from None
    # A flag changed from its default in a run where it does nothing is a mistake to point out: the
    # user would believe they measured its effect. (Preset flags are not listed: presets fill them.)
    # StyleGAN2's lazy intervals always act (they scale Adam, as in the official code); elsewhere only with R1.
    aligning = args.sel != 'none' and not args.no_align and args.align_weight > 0
    for key in ('eqgan', 'heatmap'):  # their defaults follow --sel (parse_args)
        if key in args.explicit and args.sel == 'none':
            raise UserError(f'--{key} does nothing without --sel norm (or concat/flatten); add that or drop the flag')
    if 'added_layers' in args.explicit and (stylegan or not has_added_layers(vars(args))):
        raise UserError('--added-layers does nothing ' + ('with --arch stylegan2 (its layers are all equalized)' if stylegan
                        else 'without --sel, --g-attn or --d-attn (the layers it parametrizes)') + '; drop it')
    paper = args.eqgan == 'paper'
    default = make_parser().get_default
    for key, active, needs in [
            ('no_align', args.sel != 'none', '--sel norm (or concat/flatten)'),
            ('sel_placement', args.sel in ('norm', 'concat') and paper, '--eqgan paper and --sel norm or concat'),
            ('align_weight', args.sel != 'none' and not args.no_align, '--sel norm (or concat/flatten) without --no-align'),
            *((k, aligning, 'the alignment loss (--sel without --no-align, --align-weight > 0)')
              for k in ('align_tau', 'align_interval')),
            *((k, aligning and paper, "the alignment loss of --eqgan paper (--eqgan official's is the authors' as a whole)")
              for k in ('align_truncation', 'cam_weights')),
            ('g_form', args.loss == 'contrastive', '--loss contrastive'),
            ('warmup_kimg', args.loss == 'contrastive', '--loss contrastive'),
            ('g_attn_res', args.g_attn != 'none', '--g-attn san (or sagan/dfn/vt)'),
            ('d_attn_res', args.d_attn != 'none', '--d-attn self (or ref)'),
            ('ref_attn_eq', args.d_attn == 'ref', '--d-attn ref'),
            ('r1_interval', stylegan or args.gamma > 0, 'a positive --gamma'),
            ('num_gen', args.metrics not in ('', 'none'), '--metrics'),
            ('aug_p', args.aug == 'fixed', '--aug fixed (--aug ada adapts p itself)'),
            *((k, args.aug == 'ada', '--aug ada') for k in ('ada_target', 'ada_interval', 'ada_kimg')),
            ('diffaug', args.aug == 'diffaug', '--aug diffaug')]:
        if getattr(args, key) != default(key) and not active:
            raise UserError(f'--{key.replace("_", "-")} does nothing without {needs}; add that or drop the flag')
    if args.amp == 'fp16' and device.type != 'cuda':
        raise UserError('--amp fp16 needs a CUDA GPU (loss scaling); use --amp bf16 on the CPU')


# ----------------------------------------------------------------------------------------------
# Distributed helpers (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; one process otherwise)

def init_distributed(device_flag):
    try:
        dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu') if device_flag == 'auto' else torch.device(device_flag)
    except RuntimeError:
        raise UserError(f'--device {device_flag} is not a device; use auto, cpu, cuda or cuda:N') from None
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'--device {device_flag}: PyTorch sees no CUDA GPU here; use --device cpu')
    if 'RANK' not in os.environ:
        if dev.type == 'cuda' and dev.index is not None:  # else kernels, syncs and a stray context land on GPU 0
            torch.cuda.set_device(dev)
        return 0, 1, dev
    local = int(os.environ.get('LOCAL_RANK', 0))
    cuda = dev.type == 'cuda'
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group('nccl' if cuda else 'gloo')
    return dist.get_rank(), dist.get_world_size(), torch.device(f'cuda:{local}' if cuda else 'cpu')


def set_tf32(on):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on


def lr_scale(nimg, total, decay_kimg):
    """The lr's factor after nimg of total images: 1, then linearly to 0 over the last decay_kimg (the
    SNGAN authors' chainer code decays Adam's alpha linearly to 0 over the whole run)."""
    if decay_kimg <= 0:
        return 1.0
    return min(1.0, max(0.0, (total - nimg) / (decay_kimg * 1000)))


BUCKET_MB = 25  # gradient all-reduce bucket size (DDP's default): large enough for bandwidth, small enough to overlap


def reuses_real_logits(D):
    """The contrastive G loss needs D's real logits (Eq. 2.1-2.2); Dmain computes them again with the same
    D (it changes only in its own step) on the same batch. Where D's forward has no side effect
    (StyleGAN2's D; the SN backbones' power iteration updates u on every forward) and sees the reals
    alone (not in reference-attention's joint pass), Gmain keeps that pass's graph and Dmain uses it:
    one D pass less per step, the same numbers."""
    return isinstance(D, model.Discriminator) and not D.needs_ref


def phase_step(net, opt, scaler, loss, world):
    """Backward, average gradients over processes, optimizer step. Manual instead of DDP wrappers:
    every flag combination works, unused parameters included (e.g. D's layers that a phase does not
    reach), and the phases alternate between G and D and take double backwards (R1, path length),
    which DDP's reducer does not follow. Non-finite gradient entries are zeroed like the official
    code, except under fp16 loss scaling: there an inf is the overflow the scaler must see to skip
    the step and lower its scale (the all_reduce spreads it, so every process skips). Returns the norm of
    the averaged gradient (None under fp16 loss scaling).
    Each gradient becomes a view of one flat buffer with its parameter's strides (channels_last
    included): the optimizer's foreach kernels then group them, and a fused Adam, which assumes a
    gradient laid out as its parameter, updates the right elements.
    The all-reduce overlaps the backward, as DDP's: the buffer is cut into buckets of ~BUCKET_MB, the
    parameters taken in reverse order (the order the backward finishes them); a hook copies each
    gradient into the buffer once autograd has accumulated it, and a bucket whose gradients are all in
    starts its async all-reduce, strictly in bucket order (the same collectives in the same order on
    every process). Parameters the backward does not reach (no hook fires) go in after it; their
    buckets and those behind them are reduced then. Summing slices of the buffer in place of the whole
    gives the same numbers."""
    params = [p for p in net.parameters() if p.requires_grad]
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    flat = torch.empty(offsets[-1], dtype=params[0].dtype, device=params[0].device)
    views = [flat.as_strided(p.shape, p.stride(), o) for p, o in zip(params, offsets)]  # dense: contiguous or channels_last
    cap, buckets, bucket_of = BUCKET_MB * 2 ** 20 // flat.element_size(), [], {}
    for i in reversed(range(len(params))):  # buckets of consecutive parameters: slices [offsets[lo], offsets[hi]) of flat
        if not buckets or offsets[buckets[-1][1]] - offsets[i] > cap:
            buckets.append([i + 1, i + 1])
        buckets[-1][0] = i
        bucket_of[i] = len(buckets) - 1
    waiting = [hi - lo for lo, hi in buckets]  # per bucket: gradients not yet copied
    works, done = [], set()

    def launch():  # every complete bucket after those already started, in order
        while len(works) < len(buckets) and waiting[len(works)] == 0:
            lo, hi = buckets[len(works)]
            works.append(dist.all_reduce(flat[offsets[lo]:offsets[hi]], async_op=True) if world > 1 else None)

    def put(i):  # parameter i's gradient into the buffer (none: 0); its own copy freed, so the backward holds one
        g = params[i].grad
        if g is None:
            views[i].zero_()
        else:
            views[i].copy_(g)
        params[i].grad = None
        waiting[bucket_of[i]] -= 1

    def ready(i):  # autograd has accumulated parameter i's gradient (None where it brought only an undefined one)
        if i in done:  # a second accumulation in one backward (reentrant checkpointing) would come after its bucket left
            raise RuntimeError(f'phase_step: parameter {i} of {type(net).__name__} received two gradients in one '
                               f'backward; use non-reentrant checkpointing (use_reentrant=False)')
        done.add(i)
        put(i)
        launch()

    hooks = [p.register_post_accumulate_grad_hook(lambda p, i=i: ready(i)) for i, p in enumerate(params)]
    try:
        scaler.scale(loss).backward()
    finally:
        for h in hooks:
            h.remove()
    for i in range(len(params)):  # not reached by this backward: a gradient from before it, or none
        if i not in done:
            put(i)
    launch()
    for w in works:
        if w is not None:
            w.wait()
    if world > 1:
        flat /= world
    if not scaler.is_enabled():
        torch.nan_to_num(flat, nan=0, posinf=1e5, neginf=-1e5, out=flat)
    for p, g in zip(params, views):
        p.grad = g
    scaler.step(opt)
    scaler.update()
    return None if scaler.is_enabled() else flat.norm()  # the gradient's norm (not under fp16: it is scaled there)


def keep_freed_memory():
    """glibc hands blocks over 32 MB (and the heap's top) back to the OS when freed, so a CPU step's
    large tensors come back as fresh pages, zeroed one page fault at a time. Keep freed memory for
    reuse instead, as the MALLOC_*_ environment variables would (a user's own settings win): at the
    cpu preset -4% step time, with SAN -11% (README). A no-op where libc is not glibc."""
    if any(k.startswith('MALLOC_') for k in os.environ):
        return
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: the largest allowed; fixed, so not adjusted upwards
    libc.mallopt(-1, 16 << 30)  # M_TRIM_THRESHOLD: do not trim the heap
    libc.mallopt(-2, 1 << 30)   # M_TOP_PAD: grow it in large steps


def fail(msg, code=1):
    """'error: msg' on stderr in ONE write (print writes the newline apart: the lines of DDP processes
    sharing a stderr interleaved), then exit."""
    sys.stderr.write(f'error: {msg}\n')
    sys.stderr.flush()
    sys.exit(code)


def print0(*a, rank=0, **k):
    if rank == 0:
        print(*a, **k, flush=True)


# ----------------------------------------------------------------------------------------------
# Checkpoints: plain dicts of tensors and numbers, written to a temporary file and renamed.

def checkpoint_name(step):
    return f'ckpt-{step:07d}.pt'


def checkpoint_paths(out):  # oldest first: the names sort by step
    return sorted(glob.glob(os.path.join(out, 'ckpt-*.pt')))


def save_checkpoint(path, state, keep):
    try:  # on disk before the rename and before older checkpoints go: a crash leaves the previous ones intact
        data.atomic_write(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as e:  # disk full, quota, permissions
        raise UserError(f'could not write {path} ({str(e).strip().splitlines()[0]}): free some space or choose '
                        f'another --out; the earlier checkpoints are intact') from None
    for old in checkpoint_paths(os.path.dirname(path))[:-keep]:
        os.remove(old)


def last_good(args):
    last = checkpoint_paths(args.out)
    fix = 'a lower --lr or --gamma' + (', or --amp none' if args.amp != 'none' else '')
    return (f'the last good checkpoint is {last[-1]}: resume from it with {fix}' if last else
            f'no checkpoint was written yet: start again with {fix}')


def _differing(keys, saved, args):
    return [f'--{k.replace("_", "-")} {saved.get(k)} (this run: {getattr(args, k)})' for k in keys if saved.get(k) != getattr(args, k)]


def lock_out(out, rank, world, device):
    """One writer per run: rank 0 holds an exclusive flock on OUT/.lock for as long as it lives (the kernel
    drops it when the process ends, kill -9 included, so no lock goes stale); a second train.py with the
    same --out is refused, naming the live process. The holder then removes the *.tmp files a killed writer
    left. Returns the open lock file (None on other ranks): keep it until the run ends."""
    held, error = None, None
    if rank == 0:
        try:
            os.makedirs(out, exist_ok=True)
            held = open(os.path.join(out, '.lock'), 'a+')  # 'a+': no truncation before the lock is ours
        except OSError as e:  # --out under a file, permissions: main() reports it
            error = e
        else:
            try:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.seek(0)
                pid = held.read().strip() or '?'
                held.close()
                error = UserError(f'--out {out} is in use by another train.py (pid {pid}, still running): wait for it '
                                  f'to end, stop it, or choose another --out')
            except OSError as e:  # a file system without flock (some network ones): train, unguarded
                print(f'warning: cannot lock {held.name} ({e.strerror}): nothing stops a second run on this --out',
                      file=sys.stderr, flush=True)
            else:
                held.truncate(0)
                held.write(f'{os.getpid()}\n')
                held.flush()
                stale = glob.glob(os.path.join(glob.escape(out), '*.tmp'))  # ours to remove: no other writer
                for tmp in stale:
                    os.remove(tmp)
                if stale:
                    print(f'removed {len(stale)} partial file(s) a stopped run left: '
                          f'{", ".join(map(os.path.basename, stale))}', flush=True)
    if world > 1:  # every process leaves when rank 0 could not lock
        ok = torch.tensor(float(error is None), device=device)
        dist.broadcast(ok, 0)
        if not ok.item() and rank != 0:
            raise UserError(f'rank 0 could not take --out {out} (its message says why)')
    if error:
        raise error
    return held


def resolve_resume(args, rank=0, world=1):
    if args.resume in ('none', ''):
        existing = checkpoint_paths(args.out)
        if existing:
            raise UserError(f'{args.out} already holds checkpoints ({os.path.basename(existing[-1])}); '
                            f'pass --resume auto to continue that run or choose another --out')
        return None
    if args.resume == 'auto':  # the newest intact checkpoint; corrupt newer ones are renamed aside (kept, no longer listed)
        existing, found, bad = checkpoint_paths(args.out), None, []
        for path in reversed(existing):
            try:
                model.verify_zip(path)
                found = path
                break
            except ValueError:
                bad.append(path)
        if bad and not found:
            raise UserError(f'every checkpoint in {args.out} is corrupt (a CRC-32 check fails): restore one from a copy, '
                            f'or move them away to start again')
        for path in bad if rank == 0 else []:
            os.replace(path, path + '.corrupt')
            print(f'warning: {path} is corrupt (a CRC-32 check fails): renamed {os.path.basename(path)}.corrupt; '
                  f'resuming from {os.path.basename(found)}', file=sys.stderr, flush=True)
        if world > 1:  # the renames done before any process lists the checkpoints again
            dist.barrier()
        return found
    if not os.path.isfile(args.resume):
        raise UserError(f'--resume {args.resume}: no such file; give a checkpoint path or --resume auto')
    return args.resume


RUN_KEYS = ('data', 'max_images', 'seed', 'batch', 'loss', 'mirror')  # what makes --resume auto's run the same run


def load_resume(path, args, device):
    try:
        ckpt = model.read_checkpoint(path, device)
    except ValueError as e:
        raise UserError(str(e)) from None
    if 'opt_G' not in ckpt:
        raise UserError(f'{path} holds networks only (a conversion or an official pickle): start a new run from it '
                        f'with --init {path} in another --out')
    diff = _differing([k for k in model.ARCH_KEYS if k != 'conv_clamp'], {**model.ARCH_DEFAULTS, **ckpt['args']}, args)  # --amp may change
    if diff:
        raise UserError(f'checkpoint {path} has another architecture: {"; ".join(diff)}; rerun with its flags'
                        + (' or use another --out' if args.resume == 'auto' else ''))
    diff = _differing(RUN_KEYS, ckpt['args'], args)
    if args.resume == 'auto' and diff:
        raise UserError(f'{args.out} holds a run with other settings: {"; ".join(diff)}; rerun with its flags, use '
                        f'another --out, or pass --resume {path} to continue it with these on purpose')
    newer = [p for p in checkpoint_paths(args.out) if os.path.basename(p) > checkpoint_name(ckpt['step'])]
    if newer:
        raise UserError(f'{args.out} holds checkpoints past step {ckpt["step"]} ({os.path.basename(newer[-1])}), '
                        f'which a later --resume auto would take: delete them or use another --out')
    return ckpt


INIT_KEYS = ('arch', 'resolution', 'z_dim', 'w_dim', 'channel_base', 'channel_max', 'map_layers', 'mbstd_group',
             'mbstd_layout')  # D's groups as its weights were trained (official pickles: strided)


def init_from(args):
    """--init PATH: the networks a run fine-tunes from (an official pickle or a checkpoint of ours). Their
    architecture flags (INIT_KEYS) replace the preset's; one given on the command line must agree.
    Returns the checkpoint dict, or None without --init."""
    if not args.init:
        return None
    try:
        ckpt = model.read_checkpoint(args.init)
    except ValueError as e:
        raise UserError(f'--init: {e}') from None
    saved = {**model.ARCH_DEFAULTS, **ckpt['args']}
    if not has_added_layers(saved):  # else its added layers' weights load as they were trained; here this run's choice
        saved['added_layers'] = args.added_layers if 'added_layers' in args.explicit else default_added_layers(saved['arch'], args)
    for k in INIT_KEYS + ('added_layers',):
        if k in args.explicit and getattr(args, k) != saved[k]:
            raise UserError(f'--init {args.init} has --{k.replace("_", "-")} {saved[k]}, this run asks for '
                            f'{getattr(args, k)}: drop the flag (the architecture comes from --init)')
        setattr(args, k, saved[k])
    if bool(saved['c_dim']) != args.cond:
        raise UserError(f'--init {args.init} is ' + (f'class-conditional ({saved["c_dim"]} classes): add --cond'
                                                     if saved['c_dim'] else 'unconditional: drop --cond'))
    return ckpt


def load_init(net, state, what):
    """Copy the tensors of `state` that `net` has (same name and shape); the rest of net keeps its fresh
    initialisation (added SEL / attention layers). Returns a one-line summary."""
    own = net.state_dict()
    wrong = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if wrong:
        raise UserError(f'--init: {what}.{wrong[0]} is {tuple(state[wrong[0]].shape)} there and {tuple(own[wrong[0]].shape)} '
                        f'here; the architecture flags must match the networks of --init')
    net.load_state_dict({**own, **{k: v for k, v in state.items() if k in own}})
    new = sorted(k for k in own.keys() - state.keys() if not k.endswith('resample_filter'))
    unused = sorted(state.keys() - own.keys())
    return (f'{what}: {len(own) - len(new)} tensors loaded' + (f', {len(new)} new ({new[0]}, ...)' if new else '')
            + (f', {len(unused)} not used ({unused[0]}, ...: layers this run replaces)' if unused else ''))


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    lock = None
    try:
        init = init_from(args)
        rank, world, device = init_distributed(args.device)
        check_args(args, world, device)
        if not args.bench_steps:  # the benchmark writes nothing
            lock = lock_out(args.out, rank, world, device)  # held until the run ends
        code = train(args, rank, world, device, init)
        if world > 1:  # leave together: a rank tearing gloo down while rank 0 still writes can abort
            dist.barrier()
    except (UserError, data.DataError) as e:
        fail(str(e).strip().splitlines()[-1])  # errors re-raised from loader workers carry a traceback
    except KeyboardInterrupt:
        fail('interrupted; the same command resumes from the last checkpoint, if one was written', 130)
    except OSError as e:  # the file system: --out under a file, a full disk while writing a grid or the log
        where = f'{e.filename}: {e.strerror}' if e.filename else str(e)
        fail(f'{where}; check the path, its permissions and the free space')
    finally:
        if lock:  # (a traceback kept by a caller would otherwise keep the file, and the lock, open)
            lock.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    if code:
        sys.exit(code)


@contextlib.contextmanager
def stop_requests(rank, world):
    """While this is active, SIGINT (Ctrl-C) or SIGTERM (a cluster preempting the job) asks the loop
    to stop after the current step with a checkpoint; yields the list the first signal is put in.
    Launchers pass a signal on to their workers (torchrun), so repeats are ignored, except, in a
    single process, a Ctrl-C more than 2 s after the first: that one stops at once (under torchrun a
    terminal's Ctrl-C reaches torchrun only, which passes the first one on)."""
    got = []

    def handler(signum, frame):
        if not got:
            got.append((signum, time.time()))
            if rank == 0:  # stderr: stdout may be in the middle of a log line
                print(f'\n{signal.Signals(signum).name}: stopping after this step with a checkpoint'
                      + (' (Ctrl-C again after 2 s: stop at once)' if world == 1 and signum == signal.SIGINT else ''),
                      file=sys.stderr, flush=True)
        elif world == 1 and signum == signal.SIGINT and time.time() - got[0][1] > 2:
            raise KeyboardInterrupt  # (under DDP one rank alone leaving would hang the others)
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def train(args, rank, world, device, init=None):
    if device.type == 'cpu':
        keep_freed_memory()
    torch.backends.cudnn.benchmark = True
    set_tf32(args.tf32 != 'none')
    bench = args.bench_steps > 0
    B, b = args.batch, args.batch // world
    stylegan = args.arch == 'stylegan2'
    dataset = data.make_dataset(None if bench else args.data, args.resolution, args.max_images, args.seed, args.skip_bad,
                                labels=args.cond)
    held = (data.make_holdout(args.data, args.resolution, len(dataset), args.holdout, args.seed, args.skip_bad, args.cond)
            if args.holdout and not bench else None)  # D-overfitting diagnostics: reals the run never trains on
    if args.warmup_kimg is None:  # thesis Sec. 2.4: "about 20 epochs"
        args.warmup_kimg = 20 * len(dataset) / 1000
    args.c_dim = dataset.num_classes if args.cond else 0
    if held is not None and args.cond and held.labels.max() >= args.c_dim:
        raise UserError(f'--holdout {args.holdout}: a held-out image has class {held.labels.max()}, which the training '
                        f'images lack (they have {args.c_dim}); change --max-images or --holdout')
    if init and init['args']['c_dim'] != args.c_dim:
        raise UserError(f'--init {args.init} has {init["args"]["c_dim"]} classes, the data {args.c_dim}; '
                        f'fine-tune on data with the same classes')

    # Networks, optimisers (lazy regularisation: lr * c, betas ** c, c = I / (I + 1)), EMA copy.
    args.conv_clamp = init['args']['conv_clamp'] if init else 256 if args.amp != 'none' and stylegan else None
    torch.manual_seed(args.seed)  # the same initial weights on every process
    try:
        G, D = model.build_networks(vars(args))
    except ValueError as e:  # an impossible architecture flag, e.g. --g-attn-res 12
        raise UserError(str(e)) from None
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    # Freeze-D (Mo et al. 2020): the first --freeze-d blocks of D, from the image side, never train
    d_blocks = [getattr(D, f'b{r}') for r in D.res_list] if stylegan else list(D.stages.values())
    if args.freeze_d > len(d_blocks):
        raise UserError(f'--freeze-d {args.freeze_d}: this D has {len(d_blocks)} blocks before its output layers; '
                        f'freeze at most {len(d_blocks)}')
    frozen = [p for block in d_blocks[:args.freeze_d] for p in block.parameters()]
    resume = None if bench else resolve_resume(args, rank, world)
    if init and not resume:
        for net, key in [(G, 'G'), (D, 'D'), (G_ema, 'G_ema')]:
            print0(f'init from {args.init}: ' + load_init(net, init[key], key), rank=rank)
    del init
    G, D, G_ema = G.to(device), D.to(device), G_ema.to(device)
    if args.channels_last:  # G_ema too: its lerp towards G then pairs tensors of one layout
        G, D, G_ema = (net.to(memory_format=torch.channels_last) for net in (G, D, G_ema))
    # The official code sets both lazy intervals always, so its G runs at lr x 4/5 even without path
    # length (e.g. EqGAN-SA's --pl_w=0); the SN backbones are lazy only where R1 is on.
    c_G = args.pl_interval / (args.pl_interval + 1) if stylegan else 1
    c_D = args.r1_interval / (args.r1_interval + 1) if stylegan or args.gamma > 0 else 1
    # fused Adam: one kernel per step, and GradScaler hands it the scale and the overflow flag on the
    # device (the foreach step unscales and checks for infs with host syncs)
    fused = args.adam == 'fused' or args.adam == 'auto' and device.type == 'cuda'
    impl = dict(fused=fused or None, foreach=args.adam == 'foreach' or None)  # None: PyTorch's choice
    opt_G = torch.optim.Adam(G.parameters(), eps=1e-8, **impl)  # lr and betas: set below, after a resume too
    opt_D = torch.optim.Adam(D.parameters(), eps=1e-8, **impl)
    scaler_G = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    scaler_D = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    pl_mean = torch.zeros([], device=device)
    # ADA's p (a device tensor: adjusting it needs no host sync) and the sum and count of sign(D(real)) since its
    # last adjustment; both in the checkpoint, so a resumed run adjusts p exactly as the uninterrupted one
    aug_p = torch.tensor(args.aug_p or 0.0, device=device)
    ada_signs = torch.zeros(2, device=device)
    step = nimg = 0
    seconds = 0.0  # the run's time before this process: the parts before its resumes

    if resume:
        ckpt = load_resume(resume, args, device)
        try:
            for net, key in [(G, 'G'), (D, 'D'), (G_ema, 'G_ema')]:
                model.load_weights(net, ckpt[key])
            for opt, key in [(opt_G, 'opt_G'), (opt_D, 'opt_D')]:
                for group in ckpt[key]['param_groups']:  # this run's implementation, not the saved one's
                    group.update(impl)
                opt.load_state_dict(ckpt[key])
            for scaler, key in [(scaler_G, 'scaler_G'), (scaler_D, 'scaler_D')]:
                if ckpt[key]:  # empty from a run without fp16: a switch to --amp fp16 starts a new scale
                    scaler.load_state_dict(ckpt[key])
            pl_mean.copy_(ckpt['pl_mean'])
            if args.aug == 'ada' and 'aug_p' in ckpt:  # (a run that did not adapt p starts ADA at 0)
                aug_p.copy_(ckpt['aug_p'])
                ada_signs.copy_(ckpt['ada_signs'])
            step, nimg = ckpt['step'], ckpt['nimg']
            seconds = ckpt.get('seconds', 0.0)  # checkpoints before it was saved: this part's time only
        except (KeyError, RuntimeError, ValueError) as e:
            raise UserError(f'checkpoint {resume} does not fit this code ({type(e).__name__}: '
                            f'{" ".join(str(e).split())[:200]}); use another --out') from None
        print0(f'resumed {resume} at kimg {nimg / 1000:.3f} (step {step})', rank=rank)
        threads = ckpt.get('threads', torch.get_num_threads())  # (checkpoints before it was saved: not known)
        if device.type == 'cpu' and threads != torch.get_num_threads():  # CPU kernels split sums by thread count
            print0(f'note: this run trained with {threads} CPU threads per process and resumes with '
                   f'{torch.get_num_threads()}: the same run, but no longer the same to the bit (set '
                   f'OMP_NUM_THREADS={threads} for that)', rank=rank)
        if ckpt['args'].get('conv_clamp') != args.conv_clamp:  # the networks' function changes with --amp
            print0(f'note: --amp {args.amp} {"clamps" if args.conv_clamp else "no longer clamps"} activations at '
                   f'+-{args.conv_clamp or ckpt["args"]["conv_clamp"]} (conv_clamp; the checkpoint\'s run: '
                   f'{ckpt["args"]["conv_clamp"]}), as the official code under mixed precision', rank=rank)
        del ckpt
    total = int(args.kimg * 1000)

    def set_lr(nimg):  # lazy regularisation and the decay; after a resume the flags win (e.g. a lower --lr)
        scale = lr_scale(nimg, total, args.lr_decay_kimg)
        for opt, c in ((opt_G, c_G), (opt_D, c_D)):
            for group in opt.param_groups:
                group.update(lr=args.lr * c * scale, betas=(args.beta1 ** c, args.beta2 ** c))
    set_lr(nimg)
    # double-backward phases use the eager modules. Static shapes: with --d-attn ref D sees batch 2b or 3b
    # in Dmain and b in Gmain, which would otherwise turn into a dynamic batch dimension after one recompile
    G_main = torch.compile(G, dynamic=False) if args.compile else G
    D_main = torch.compile(D, dynamic=False) if args.compile else D
    reuse_real = reuses_real_logits(D)

    loader = data.InfiniteLoader(dataset, b, rank, world, args.seed, nimg, args.mirror, args.workers, device, args.cond)
    ref_loader = (data.InfiniteLoader(dataset, b, rank, world, args.seed + 1, nimg, args.mirror, args.workers, device)
                  if D.needs_ref else None)  # references: real, independent of the primary batch
    amp = (torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == 'bf16' else torch.float16)
           if args.amp != 'none' else contextlib.nullcontext())
    to_float = lambda x: (x.to(torch.float32) / 127.5 - 1).contiguous(
        memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    align = args.sel != 'none' and not args.no_align and args.align_weight > 0
    # GradCAM's inner gradient (Eq. 4) is taken without loss scaling: in fp16 it can underflow to 0, so
    # under --amp fp16 the D pass it goes through runs in bf16 (fp32 on GPUs without bf16)
    cam_amp = (torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type != 'cuda' or torch.cuda.is_bf16_supported())
               if args.amp == 'fp16' else contextlib.nullcontext())

    if rank == 0 and not bench:
        os.makedirs(args.out, exist_ok=True)
        print(f'{len(dataset)} images ({dataset.name}) at {args.resolution}px; G {count(G) / 1e6:.2f}M, '
              f'D {count(D) / 1e6:.2f}M parameters; {world} process(es) on {device}; batch {B}', flush=True)
        grid_z, grid_h, grid_c = grid_latents(G, args, device)
        data.save_grid(torch.stack([dataset[i] for i in range(min(len(dataset), grid_z.shape[0]))]),
                       os.path.join(args.out, 'reals.png'))

    # One training step: ALL its randomness (latents, mixing, per-layer noise, heatmaps, path-length
    # noise) is drawn for the global batch from a generator seeded by (seed, step), each process
    # taking its slice: a resumed run and a DDP run see exactly the numbers of the uninterrupted
    # single-process run, with no RNG state to save.
    mine = lambda t: t[rank * (len(t) // world):(rank + 1) * (len(t) // world)]

    def draw(gen, *tail, total=B):
        return mine(torch.randn([total, *tail], generator=gen, device=device))

    label_pool = torch.as_tensor(dataset.labels, device=device) if args.cond else None  # the real label distribution
    one_hot = lambda labels: F.one_hot(labels, args.c_dim).float()

    def latents(gen, total=B):  # G's inputs; generated labels as the official code: those of random real images
        lat = dict(z=draw(gen, G.z_dim, total=total))
        if stylegan:
            z2 = draw(gen, G.z_dim, total=total)
            cut = torch.randint(1, G.num_ws, [], generator=gen, device=device)
            cut = torch.where(torch.rand([], generator=gen, device=device) < args.style_mix, cut, G.num_ws)
            noise = [draw(gen, 1, r, r, total=total) for r in G.noise_res]
            lat.update(mix_z=z2 if args.style_mix > 0 else None, mix_cutoff=cut, noise=noise)
        heat = G.sample_heatmaps(total, device, gen) if G.uses_heatmaps else None
        lat['heatmaps'] = None if heat is None else {k: mine(v) for k, v in heat.items()}
        if args.cond:
            lat['c'] = mine(one_hot(label_pool[torch.randint(len(label_pool), [total], generator=gen, device=device)]))
        return lat

    w_avg = dict(update_w_avg=True) if stylegan else {}  # as the official code: every phase that runs the mapping

    stats, extremes = {}, {}  # name -> [sum, count], accumulated on the device: no host sync per step

    def record(name, value):
        s = stats.setdefault(name, [0, 0])
        s[0], s[1] = s[0] + value.detach().float(), s[1] + 1

    policies = args.diffaug.split(',')

    def aug_params(gen, total=B):  # fresh augmentation parameters for a global batch; this process's slice
        prm = (model.diffaug_params(gen, total, policies, (args.resolution,) * 2, device) if args.aug == 'diffaug' else
               model.ada_params(gen, total, aug_p, (args.resolution,) * 2, device=device))
        return {k: mine(v) if torch.is_tensor(v) else v for k, v in prm.items()}

    def aug(gen, x):  # an image batch D is about to see (reals, fakes, references), augmented
        return x if args.aug == 'none' or x is None else model.augment(x, aug_params(gen))

    def count_signs(signs):  # --aug ada: add sign(D(real)) [b] to the sums over all processes (the same everywhere,
        if args.aug == 'ada':  # so that any process's checkpoint resumes every one of them)
            s = torch.stack([signs.sum(), torch.tensor(float(signs.numel()), device=device)])
            if world > 1:
                dist.all_reduce(s)
            ada_signs.add_(s)

    def train_step(step, batch, ref_u8):  # batch: the loader's images (and labels, with --cond)
        gen = torch.Generator(device).manual_seed(args.seed * 1_000_003 + step)
        real_u8, real_labels = batch if args.cond else (batch, None)
        real, c_real = to_float(real_u8), (one_hot(real_labels) if args.cond else None)
        ref = to_float(ref_u8) if ref_u8 is not None else None
        kind = 'nonsat' if args.loss == 'contrastive' and nimg < args.warmup_kimg * 1000 else args.loss
        timings, kept = {}, None  # kept: D's real logits of Gmain, with their graph, when Dmain can use them

        def tic(name):  # phase start times; the benchmark synchronises the GPU to time phases
            if bench and device.type == 'cuda':
                torch.cuda.synchronize(device)
            timings[name] = time.perf_counter()

        def train_only(net):  # only `net` takes gradients, Freeze-D's blocks never
            G.requires_grad_(net is G)
            D.requires_grad_(net is D)
            for p in frozen:
                p.requires_grad_(False)

        def begin(name, net, opt):
            tic(name)
            set_tf32(args.tf32 == 'all' or args.tf32 == 'main' and name.endswith('main'))
            train_only(net)
            opt.zero_grad(set_to_none=True)

        g_step, g_index = step % args.n_dis == 0, step // args.n_dis  # G trains every n_dis-th step
        # Gmain: adversarial loss (+ EqGAN-SA alignment, Eq. 4)
        if g_step:
            begin('Gmain', G, opt_G)
            lat = latents(gen)
            align_now = align and g_index % args.align_interval == 0
            with amp:
                fake = G_main(**lat, **w_avg)
                heatmaps = lat['heatmaps']
                if args.aug != 'none':  # G learns through the augmentation D sees
                    prm = aug_params(gen)
                    fake = model.augment(fake, prm)
                    if align_now:  # Eq. 4 compares GradCAM on the augmented fakes with the heatmaps moved likewise
                        heatmaps = model.warp_maps(heatmaps, prm)
                ref_g = aug(gen, ref)
                if align_now:  # one D pass for both losses; the eager D: GradCAM's double backward (graph)
                    with cam_amp:
                        fake_logits, maps = D(fake, ref_g, return_maps=True, c=lat.get('c'))
                else:
                    fake_logits = D_main(fake, ref_g, c=lat.get('c'))
                real_logits = None
                if kind == 'contrastive':  # kept with its graph for Dmain where D cannot change before it
                    train_only(D if reuse_real else G)
                    kept = D_main(aug(gen, real), ref_g, c=c_real)
                    train_only(G)
                    real_logits = kept.detach()
                    kept = kept if reuse_real else None
                loss = losses.g_loss(kind, fake_logits, real_logits, args.g_form)
            record('G/loss', loss)
            if align_now:  # EqGAN-SA Eq. 4 (--eqgan official: as the authors' code computes it)
                l_align = (losses.align_loss_official(fake_logits, maps, heatmaps, args.align_tau)
                           if args.eqgan == 'official' else
                           losses.align_loss(fake_logits, maps, heatmaps, args.align_tau, args.align_truncation,
                                             args.cam_weights))
                record('G/align', l_align)
                loss = loss + args.align_weight * args.align_interval * l_align
            grad = phase_step(G, opt_G, scaler_G, loss, world)
            if grad is not None:  # what G receives from D (and the alignment loss)
                record('G/grad', grad)

        # Greg: path length on half the batch, every pl_interval G steps, weight x interval
        if g_step and args.pl_weight > 0 and g_index % args.pl_interval == 0:
            begin('Greg', G, opt_G)
            half = max(world, B // 2)  # batch shrink 2, over the global batch
            img, ws = G(**latents(gen, half), return_ws=True, **w_avg)
            pl = losses.path_length_penalty(img, ws, pl_mean, noise=draw(gen, 3, *img.shape[2:], total=half)).mean()
            record('G/pl', pl)
            phase_step(G, opt_G, scaler_G, pl * args.pl_weight * args.pl_interval, world)

        # Dmain
        begin('Dmain', D, opt_D)
        lat = latents(gen)
        with amp:
            with torch.no_grad():
                fake = G_main(**lat, **w_avg)
            fake_d, real_d, ref_d = aug(gen, fake), (aug(gen, real) if kept is None else None), aug(gen, ref)
            if D.needs_ref and b % args.mbstd_group == 0:  # one pass of the references for both (same mbstd groups)
                both = torch.cat([lat['c'], c_real]) if args.cond else None
                fake_logits, real_logits = D_main(torch.cat([fake_d, real_d]), ref_d, c=both).chunk(2)
            else:
                fake_logits = D_main(fake_d, ref_d, c=lat.get('c'))
                real_logits = kept if kept is not None else D_main(real_d, ref_d, c=c_real)
            loss = losses.d_loss(kind, real_logits, fake_logits)
        signs = real_logits.detach().float().sign()  # r_t (ADA Sec. 3): the share of reals D calls real, as -1..1
        count_signs(signs)
        if kind == 'wgan':  # the penalty's interpolates go through the augmentation too (its gradient: before it)
            t = mine(torch.rand([B, 1, 1, 1], generator=gen, device=device))
            D_aug = (lambda x, **kw: D(aug(gen, x), **kw)) if args.aug != 'none' else D
            gp = losses.wgan_gp(D_aug, real, fake, ref_d, t, c_real).mean()
            record('D/gp', gp)
            loss = loss + 10 * gp
        record('D/loss', loss)
        record('D/real', real_logits.mean())
        record('D/fake', fake_logits.mean())
        record('D/std', torch.cat([real_logits, fake_logits]).float().std())  # the logits' scale
        record('D/acc', (real_logits[:, None] > fake_logits[None, :]).float().mean())  # share of (real, fake) pairs ranked right
        record('D/rt', signs.mean())
        # EqGAN-SA Fig. 1: min D score of reals vs max D score of fakes since the last log line
        r_min, f_max = real_logits.detach().min().float(), fake_logits.detach().max().float()
        extremes['D/real_min'] = torch.minimum(extremes.get('D/real_min', r_min), r_min)
        extremes['D/fake_max'] = torch.maximum(extremes.get('D/fake_max', f_max), f_max)
        grad = phase_step(D, opt_D, scaler_D, loss, world)
        if grad is not None:
            record('D/grad', grad)

        # Dreg: R1 every r1_interval steps, weight gamma / 2 x interval
        if args.gamma > 0 and step % args.r1_interval == 0:
            begin('Dreg', D, opt_D)
            real_ = real.detach().requires_grad_(True)  # R1 of the un-augmented reals, through the augmentation
            real_logits = D(aug(gen, real_), aug(gen, ref), c=c_real)
            r1 = losses.r1_penalty(real_, real_logits).mean()
            count_signs(real_logits.detach().float().sign())  # counted in r_t as in the official code
            record('D/r1', r1)
            phase_step(D, opt_D, scaler_D, r1 * (args.gamma / 2) * args.r1_interval, world)

        # G EMA: half-life ema_kimg, ramped up to rampup * images seen
        tic('ema')
        ema_nimg = args.ema_kimg * 1000
        if args.ema_rampup:
            ema_nimg = min(ema_nimg, nimg * args.ema_rampup)
        beta = 0.5 ** (B / max(ema_nimg, 1e-8))
        with torch.no_grad():
            torch._foreach_lerp_(list(G_ema.parameters()), list(G.parameters()), 1 - beta)
            torch._foreach_copy_(list(G_ema.buffers()), list(G.buffers()))

        # ADA: every ada_interval steps (as the official loop, from step 0), p moves by batch x interval /
        # (ada_kimg x 1000) towards r_t = --ada-target, with r_t over all processes' reals since the last move
        if args.aug == 'ada' and step % args.ada_interval == 0:
            tic('ada')
            r_t = ada_signs[0] / ada_signs[1]
            aug_p.copy_((aug_p + torch.sign(r_t - args.ada_target) * B * args.ada_interval / (args.ada_kimg * 1000)).clamp(min=0))
            ada_signs.zero_()
        if args.aug in ('ada', 'fixed'):
            extremes['aug/p'] = aug_p.clone()  # the current p (the same on every process), not a mean since the last line
        set_tf32(args.tf32 != 'none')  # the metrics' and grids' setting
        return timings

    if bench:
        benchmark(args, train_step, loader, ref_loader, device, B, rank)
        return 0

    # The loop
    due = lambda kimg: nimg // max(1, round(kimg * 1000)) > (nimg - B) // max(1, round(kimg * 1000))  # crossed a multiple
    names = [m for m in args.metrics.split(',') if m and m != 'none']
    ctl = dist.new_group(backend='gloo') if world > 1 else None  # host-side flags, no device sync

    def agree(flag, *anyone):  # (rank 0's flag, whether any process set each of `anyone`), the same on every process
        if world == 1:
            return (flag, *anyone)
        t = torch.tensor([int(flag and rank == 0), *map(int, anyone)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctl)
        return tuple(map(bool, t))

    finite = lambda: all(bool(torch.isfinite(p).all()) for net in (G, D) for p in net.parameters())

    def checkpoint(step, nimg):  # the weights are the same on every process: any one of them may write them
        state = dict(G=G.state_dict(), D=D.state_dict(), G_ema=G_ema.state_dict(), opt_G=opt_G.state_dict(),
                     opt_D=opt_D.state_dict(), scaler_G=scaler_G.state_dict(), scaler_D=scaler_D.state_dict(),
                     pl_mean=pl_mean, aug_p=aug_p, ada_signs=ada_signs, step=step, nimg=nimg,
                     seconds=seconds + time.time() - t_start, threads=torch.get_num_threads(), args=vars(args))
        save_checkpoint(os.path.join(args.out, checkpoint_name(step)), state, args.keep)

    held_u8 = {}  # the diagnostics' real images, read once: 'train' (the first --holdout) and 'heldout'

    @torch.no_grad()
    def d_outputs():
        """ADA Fig. 1b: D's mean raw output, without augmentation, on --holdout training reals, as many held-out
        reals and as many fakes of G (fixed latents), in global batches of B, each process its slice."""
        if not held_u8:
            mine_idx = [k * B + rank * b + i for k in range(args.holdout // B) for i in range(b)]
            held_u8['train'] = torch.stack([dataset[i % len(dataset)] for i in mine_idx])
            held_u8['heldout'] = torch.stack([held[i] for i in mine_idx])
            if args.cond:  # D judges each real with its own class
                held_u8['c'] = {'train': dataset.labels[[i % len(dataset) for i in mine_idx]], 'heldout': held.labels[mine_idx]}
        sums = torch.zeros(3, device=device)
        with metrics._eval_mode(G, D), amp:  # (batch norm's statistics and spectral norm's vectors stay as they are)
            for k in range(args.holdout // B):
                gen = torch.Generator(device).manual_seed(args.seed * 1_000_003 - 1 - k)  # not a training step's seed
                lat, part = latents(gen), slice(k * b, (k + 1) * b)
                ref_k = to_float(held_u8['train'][part].to(device)) if D.needs_ref else None
                reals = [(to_float(held_u8[key][part].to(device)),
                          one_hot(torch.as_tensor(held_u8['c'][key][part], device=device)) if args.cond else None)
                         for key in ('train', 'heldout')]
                for j, (x, c) in enumerate(reals + [(G(**lat), lat.get('c'))]):
                    sums[j] += D(x, ref_k, c=c).float().sum()
        if world > 1:
            dist.all_reduce(sums)
        return dict(zip(('train', 'heldout', 'fake'), (sums / args.holdout).tolist()))

    def measure():  # the in-loop metrics of G_ema at this nimg, one log.jsonl line; returns the seconds taken
        t0 = time.time()
        res = metrics.evaluate(names, G_ema, D, dataset, device, rank, world, num_gen=args.num_gen,
                               fid_weights=args.fid_weights, cache_dir=os.path.join(args.out, 'cache'),
                               seed=args.seed, amp=args.amp, log=lambda s: print0(s, rank=rank),
                               worker_init_fn=data.leave_stop_signals_to_main) if names else {}
        if held is not None:
            res['overfit'] = d_outputs()
        seconds = time.time() - t0
        if logf:
            logf.write(json.dumps(dict(kimg=round(nimg / 1000, 3), step=step, metrics=res, seconds=round(seconds, 1))) + '\n')
            logf.flush()
        if tb:
            tb_scalars(tb, {'metrics': res}, nimg)
        print0(f'metrics at kimg {nimg / 1000:.2f} ({seconds:.1f} s): {json.dumps(res)}', rank=rank)
        return seconds

    metrics_due = lambda: (names or held is not None) and (due(args.metrics_kimg or args.snap_kimg) or nimg >= total)
    log_path = os.path.join(args.out, 'log.jsonl')
    logged = trim_log(log_path, step) if rank == 0 else []
    logf = open(log_path, 'a') if rank == 0 else None
    tb = tensorboard_writer(args, rank)
    # The checkpoint is written before its step's metrics: a run stopped while evaluating them
    # evaluates them first when it resumes.
    if step > 0 and metrics_due() and agree(not any('metrics' in r and r['step'] == step for r in logged))[0]:
        measure()

    def log_line():  # the means since the last line (all processes), console and log.jsonl
        nonlocal t_log, n_log
        vals = reduced_stats(stats, extremes, world)
        bad = [k for k, v in vals.items() if v != v or abs(v) == float('inf')]
        if bad:
            raise UserError(f'non-finite {", ".join(bad)} at kimg {nimg / 1000:.2f}; {last_good(args)}')
        dt, t_log = time.time() - t_log, time.time()
        ips = (nimg - n_log) / dt
        window.append((nimg - n_log, dt))  # the ETA's speed: the last 10 lines, steadier on a busy machine
        del window[:-10]
        n_log = nimg
        eta = max(0, total - nimg) * sum(t for _, t in window) / max(sum(n for n, _ in window), 1)
        line = dict(kimg=round(nimg / 1000, 3), step=step, sec_per_kimg=round(1000 / max(ips, 1e-8), 2),
                    img_per_sec=round(ips, 2), mem_gb=round(peak_memory_gb(device), 3),
                    lr=float(f'{args.lr * lr_scale(nimg, total, args.lr_decay_kimg):.4g}'), **{k: round(v, 4) for k, v in vals.items()})
        print0(f'kimg {nimg / 1000:8.2f} | sec/kimg {line["sec_per_kimg"]:7.2f} | img/s {ips:7.1f} | ETA {fmt_time(eta)} | '
               + ' '.join(f'{k} {v:.3f}' for k, v in vals.items()) + f' | mem {line["mem_gb"]:.2f} GB', rank=rank)
        if logf:
            logf.write(json.dumps(line) + '\n')
            logf.flush()
        if tb:
            tb_scalars(tb, {k: v for k, v in line.items() if k not in ('kimg', 'step')}, nimg)
        stats.clear()
        extremes.clear()

    def save():  # image grid and checkpoint of this step
        snapshot(args, rank, world, device, step, nimg, finite(), G_ema, lambda: checkpoint(step, nimg),
                 *((grid_z, grid_h, grid_c) if rank == 0 else (None, None, None)))
        if tb:  # the grid snapshot() just wrote
            tb_image(tb, os.path.join(args.out, f'fakes-{step:07d}.png'), nimg)

    t_log = t_start = time.time()
    n_log, saved, window = nimg, step, []
    print0(f'training to {args.kimg} kimg with the {args.loss} loss'
           + (f' (non-saturating warm-up until {args.warmup_kimg:g} kimg)' if args.loss == 'contrastive' else '')
           + (f'; the run is already at {nimg / 1000:g} kimg: raise --kimg to go on' if nimg >= total else ''), rank=rank)
    with stop_requests(rank, world) as stop:  # Ctrl-C / SIGTERM: no more batches; log, save, exit
        stopping = lambda: agree(False, bool(stop))[1]  # any process's signal, the same answer on all
        while nimg < total:
            try:
                batch = next(loader)
                ref_u8 = next(ref_loader) if ref_loader is not None else None
                bad = None
            except data.DataError as e:  # e.g. a truncated image, which only this process may have read
                bad = e
            # one agreement per step on both: a signal and a data error anywhere stop every process here
            _, signalled, broken = agree(False, bool(stop), bad is not None)
            if broken:  # keep the steps since the last snapshot (one writer), then all stop together
                try:
                    if rank == 0 and step > saved and finite():
                        checkpoint(step, nimg)
                finally:  # none exits (and torchrun ends the others) while rank 0 writes
                    if world > 1:
                        dist.barrier(group=ctl)
                raise bad or UserError('stopped: another process could not read an image (its error above)')
            if signalled:  # (the batch just fetched is fetched again on resume)
                if stats:
                    log_line()
                if step > saved:
                    save()
                print0(f'stopped at kimg {nimg / 1000:.2f} with a checkpoint; the same command resumes', rank=rank)
                return 128 + (stop[0][0] if stop else signal.SIGTERM)  # the shell's code for "ended by a signal"
            set_lr(nimg)
            train_step(step, batch, ref_u8)
            step += 1
            nimg += B
            done = nimg >= total
            if agree(time.time() - t_log >= args.log_sec or done)[0]:
                log_line()
            if due(args.snap_kimg) or done:
                save()
                saved = step
            if metrics_due() and (done or not stopping()):  # after a stop, the resume evaluates them
                t_log += measure()  # metric time does not count as training speed
    this = time.time() - t_start
    print0(f'done: {nimg / 1000:.2f} kimg in {fmt_time(seconds + this)}' + (f' ({fmt_time(this)} since the resume)' if seconds else '')
           + f'; checkpoints in {args.out}', rank=rank)
    return 0


def reduced_stats(stats, extremes, world):
    """Means of the recorded values over the steps since the last log line and over all processes;
    D's extreme scores over all processes (the same on every rank)."""
    keys = list(stats)
    sums = torch.stack([stats[k][0] for k in keys]) if keys else torch.zeros(0)
    if world > 1:
        dist.all_reduce(sums)
        for k, v in extremes.items():
            dist.all_reduce(v, op=dist.ReduceOp.MIN if k.endswith('_min') else dist.ReduceOp.MAX)
    vals = {k: s / (stats[k][1] * world) for k, s in zip(keys, sums.tolist())}
    return {**vals, **{k: v.item() for k, v in extremes.items()}}


def tensorboard_writer(args, rank):
    """--tensorboard: a SummaryWriter on --out for rank 0 (None elsewhere, and without the flag). The package
    is imported only here, and on every rank: a missing one stops all processes with the same line."""
    if not args.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError('--tensorboard needs the tensorboard package: pip install tensorboard (or drop --tensorboard)') from None
    return SummaryWriter(args.out) if rank == 0 else None


def tb_scalars(tb, values, nimg, prefix=''):
    """The numbers of a log.jsonl record as TensorBoard scalars at x = images seen; nested dicts (the
    metrics) become 'metrics/fid50k_full', ..."""
    for k, v in values.items():
        if isinstance(v, dict):
            tb_scalars(tb, v, nimg, f'{prefix}{k}/')
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            tb.add_scalar(prefix + k, v, nimg)
    tb.flush()


def tb_image(tb, path, nimg):
    """A PNG grid as a TensorBoard image at x = images seen."""
    import numpy as np
    from PIL import Image
    with Image.open(path) as im:
        tb.add_image('fakes', np.asarray(im.convert('RGB')), nimg, dataformats='HWC')
    tb.flush()


def trim_log(path, step):
    """A resumed run drops the log lines past its checkpoint's step (it writes them again); a new run
    starts an empty log. Returns the records kept."""
    keep = []  # (line, record)
    if os.path.isfile(path):
        for line in open(path):
            try:
                record = json.loads(line)
                if record['step'] <= step:
                    keep.append((line, record))
            except (ValueError, KeyError, TypeError):  # a line cut short by a crash
                pass
    data.atomic_write(path, lambda f: f.writelines(line for line, _ in keep), mode='w')
    return [record for _, record in keep]


def snapshot(args, rank, world, device, step, nimg, finite, G_ema, checkpoint, grid_z, grid_h, grid_c):
    """Image grid (EMA G, fixed latents) and checkpoint; refuses to save when G's or D's weights are
    not all `finite` on every process (G_ema follows G)."""
    ok = torch.tensor(float(finite), device=device)
    if world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not ok.item():
        raise UserError(f'G or D weights became non-finite at kimg {nimg / 1000:.2f}; {last_good(args)}')
    if rank != 0:
        return
    data.save_grid(generate_images(G_ema, grid_z, grid_h, args.batch, grid_c), os.path.join(args.out, f'fakes-{step:07d}.png'),
                   8 if args.cond else None)
    checkpoint()


def grid_latents(G, args, device):
    """The snapshots' fixed latents (and heatmaps); class-conditional: one row of 8 per class (the first 16)."""
    n = 8 * min(args.c_dim, 16) if args.cond else 32 if args.resolution <= 128 else 16
    gen = torch.Generator().manual_seed(args.seed)
    z = torch.randn(n, G.z_dim, generator=gen)
    h = G.sample_heatmaps(n, 'cpu', gen)
    c = F.one_hot(torch.arange(n) // 8, args.c_dim).float().to(device) if args.cond else None
    return z.to(device), (None if h is None else {k: v.to(device) for k, v in h.items()}), c


@torch.no_grad()
def generate_images(G, z, heatmaps, batch, c=None):
    """uint8 images [N, 3, H, W] from G (const noise; labels c [N, c_dim] if conditional), in chunks of `batch`."""
    out = []
    for i in range(0, z.shape[0], batch):
        h = None if heatmaps is None else {k: v[i:i + batch] for k, v in heatmaps.items()}
        out.append(G(z[i:i + batch], noise_mode='const', heatmaps=h, **({} if c is None else {'c': c[i:i + batch]})))
    return model.to_uint8(torch.cat(out))


def benchmark(args, train_step, loader, ref_loader, device, B, rank=0):
    """Full training steps on the built-in dataset: 3 warm-up steps, then args.bench_steps timed ones.
    img/s includes the wait for the loader (its own line says how long); rank 0 prints."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    per_phase, t0, waited = {}, None, 0.0
    for i in range(3 + args.bench_steps):
        t_fetch = time.perf_counter()
        real, ref = next(loader), (next(ref_loader) if ref_loader is not None else None)
        if i > 3:  # the first timed batch was fetched before the clock started
            waited += time.perf_counter() - t_fetch
        if i == 3:
            sync()
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
            t0, cpu0 = time.perf_counter(), time.process_time()
        starts = train_step(i, real, ref)
        sync()
        if i >= 3:
            marks = sorted(starts.items(), key=lambda kv: kv[1]) + [('end', time.perf_counter())]
            for (name, t), (_, t_next) in zip(marks, marks[1:]):
                per_phase.setdefault(name, []).append(t_next - t)
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0  # CPU time: all threads of this process
    res = dict(img_per_sec=round(args.bench_steps * B / dt, 2), ms_per_step=round(1000 * dt / args.bench_steps, 1),
               cpu_ms_per_step=round(1000 * cpu / args.bench_steps, 1),
               peak_mem_gb=round(peak_memory_gb(device), 3),
               phases_ms={k: round(1000 * sum(v) / len(v), 1) for k, v in per_phase.items()},
               phase_counts={k: len(v) for k, v in per_phase.items()},
               loader_ms_per_step=round(1000 * waited / max(1, args.bench_steps - 1), 2))
    print0(f'bench: {res["img_per_sec"]} img/s, {res["ms_per_step"]} ms/step ({res["cpu_ms_per_step"]} ms of CPU time), '
           f'peak {res["peak_mem_gb"]} GB; '
           f'ms per phase occurrence: {res["phases_ms"]} over {res["phase_counts"]} occurrences; img/s includes '
           f'{res["loader_ms_per_step"]} ms/step waiting for the loader (the built-in dataset, --workers {args.workers}; '
           f'--data is not read)', rank=rank)
    print0(json.dumps(dict(bench=res, args=vars(args))), rank=rank)


def count(net):
    return sum(p.numel() for p in net.parameters())


def peak_memory_gb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # peak RSS of this process


def fmt_time(s):
    s = int(s)
    return f'{s // 86400}d {s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}' if s >= 86400 else f'{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}'


if __name__ == '__main__':
    main()
