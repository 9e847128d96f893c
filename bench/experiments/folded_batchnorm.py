"""A MAML session predict with each block's BatchNorm folded into its conv, against the fast kernel's prediction.

    python bench/experiments/folded_batchnorm.py

With statistics kept in the session, a block's BatchNorm is a per-channel
affine map ``s * (y - mean) + beta`` with ``s = gamma / sqrt(var + eps)``, so
``conv -> BatchNorm`` is one conv with weight ``s * W`` and bias
``s * (b - mean) + beta``; the 2x2 max-pool and the ReLU follow as before
(the fused first block included: its pooled product takes the folded weight
directly). This script folds one session's tensors, traces both predictions
of 5 queries as the engine's CPU traces do (``service/cpu_traces.py``), checks
they agree, and times them on one thread, with the folding itself (once per
session).

Not in the service: a session would need its folded tensors kept beside the
adapted ones (a second copy of every conv weight, which the session store's
byte budget would have to count) or refolded per request, for a prediction
about 10% faster in process.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.jit._trace import _get_trace_graph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from engine_graphs import demo_registry, jobs_for  # noqa: E402

import metalearn  # noqa: E402
from metalearn.first_block import _pooled_max, window_columns  # noqa: E402
from service.engine import Engine, adaptation_from_tensors  # noqa: E402
from service.fastpath import _grouped_layout, _inputs  # noqa: E402


def median_us(fn, calls: int = 400) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def traced(fn, inputs: tuple):
    """``fn`` traced into a compilation unit of its own, as service.cpu_traces does, warmed up."""
    with warnings.catch_warnings():  # shapes read while tracing become constants, as in the service
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        graph, _ = _get_trace_graph(fn, inputs)
    unit = torch._C.CompilationUnit()
    function = unit.create_function("compute", graph)
    for _ in range(3):
        function(*inputs)
    return function, unit


def main() -> None:
    metalearn.keep_freed_memory()
    torch.set_num_threads(1)
    model = demo_registry(["maml"], "cpu").get("maml")
    engine = Engine(threads=1, cpu_traces=0, cpu_scripts=0)
    with torch.no_grad():
        session = engine._compute(jobs_for(model, 1, "adapt", seed=1))[0]["tensors"]
    fast = engine._fast(model)
    adaptation = adaptation_from_tensors({n: t.unsqueeze(0) for n, t in session.items()})  # one request: R = 1
    params = {**{n: p.unsqueeze(0) for n, p in fast.params.items()}, **adaptation.params}
    query_x = jobs_for(model, 1, "session", seed=2, sessions=[session])[0].query_x.unsqueeze(0)
    param_names, stat_names = list(params), list(adaptation.norm_stats)

    def fold(params: dict, stats: dict) -> list[torch.Tensor]:
        folded = []
        for _, conv_name, bn, bn_name in fast.blocks:
            mean, var = (t.reshape(t.shape[0], -1) for t in stats[bn_name])
            scale = params[bn_name + ".weight"] * torch.rsqrt(var + bn.eps)  # [R, C]
            bias = params.get(conv_name + ".bias", torch.zeros_like(mean))
            folded += [params[conv_name + ".weight"] * scale[:, :, None, None, None], (bias - mean) * scale + params[bn_name + ".bias"]]
        return folded + [params["head.weight"], params["head.bias"]]

    def folded_predict(query_x, *folded):
        R, N = query_x.shape[:2]
        columns = window_columns(query_x, fast.blocks[0][0])
        pooled = _pooled_max(folded[0].flatten(-3), columns.cols, True)  # [R, M, C]
        h = torch.relu(pooled + folded[1].unsqueeze(1)).unflatten(-2, (columns.images, columns.pooled_h, columns.pooled_w))
        h = _grouped_layout(h)
        for k, (conv, *_) in enumerate(fast.blocks[1:], start=1):
            weight, bias = folded[2 * k], folded[2 * k + 1]
            h = F.conv2d(h, weight.flatten(0, 1), bias.reshape(-1), conv.stride, conv.padding, conv.dilation, R)
            h = torch.relu(F.max_pool2d(h, 2))
        features = h.contiguous().view(N, R, -1).transpose(0, 1)
        return torch.baddbmm(folded[-1].unsqueeze(1), features, folded[-2].transpose(1, 2))

    def kernel_predict(query_x, *tensors):  # what the engine traces for a session predict: FastFull's forward
        P = dict(zip(param_names, tensors[: len(param_names)]))
        rest = tensors[len(param_names) :]
        stats = {name: (rest[2 * i], rest[2 * i + 1]) for i, name in enumerate(stat_names)}
        return fast.forward(P, _inputs(fast.blocks, query_x), stats=stats)[0]

    tensors = [params[n] for n in param_names] + [t for name in stat_names for t in adaptation.norm_stats[name]]
    with torch.no_grad():
        folded = fold(params, adaptation.norm_stats)
        reference, candidate = kernel_predict(query_x, *tensors), folded_predict(query_x, *folded)
        torch.testing.assert_close(candidate, reference, rtol=1e-5, atol=1e-5)
        (kernel, _ku), (folding, _fu) = traced(kernel_predict, (query_x, *tensors)), traced(folded_predict, (query_x, *folded))
        print(f"# MAML Conv4-64 session predict, 5 queries, one thread; largest logit difference {(candidate - reference).abs().max():.1e}")
        print(f"# trace nodes: fast kernel {len(list(kernel.graph.nodes()))}, folded {len(list(folding.graph.nodes()))}")
        for _ in range(3):  # interleaved
            now = median_us(lambda: kernel(query_x, *tensors))
            then = median_us(lambda: folding(query_x, *folded))
            once = median_us(lambda: fold(params, adaptation.norm_stats))
            print(f"fast kernel {now:.0f} us  folded {then:.0f} us ({now / then:.2f}x)  folding, once per session {once:.0f} us")


if __name__ == "__main__":
    main()
