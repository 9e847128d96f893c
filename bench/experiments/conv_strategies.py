"""MAML meta-training step strategies for Conv4 on CPU (second- and first-order).

Usage:
    python bench/experiments/conv_strategies.py            # full run (~10 min on 2 idle cores)
    python bench/experiments/conv_strategies.py --quick    # fewer reps / candidates
    python bench/experiments/conv_strategies.py --only W2 --order so --cands loop,opt --reps 3

Every (workload, order, candidate, rep) measurement runs in a FRESH subprocess:
  * time per meta-step = median over `--steps` timed steps after one warm-up step
    (also process CPU time per step, which is less sensitive to other jobs on the box);
  * peak memory = ru_maxrss at the end minus RSS just before the first step (the data and
    parameters are already allocated then).  For the 2-process candidate the worker's own
    increase is added (and its whole RSS reported separately);
  * the meta-gradient of the warm-up step is saved and compared with the baseline's
    (max |diff| / max |ref| over all tensors, and max per-tensor relative L2 error).
Candidates are interleaved (rep-major order) so that load from other users hits all of them.

Reference implementation to integrate: `maml_metagrad_fast` (see its docstring).
"""
import argparse, json, os, resource, statistics, subprocess, sys, tempfile, time
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- model / data
WORKLOADS = {
    'W2': dict(n=5, k=1, q=15, T=32, steps=1, lr=0.4),   # Omniglot 5-way 1-shot
    'W3': dict(n=20, k=1, q=5, T=16, steps=5, lr=0.1),   # Omniglot 20-way 1-shot
}


class Conv4(nn.Module):
    """4 x [conv3x3(64,pad 1) -> BN(batch stats, no running stats) -> ReLU -> maxpool2] -> linear."""

    def __init__(self, n_way, hidden=64, in_ch=1):
        super().__init__()
        for i in range(4):
            setattr(self, f'conv{i}', nn.Conv2d(in_ch if i == 0 else hidden, hidden, 3, padding=1))
            setattr(self, f'bn{i}', nn.BatchNorm2d(hidden, track_running_stats=False))
        self.head = nn.Linear(hidden, n_way)

    def forward(self, x):
        return forward_ref(dict(self.named_parameters()), x)


def forward_ref(p, x):
    """Textbook functional forward (NCHW, conv -> BN -> ReLU -> pool)."""
    for i in range(4):
        x = F.conv2d(x, p[f'conv{i}.weight'], p[f'conv{i}.bias'], padding=1)
        x = F.batch_norm(x, None, None, p[f'bn{i}.weight'], p[f'bn{i}.bias'], training=True)
        x = F.max_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), p['head.weight'], p['head.bias'])


def _conv0_im2col(p, x):
    """First conv (C_in=1) as im2col + addmm.  mkldnn is very slow for C_in=1 (~8 GFLOP/s);
    the [N*H*W, 64] result is already channels_last.  The unfold is of the (constant) input."""
    N, _, H, W_ = x.shape
    w = p['conv0.weight']
    U = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(N * H * W_, w.shape[1] * 9)
    y = torch.addmm(p['conv0.bias'], U, w.reshape(w.shape[0], -1).t())
    return y.view(N, H, W_, w.shape[0]).permute(0, 3, 1, 2)      # NCHW logical, NHWC physical


def make_forward_opt(channels_last=True, im2col=True, pool_first=True):
    """Same function as forward_ref, cheaper to evaluate:
      * pool_first: maxpool(relu(z)) == relu(maxpool(z)) exactly (relu is monotone), so ReLU
        (and its backward) runs on 4x fewer elements;
      * channels_last activations/weights (mkldnn's native layout, no reorders);
      * im2col first conv.
    Everything is twice differentiable (used in the inner loop with create_graph=True)."""
    def fwd(p, x):
        for i in range(4):
            if i == 0 and im2col:
                x = _conv0_im2col(p, x)
            else:
                w = p[f'conv{i}.weight']
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                    w = w.contiguous(memory_format=torch.channels_last)
                x = F.conv2d(x, w, p[f'conv{i}.bias'], padding=1)
            x = F.batch_norm(x, None, None, p[f'bn{i}.weight'], p[f'bn{i}.bias'], training=True)
            x = F.relu(F.max_pool2d(x, 2)) if pool_first else F.max_pool2d(F.relu(x), 2)
        return F.linear(x.flatten(1), p['head.weight'], p['head.bias'])
    return fwd


