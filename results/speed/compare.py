"""This project's training speed beside the official stylegan2-ada-pytorch's, measured side by side.

    python results/speed/compare.py --official ~/src/stylegan2-ada-pytorch            # 32 px, 3 pairs
    python results/speed/compare.py --official PATH --res 32 64 --repeats 3 --steps 24
    python results/speed/compare.py --official PATH --flags=--compile                 # a lever beside it (note the =)

The two sides run one after the other, alternated `--repeats` times in one call, each in a fresh
process, so that the machine's drift (other jobs, turbo, thermal) falls on both: the ratio of each
pair is the claim, the absolute img/s only mean something beside each other. Both train the same
networks the same way: StyleGAN2 config E (skip G, residual D) with channel_base 4096, channel_max
256, 2 mapping layers, batch 16, style mixing 0.9, lazy R1 (gamma 0.05, every 16 steps), no path
length, fp32, minibatch-std groups of 4, the G EMA updated every step; 3 warm-up steps, then
`--steps` timed ones. This side: `python train.py --cfg cpu --bench-steps N` (its loader included:
the built-in dataset rendered in a worker process). The official side: its networks and loss from
the checkout given by `--official` (your own clone of github.com/NVlabs/stylegan2-ada-pytorch; never
part of this repository), driven by the phase loop of its training_loop.py (Gmain, Dmain, Dreg; Greg
computes nothing without path length and is skipped), with one fixed random batch as its reals. On a
CPU it runs its reference ops (its CUDA kernels need a GPU). Threads: both inherit OMP_NUM_THREADS.
"""
import argparse, json, os, platform, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def official_worker(a):
    """Time the official networks and loss; print one JSON line."""
    import torch
    sys.path.insert(0, a.official)
    from training.networks import Generator, Discriminator  # the user's checkout
    from training.loss import StyleGAN2Loss
    torch.manual_seed(0)
    res = a.res[0]
    arch = dict(channel_base=4096, channel_max=256, num_fp16_res=0, conv_clamp=None)
    G = Generator(z_dim=512, c_dim=0, w_dim=512, img_resolution=res, img_channels=3,
                  mapping_kwargs=dict(num_layers=2), synthesis_kwargs=arch)
    D = Discriminator(c_dim=0, img_resolution=res, img_channels=3, epilogue_kwargs=dict(mbstd_group_size=4), **arch)
    G_ema = G.__class__(**G.init_kwargs).eval().requires_grad_(False)
    G_ema.load_state_dict(G.state_dict())
    loss = StyleGAN2Loss('cpu', G.mapping, G.synthesis, D, style_mixing_prob=0.9, r1_gamma=0.05, pl_weight=0)
    optG = torch.optim.Adam(G.parameters(), lr=0.0025, betas=(0.0, 0.99))
    optD = torch.optim.Adam(D.parameters(), lr=0.0025 * 16 / 17, betas=(0.0, 0.99 ** (16 / 17)))  # lazy R1's ratio
    B, c = a.batch, torch.zeros([a.batch, 0])
    real = torch.rand([B, 3, res, res]) * 2 - 1
    for m in (G, D):
        m.requires_grad_(False)

    def step(i):
        for phase, opt, net, every in (('Gmain', optG, G, 1), ('Dmain', optD, D, 1), ('Dreg', optD, D, 16)):
            if i % every:
                continue
            opt.zero_grad(set_to_none=True)
            net.requires_grad_(True)
            loss.accumulate_gradients(phase, real, c, torch.randn([B, 512]), c, sync=True, gain=every)
            net.requires_grad_(False)
            for p in net.parameters():
                if p.grad is not None:
                    torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
            opt.step()
        with torch.no_grad():  # the official EMA (ema_kimg 10 at batch 16: its cost, not its value, matters here)
            beta = 0.5 ** (B / 10000)
            for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                p_ema.copy_(p.lerp(p_ema, beta))
            for b_ema, b in zip(G_ema.buffers(), G.buffers()):
                b_ema.copy_(b)

    for i in range(3):
        step(i)
    t, cpu = time.perf_counter(), time.process_time()
    for i in range(3, 3 + a.steps):
        step(i)
    dt, cpu = time.perf_counter() - t, time.process_time() - cpu
    print(json.dumps(dict(img_per_sec=round(a.steps * B / dt, 2), ms_per_step=round(1000 * dt / a.steps, 1),
                          cpu_ms_per_step=round(1000 * cpu / a.steps, 1))))


