"""One MAML request (Conv4-64, 10 steps, 5-way 1-shot, 5 queries) in process: the textbook loop vs metalearn.

    python bench/experiments/request_profile.py cuda    # or: cpu [threads]

Medians of 15 interleaved calls of: the textbook per-task loop (the service
bench's baseline), ``adapt`` + ``predict``, the service's fast kernel and
``adapt_many`` with one request (and with 64 stacked, on cuda); on cuda also a torch.profiler table of one call of the first
two (CPU vs GPU time: a request on a GPU is launch-bound).
"""
import statistics, sys, time
import torch
import torch.nn.functional as F
from torch.func import functional_call
from metalearn import Conv4, MetaConfig, MetaLearner, adapt, adapt_many, predict, predict_many

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
torch.manual_seed(0)
learner = MetaLearner(Conv4(out_features=5, channels=64), MetaConfig("maml", inner_steps=10, inner_lr=0.4)).to(dev)
sx, sy, qx = torch.randn(5, 1, 28, 28, device=dev), torch.arange(5, device=dev), torch.randn(5, 1, 28, 28, device=dev)

def textbook():
    params = {n: p.detach() for n, p in learner.model.named_parameters()}
    fast = {n: params[n].clone().requires_grad_() for n in learner.adapt_names}
    for _ in range(10):
        loss = F.cross_entropy(functional_call(learner.model, {**params, **fast}, (sx,)), sy)
        grads = torch.autograd.grad(loss, list(fast.values()))
        fast = {n: (p - 0.4 * g).detach().requires_grad_() for (n, p), g in zip(fast.items(), grads)}
    with torch.no_grad():
        return torch.softmax(functional_call(learner.model, {**params, **fast}, (qx,)), -1).tolist()

def ours():
    a = adapt(learner, sx, sy, steps=10, lr=0.4)
    return predict(learner, a, qx).tolist()

def many(r):
    def f():
        a = adapt_many(learner, sx.expand(r, -1, -1, -1, -1), sy.expand(r, -1), steps=10, lr=0.4)
        return predict_many(learner, a, qx.expand(r, -1, -1, -1, -1)).tolist()
    return f

from service.fastpath import fast_kernel

kernel = fast_kernel(learner)


def fast(r):
    def f():
        a = kernel.adapt(sx.expand(r, -1, -1, -1, -1), sy.expand(r, -1), 10, 0.4)
        return kernel.predict(a, qx.expand(r, -1, -1, -1, -1), transductive=False).tolist()
    return f


threads = int(sys.argv[2]) if len(sys.argv) > 2 else torch.get_num_threads()
torch.set_num_threads(threads)
print(f"{dev}, {threads} torch threads, fast kernel: {type(kernel).__name__}")
cands = {"textbook": textbook, "adapt": ours, "fastpath R=1": fast(1), "adapt_many R=1": many(1), "adapt_many R=64": many(64), "fastpath R=64": fast(64)}
if dev == "cpu":  # 64 stacked requests take seconds on a CPU
    for k in ("adapt_many R=64", "fastpath R=64"):
        cands.pop(k)
for f in cands.values():
    f(); f()
times = {k: [] for k in cands}
for _ in range(15):
    for k, f in cands.items():
        sync(); t = time.perf_counter(); f(); sync(); times[k].append((time.perf_counter() - t) * 1e3)
for k, v in times.items():
    print(f"{k:16s} median {statistics.median(v):7.2f} ms per call")
if dev == "cuda":
    from torch.profiler import profile, ProfilerActivity
    for k in ("textbook", "adapt"):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            cands[k]()
        print(k); print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14))