def bn_manual(x, w, b, eps=1e-5):
    v, m = torch.var_mean(x, (0, 2, 3), unbiased=False, keepdim=True)
    scale = w.view(1, -1, 1, 1) * torch.rsqrt(v + eps)
    return x * scale + (b.view(1, -1, 1, 1) - m * scale)


def make_data(w, seed=1):
    g = torch.Generator().manual_seed(seed)
    n, k, q, T = w['n'], w['k'], w['q'], w['T']
    sx = torch.randn(T, n * k, 1, 28, 28, generator=g)
    sy = torch.arange(n).repeat_interleave(k).expand(T, -1).contiguous()
    qx = torch.randn(T, n * q, 1, 28, 28, generator=g)
    qy = torch.arange(n).repeat_interleave(q).expand(T, -1).contiguous()
    return sx, sy, qx, qy


# ----------------------------------------------------------------------------- strategies
# Every strategy: (params dict of leaf tensors, sx, sy, qx, qy, lr, steps, fo) -> mean query loss,
# with the meta-gradient (of the mean query loss over tasks) ACCUMULATED into p[k].grad.

def strat_loop(p, sx, sy, qx, qy, lr, steps, fo, fwd=forward_ref):
    """Baseline: textbook per-task loop, autograd.grad(create_graph=True), backward per task."""
    T = sx.shape[0]
    tot = 0.
    for t in range(T):
        fast = dict(p)
        for _ in range(steps):
            loss = F.cross_entropy(fwd(fast, sx[t]), sy[t])
            g = torch.autograd.grad(loss, list(fast.values()), create_graph=not fo)
            fast = {k: v - lr * gi for (k, v), gi in zip(fast.items(), g)}
        ql = F.cross_entropy(fwd(fast, qx[t]), qy[t])
        (ql / T).backward()
        tot += ql.item()
    return tot / T


FWD_OPT = make_forward_opt()


def maml_metagrad_fast(p, sx, sy, qx, qy, lr, steps, fo, fwd=FWD_OPT, accumulate=True):
    """Reference implementation for integration (single process).

    p: dict name -> leaf tensor (requires_grad) of a Conv4 (names as Conv4.named_parameters()).
    sx [T,S,1,28,28], sy [T,S], qx [T,Q,1,28,28], qy [T,Q].
    Returns (mean query loss, grads dict); grads are also accumulated into p[k].grad if
    accumulate=True (like loss.backward()).

    Second order: per-task loop (keeps peak memory at one task's graph) with the cheaper but
    mathematically identical forward FWD_OPT.  First order: the inner loop is built without
    any graph (torch.no_grad + manual grads via autograd.grad on a detached copy), the query
    backward gives dL/dtheta' directly; that is the FO meta-gradient.
    """
    T = sx.shape[0]
    names = list(p)
    grads = {k: torch.zeros_like(v) for k, v in p.items()}
    tot = 0.
    for t in range(T):
        if fo:
            fast = {k: v.detach() for k, v in p.items()}
            for _ in range(steps):
                fl = {k: v.requires_grad_() for k, v in fast.items()}
                loss = F.cross_entropy(fwd(fl, sx[t]), sy[t])
                g = torch.autograd.grad(loss, list(fl.values()))
                with torch.no_grad():
                    fast = {k: v - lr * gi for (k, v), gi in zip(fl.items(), g)}
            fl = {k: v.requires_grad_() for k, v in fast.items()}
            ql = F.cross_entropy(fwd(fl, qx[t]), qy[t])
            g = torch.autograd.grad(ql / T, list(fl.values()))
            for k, gi in zip(names, g):
                grads[k] += gi
        else:
            fast = dict(p)
            for _ in range(steps):
                loss = F.cross_entropy(fwd(fast, sx[t]), sy[t])
                g = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
                fast = {k: v - lr * gi for (k, v), gi in zip(fast.items(), g)}
            ql = F.cross_entropy(fwd(fast, qx[t]), qy[t])
            g = torch.autograd.grad(ql / T, list(p.values()))
            for k, gi in zip(names, g):
                grads[k] += gi
        tot += ql.item()
    if accumulate:
        for k, v in p.items():
            v.grad = grads[k].clone() if v.grad is None else v.grad + grads[k]
    return tot / T, grads