def run(cmd):
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [s for s in out.stdout.splitlines() if s.startswith('{')]
    if out.returncode or not lines:
        sys.exit(f'compare.py: this command failed (exit {out.returncode}): {" ".join(cmd)}\n{out.stderr[-2000:]}')
    res = json.loads(lines[-1])
    return res.get('bench', res)


def machine():
    model = next((s.split(':', 1)[1].strip() for s in open('/proc/cpuinfo') if s.startswith('model name')), platform.processor()) \
        if os.path.exists('/proc/cpuinfo') else platform.processor()
    import torch
    return (f'{model}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), '
            f'OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS", "unset")}')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--official', required=True, help='path to your checkout of NVlabs/stylegan2-ada-pytorch')
    p.add_argument('--res', type=int, nargs='+', default=[32], help='resolutions (default 32)')
    p.add_argument('--repeats', type=int, default=3, help='pairs per resolution, alternated (default 3)')
    p.add_argument('--steps', type=int, default=24, help='timed steps per run (default 24)')
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--workers', type=int, default=1, help="this side's loader processes (default 1)")
    p.add_argument('--flags', default='', help='extra train.py flags for this side, written with = since they start with a dash: --flags="--compile --channels-last"')
    p.add_argument('--official-worker', action='store_true', help=argparse.SUPPRESS)
    a = p.parse_args()
    if not os.path.isfile(os.path.join(a.official, 'training', 'networks.py')):
        sys.exit(f'compare.py: --official {a.official} holds no training/networks.py: give the root of a '
                 'stylegan2-ada-pytorch checkout (git clone https://github.com/NVlabs/stylegan2-ada-pytorch)')
    if a.official_worker:
        return official_worker(a)
    print(f'{time.strftime("%Y-%m-%d %H:%M")}  {machine()}')
    summary = []
    for res in a.res:
        ours_cmd = [sys.executable, 'train.py', '--cfg', 'cpu', '--resolution', str(res), '--batch', str(a.batch),
                    '--bench-steps', str(a.steps), '--workers', str(a.workers)] + a.flags.split()
        off_cmd = [sys.executable, os.path.abspath(__file__), '--official-worker', '--official', a.official,
                   '--res', str(res), '--steps', str(a.steps), '--batch', str(a.batch)]
        ratios = []
        for r in range(a.repeats):
            ours, off = run(ours_cmd), run(off_cmd)
            ratios.append(ours['img_per_sec'] / off['img_per_sec'])
            print(f'{res} px, pair {r + 1}: this project {ours["img_per_sec"]:6.2f} img/s '
                  f'(CPU {ours["cpu_ms_per_step"]:.0f} ms/step) | official {off["img_per_sec"]:6.2f} img/s '
                  f'(CPU {off["cpu_ms_per_step"]:.0f} ms/step) | ratio {ratios[-1]:.2f}', flush=True)
            summary.append(dict(res=res, pair=r + 1, ours=ours['img_per_sec'], official=off['img_per_sec'],
                                ours_cpu_ms=ours['cpu_ms_per_step'], official_cpu_ms=off['cpu_ms_per_step']))
        print(f'{res} px: ratio {statistics.median(ratios):.2f} (median of {len(ratios)}; '
              f'{", ".join(f"{x:.2f}" for x in ratios)}), flags: {a.flags or "none"}')
    print(json.dumps(dict(date=time.strftime('%Y-%m-%d'), machine=machine(), flags=a.flags, steps=a.steps, pairs=summary)))


if __name__ == '__main__':
    main()
