"""A MAML session predict's per-session constants: made in every prediction, made once (the service), or BatchNorm folded into the weights.

    python bench/experiments/folded_batchnorm.py

With statistics kept in the session, a block's conv bias and BatchNorm are
one per-channel map ``scale * conv(x, W) + shift`` with
``scale = gamma / sqrt(var + eps)``. ``FastFull.prepare`` computes these
constants (a few KB; the first block's weight carries sign(scale)) and
``FastFull.predict_prepared`` computes with them. Traced as the engine's CPU
traces are (``service/cpu_traces.py``, sizes fixed), for 5 queries on one
thread, this times:

- **per prediction**: ``FastFull.predict``, the constants made inside every
  prediction (what a session predict computed before sessions kept them);
- **per session**: ``predict_prepared`` on constants made once (the service:
  ``Session.prepared``);
- **folded**: the scale folded into each conv's weight and the shift into its
  bias, so a block is conv -> pool -> ReLU; made once per session, it is a
  second copy of every conv weight.

and the making itself, once per session, with what each keeps per session.
"""

from __future__ import annotations

import statistics
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.jit._trace import _get_trace_graph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from engine_graphs import demo_registry, jobs_for, median_us  # noqa: E402

import metalearn  # noqa: E402
from metalearn.first_block import pooled_product, window_columns  # noqa: E402
from service.cpu_traces import fixed_shapes  # noqa: E402
from service.engine import Engine, adaptation_from_tensors  # noqa: E402
from service.fastpath import _grouped_layout  # noqa: E402



UNITS = []  # the traces' compilation units, alive as long as their functions run


def traced(fn, inputs: tuple):
    """``fn`` traced into a compilation unit of its own with its sizes fixed, as service.cpu_traces does, warmed up."""
    with warnings.catch_warnings():  # shapes read while tracing become constants, as in the service
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        graph, _ = _get_trace_graph(fn, inputs)
    UNITS.append(torch._C.CompilationUnit())
    function = UNITS[-1].create_function("compute", fixed_shapes(graph))
    for _ in range(3):
        function(*inputs)
    return function


def main() -> None:
    metalearn.keep_freed_memory()
    torch.set_num_threads(1)
    model = demo_registry(["maml"], "cpu").get("maml")
    engine = Engine(threads=1, cpu_traces=0, cpu_scripts=0)
    with torch.no_grad():
        session = engine._compute(jobs_for(model, 1, "adapt", seed=1))[0]["tensors"]
    fast = engine._fast(model)
    adaptation = adaptation_from_tensors({n: t.unsqueeze(0) for n, t in session.items()})  # one request: R = 1
    query_x = jobs_for(model, 1, "session", seed=2, sessions=[session])[0].query_x.unsqueeze(0)

    def fold(adaptation) -> list[torch.Tensor]:
        """FastFull.prepare's per-block ``scale * conv(x, W) + shift`` with the scale folded into W (for the
        first block too: its weight's sign(scale) times |scale| is scale)."""
        prepared = fast.prepare(adaptation)
        folded = []
        for _, conv_name, _, bn_name in fast.blocks:
            scale = prepared[bn_name + ".scale"]
            folded += [prepared[conv_name + ".weight"] * scale[:, :, None, None, None], prepared[bn_name + ".shift"]]
        return folded + [prepared["head.weight"], prepared["head.bias"]]

    def folded_predict(query_x, *folded):
        R, N = query_x.shape[:2]
        columns = window_columns(query_x, fast.blocks[0][0])
        pooled = pooled_product(folded[0].flatten(-3), columns, True)  # [R, M, C]
        h = torch.relu(pooled + folded[1].unsqueeze(1)).unflatten(-2, (columns.images, columns.pooled_h, columns.pooled_w))
        h = _grouped_layout(h)
        for k, (conv, *_) in enumerate(fast.blocks[1:], start=1):
            weight, bias = folded[2 * k], folded[2 * k + 1]
            h = F.conv2d(h, weight.flatten(0, 1), bias.reshape(-1), conv.stride, conv.padding, conv.dilation, R)
            h = torch.relu(F.max_pool2d(h, 2))
        features = h.contiguous().view(N, R, -1).transpose(0, 1)
        return torch.baddbmm(folded[-1].unsqueeze(1), features, folded[-2].transpose(1, 2))

    with torch.no_grad():
        prepared, folded = fast.prepare(adaptation), fold(adaptation)
        names = sorted(prepared)

        def per_prediction(query_x, *session):  # the session's tensors -> constants -> logits, every time
            return fast.predict(adaptation_from_tensors(dict(zip(session_names, session))), query_x)

        def per_session(query_x, *constants):
            return fast.predict_prepared(dict(zip(names, constants)), query_x)

        session_names = sorted(session)
        session_inputs = [session[n].unsqueeze(0) for n in session_names]
        constants = [prepared[n] for n in names]
        reference = per_prediction(query_x, *session_inputs)
        for candidate in (per_session(query_x, *constants), folded_predict(query_x, *folded)):
            torch.testing.assert_close(candidate, reference, rtol=1e-5, atol=1e-5)
        candidates = {
            "per prediction": (traced(per_prediction, (query_x, *session_inputs)), session_inputs),
            "per session": (traced(per_session, (query_x, *constants)), constants),
            "folded": (traced(folded_predict, (query_x, *folded)), folded),
        }
        shared = {t.data_ptr() for t in session.values()}
        kept = {  # bytes a session keeps beyond its own tensors
            "per session": sum(t.numel() * t.element_size() for t in prepared.values() if t.data_ptr() not in shared),
            "folded": sum(t.numel() * t.element_size() for t in folded if t.data_ptr() not in shared),
        }
        print(f"# MAML Conv4-64 session predict, 5 queries, one thread; the session itself {sum(t.numel() * t.element_size() for t in session.values()) // 1024} KB")
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(5):  # interleaved
            for name, (function, inputs) in candidates.items():
                times[name].append(median_us(lambda: function(query_x, *inputs), calls=200))
        making = {"per session": median_us(lambda: fast.prepare(adaptation)), "folded": median_us(lambda: fold(adaptation))}
        for name, (function, _) in candidates.items():
            line = f"{name:15s} {statistics.median(times[name]):5.0f} us  ({len(list(function.graph.nodes()))} trace nodes)"
            if name in making:
                line += f"; made once per session in {making[name]:.0f} us, keeping {kept[name] / 1024:.1f} KB more"
            print(line)


if __name__ == "__main__":
    main()
