import torch, time, torch.nn.functional as F, sys, itertools
from common_probe import *
def bn_manual(x, w, b, eps=1e-5):
    m = x.mean((0, 2, 3), keepdim=True)
    v = (x - m).pow(2).mean((0, 2, 3), keepdim=True)
    return (x - m) * torch.rsqrt(v + eps) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
def bn_manual2(x, w, b, eps=1e-5):
    v, m = torch.var_mean(x, (0, 2, 3), unbiased=False, keepdim=True)
    scale = w.view(1, -1, 1, 1) * torch.rsqrt(v + eps)
    return x * scale + (b.view(1, -1, 1, 1) - m * scale)
def pool_amax(x):
    N, C, H, W_ = x.shape; H2, W2 = H // 2, W_ // 2
    if H % 2: x = x[:, :, :2*H2, :2*W2]
    return x.reshape(N, C, H2, 2, W2, 2).amax((3, 5))
def make_fwd(cl=False, pool_first=False, bn='F', pool='mp'):
    def f(p, x):
        if cl: x = x.contiguous(memory_format=torch.channels_last)
        for i in range(4):
            wt = p[f'conv{i}.weight']
            if cl: wt = wt.contiguous(memory_format=torch.channels_last)
            x = F.conv2d(x, wt, p[f'conv{i}.bias'], padding=1)
            if bn == 'F': x = F.batch_norm(x, None, None, p[f'bn{i}.weight'], p[f'bn{i}.bias'], training=True)
            elif bn == 'm': x = bn_manual(x, p[f'bn{i}.weight'], p[f'bn{i}.bias'])
            else: x = bn_manual2(x, p[f'bn{i}.weight'], p[f'bn{i}.bias'])
            P = (lambda z: F.max_pool2d(z, 2)) if pool == 'mp' else pool_amax
            x = F.relu(P(x)) if pool_first else P(F.relu(x))
        return F.linear(x.flatten(1), p['head.weight'], p['head.bias'])
    return f
def loop(fwdf, p, sx, sy, qx, qy, lr, steps, fo=False):
    T = sx.shape[0]; tot = 0.
    for t in range(T):
        fast = dict(p)
        for s in range(steps):
            loss = F.cross_entropy(fwdf(fast, sx[t]), sy[t])
            g = torch.autograd.grad(loss, list(fast.values()), create_graph=not fo)
            fast = {k: v - lr * gi for (k, v), gi in zip(fast.items(), g)}
        ql = F.cross_entropy(fwdf(fast, qx[t]), qy[t])
        (ql / T).backward(); tot += ql.item()
    return tot / T
if __name__ == '__main__':
    wn = sys.argv[1]; fo = 'fo' in sys.argv; T = int(sys.argv[2]) if len(sys.argv)>2 and sys.argv[2].isdigit() else None
    torch.set_num_threads(int(dict(a.split('=') for a in sys.argv if '=' in a).get('thr', 2)))
    w = dict(W[wn]); 
    if T: w['T'] = T
    p = init_params(w['n']); d = data(w)
    cands = {'ref': make_fwd(), 'pf': make_fwd(pool_first=True), 'cl': make_fwd(cl=True), 'cl_pf': make_fwd(cl=True, pool_first=True),
             'pf_bnm': make_fwd(pool_first=True, bn='m'), 'pf_bnm2': make_fwd(pool_first=True, bn='m2'),
             'pf_amax': make_fwd(pool_first=True, pool='amax'), 'cl_pf_amax': make_fwd(cl=True, pool_first=True, pool='amax'),
             'cl_pf_bnm2': make_fwd(cl=True, pool_first=True, bn='m2')}
    grads = {}
    for k, f in cands.items():
        for v in p.values(): v.grad = None
        loop(f, p, *d, w['lr'], w['steps'], fo); grads[k] = {n: v.grad.clone() for n, v in p.items()}
        err = max(((grads[k][n] - grads['ref'][n]).abs().max() / grads['ref'][n].abs().max()).item() for n in p)
        print(k, 'relerr', err)
    times = {k: [] for k in cands}
    for r in range(3):
        for k, f in cands.items():
            t = time.perf_counter(); loop(f, p, *d, w['lr'], w['steps'], fo); times[k].append(time.perf_counter() - t)
    import statistics
    b = statistics.median(times['ref'])
    for k in cands:
        m = statistics.median(times[k]); print(f'{k:12s} {m:.3f}s  speedup {b/m:.2f}')