def strat_opt(p, sx, sy, qx, qy, lr, steps, fo):
    return maml_metagrad_fast(p, sx, sy, qx, qy, lr, steps, fo)[0]


def strat_loop_fwdopt_variant(**kw):
    fwd = make_forward_opt(**kw)
    return lambda p, sx, sy, qx, qy, lr, steps, fo: strat_loop(p, sx, sy, qx, qy, lr, steps, fo, fwd=fwd)


def fwd_bnmanual(p, x):
    """FWD_OPT with BatchNorm written from var_mean (idea b)."""
    for i in range(4):
        if i == 0:
            x = _conv0_im2col(p, x)
        else:
            x = F.conv2d(x.contiguous(memory_format=torch.channels_last),
                         p[f'conv{i}.weight'].contiguous(memory_format=torch.channels_last),
                         p[f'conv{i}.bias'], padding=1)
        x = bn_manual(x, p[f'bn{i}.weight'], p[f'bn{i}.bias'])
        x = F.relu(F.max_pool2d(x, 2))
    return F.linear(x.flatten(1), p['head.weight'], p['head.bias'])


FWD_VMAPPABLE = make_forward_opt(channels_last=False, im2col=False, pool_first=True)


def _func_task_loss(fwd, lr, steps, fo):
    from torch.func import grad

    def inner_loss(fp, x, y):
        return F.cross_entropy(fwd(fp, x), y)

    def task_loss(pp, sx, sy, qx, qy):
        fast = pp
        for _ in range(steps):
            g = grad(inner_loss)(fast, sx, sy)
            if fo:
                g = {k: v.detach() for k, v in g.items()}
            fast = {k: fast[k] - lr * g[k] for k in fast}
        return inner_loss(fast, qx, qy)
    return task_loss


def strat_func_grad(p, sx, sy, qx, qy, lr, steps, fo, fwd=FWD_OPT):
    """(c) torch.func.grad(outer) of a per-task loss whose inner loop uses torch.func.grad."""
    from torch.func import grad_and_value
    T = sx.shape[0]
    pd = {k: v.detach() for k, v in p.items()}
    gv = grad_and_value(_func_task_loss(fwd, lr, steps, fo))
    tot = 0.
    acc = {k: torch.zeros_like(v) for k, v in pd.items()}
    for t in range(T):
        g, l = gv(pd, sx[t], sy[t], qx[t], qy[t])
        for k in acc:
            acc[k] += g[k]
        tot += l.item()
    for k, v in p.items():
        v.grad = acc[k] / T if v.grad is None else v.grad + acc[k] / T
    return tot / T


def make_strat_vmap(chunk):
    """(d) vmap(grad(task_loss)) over chunks of tasks (convs become grouped convs)."""
    def strat(p, sx, sy, qx, qy, lr, steps, fo):
        from torch.func import grad_and_value, vmap
        T = sx.shape[0]
        pd = {k: v.detach() for k, v in p.items()}
        f = vmap(grad_and_value(_func_task_loss(FWD_VMAPPABLE, lr, steps, fo)), in_dims=(None, 0, 0, 0, 0))
        acc = {k: torch.zeros_like(v) for k, v in pd.items()}
        tot = 0.
        for s in range(0, T, chunk):
            g, l = f(pd, sx[s:s + chunk], sy[s:s + chunk], qx[s:s + chunk], qy[s:s + chunk])
            for k in acc:
                acc[k] += g[k].sum(0)
            tot += l.sum().item()
        for k, v in p.items():
            v.grad = acc[k] / T if v.grad is None else v.grad + acc[k] / T
        return tot / T
    return strat


