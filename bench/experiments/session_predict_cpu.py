"""A lone MAML session predict on the CPU, in process: how much an idle core costs, and two ideas that did not pay.

    python bench/experiments/session_predict_cpu.py

Runs the engine's computation of one session predict (``Engine._compute``:
stacking, the replayed trace of the fast kernel's prediction, results to
Python) for a Conv4-64 5-way model, 5 query images, medians of 300 calls:

- **hot**: calls back to back;
- **after 1 ms asleep**: as a server's worker between a lone client's requests;
- **asleep, 8 MB touched**: and the event loop's work meanwhile evicting caches;

each with one and with two torch threads. It then times the first block's
window columns (5 images) as ``F.unfold`` does them (``metalearn.first_block``)
against one strided copy of the padded input, the alternative tried.

In the server, lone session predicts compute in 1.1-1.3 ms
(``bench/experiments/latency_split.py``); the idle-core rows show where most of
the difference from the hot in-process time goes.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from engine_graphs import demo_registry, jobs_for  # noqa: E402

import metalearn  # noqa: E402
from metalearn.first_block import conv_output_size, window_columns  # noqa: E402
from service.engine import Engine  # noqa: E402


def median_us(fn, calls: int = 300, sleep_s: float = 0.0, touch: torch.Tensor | None = None) -> float:
    times = []
    for _ in range(calls):
        if sleep_s:
            time.sleep(sleep_s)
        if touch is not None:
            touch.add_(1)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def strided_columns(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """``window_columns(x, conv).cols`` for ``x`` [R, N, C, H, W] as one strided copy of the padded input."""
    R, N, C, H, W = x.shape
    (kh, kw), (ph, pw), (dh, dw) = conv.kernel_size, conv.padding, conv.dilation
    padded = F.pad(x.reshape(R * N, C, H, W), (pw, pw, ph, ph))
    out_h, out_w = conv_output_size(conv, H, W)
    P, Q = out_h // 2, out_w // 2
    sB, sC, sH, sW = padded.stride()
    # [R, N, window row, window column, pooled row, pooled column, C, kh, kw]
    view = padded.as_strided((R, N, 2, 2, P, Q, C, kh, kw), (N * sB, sB, sH, sW, 2 * sH, 2 * sW, sC, dh * sH, dw * sW))
    return view.permute(0, 2, 3, 1, 4, 5, 6, 7, 8).reshape(R, 4, N * P * Q, C * kh * kw)


def main() -> None:
    metalearn.keep_freed_memory()  # as the service does
    model = demo_registry(["maml"], "cpu").get("maml")
    engine = Engine(threads=1, cpu_traces=24, cpu_scripts=0)
    with torch.no_grad():
        session = engine._compute(jobs_for(model, 1, "adapt", seed=1))[0]["tensors"]
        jobs = jobs_for(model, 1, "session", seed=2, sessions=[session])

        def predict():
            with torch.no_grad():
                engine._compute(jobs)

        for _ in range(5):  # eager use, trace, first replays
            predict()
        assert engine.trace_stats()["replays"] > 0, "the prediction was not replayed from a trace"
        touch = torch.zeros(8 << 20, dtype=torch.uint8)
        print("# one MAML session predict (Conv4-64, 5 queries), engine computation, median of 300 calls")
        for rep in range(2):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                row = {
                    "hot": median_us(predict),
                    "after 1 ms asleep": median_us(predict, sleep_s=0.001),
                    "asleep, 8 MB touched": median_us(predict, sleep_s=0.001, touch=touch),
                }
                print(f"{threads} thread(s): " + "  ".join(f"{name} {us / 1000:.3f} ms" for name, us in row.items()))
        torch.set_num_threads(1)

        conv = model.learner.model.body[0]
        x = torch.rand(1, 5, 1, 28, 28)
        assert torch.equal(strided_columns(x, conv), window_columns(x, conv).cols)
        print(f"# first block's window columns, 5 images: F.unfold {median_us(lambda: window_columns(x, conv)):.0f} us, "
              f"one strided copy {median_us(lambda: strided_columns(x, conv)):.0f} us")


if __name__ == "__main__":
    main()
