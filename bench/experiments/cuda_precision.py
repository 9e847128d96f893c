"""CUDA vs CPU numerics of test-time adaptation (Conv4-16, 5-way, lr 0.4): which backend setting explains a difference.

    python bench/experiments/cuda_precision.py          # on a GPU machine

Prints the largest difference of the adapted parameters and the query outputs
between the CPU (fused first block, or the plain modules) and the GPU, in
float32 and float64, with cuDNN's defaults, deterministic, disabled, and with
torch's fp32_precision set to "ieee". Run 2026-11-27 on an H100 (torch 2.11):
float32 with cuDNN on differed by 1.7e-3 after 5 steps (2e-7 after 1),
whatever the TF32/deterministic/ieee settings; with cuDNN off 5.5e-7; float64
1e-15. tests/test_cuda.py compares float32 with cuDNN off and float64 with it on.
"""
import copy
import torch
import metalearn.models as models
from metalearn import Conv4, MetaConfig, MetaLearner, adapt, predict

torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
real_fuses = models.fuses

def run(dtype, steps, fused, algorithm="maml", seed=0):
    models.fuses = real_fuses if fused else (lambda *a, **k: False)
    torch.manual_seed(0)
    cpu = MetaLearner(Conv4(1, 5, channels=16, image_size=28), MetaConfig(algorithm, inner_steps=steps, inner_lr=0.4)).to(dtype)
    gpu = copy.deepcopy(cpu).cuda()
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(5, 1, 28, 28, generator=g).to(dtype)
    qx = torch.randn(15, 1, 28, 28, generator=g).to(dtype)
    sy = torch.arange(5)
    a = adapt(cpu, sx, sy, steps=steps)
    models.fuses = lambda *a, **k: False
    b = adapt(gpu, sx.cuda(), sy.cuda(), steps=steps)
    dp = max((a.params[n] - b.params[n].cpu()).abs().max().item() for n in a.params)
    models.fuses = real_fuses if fused else (lambda *a, **k: False)
    pa = predict(cpu, a, qx)
    models.fuses = lambda *a, **k: False
    pb = predict(gpu, b, qx.cuda())
    pa = pa if torch.is_tensor(pa) else pa[0]
    pb = pb if torch.is_tensor(pb) else pb[0]
    dq = (pa - pb.cpu()).abs().max().item()
    print(f"{str(dtype):14s} steps={steps} cpu_path={'fused' if fused else 'plain'} {algorithm:6s} seed={seed}: max|param diff|={dp:.2e} max|output diff|={dq:.2e}", flush=True)


def show_flags(tag):
    b = torch.backends
    extra = {k: getattr(b, k).fp32_precision for k in ("cudnn",) if hasattr(getattr(b, k), "fp32_precision")}
    if hasattr(b, "fp32_precision"):
        extra["global"] = b.fp32_precision
    if hasattr(b.cuda.matmul, "fp32_precision"):
        extra["matmul"] = b.cuda.matmul.fp32_precision
    print(tag, "cudnn.allow_tf32", b.cudnn.allow_tf32, "matmul.allow_tf32", b.cuda.matmul.allow_tf32, "enabled", b.cudnn.enabled, "det", b.cudnn.deterministic, extra, flush=True)

def guarded(*a, **k):
    try:
        run(*a, **k)
    except Exception as e:
        print("ERROR", a, k, repr(e)[:300], flush=True)

show_flags("default-off")
for steps in (1, 5):
    guarded(torch.float32, steps, True)
guarded(torch.float32, 5, False)
guarded(torch.float32, 5, True, algorithm="anil")
guarded(torch.float64, 5, True)
guarded(torch.float64, 5, False)
torch.backends.cudnn.deterministic = True
show_flags("deterministic")
guarded(torch.float32, 5, True)
torch.backends.cudnn.deterministic = False
torch.backends.cudnn.enabled = False
show_flags("cudnn-disabled")
guarded(torch.float32, 5, True)
torch.backends.cudnn.enabled = True
if hasattr(torch.backends, "fp32_precision"):
    torch.backends.fp32_precision = "ieee"
    show_flags("ieee")
    guarded(torch.float32, 5, True)