def strat_fold0(p, sx, sy, qx, qy, lr, steps, fo):
    """(d) inner step 0 of ALL tasks in one vmapped call with shared (unbatched) theta, so convs
    are single convs over [T*S] images (per-task BN stats via vmap); then per task: remaining
    inner steps + query from a detached leaf theta_t^(1); finally one backward through the
    shared step-0 graph with the stacked dL/dtheta_t^(1) (two-phase chain rule)."""
    from torch.func import grad, vmap
    T = sx.shape[0]
    names = list(p)

    def inner_loss(fp, x, y):
        return F.cross_entropy(FWD_VMAPPABLE(fp, x), y)
    if fo:
        with torch.no_grad():
            pd = {k: v.detach() for k, v in p.items()}
            g0 = vmap(grad(inner_loss), in_dims=(None, 0, 0))(pd, sx, sy)
            fast0 = {k: pd[k] - lr * g0[k] for k in names}            # [T, ...]
    else:
        g0 = vmap(grad(inner_loss), in_dims=(None, 0, 0))(p, sx, sy)  # differentiable wrt p
        fast0 = {k: p[k] - lr * g0[k] for k in names}
    dfast = {k: torch.empty_like(v) for k, v in fast0.items()}
    tot = 0.
    for t in range(T):
        leaf = {k: fast0[k][t].detach().requires_grad_() for k in names}
        fast = dict(leaf)
        for _ in range(steps - 1):
            loss = F.cross_entropy(FWD_OPT(fast, sx[t]), sy[t])
            g = torch.autograd.grad(loss, list(fast.values()), create_graph=not fo)
            fast = {k: v - lr * gi for (k, v), gi in zip(fast.items(), g)}
        ql = F.cross_entropy(FWD_OPT(fast, qx[t]), qy[t])
        g = torch.autograd.grad(ql / T, list(leaf.values()))
        for k, gi in zip(names, g):
            dfast[k][t] = gi
        tot += ql.item()
    if fo:
        for k, v in p.items():
            s = dfast[k].sum(0)
            v.grad = s if v.grad is None else v.grad + s
    else:
        torch.autograd.backward([fast0[k] for k in names], [dfast[k] for k in names])
    return tot / T


_COMPILED = {}


def strat_compile_query(p, sx, sy, qx, qy, lr, steps, fo):
    """(f) torch.compile of the query loss only (the query graph is differentiated once, even in
    second-order MAML; the inner loop stays eager because it needs create_graph=True)."""
    if 'q' not in _COMPILED:
        _COMPILED['q'] = torch.compile(lambda fp, x, y: F.cross_entropy(FWD_OPT(fp, x), y), dynamic=False)
    cq = _COMPILED['q']
    T = sx.shape[0]
    tot = 0.
    for t in range(T):
        fast = dict(p) if not fo else {k: v.detach() for k, v in p.items()}
        for _ in range(steps):
            fl = fast if not fo else {k: v.detach().requires_grad_() for k, v in fast.items()}
            loss = F.cross_entropy(FWD_OPT(fl, sx[t]), sy[t])
            g = torch.autograd.grad(loss, list(fl.values()), create_graph=not fo)
            fast = {k: v - lr * gi for (k, v), gi in zip(fl.items(), g)}
        if fo:
            fl = {k: v.detach().requires_grad_() for k, v in fast.items()}
            ql = cq(fl, qx[t], qy[t])
            g = torch.autograd.grad(ql / T, list(fl.values()))
            for (k, v), gi in zip(p.items(), g):
                v.grad = gi.clone() if v.grad is None else v.grad + gi
        else:
            ql = cq(fast, qx[t], qy[t])
            (ql / T).backward()
        tot += ql.item()
    return tot / T


