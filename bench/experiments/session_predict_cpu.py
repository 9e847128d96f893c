"""A lone MAML session predict on the CPU, in process: how much an idle core costs, and ideas that did not pay.

    python bench/experiments/session_predict_cpu.py

Runs the engine's computation of one session predict (``Engine._compute``:
stacking, the replayed trace of the fast kernel's prediction, results to
Python) for a Conv4-64 5-way model, 5 query images, medians of 300 calls:

- **hot**: calls back to back;
- **after 1 ms asleep**: as a server's worker between a lone client's requests;
- **asleep, 8 MB touched**: and the event loop's work meanwhile evicting caches;

each with one and with two torch threads. It then times the first block's
window columns (1 and 16 requests of 5 images) as ``F.unfold`` does them
(``metalearn.first_block``) against two alternatives tried: one strided copy of
the padded input, and a convolution with one-hot kernels.

Then three ideas measured and not kept: spreading a lone request's 5 queries
over two idle worker threads (3 + 2 images, handed to sleeping threads and
gathered as the engine's workers would be: each query's prediction is
independent of the others'), after the engine's computation for 5, 3 and 2
images; blocks 3 and 4's convolutions computing only the outputs their
flooring 2x2 max-pool keeps (the input padded on the top and left only); and
block 4's convolution (3x3 outputs, pooled to 1x1) as one matrix product of
the four positions the pool keeps.

In the server, lone session predicts compute in 1.1-1.3 ms
(``bench/experiments/latency_split.py``); the idle-core rows show where most of
the difference from the hot in-process time goes.
"""

from __future__ import annotations

import statistics
import sys
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from engine_graphs import demo_registry, jobs_for, median_us  # noqa: E402

import metalearn  # noqa: E402
from metalearn.first_block import conv_output_size, window_columns  # noqa: E402
from service.engine import Engine  # noqa: E402



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


def one_hot_conv_columns(x: torch.Tensor) -> torch.Tensor:
    """``window_columns(x, conv).cols`` for a 3x3, padding-1 conv of one input channel, ``x`` [R, N, 1, H, W]:
    a convolution with the 9 one-hot 3x3 kernels (exact: each output is one input times 1), then grouped."""
    R, N, _, H, W = x.shape
    columns = F.conv2d(x.reshape(R * N, 1, H, W), torch.eye(9).view(9, 1, 3, 3), padding=1)  # [R*N, 9, H, W]
    grouped = columns.view(R, N, 9, H // 2, 2, W // 2, 2).permute(0, 4, 6, 1, 3, 5, 2)
    return grouped.reshape(R, 4, N * (H // 2) * (W // 2), 9)


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
        for requests in (1, 16):
            x = torch.rand(requests, 5, 1, 28, 28)
            assert torch.equal(strided_columns(x, conv), window_columns(x, conv).cols)
            assert torch.equal(one_hot_conv_columns(x), window_columns(x, conv).cols)
            print(f"# first block's window columns, {requests} x 5 images: F.unfold {median_us(lambda: window_columns(x, conv)):.0f} us, "
                  f"one strided copy {median_us(lambda: strided_columns(x, conv)):.0f} us, "
                  f"a convolution with one-hot kernels {median_us(lambda: one_hot_conv_columns(x)):.0f} us")
        split_over_two_threads(model, session)
        pooled_outputs_only()


class SleepingWorker(threading.Thread):
    """Computes the jobs it is handed, asleep on a condition in between (as the engine's workers wait)."""

    def __init__(self, engine: Engine):
        super().__init__(daemon=True)
        self.engine, self.ready, self.work = engine, threading.Condition(), None

    def run(self) -> None:
        torch.set_num_threads(1)
        while True:
            with self.ready:
                while self.work is None:
                    self.ready.wait()
                (jobs, done), self.work = self.work, None
            with torch.no_grad():
                self.engine._compute(jobs)
            done()

    def hand(self, jobs, done) -> None:
        with self.ready:
            self.work = (jobs, done)
            self.ready.notify()


def split_over_two_threads(model, session_tensors: dict) -> None:
    def job(first: int, end: int) -> list:
        (one,) = jobs_for(model, 1, "session", seed=2, sessions=[session_tensors])
        one.query_x = one.query_x[first:end]
        return [one]

    computing = Engine(threads=1, cpu_traces=24, cpu_scripts=0)
    for count in (5, 3, 2):
        jobs = job(0, count)
        with torch.no_grad():
            for _ in range(5):
                computing._compute(jobs)
            print(f"# engine computation, {count} queries: {median_us(lambda: computing._compute(jobs)) / 1000:.3f} ms")
    workers = [SleepingWorker(Engine(threads=1, cpu_traces=24, cpu_scripts=0)) for _ in range(2)]
    for worker in workers:
        worker.start()
    plans = {"one thread, 5 queries": [job(0, 5)], "two threads, 3 + 2 queries": [job(0, 3), job(3, 5)]}

    def run(parts: list) -> None:
        finished, left, lock = threading.Event(), [len(parts)], threading.Lock()

        def done() -> None:
            with lock:
                left[0] -= 1
                if not left[0]:
                    finished.set()

        for worker, jobs in zip(workers, parts):
            worker.hand(jobs, done)
        finished.wait()

    times: dict[str, list[float]] = {name: [] for name in plans}
    for _ in range(20):  # traces
        for parts in plans.values():
            run(parts)
    for _ in range(6):  # interleaved blocks, the threads asleep between requests as between a lone client's
        for name, parts in plans.items():
            times[name].append(median_us(lambda: run(parts), calls=200, sleep_s=0.0005))
    print("# a lone session predict handed to sleeping threads, to the last answer: "
          + "  ".join(f"{name} {statistics.median(t) / 1000:.3f} ms" for name, t in times.items()))


def pooled_outputs_only() -> None:
    line = []
    for side in (7, 3):  # blocks 3 and 4 of Conv4 on 28x28 images
        x = torch.rand(5, 64, side, side).contiguous(memory_format=torch.channels_last)
        weight = torch.rand(64, 64, 3, 3).contiguous(memory_format=torch.channels_last)
        bias = torch.rand(64)

        def every_output():
            return F.max_pool2d(F.conv2d(x, weight, bias, padding=1), 2)

        def pooled_only():  # the pool floors: the last row and column of outputs are never read
            return F.max_pool2d(F.conv2d(F.pad(x, (1, 0, 1, 0)), weight, bias), 2)

        torch.testing.assert_close(pooled_only(), every_output())
        line.append(f"{side}x{side}: every output {median_us(every_output):.0f} us, pooled outputs only {median_us(pooled_only):.0f} us")
    columns_weight = weight.permute(2, 3, 1, 0).reshape(9 * 64, 64).contiguous()

    def as_matmul():  # the four kept positions' windows [4 * 5, 9 * 64] times the weight, then their maximum
        windows = F.pad(x, (1, 0, 1, 0)).permute(0, 2, 3, 1).unfold(1, 3, 1).unfold(2, 3, 1)  # [5, 2, 2, C, 3, 3]
        windows = windows.permute(1, 2, 0, 4, 5, 3).reshape(20, 9 * 64)
        return torch.addmm(bias, windows, columns_weight).view(4, 5, 64).amax(0).view(5, 64, 1, 1)

    torch.testing.assert_close(as_matmul(), F.max_pool2d(F.conv2d(x, weight, bias, padding=1), 2))
    line.append(f"3x3 as one matrix product {median_us(as_matmul):.0f} us")
    print("# one thread, 5 images, 64 channels: " + "; ".join(line))


if __name__ == "__main__":
    main()