def strat_compile_full_so(p, sx, sy, qx, qy, lr, steps, fo):
    """(f) try torch.compile of the whole per-task torch.func meta-gradient (grad of grad)."""
    if 'full' not in _COMPILED:
        from torch.func import grad_and_value
        _COMPILED['full'] = torch.compile(grad_and_value(_func_task_loss(FWD_VMAPPABLE, lr, steps, fo)))
    f = _COMPILED['full']
    T = sx.shape[0]
    pd = {k: v.detach() for k, v in p.items()}
    acc = {k: torch.zeros_like(v) for k, v in pd.items()}
    tot = 0.
    for t in range(T):
        g, l = f(pd, sx[t], sy[t], qx[t], qy[t])
        for k in acc:
            acc[k] += g[k]
        tot += l.item()
    for k, v in p.items():
        v.grad = acc[k] / T if v.grad is None else v.grad + acc[k] / T
    return tot / T


# ----------------------------------------------------------------------------- 2 processes (e)
def _mp_worker(conn, shared, wl, fo, inner):
    torch.set_num_threads(1)
    p = {k: v.requires_grad_() for k, v in shared['params'].items()}
    base = _rss_kb()
    while True:
        msg = conn.recv()
        if msg is None:
            break
        lo, hi, T = msg
        sx, sy, qx, qy = (shared[k][lo:hi] for k in ('sx', 'sy', 'qx', 'qy'))
        for v in p.values():
            v.grad = None
        l = STRATS[inner](p, sx, sy, qx, qy, wl['lr'], wl['steps'], fo)
        for k, v in p.items():
            shared['grads'][k].copy_(v.grad * ((hi - lo) / T))
        conn.send((l, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base,
                   resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


class TwoProc:
    """Main process + 1 worker process, each torch.set_num_threads(1), each does half the tasks.
    Parameters, the task batch and the worker's gradient buffer live in shared memory."""

    def __init__(self, p, data, wl, fo, inner='opt'):
        import torch.multiprocessing as mp
        ctx = mp.get_context('fork')
        for v in p.values():
            v.data.share_memory_()
        self.shared = {'params': {k: v.detach() for k, v in p.items()},
                       'grads': {k: torch.zeros_like(v).share_memory_() for k, v in p.items()}}
        for k, d in zip(('sx', 'sy', 'qx', 'qy'), data):
            self.shared[k] = d.clone().share_memory_()
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_mp_worker, args=(child, self.shared, wl, fo, inner), daemon=True)
        self.proc.start()
        self.inner, self.wl, self.fo = inner, wl, fo
        self.worker_peak_delta_kb = 0
        self.worker_maxrss_kb = 0

    def __call__(self, p, sx, sy, qx, qy, lr, steps, fo):
        torch.set_num_threads(1)
        T = sx.shape[0]
        h = T // 2
        for k, d in zip(('sx', 'sy', 'qx', 'qy'), (sx, sy, qx, qy)):   # new batch -> shared buffer
            self.shared[k].copy_(d)
        self.conn.send((h, T, T))
        mine = {k: v.grad for k, v in p.items()}
        for v in p.values():
            v.grad = None
        l0 = STRATS[self.inner](p, sx[:h], sy[:h], qx[:h], qy[:h], lr, steps, fo)
        l1, dkb, mkb = self.conn.recv()
        self.worker_peak_delta_kb = max(self.worker_peak_delta_kb, dkb)
        self.worker_maxrss_kb = mkb
        for k, v in p.items():
            g = v.grad * (h / T) + self.shared['grads'][k]
            v.grad = g if mine[k] is None else mine[k] + g
        return (l0 * h + l1 * (T - h)) / T

    def close(self):
        self.conn.send(None)
        self.proc.join()


STRATS = {
    'loop': strat_loop,                                  # baseline
    'loop_cl': strat_loop_fwdopt_variant(channels_last=True, im2col=False, pool_first=False),   # (a)
    'loop_pf': strat_loop_fwdopt_variant(channels_last=False, im2col=False, pool_first=True),
    'loop_cl_pf': strat_loop_fwdopt_variant(channels_last=True, im2col=False, pool_first=True),
    'opt': strat_opt,                                    # cl + pool-first + im2col conv0 (+FO no-graph)
    'opt_bnmanual': lambda *a: strat_loop(*a, fwd=fwd_bnmanual),                                # (b)
    'func_grad': strat_func_grad,                        # (c)
    'vmap_c4': make_strat_vmap(4),                       # (d)
    'vmap_all': make_strat_vmap(10 ** 9),                # (d) plain vmap over all tasks
    'fold0': strat_fold0,                                # (d)
    'compile_q': strat_compile_query,                    # (f)
    'compile_full': strat_compile_full_so,               # (f)
}
# special (built in the child): 'loop_t1' (baseline, 1 thread), 'opt_t1', 'opt_nomkldnn' (g),
# '2proc' (e, 'opt' in 2 processes x 1 thread), '2proc_loop'.


def _rss_kb():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') // 1024


# ----------------------------------------------------------------------------- child measurement
def child(args):
    wl = dict(WORKLOADS[args.wl])
    fo = args.order == 'fo'
    name = args.cand
    threads = 1 if name.endswith('_t1') else args.threads
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Conv4(wl['n'])
    if name == 'loop64':                 # float64 reference for the numerics check (same init)
        model.double()
    p = dict(model.named_parameters())
    data = make_data(wl)
    if name == 'loop64':
        data = tuple(d.double() if d.is_floating_point() else d for d in data)
    opt = torch.optim.SGD(p.values(), lr=1e-3)
    if name.startswith('2proc'):
        fn = TwoProc(p, data, wl, fo, inner='opt' if name == '2proc' else 'loop')
    else:
        base = {'loop_t1': 'loop', 'loop64': 'loop', 'opt_t1': 'opt', 'opt_nomkldnn': 'opt'}.get(name, name)
        fn = STRATS[base]
        if name == 'opt_nomkldnn':
            torch.backends.mkldnn.enabled = False
    # snapshot params so that every candidate computes the gradient at the same point
    p0 = {k: v.detach().clone() for k, v in p.items()}
    rss0 = _rss_kb()
    times, cpus = [], []
    gsave = None
    t_first = None
    for it in range(1 + args.steps):
        for v in p.values():
            v.grad = None
        t, c = time.perf_counter(), time.process_time()
        loss = fn(p, *data, wl['lr'], wl['steps'], fo)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        if it == 0:
            t_first = dt
            gsave = {k: v.grad.detach().clone() for k, v in p.items()}
            loss0 = loss
        else:
            times.append(dt)
            cpus.append(dc)
        opt.step()
        with torch.no_grad():          # reset to the same point: timing is of identical work
            for k, v in p.items():
                v.copy_(p0[k])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    extra = {}
    if name.startswith('2proc'):
        peak += fn.worker_peak_delta_kb
        extra['worker_maxrss_mb'] = fn.worker_maxrss_kb / 1024
        fn.close()
    torch.save(gsave, args.gradfile)
    print('RESULT ' + json.dumps(dict(time=statistics.median(times), times=times,
                                      cpu=statistics.median(cpus), first=t_first, peak_mb=peak / 1024,
                                      loss=loss0, threads=threads, **extra)))


def grad_err(g, ref):
    g = {k: v.double() for k, v in g.items()}; ref = {k: v.double() for k, v in ref.items()}
    num = max((g[k] - ref[k]).abs().max().item() for k in ref)
    den = max(r.abs().max().item() for r in ref.values())
    rel_l2 = max(((g[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref if ref[k].norm() > 1e-6 * den)
    return num / den, rel_l2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--reps', type=int, default=None)
    ap.add_argument('--steps', type=int, default=None)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--only', default='W2,W3')
    ap.add_argument('--order', default='so,fo')
    ap.add_argument('--cands', default=None)
    ap.add_argument('--child', action='store_true')
    ap.add_argument('--wl'); ap.add_argument('--cand'); ap.add_argument('--gradfile')
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.cands:
        cands = args.cands.split(',')
    elif args.quick:
        cands = ['loop', 'opt', '2proc', 'fold0']
    else:
        cands = ['loop', 'loop_t1', 'loop_cl_pf', 'opt', 'opt_t1', 'fold0', '2proc', 'func_grad', 'vmap_c4',
                 'compile_q']
    reps = args.reps or (1 if args.quick else 2)
    steps = args.steps or (1 if args.quick else 2)
    tmp = tempfile.mkdtemp()
    configs = [(w, o) for w in args.only.split(',') for o in args.order.split(',')]
    print(f'torch {torch.__version__}, threads {args.threads}, reps {reps}, timed steps/rep {steps}, '
          f'cpus {os.cpu_count()}')
    # machine reference: big matmul GFLOP/s
    torch.set_num_threads(args.threads)
    a = torch.randn(2048, 2048); b = torch.randn(2048, 2048); a @ b
    ts = []
    for _ in range(5):
        t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)
    print(f'big mm (2048^3, {args.threads} threads): {2 * 2048 ** 3 / statistics.median(ts) / 1e9:.0f} GFLOP/s')
    for (w, o) in configs:
        res = {c: [] for c in cands}
        for r in range(reps):
            for c in cands:
                gf = os.path.join(tmp, f'{w}_{o}_{c}.pt')
                cmd = [sys.executable, __file__, '--child', '--wl', w, '--order', o, '--cand', c,
                       '--gradfile', gf, '--steps', str(steps), '--threads', str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                line = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
                if not line:
                    print(f'  {w} {o} {c}: FAILED: {out.stderr.strip().splitlines()[-1:] }')
                    res[c].append(None)
                    continue
                res[c].append(json.loads(line[0][7:]))
        ref = torch.load(os.path.join(tmp, f'{w}_{o}_loop.pt')) if 'loop' in cands else None
        ref64 = torch.load(os.path.join(tmp, f'{w}_{o}_loop64.pt')) if 'loop64' in cands else None
        ok = [x for x in res.get('loop', []) if x]
        bt = statistics.median([x['time'] for x in ok]) if ok else None
        bc = statistics.median([x['cpu'] for x in ok]) if ok else None
        bm = statistics.median([x['peak_mb'] for x in ok]) if ok else None
        print(f'\n== {w} {"first" if o == "fo" else "second"}-order  ({WORKLOADS[w]})')
        print(f'{"candidate":14s} {"steps/s":>8s} {"speedup":>8s} {"cpu s/step":>10s} {"cpu ratio":>9s} '
              f'{"peakMB":>8s} {"mem ratio":>9s} {"1st step s":>10s} {"max|d|/max|ref|":>15s} {"rel L2":>9s} {"vs f64":>8s}')
        for c in cands:
            ok_c = [x for x in res[c] if x]
            if not ok_c:
                print(f'{c:14s} FAILED'); continue
            t = statistics.median([x['time'] for x in ok_c])
            cp = statistics.median([x['cpu'] for x in ok_c])
            m = statistics.median([x['peak_mb'] for x in ok_c])
            fst = statistics.median([x['first'] for x in ok_c])
            e1 = e2 = float('nan')
            if ref is not None:
                e1, e2 = grad_err(torch.load(os.path.join(tmp, f'{w}_{o}_{c}.pt')), ref)
            e3 = grad_err(torch.load(os.path.join(tmp, f'{w}_{o}_{c}.pt')), ref64)[0] if ref64 else float('nan')
            print(f'{c:14s} {1 / t:8.3f} {bt / t if bt else float("nan"):8.2f} {cp:10.2f} '
                  f'{bc / cp if bc else float("nan"):9.2f} {m:8.0f} {m / bm if bm else float("nan"):9.2f} '
                  f'{fst:10.2f} {e1:15.1e} {e2:9.1e} {e3:8.1e}' + (f'  (worker RSS {ok_c[0]["worker_maxrss_mb"]:.0f} MB)'
                                                          if 'worker_maxrss_mb' in ok_c[0] else ''))
        sys.stdout.flush()


if __name__ == '__main__':
    main()
