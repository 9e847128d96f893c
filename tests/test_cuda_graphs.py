"""Recorded computations in the engine: CUDA graphs (service.cuda_graphs), CPU traces (service.cpu_traces)
and CPU scripts (service.cpu_scripts).

On the CPU, a stand-in for the graph (``RecordedGraph``: replay recomputes the
captured function on the static inputs) checks the cache's bookkeeping and the
engine's graphed path (padding, keys, static inputs and outputs) against its
eager path. The tests marked ``cuda`` capture and replay real graphs
(``scripts/gpu_check.sh`` runs them). The CPU's TorchScript traces and scripts
are real here: replayed with new inputs, they must give what the eager engine
computes.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import time

import pytest
import torch

from service import cuda_graphs
from service.cpu_traces import TraceCache, fixed_shapes, flatten
from service.cuda_graphs import GraphCache, bucket, pad_rows


class RecordedGraph:
    """What a captured graph does, without a GPU: replay recomputes ``fn`` on the static inputs into the static outputs."""

    def __init__(self, fn, inputs):
        self.fn, self.inputs = fn, inputs
        self.outputs = fn(*inputs)

    def replay(self):
        for static, fresh in zip(self.outputs, self.fn(*self.inputs)):
            static.copy_(fresh)


class RecordedCapture:
    """``GraphCache._capture`` without CUDA: a RecordedGraph whose replay refreshes the static outputs in place."""

    def __init__(self):
        self.captured = []

    def __call__(self, cache, fn, inputs, owner):
        self.captured.append(fn)
        static = tuple(t.clone() for t in inputs)
        outputs = fn(*static)
        graph = RecordedGraph(lambda *args: flatten(fn(*args))[0], static)
        graph.outputs = flatten(outputs)[0]
        cache.captures += 1
        return cuda_graphs._Graph(graph, static, outputs, owner)


@pytest.fixture
def captures(monkeypatch):
    """Replace the CUDA capture with RecordedGraph; yields the list of captured functions."""
    recorder = RecordedCapture()
    monkeypatch.setattr(GraphCache, "_capture", lambda self, fn, inputs, owner: recorder(self, fn, inputs, owner))
    return recorder.captured


@dataclasses.dataclass
class Pair:
    left: torch.Tensor
    right: dict


def nested(x, y):
    """A result in every structure the engine's kernels return, with a non-tensor value inside."""
    return Pair(x * 2 + y, {"sum": (x - y).sum(1), "none": None}), [x.relu()], 3


def affine(x, y):
    return (x * 2 + y, (x - y).sum(1))


@pytest.mark.parametrize("kind", ["cuda-graph", "cpu-trace"])
def test_cache_runs_eagerly_then_captures_then_replays_with_new_inputs(kind, request):
    if kind == "cuda-graph":
        captured = request.getfixturevalue("captures")
        cache = GraphCache(capacity=4, capture_after=2)
    else:
        cache = TraceCache(capacity=4, capture_after=2)
    seen = []
    for step in range(4):
        x, y = torch.randn(3, 2), torch.randn(3, 2)
        out = cache.run(("adapt", 3), nested, (x, y))
        want = nested(x, y)
        torch.testing.assert_close(out[0].left, want[0].left)
        torch.testing.assert_close(out[0].right["sum"], want[0].right["sum"])
        torch.testing.assert_close(out[1][0], want[1][0])
        assert out[0].right["none"] is None and out[2] == 3
        seen.append(out)
    assert cache.captures == 1 and cache.failures == 0 and len(cache) == 1
    assert cache.replays == 3  # the capture's own first run, then two replays
    if kind == "cuda-graph":
        assert len(captured) == 1
        # replays hand back the graph's static outputs, refreshed in place
        assert seen[2] is seen[3] and seen[0] is not seen[1]
    else:
        assert seen[2][0].left is not seen[3][0].left  # every replay returns new tensors


def test_cache_drops_the_least_recently_used_graph(captures):
    cache = GraphCache(capacity=2, capture_after=1, refill_s=1e-9)  # no capture budget
    x = torch.ones(2, 2)
    for key in ("a", "b", "a", "c"):
        cache.run((key,), affine, (x, x))
    assert len(cache) == 2 and len(captures) == 3
    cache.run(("a",), affine, (x, x))  # still held: replayed, not captured again
    assert len(captures) == 3
    cache.run(("b",), affine, (x, x))  # dropped: captured anew
    assert len(captures) == 4


def test_more_shapes_than_the_cache_holds_are_not_captured_again_and_again(captures, monkeypatch):
    """Captures spend a budget (``capacity`` at once, then one per ``refill_s``): three shapes in turn
    through a cache of two would otherwise be captured on every use, each dropping another."""
    clock = [1000.0]
    monkeypatch.setattr(cuda_graphs.time, "monotonic", lambda: clock[0])
    cache = GraphCache(capacity=2, capture_after=1, refill_s=10.0)
    x = torch.ones(2, 2)
    for _ in range(5):
        for key in ("a", "b", "c"):
            out = cache.run((key,), affine, (x, x))
            torch.testing.assert_close(out[0], x * 3)  # eager or replayed, the same result
    assert cache.captures == 2 and len(captures) == 2 and len(cache) == 2
    clock[0] += 10.0  # one capture's worth of budget
    for key in ("a", "b", "c"):
        cache.run((key,), affine, (x, x))
    assert cache.captures == 3 and len(cache) == 2


def test_a_failed_capture_runs_that_key_eagerly_then_is_tried_again(monkeypatch):
    """A capture may fail for a passing reason (another thread's GPU work): the key runs eagerly, and
    its capture is tried again ``retry_failed_s`` later, not at every use nor never."""
    attempts = []
    clock = [1000.0]
    monkeypatch.setattr(cuda_graphs.time, "monotonic", lambda: clock[0])

    def failing(self, fn, inputs, owner):
        attempts.append(fn)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(GraphCache, "_capture", failing)
    cache = GraphCache(capture_after=1)
    for _ in range(3):
        x = torch.randn(4, 2)
        out = cache.run(("k",), affine, (x, x))
        torch.testing.assert_close(out[0], x * 3)
    assert len(attempts) == 1 and cache.failures == 1 and len(cache) == 0
    clock[0] += cache.retry_failed_s - 1
    cache.run(("k",), affine, (x, x))
    assert len(attempts) == 1
    clock[0] += 1
    recorder = RecordedCapture()  # this time the capture works (a CPU stand-in for the graph)
    monkeypatch.setattr(GraphCache, "_capture", lambda self, fn, inputs, owner: recorder(self, fn, inputs, owner))
    out = cache.run(("k",), affine, (x, x))  # tried again
    torch.testing.assert_close(out[0], x * 3)
    assert cache.failures == 1 and cache.captures == 1 and len(cache) == 1


def test_bucket_and_padding():
    assert [bucket(n, 64) for n in (1, 2, 3, 5, 33, 64)] == [1, 2, 4, 8, 64, 64]
    assert bucket(40, 48) == 48 and bucket(7, 7) == 7
    x = torch.arange(6.0).view(3, 2)
    padded = pad_rows(x, 4)
    assert padded.shape == (4, 2) and torch.equal(padded[:3], x) and torch.equal(padded[3], x[0])
    assert pad_rows(x, 3) is x
    with pytest.raises(ValueError):
        GraphCache(capacity=0)


# ---------------------------------------------------------------------------
# The engine's graphed path equals its eager path (CPU stand-in, and real graphs on a GPU)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from metalearn import MLP, Conv4, MetaConfig, MetaLearner
    from metalearn.checkpoint import save_checkpoint

    directory = tmp_path_factory.mktemp("models")
    for algorithm in ("maml", "anil", "metasgd"):  # the fast full, fast head-only and generic paths
        torch.manual_seed(0)
        learner = MetaLearner(Conv4(1, 5, channels=8, image_size=28), MetaConfig(algorithm, inner_steps=3, inner_lr=0.4))
        save_checkpoint(directory / f"conv-{algorithm}.safetensors", learner, input_shape=(1, 28, 28), n_way=5)
    torch.manual_seed(0)  # ANIL starting from class prototypes: a torch.func.vmap inside the traced computation
    learner = MetaLearner(Conv4(1, 5, channels=8, image_size=28), MetaConfig("anil", inner_steps=3, inner_lr=0.4, head_init="prototypes"))
    save_checkpoint(directory / "conv-protoanil.safetensors", learner, input_shape=(1, 28, 28), n_way=5)
    torch.manual_seed(0)
    sine = MetaLearner(MLP(1, (40, 40), 1), MetaConfig("maml", "regression", inner_steps=2, inner_lr=0.01))
    save_checkpoint(directory / "sine.safetensors", sine, input_shape=(1,))
    return directory


def _jobs(model, rows: int, seed: int, kind: str, sessions=None):
    from service.engine import Job

    g = torch.Generator().manual_seed(seed)
    jobs = []
    for i in range(rows):
        if model.task_type == "regression":
            support_x, query_x = torch.rand(5, 1, generator=g) * 10 - 5, torch.rand(7, 1, generator=g) * 10 - 5
            support_y = torch.sin(support_x + seed + i)
        else:
            support_x, query_x = torch.randn(5, 1, 28, 28, generator=g), torch.randn(6, 1, 28, 28, generator=g)
            support_y = torch.randperm(5, generator=g)  # other labels per request: a trace must not keep them
        if kind == "predict":
            jobs.append(Job("predict", model, query_x=query_x, session=sessions[i]))
        else:
            jobs.append(Job("adapt", model, support_x=support_x, support_y=support_y, steps=3, lr=None,
                            query_x=query_x, keep_session=True))
    return jobs


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
@pytest.mark.parametrize("name", ["conv-maml", "conv-anil", "conv-metasgd", "sine"])
def test_engine_graphed_results_equal_eager(model_dir, name, device, monkeypatch, request):
    """Adapt-and-predict and session predicts in batches of 1 and of 3 (padded to 4): each shape runs
    eagerly, is captured, then replayed with new requests; every result equals the eager engine's,
    and the session tensors handed out are copies that later replays leave alone."""
    from service.engine import Engine
    from service.registry import ModelRegistry

    if device == "cpu":  # the graphed path with the stand-in graph
        request.getfixturevalue("captures")
        real = Engine._graphs
        monkeypatch.setattr(Engine, "_graphs", lambda self, dev: real(self, "cuda") if self.cuda_graphs else None)
    else:
        # Reproducible kernels: otherwise cuDNN may pick other algorithms for other shapes, and TF32
        # rounding, amplified by the inner steps, exceeds any fixed tolerance.
        for flag, value in (("deterministic", True), ("benchmark", False), ("allow_tf32", False)):
            monkeypatch.setattr(torch.backends.cudnn, flag, value)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = ModelRegistry.load(model_dir, device).get(name)
    # (cpu_scripts=0: on the CPU the stand-in graphs, not the scripts, must take MAML's adaptations)
    graphed, eager = Engine(cuda_graphs=8, max_batch_size=8, cpu_scripts=0), Engine(cuda_graphs=0, max_batch_size=8, cpu_scripts=0)
    if device == "cuda":
        # The comparison runs the same padded shapes eagerly: a cache that never captures.
        eager = Engine(cuda_graphs=8, max_batch_size=8)
        eager._graphs(device).capture_after = 10**9
    key = "probabilities" if model.task_type == "classification" else "predictions"
    for rows in (1, 3):
        for round_ in range(4):
            jobs = _jobs(model, rows, round_, "adapt")
            got, want = graphed._compute(jobs), eager._compute(jobs)
            assert len(got) == rows
            for g, w in zip(got, want):
                torch.testing.assert_close(torch.tensor(g[key]), torch.tensor(w[key]), atol=1e-5, rtol=1e-4)
                assert g["support_loss_after"] == pytest.approx(w["support_loss_after"], rel=1e-4, abs=1e-6)
                assert set(g["tensors"]) == set(w["tensors"])
                for n in w["tensors"]:
                    torch.testing.assert_close(g["tensors"][n], w["tensors"][n], atol=1e-5, rtol=1e-4)
            kept = {n: t.clone() for n, t in got[0]["tensors"].items()}
            sessions = [w["tensors"] for w in want]
            predicted = _jobs(model, rows, round_ + 10, "predict", sessions)
            for g, w in zip(graphed._compute(predicted), eager._compute(predicted)):
                torch.testing.assert_close(torch.tensor(g[key]), torch.tensor(w[key]), atol=1e-5, rtol=1e-4)
            graphed._compute(_jobs(model, rows, round_ + 20, "adapt"))
            for n, t in kept.items():  # a session's tensors are its own, not the graph's outputs
                assert torch.equal(got[0]["tensors"][n], t)
    cache = graphed._graphs(device)
    assert cache.failures == 0
    assert cache.captures == 4  # (adapt, predict) x (1, 4 rows)
    assert cache.replays >= 4 * 4
    assert device == "cuda" or eager._graphs(device) is None
    assert device == "cpu" or eager._graphs(device).captures == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_capture_failure_runs_eagerly_on_cuda():
    """A computation that synchronises with the CPU cannot be captured: it runs eagerly, and CUDA keeps working."""
    cache = GraphCache(capture_after=1)
    x = torch.ones(3, device="cuda")
    out = cache.run(("syncs",), lambda t: t * float(t.sum()), (x,))
    torch.testing.assert_close(out, x * 3)
    assert cache.failures == 1 and len(cache) == 0
    for value in (1.0, 2.0):
        t = torch.full((3,), value, device="cuda")
        torch.testing.assert_close(cache.run(("pure",), lambda t: t * 2, (t,)), t * 2)
    assert cache.captures == 1 and len(cache) == 1


def test_graphs_only_with_one_worker_per_gpu():
    """A capture fails while another thread computes on the GPU (two workers on an H100:
    cudaErrorStreamCaptureUnsupported), so several workers run without graphs."""
    from service.engine import Engine

    assert isinstance(Engine(workers=1)._graphs("cuda"), GraphCache)
    assert Engine(workers=2)._graphs("cuda") is None
    assert Engine(workers=1, cuda_graphs=0)._graphs("cuda") is None
    assert isinstance(Engine(workers=1)._graphs("cpu"), TraceCache)  # the CPU's traces are per worker
    assert Engine(workers=1, cpu_traces=0)._graphs("cpu") is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_workers_on_one_gpu_run_eagerly_and_correctly(model_dir, monkeypatch):
    """METALEARN_WORKERS=2 on a GPU: no graphs (see above), and concurrent requests on the three
    engine paths get what a lone eager engine computes."""
    import asyncio

    from service.engine import Engine
    from service.registry import ModelRegistry

    for flag, value in (("deterministic", True), ("benchmark", False)):
        monkeypatch.setattr(torch.backends.cudnn, flag, value)
    registry = ModelRegistry.load(model_dir, "cuda")
    models = [registry.get(name) for name in ("conv-maml", "conv-anil", "conv-metasgd")]
    requests = [(model, seed) for seed in range(6) for model in models]
    reference = Engine(cuda_graphs=0, max_batch_size=1)
    want = [reference._compute(_jobs(model, 1, seed, "adapt"))[0]["probabilities"] for model, seed in requests]

    engine = Engine(workers=2, max_batch_size=1, max_wait_ms=0, request_timeout_s=120)
    engine.start()
    try:
        async def all_at_once():
            return await asyncio.gather(*[engine.submit(_jobs(model, 1, seed, "adapt")[0]) for model, seed in requests])

        rounds = [asyncio.run(all_at_once()) for _ in range(3)]
    finally:
        engine.stop()
    assert engine.graph_stats() == {"held": 0, "captures": 0, "replays": 0, "failures": 0}
    for results in rounds:
        for result, expected in zip(results, want):
            torch.testing.assert_close(torch.tensor(result["probabilities"]), torch.tensor(expected), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------
# CPU traces (service.cpu_traces): real TorchScript traces, replayed with new inputs
# ---------------------------------------------------------------------------
def test_flatten_rebuilds_the_structure_from_new_tensors():
    value = nested(torch.randn(3, 2), torch.randn(3, 2))
    tensors, rebuild = flatten(value)
    assert len(tensors) == 3
    fresh = [t + 1 for t in tensors]
    rebuilt = rebuild(iter(fresh))
    assert isinstance(rebuilt, tuple) and isinstance(rebuilt[0], Pair) and isinstance(rebuilt[1], list)
    assert rebuilt[0].left is fresh[0] and rebuilt[0].right["sum"] is fresh[1] and rebuilt[1][0] is fresh[2]
    assert rebuilt[0].right["none"] is None and rebuilt[2] == 3


def test_a_trace_that_fails_runs_eagerly_from_then_on():
    def untraceable(x):  # stands for any computation the tracer refuses
        if torch.jit.is_tracing():
            raise RuntimeError("Cannot insert a Tensor that requires grad as a constant")
        return x * 3

    cache = TraceCache(capture_after=1)
    for _ in range(3):
        x = torch.randn(4)
        torch.testing.assert_close(cache.run(("k",), untraceable, (x,)), x * 3)
    assert cache.failures == 1 and cache.captures == 0 and len(cache) == 0


def test_traces_stay_out_of_torchscripts_global_compilation_unit():
    """``torch.jit.trace`` would keep every trace in one global unit for the life of the process
    (about 8 MB per ANIL trace): each trace has its own unit, dropped with it."""
    global_unit = torch.jit._state._python_cu
    before = len(global_unit.get_functions())
    cache = TraceCache(capacity=1, capture_after=1, refill_s=1e-9)  # no capture budget
    x = torch.randn(3, 2)
    for key in range(4):
        cache.run((key,), nested, (x, x))
    assert cache.captures == 4 and len(cache) == 1 and cache.evictions == 3  # (metalearn_cpu_trace_evictions_total)
    assert len(global_unit.get_functions()) == before


def _traced_graph(fn, *inputs):
    from torch.jit._trace import _get_trace_graph

    graph, _ = _get_trace_graph(fn, inputs)
    return graph


def _run(graph, *inputs):
    unit = torch._C.CompilationUnit()
    return unit.create_function("compute", graph)(*inputs)


def test_a_trace_reads_no_sizes_unless_a_shape_follows_from_values():
    """The tracer records shape arithmetic (``x.shape[0] * x.shape[1]``) as operations, so that a trace
    could run on other shapes; the engine replays a trace only on its key's shapes, and ``fixed_shapes``
    folds that arithmetic to the traced sizes. Where a shape follows from tensor values, nothing changes."""
    import torch.nn.functional as F

    def shaped(x):
        rows = x.reshape(x.shape[0] * x.shape[1], -1)
        return rows.sum(0) / rows.shape[0], F.one_hot(x.argmax(-1), x.shape[-1])

    x = torch.randn(3, 4, 5)
    graph = _traced_graph(shaped, x)
    fixed = fixed_shapes(graph)
    assert graph.findAllNodes("aten::size") and not fixed.findAllNodes("aten::size")  # the original is left as it was
    assert not any(fixed.findAllNodes(kind) for kind in ("prim::NumToTensor", "aten::Int", "prim::ListConstruct"))  # the arithmetic folded
    assert len(list(fixed.nodes())) < len(list(graph.nodes()))
    other = torch.randn(3, 4, 5)  # other values, the traced shape
    for got, want in zip(_run(fixed, other), shaped(other)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    def value_shaped(x):  # how many elements are positive decides the shape
        positive = x[x > 0]
        return positive * positive.shape[0]

    def unknown_width(x):  # one_hot's width is the largest label + 1
        return F.one_hot(x.argmax(-1)) * x.shape[0]

    for fn in (value_shaped, unknown_width):
        graph = _traced_graph(fn, x)
        assert fixed_shapes(graph) is graph


@pytest.mark.parametrize("name,traced_kinds", [
    ("conv-anil", {"adapt", "predict"}),  # fast head-only kernel: no autograd anywhere
    ("conv-protoanil", {"adapt", "predict"}),
    ("conv-maml", {"predict"}),  # fast full kernel: the inner loop uses autograd, so only predictions
    ("conv-metasgd", set()),  # the generic path (torch.func transforms) runs eagerly
])
def test_engine_traced_results_equal_eager_on_the_cpu(model_dir, name, traced_kinds):
    """Adaptations (with and without queries, transductive or not) and session predictions in batches
    of 1 and 3: each shape runs eagerly, is traced, then replayed with new requests (other images,
    other labels); every result equals the eager engine's."""
    from service.engine import Engine
    from service.registry import ModelRegistry

    model = ModelRegistry.load(model_dir, "cpu").get(name)
    traced, eager = Engine(max_batch_size=8, cpu_scripts=0), Engine(cpu_traces=0, cpu_scripts=0, max_batch_size=8)
    variants = [{}, {"query_x": None}, {"transductive": True}]
    for rows in (1, 3):
        for round_ in range(3):
            for variant in variants:
                jobs = [dataclasses.replace(job, **variant) for job in _jobs(model, rows, 100 * round_ + rows, "adapt")]
                got, want = traced._compute(jobs), eager._compute(jobs)
                for g, w in zip(got, want):
                    if variant.get("query_x", 0) is not None:
                        torch.testing.assert_close(torch.tensor(g["probabilities"]), torch.tensor(w["probabilities"]), atol=1e-6, rtol=1e-5)
                    assert g["support_loss_after"] == pytest.approx(w["support_loss_after"], rel=1e-5, abs=1e-7)
                    for n in w["tensors"]:
                        torch.testing.assert_close(g["tensors"][n], w["tensors"][n], atol=1e-6, rtol=1e-5)
            sessions = [w["tensors"] for w in want]
            for transductive in (False, True):
                predicted = [dataclasses.replace(job, transductive=transductive) for job in _jobs(model, rows, round_ + 7, "predict", sessions)]
                for g, w in zip(traced._compute(predicted), eager._compute(predicted)):
                    torch.testing.assert_close(torch.tensor(g["probabilities"]), torch.tensor(w["probabilities"]), atol=1e-6, rtol=1e-5)
    stats = traced.trace_stats()
    shapes = {"adapt": 2 * len(variants), "predict": 2 * 2}  # per batch size (1, 3): the variants' shapes
    assert stats["failures"] == 0
    assert stats["captures"] == sum(shapes[kind] for kind in traced_kinds)
    assert stats["replays"] == stats["captures"] * 2  # rounds 2 and 3 (round 1 runs eagerly, then traces)
    assert eager.trace_stats()["captures"] == 0


# ---------------------------------------------------------------------------
# CPU scripts (service.cpu_scripts): MAML-family adaptations compiled in the background
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", [
    "conv-maml",  # the fast full kernel
    "conv-metasgd",  # the generic path (torch.func transforms, learned learning rates)
    "sine",  # the generic path, regression
])
def test_engine_scripted_adaptations_equal_eager_on_the_cpu(model_dir, name):
    """Adaptations (with and without queries, transductive or not) in batches of 1 and 3 run eagerly
    until each shape's third batch queues its compilation; once compiled, new requests (other inputs,
    other labels) in batches of 1, 3 and 5 run row by row through the script, also from two threads at
    once, and every result equals the eager engine's for that request alone (a batch's grouped
    convolutions round differently from one request's)."""
    import threading

    from service.engine import Engine
    from service.registry import ModelRegistry

    model = ModelRegistry.load(model_dir, "cpu").get(name)
    scripted, eager = Engine(max_batch_size=8, cpu_traces=0), Engine(max_batch_size=8, cpu_traces=0, cpu_scripts=0)
    variants = [{}, {"query_x": None}, {"transductive": True}]
    key = "probabilities" if model.task_type == "classification" else "predictions"

    def expected(rows: int, seed: int, compiled: bool = True) -> list[tuple[list, list]]:
        """(jobs, the eager engine's results) per variant. (The eager engine has one worker, so its
        generic path computes with the model's own modules: one thread at a time.)"""
        out = []
        for variant in variants:
            jobs = [dataclasses.replace(job, **variant) for job in _jobs(model, rows, seed, "adapt")]
            out.append((jobs, [eager._compute([job])[0] for job in jobs] if compiled else eager._compute(jobs)))
        return out

    def check(rows: int, seed: int, compiled: bool = True, wanted=None) -> None:
        for variant, (jobs, want) in zip(variants, wanted or expected(rows, seed, compiled)):
            got = scripted._compute(jobs)
            for g, w in zip(got, want):
                if variant.get("query_x", 0) is not None:
                    torch.testing.assert_close(torch.tensor(g[key]), torch.tensor(w[key]), atol=1e-6, rtol=1e-5)
                assert g["support_loss_before"] == pytest.approx(w["support_loss_before"], rel=1e-5, abs=1e-7)
                assert g["support_loss_after"] == pytest.approx(w["support_loss_after"], rel=1e-5, abs=1e-7)
                assert g["tensors"].keys() == w["tensors"].keys()
                for n in w["tensors"]:
                    torch.testing.assert_close(g["tensors"][n], w["tensors"][n], atol=1e-6, rtol=1e-5)

    try:
        for seed, rows in enumerate((1, 3, 1)):  # the shape's third batch (any size) queues it
            check(rows, seed, compiled=False)
        assert scripted.script_stats()["replays"] == 0
        seed = 100
        while scripted._scripts.pending() and seed < 102:  # eager adaptations while the compiling thread records
            check(1, seed)  # (one request: eager or compiled, the same computation)
            seed += 1
        assert scripted._scripts.wait(120), "compilation did not finish"
        stats = scripted.script_stats()
        replayed = stats["replays"]
        assert stats["captures"] == len(variants) and stats["failures"] == 0 and stats["held"] == len(variants)
        for seed, rows in enumerate((1, 3, 5), start=10):
            check(rows, seed)
        errors = []
        torch_threads = torch.get_num_threads()  # (set per OS thread: another test may have changed this one's)

        def in_a_thread(seed, wanted):
            try:
                torch.set_num_threads(torch_threads)  # as the eager results were computed: the same summation order
                check(3, seed, wanted=wanted)
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=in_a_thread, args=(20 + i, expected(3, 20 + i))) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert scripted.script_stats()["replays"] - replayed == 5 * len(variants)
        assert eager.script_stats()["captures"] == 0
    finally:
        scripted.stop()


@pytest.mark.parametrize("name", ["conv-metasgd", "sine"])  # the generic path (the fast kernels' are traced)
def test_engine_scripted_session_predictions_equal_eager_on_the_cpu(model_dir, name):
    """Session predictions (transductive or not) of the generic path run eagerly until a shape's third
    batch queues its compilation, then row by row through it; each equals the eager engine's for that
    request alone."""
    from service.engine import Engine
    from service.registry import ModelRegistry

    model = ModelRegistry.load(model_dir, "cpu").get(name)
    scripted, eager = Engine(max_batch_size=8, cpu_traces=0), Engine(max_batch_size=8, cpu_traces=0, cpu_scripts=0)
    key = "probabilities" if model.task_type == "classification" else "predictions"
    sessions = [r["tensors"] for r in eager._compute(_jobs(model, 5, 0, "adapt"))]

    def check(rows: int, seed: int, compiled: bool = True) -> None:
        for transductive in (False, True):
            jobs = [dataclasses.replace(job, transductive=transductive) for job in _jobs(model, rows, seed, "predict", sessions[seed % 2:])]
            want = [eager._compute([job])[0] for job in jobs] if compiled else eager._compute(jobs)
            for g, w in zip(scripted._compute(jobs), want):
                torch.testing.assert_close(torch.tensor(g[key]), torch.tensor(w[key]), atol=1e-6, rtol=1e-5)

    try:
        for seed, rows in enumerate((1, 3, 1)):
            check(rows, seed, compiled=False)
        assert scripted._scripts.wait(120), "compilation did not finish"
        stats = scripted.script_stats()
        assert stats["captures"] == 2 and stats["failures"] == 0  # (transductive or not)
        for seed, rows in enumerate((1, 3), start=10):
            check(rows, seed)
        assert scripted.script_stats()["replays"] - stats["replays"] == 2 * 2
    finally:
        scripted.stop()


def test_a_cheap_shape_runs_whole_batches_through_a_script_of_their_size(model_dir, monkeypatch):
    """A small model's request script runs in well under ``cheap_s``: then a batch of that shape is padded
    to the next power of two, compiled as a whole on its size's third use, and from then on runs through
    one call, its results equal to the eager engine's for the same batch; an expensive shape never is."""
    from service import cpu_scripts
    from service.engine import Engine
    from service.registry import ModelRegistry

    # The sine MLP's request script takes about 0.45 ms of CPU, under cheap_s; on a loaded machine its
    # measured time went over 2 ms, so the threshold is raised here: this test is about what follows.
    monkeypatch.setattr(cpu_scripts.ScriptCache, "cheap_s", 0.05)
    model = ModelRegistry.load(model_dir, "cpu").get("sine")
    scripted, eager = Engine(max_batch_size=8, cpu_traces=0), Engine(max_batch_size=8, cpu_traces=0, cpu_scripts=0)
    row_by_row = []
    by_row = cpu_scripts.ScriptCache._by_row
    monkeypatch.setattr(cpu_scripts.ScriptCache, "_by_row", staticmethod(lambda entry, inputs: row_by_row.append(inputs[0].shape[0]) or by_row(entry, inputs)))

    def check(rows: int, seed: int) -> None:
        jobs = _jobs(model, rows, seed, "adapt")
        for g, w in zip(scripted._compute(jobs), eager._compute(jobs)):
            torch.testing.assert_close(torch.tensor(g["predictions"]), torch.tensor(w["predictions"]), atol=1e-6, rtol=1e-5)
            for n in w["tensors"]:
                torch.testing.assert_close(g["tensors"][n], w["tensors"][n], atol=1e-6, rtol=1e-5)

    try:
        for seed in range(3):  # the request's script
            check(1, seed)
        assert scripted._scripts.wait(120)
        assert scripted.script_stats()["held"] == 1 and len(scripted._scripts._cheap) == 1
        assert not scripted._scripts.runs_by_row(_jobs(model, 1, 0, "adapt")[0].key())  # (the engine batches these)
        for seed in range(3, 6):  # batches of 3: row by row meanwhile; the third queues a script of 4 rows
            check(3, seed)
        assert row_by_row == [3, 3, 3]
        assert scripted._scripts.wait(120)
        stats = scripted.script_stats()
        assert stats["held"] == 2 and stats["failures"] == 0
        for seed in range(6, 9):  # batches of 3 and 4: padded to 4, one call each
            check(3 if seed % 2 else 4, seed)
        assert row_by_row == [3, 3, 3]
        check(5, 9)  # another size: row by row until its own script exists
        assert row_by_row == [3, 3, 3, 5]

        # Session predictions (the generic path's are compiled too): the same, batches of 3.
        sessions = [r["tensors"] for r in eager._compute(_jobs(model, 5, 0, "adapt"))]
        held = scripted.script_stats()["held"]
        for seed in range(10, 17):  # the request's script, then the batch's
            jobs = _jobs(model, 3 if seed > 12 else 1, seed, "predict", sessions[seed % 2:])
            for g, w in zip(scripted._compute(jobs), eager._compute(jobs)):
                torch.testing.assert_close(torch.tensor(g["predictions"]), torch.tensor(w["predictions"]), atol=1e-6, rtol=1e-5)
            assert scripted._scripts.wait(120)
        assert scripted.script_stats()["held"] == held + 2 and scripted.script_stats()["failures"] == 0
        assert row_by_row == [3, 3, 3, 5, 3, 3, 3]  # the last batch went through the batch's script
    finally:
        scripted.stop()

    expensive = Engine(max_batch_size=8, cpu_traces=0)
    monkeypatch.setattr(cpu_scripts.ScriptCache, "cheap_s", 0.0)
    del row_by_row[:]
    try:
        key = _jobs(model, 1, 0, "adapt")[0].key()
        assert not expensive._scripts.runs_by_row(key)  # (nothing compiled yet: eager batches)
        for seed in range(3):
            expensive._compute(_jobs(model, 1, seed, "adapt"))
        assert expensive._scripts.wait(120)
        assert expensive._scripts.runs_by_row(key)  # (the engine takes these jobs one at a time)
        for seed in range(3, 7):
            expensive._compute(_jobs(model, 3, seed, "adapt"))
        assert expensive._scripts.pending() == 0 and expensive.script_stats()["held"] == 1 and not expensive._scripts._cheap
        assert row_by_row == [3, 3, 3, 3]
    finally:
        expensive.stop()


def test_a_generic_anil_models_adaptations_compile_with_two_workers(tmp_path):
    """ANIL checks once per learner, on real values, that the model's forward is head(body(x)); the compiling
    thread records on a learner copied for it, on fake tensors, where that check cannot run: with two
    workers (the 2-core default) the copy was of a learner no request had checked, and the compilation failed
    for good ("DataDependentOutputException: aten.allclose"), every such adaptation eager."""
    from metalearn import MLP, MetaConfig, MetaLearner
    from metalearn.checkpoint import save_checkpoint
    from service.engine import Engine
    from service.registry import ModelRegistry

    torch.manual_seed(0)
    learner = MetaLearner(MLP(1, (16, 16), 1), MetaConfig("anil", "regression", inner_steps=3, inner_lr=0.01))
    save_checkpoint(tmp_path / "sine-anil.safetensors", learner, input_shape=(1,))
    model = ModelRegistry.load(tmp_path, "cpu").get("sine-anil")
    scripted, eager = Engine(max_batch_size=8, cpu_traces=0, workers=2), Engine(max_batch_size=8, cpu_traces=0, cpu_scripts=0)
    try:
        for seed in range(3):
            scripted._compute(_jobs(model, 1, seed, "adapt"))
        assert scripted._scripts.wait(120)
        stats = scripted.script_stats()
        assert stats["failures"] == 0 and stats["held"] == 1, stats
        jobs = _jobs(model, 1, 7, "adapt")
        for got, want in zip(scripted._compute(jobs), eager._compute(jobs)):
            torch.testing.assert_close(torch.tensor(got["predictions"]), torch.tensor(want["predictions"]), atol=1e-6, rtol=1e-5)
        assert scripted.script_stats()["replays"] >= 1
    finally:
        scripted.stop()


def test_whole_batch_scripts_never_displace_a_requests_script():
    """A whole batch's script is held only while the request scripts leave room (its shape runs row by
    row without it), and is the first dropped when a request's script needs the room."""
    from service import cpu_scripts

    cache = cpu_scripts.ScriptCache(capacity=2, capture_after=1, refill_s=1e-3)  # (compile budget: no limit)
    try:
        one, two = torch.randn(1, 3), torch.randn(2, 3)
        cache.run(("a",), affine, (one, one))
        assert cache.wait(60) and ("a",) in cache._cheap
        cache.run(("a",), affine, (two, two))  # queues the script of two rows
        assert cache.wait(60) and len(cache) == 2
        cache.run(("b",), affine, (one, one))  # a request's script: the whole batch's makes room
        assert cache.wait(60) and set(cache._graphs) == {("a",), ("b",)} and cache.evictions == 1
        torch.testing.assert_close(cache.run(("a",), affine, (two, two)), affine(two, two))
        assert cache.pending() == 0 and set(cache._graphs) == {("a",), ("b",)}  # no room: row by row
    finally:
        cache.close()


def test_a_compilation_that_fails_leaves_the_shape_eager(monkeypatch):
    from service import cpu_scripts

    def refuse(fn, inputs):
        raise RuntimeError("an operation TorchScript cannot express")

    monkeypatch.setattr(cpu_scripts, "script", refuse)
    cache = cpu_scripts.ScriptCache(capture_after=1)
    try:
        x = torch.randn(2, 3)
        torch.testing.assert_close(cache.run(("k",), affine, (x, x)), affine(x, x))
        assert cache.wait(30)
        for _ in range(3):
            x = torch.randn(2, 3)
            torch.testing.assert_close(cache.run(("k",), affine, (x, x)), affine(x, x))
        assert cache.wait(30)
        assert cache.failures == 1 and cache.captures == 0 and len(cache) == 0
    finally:
        cache.close()


def test_a_script_that_disagrees_with_the_eager_run_is_never_used(monkeypatch):
    from service import cpu_scripts

    real = cpu_scripts.script
    monkeypatch.setattr(cpu_scripts, "script", lambda fn, inputs: real(lambda *a: affine(*a) + 1e-3, inputs))
    cache = cpu_scripts.ScriptCache(capture_after=1)
    try:
        x = torch.randn(2, 3)
        cache.run(("k",), affine, (x, x))
        assert cache.wait(60)
        assert cache.failures == 1 and len(cache) == 0
    finally:
        cache.close()


def test_scripts_stay_out_of_torchscripts_global_compilation_unit():
    """``torch.jit.script`` of the recorded module would keep its code in one global unit for the life of
    the process (about 40 MB per MAML adaptation): each script has its own unit, and the recording's
    intermediate tensors are not kept."""
    from service.cpu_scripts import script

    global_unit = torch.jit._state._python_cu
    before = len(global_unit.get_functions())
    compiled, rebuild = script(nested, (torch.randn(1, 3), torch.randn(1, 3)))
    assert len(global_unit.get_functions()) == before
    x, y = torch.randn(1, 3), torch.randn(1, 3)
    got, want = rebuild(iter(compiled(x, y))), nested(x, y)
    torch.testing.assert_close(got[0].left, want[0].left)
    torch.testing.assert_close(got[0].right["sum"], want[0].right["sum"])
    assert got[2] == 3 and got[0].right["none"] is None


def test_a_script_that_fails_to_run_leaves_the_shape_eager():
    """Inputs the compiled computation cannot take (nothing the engine's keys let through; here a
    wider row than recorded) are computed eagerly, and the shape stays eager from then on."""
    from service import cpu_scripts

    def doubled(x, y):  # the recording fixes the shape read here: reshape(1, 3)
        return (x.reshape(x.shape[0], x.shape[1]) * 2 + y,)

    cache = cpu_scripts.ScriptCache(capture_after=1)
    cache.cheap_s = 0.0  # row by row only (a cheap shape's whole batches are compiled too: tested below)
    try:
        x = torch.randn(2, 3)
        cache.run(("k",), doubled, (x, x))
        assert cache.wait(60) and len(cache) == 1
        wide = torch.randn(2, 4)
        torch.testing.assert_close(cache.run(("k",), doubled, (wide, wide)), doubled(wide, wide))
        assert cache.failures == 1 and len(cache) == 0
        torch.testing.assert_close(cache.run(("k",), doubled, (x, x)), doubled(x, x))
        assert cache.replays == 1 and cache.pending() == 0  # (the failed replay) and no new compilation
    finally:
        cache.close()


def test_a_computation_whose_results_are_not_rows_is_never_compiled():
    """Row-by-row replays concatenate each result over the rows: a result without a row dimension
    (a total over the batch) cannot be rebuilt that way, so the compilation is refused."""
    from service import cpu_scripts

    def total(x, y):
        return (x * y).sum(), x + y

    cache = cpu_scripts.ScriptCache(capture_after=1)
    try:
        x, y = torch.randn(3, 2), torch.randn(3, 2)
        cache.run(("k",), total, (x, y))
        assert cache.wait(60)
        assert cache.failures == 1 and len(cache) == 0
        got, want = cache.run(("k",), total, (x, y)), total(x, y)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
    finally:
        cache.close()


def test_compilations_only_on_the_cpu():
    """A GPU's computations are CUDA graphs (or eager), never compilations (nor, so, a learner copied
    for a compiling thread)."""
    from types import SimpleNamespace

    from service.engine import Engine

    assert Engine()._scripting(SimpleNamespace(device="cpu"))
    assert not Engine()._scripting(SimpleNamespace(device="cuda:0"))
    assert not Engine(cpu_scripts=0)._scripting(SimpleNamespace(device="cpu"))


def test_what_a_compilation_records_is_built_only_when_one_is_queued():
    """``record`` (the engine's copy of a generic-path learner, say) costs something: it is built once,
    by the call that queues the compilation, and that is what the compiling thread records."""
    from service import cpu_scripts

    built, recorded = [], []

    def record(rows):
        built.append(rows)
        return lambda x, y: recorded.append(1) or affine(x, y)

    cache = cpu_scripts.ScriptCache(capture_after=3)
    try:
        x = torch.randn(2, 3)
        for _ in range(2):
            cache.run(("k",), affine, (x, x), record=record)
        assert built == [] and cache.pending() == 0
        cache.run(("k",), affine, (x, x), record=record)
        assert built == [1]
        assert cache.wait(60) and len(cache) == 1 and recorded  # recorded (and checked against) record()'s function
        torch.testing.assert_close(cache.run(("k",), affine, (x, x), record=record), affine(x, x))
        assert built == [1] and cache.replays == 1
    finally:
        cache.close()


def test_the_recording_machinery_is_loaded_at_start_only_for_models_that_compile(model_dir, monkeypatch):
    """``Engine.load_compiler``: on the CPU with scripts on, a model that compiles (MAML, the generic
    path) loads the recorder before the service freezes its start; ANIL's traced kernel alone does not."""
    from service import engine as engine_module
    from service.engine import Engine
    from service.registry import ModelRegistry

    loads = []
    monkeypatch.setattr(engine_module, "load_recorder", lambda: loads.append(1))
    registry = ModelRegistry.load(model_dir, "cpu")
    anil, maml, metasgd = (registry.get(f"conv-{a}") for a in ("anil", "maml", "metasgd"))
    Engine(cpu_scripts=8).load_compiler([anil])
    assert loads == []
    Engine(cpu_scripts=0).load_compiler([anil, maml, metasgd])
    assert loads == []
    for compiling in (maml, metasgd):
        Engine(cpu_scripts=8).load_compiler([anil, compiling])
    assert loads == [1, 1]


@pytest.fixture
def packing(monkeypatch):
    """``packing(pays)``: FastFull's measurement of packed against plain lone predictions answers that packing
    pays in every block (``True``), in none (``False``), or in the blocks of a set of indices."""
    from service import fastpath

    def answer(pays: bool | set[int]) -> None:
        def blocks(self, query_x):
            return frozenset(range(len(self.blocks)) if pays is True else pays or ())
        monkeypatch.setattr(fastpath.FastFull, "_measure_packed_blocks", blocks)
    return answer


def _a_lone_session_predict(model_dir):
    """An engine, the conv-maml model, a session's tensors and a lone predict of 60 queries with them; skips
    where this torch build has no packed convolutions."""
    from service import fastpath
    from service.engine import Engine
    from service.registry import ModelRegistry

    if not fastpath.packed_convolutions():
        pytest.skip("no packed convolutions in this torch build")
    model = ModelRegistry.load(model_dir, "cpu").get("conv-maml")
    engine = Engine()
    tensors = engine._compute(_jobs(model, 1, 4, "adapt"))[0]["tensors"]
    (job,) = _jobs(model, 1, 60, "predict", [tensors])
    return engine, model, tensors, job


@pytest.mark.parametrize("why", ["packing loses here", "no packed convolutions"])
def test_lone_maml_session_predicts_use_the_plain_constants_where_packing_does_not_pay(model_dir, packing, monkeypatch, why):
    """Where packed convolutions measure slower than the plain constants (an AVX2 CPU), or oneDNN's packed
    convolution is not available (another build or torch version: ``packed_convolutions()`` is False), a
    lone MAML session predict computes with FastFull.prepare's constants, and its predictions are the
    packed path's up to float rounding."""
    from service import fastpath
    from service.sessions import Session

    engine, model, tensors, job = _a_lone_session_predict(model_dir)
    sessions = [Session(f"s{i}", "conv-maml", None, 0.0, 1e9, tensors) for i in range(2)]
    packing(True)
    packed = engine._compute([dataclasses.replace(job, session_prepared=sessions[0].prepared)])[0]
    assert engine._session_inputs(model, False, lone_query=job.query_x)[0][0] == "packed"
    engine._fast(model)._packed_blocks.clear()  # (the model's kernel remembers what it measured)
    if why == "packing loses here":
        packing(False)
    else:
        monkeypatch.setattr(fastpath, "packed_convolutions", lambda: False)
    key, make = engine._session_inputs(model, False, lone_query=job.query_x)
    assert key[0] == "prepared"
    plain = engine._compute([dataclasses.replace(job, session_prepared=sessions[1].prepared)])[0]
    assert not any(t.is_mkldnn for t in sessions[1].prepared(key, make).values())
    assert plain["predictions"] == packed["predictions"]
    torch.testing.assert_close(torch.tensor(plain["probabilities"]), torch.tensor(packed["probabilities"]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pays", [True, False], ids=["packed", "plain"])
def test_a_lone_session_predict_that_overflows_is_not_finite_packed_or_plain(model_dir, packing, pays):
    """Queries near float32's limit overflow the convolutions: packed as plain, the predict is non-finite
    (the route's "Prediction not finite"). oneDNN's fused ReLU, used before, made the NaN 0 and answered
    a blank input's probabilities."""
    engine, model, tensors, job = _a_lone_session_predict(model_dir)
    packing(pays)
    overflowing = dataclasses.replace(job, query_x=torch.full_like(job.query_x, 3e38))
    assert engine._session_inputs(model, False, lone_query=overflowing.query_x)[0][0] == ("packed" if pays else "prepared")
    assert engine._compute([overflowing]) == [{"diverged": True}]
    assert "probabilities" in engine._compute([job])[0]
    # Where an overflow leaves a NaN, a packed block keeps it (the fused ReLU answered 0).
    from service import fastpath

    conv = torch.nn.Conv2d(1, 4, 3, padding=1)
    h = torch.rand(1, 1, 6, 6)
    h[0, 0, 2, 2] = float("nan")
    with torch.no_grad():
        assert fastpath.packed_block(conv, h, fastpath._pack_weight(conv.weight, conv), conv.bias).isnan().any()


def test_only_float32_cpu_weights_pack(model_dir):
    from service import fastpath
    from service.registry import ModelRegistry

    if not fastpath.packed_convolutions():
        pytest.skip("no packed convolutions in this torch build")
    model = ModelRegistry.load(model_dir, "cpu").get("conv-maml")
    learner = copy.deepcopy(model.learner)
    learner.model.double()  # oneDNN packs float32 weights only
    assert fastpath.FastFull(model.learner).can_pack() and not fastpath.FastFull(learner).can_pack()
    assert not fastpath.FastFull(learner).packed_blocks(torch.rand(5, 1, 28, 28, dtype=torch.float64))
    learner.model.float().to("meta")  # weights off the CPU (tests/test_cuda.py checks a GPU's)
    assert not fastpath.FastFull(learner).can_pack()


def test_packing_is_measured_once_per_query_count_and_decides_block_by_block(model_dir, monkeypatch):
    """``FastFull.packed_blocks`` times each block of lone predictions with plain and packed constants (once per
    count of query images; a count over ``PACKING_MEASURED`` as that many) and packs the blocks that were
    faster packed."""
    from service import fastpath
    from service.registry import ModelRegistry

    if not fastpath.packed_convolutions():
        pytest.skip("no packed convolutions in this torch build")
    model = ModelRegistry.load(model_dir, "cpu").get("conv-maml")
    measured = []
    measure, block = fastpath.FastFull._measure_packed_blocks, fastpath.FastFull._block
    monkeypatch.setattr(fastpath.FastFull, "_measure_packed_blocks", lambda self, query_x: measured.append(query_x.shape[0]) or measure(self, query_x))
    blocks = len(fastpath.FastFull(model.learner).blocks)
    for faster_packed in (set(), {0}, {1, blocks - 1}, set(range(blocks))):

        def slowed(self, index, constants, h, faster_packed=faster_packed):
            packed = self.blocks[index][1] + ".packed" in constants
            if packed != (index in faster_packed):
                # This way loses by far more than the noise: the decision takes the fastest of seven runs,
                # and 3 ms was once not enough while other processes loaded both cores.
                time.sleep(0.01)
            return block(self, index, constants, h)

        monkeypatch.setattr(fastpath.FastFull, "_block", slowed)
        fast, measured[:] = fastpath.FastFull(model.learner), []
        for count in (5, 5, 1, 40, 16):
            assert fast.packed_blocks(torch.rand(count, 1, 28, 28)) == faster_packed
        assert measured == [5, 1, 16]  # 40 images measured as 16, and 16 then known


@pytest.mark.parametrize("blocks", [{0}, {1, 2}, {0, 1, 3}])
def test_a_lone_predict_packed_in_some_blocks_predicts_what_the_plain_constants_do(model_dir, packing, blocks):
    """Where packing pays in some blocks only, a lone MAML session predict packs those and computes the others
    with the plain constants (FastFull.pack with ``blocks``), and predicts what the plain constants do up to
    float rounding."""
    from service.sessions import Session

    engine, model, tensors, job = _a_lone_session_predict(model_dir)
    results = {}
    for way in ("plain", "mixed"):
        packing(blocks if way == "mixed" else False)
        engine._fast(model)._packed_blocks.clear()
        key, make = engine._session_inputs(model, False, lone_query=job.query_x)
        session = Session(way, "conv-maml", None, 0.0, 1e9, tensors)
        results[way] = engine._compute([dataclasses.replace(job, session_prepared=session.prepared)])[0]
        made = session.prepared(key, make)
        names = [conv_name for _, conv_name, _, _ in engine._fast(model).blocks]
        packed = {index for index, name in enumerate(names) if name + ".packed" in made}
        plain = {index for index, name in enumerate(names) if name + ".weight" in made}
        assert packed == (blocks if way == "mixed" else set()) and plain == set(range(len(names))) - packed
        assert all(made[name + ".packed"].is_mkldnn for name in names if name + ".packed" in made)
    assert key == ("packed", tuple(sorted(blocks)), "cpu")
    assert results["mixed"]["predictions"] == results["plain"]["predictions"]
    torch.testing.assert_close(torch.tensor(results["mixed"]["probabilities"]), torch.tensor(results["plain"]["probabilities"]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pays", [False, True])
def test_a_lone_anil_session_predict_computes_with_its_constants_what_a_batch_of_sessions_does(model_dir, packing, pays):
    """ANIL's session prediction computed alone runs on per-session constants (FastAnil.alone: FastFull.prepare,
    packed where that pays); a batch of sessions runs the body once with the weights they share. Both give
    the same predictions, to float rounding, and the evaluation's BatchNorm uses the support's statistics
    either way (the same query alone or among others)."""
    from service.engine import Engine
    from service.fastpath import packed_convolutions
    from service.registry import ModelRegistry
    from service.sessions import Session

    if pays and not packed_convolutions():
        pytest.skip("no packed convolutions in this torch build")
    packing(pays)
    model = ModelRegistry.load(model_dir, "cpu").get("conv-anil")
    engine = Engine(max_batch_size=8)
    adapted = engine._compute(_jobs(model, 2, 7, "adapt"))
    sessions = [Session(f"s{i}", "conv-anil", None, 0.0, 1e9, result["tensors"]) for i, result in enumerate(adapted)]
    jobs = [dataclasses.replace(job, session_prepared=session.prepared) for job, session in zip(_jobs(model, 2, 8, "predict", [s.tensors for s in sessions]), sessions)]
    together = engine._compute(jobs)
    alone = [engine._compute([job])[0] for job in jobs]
    made = sessions[0].prepared(*engine._session_inputs(model, False, lone_query=jobs[0].query_x))
    assert ("body.4.packed" in made) == pays and ("body.5.scale" in made) != pays  # per-session constants, not the views
    if not pays:
        # What the session holds beyond its tensors: the first block's weight (signed) and a scale and shift
        # per block. The body's other weights are the model's, not counted (they were: 440 KB for Conv4-64).
        assert "body.4.weight" not in made
        first = model.learner.model.body[0].weight
        assert sessions[0].prepared_bytes == first.numel() * 4 + sum(2 * c.out_channels * 4 for c, *_ in engine._fast(model).alone.blocks)
    for single, batched in zip(alone, together):
        assert single["predictions"] == batched["predictions"]
        torch.testing.assert_close(torch.tensor(single["probabilities"]), torch.tensor(batched["probabilities"]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["conv-maml", "conv-anil", "conv-metasgd", "sine"])
def test_what_a_worker_derives_from_a_session_is_made_once_and_predicts_the_same(model_dir, name, packing):
    """``Job.session_prepared`` (``Session.prepared``): the session's tensors as [1, ...] views or, for MAML's
    fast kernel with the session's BatchNorm statistics, its constants (FastFull.prepare; packed for a
    prediction computed alone, FastFull.pack; ANIL's prediction computed alone too, FastAnil.alone), made
    once per session object. Predictions with them equal a job's that derives them per request, alone
    (traced, scripted or eager) and in a batch of three sessions (with the plain constants, or for ANIL the
    views), whose rows equal each session's prediction alone."""
    from service.engine import Engine
    from service.fastpath import packed_convolutions
    from service.registry import ModelRegistry
    from service.sessions import Session

    packing(True)  # (whichever is faster on this machine: test_lone_maml_session_predicts_use_the_plain_constants_... tests the other way)
    model = ModelRegistry.load(model_dir, "cpu").get(name)
    engine = Engine(max_batch_size=8)
    adapted = engine._compute(_jobs(model, 3, 3, "adapt"))
    sessions = [Session(f"s{i}", name, None, 0.0, 1e9, result["tensors"]) for i, result in enumerate(adapted)]
    query_x = _jobs(model, 1, 50, "predict", [None])[0].query_x
    for transductive, lone in itertools.product((False, True), (False, True)):
        key, make = engine._session_inputs(model, transductive, lone_query=query_x if lone else None)
        before = sessions[0].prepared_bytes
        made = sessions[0].prepared(key, make)
        assert sessions[0].prepared(key, lambda tensors: pytest.fail("made twice")) is made
        grown = sessions[0].prepared_bytes - before
        if name in ("conv-maml", "conv-anil") and not transductive and lone and packed_convolutions():  # packed weights, scale folded in
            assert made["body.4.packed"].is_mkldnn and "body.4.weight" not in made and "body.5.scale" not in made
            weights = sum(p.numel() * 4 for p in model.learner.model.parameters() if p.dim() == 4)
            assert weights <= grown <= weights + 4096  # and each block's shift
        elif name == "conv-maml" and not transductive:  # the kernel's constants: scale and shift per block
            assert {"body.1.scale", "body.1.shift"} <= set(made) and "body.1.weight" not in made
            assert 0 < grown < sessions[0].nbytes / 4  # per-channel constants (and the first weight, signed)
        else:  # views of the session's own tensors: nothing more to hold
            assert all(made[n].shape == (1, *t.shape) and made[n].data_ptr() == t.data_ptr() for n, t in sessions[0].tensors.items())
            assert grown == 0
    for round_ in range(6):  # eager, then traced (the fast kernels) or, once compiled, scripted (the generic path)
        if round_ == 3:
            assert engine._scripts.wait(120), "compilation did not finish"
        for transductive in (False, True):
            jobs = [dataclasses.replace(job, transductive=transductive) for job in _jobs(model, 3, 50 + round_, "predict", [s.tensors for s in sessions])]
            prepared = [dataclasses.replace(job, session_prepared=session.prepared) for job, session in zip(jobs, sessions)]
            alone = [engine._compute([job])[0] for job in prepared]
            assert alone == [engine._compute([job])[0] for job in jobs]  # made once or per request: the same
            if transductive:
                continue  # query statistics: a batch's rows are other requests' queries' business, not checked here
            for together, single in zip(engine._compute(prepared), alone):
                values = "probabilities" if "probabilities" in single else "predictions"  # classes, or regression values
                torch.testing.assert_close(torch.tensor(together[values]), torch.tensor(single[values]), atol=1e-6, rtol=1e-5)
    replays = engine.script_stats()["replays"] if name in ("conv-metasgd", "sine") else engine.trace_stats()["replays"]
    assert replays >= 4 and engine.script_stats()["failures"] == 0 and engine.trace_stats()["failures"] == 0


class Owner:
    """A model, as far as the caches care: what an entry keeps alive."""


@pytest.mark.parametrize("kind", ["cpu-trace", "cpu-script"])
def test_forget_drops_the_keys_of_models_no_longer_served_and_the_models(kind):
    """After a reload (``Engine.serve_only``): the entries whose key names a model no longer served go, and
    with them the models they kept alive; the others stay."""
    import gc
    import weakref

    from service import cpu_scripts

    cache = TraceCache(capacity=4, capture_after=1) if kind == "cpu-trace" else cpu_scripts.ScriptCache(capacity=4, capture_after=1, refill_s=1e-3)
    kept, replaced = Owner(), Owner()
    x = torch.randn(1, 3)
    try:
        for owner, shape in ((kept, "a"), (replaced, "a"), (replaced, "b")):
            cache.run((id(owner), shape), affine, (x, x), owner=owner)
        if kind == "cpu-script":
            assert cache.wait(60)
        assert len(cache) == 3
        gone, stale_id = weakref.ref(replaced), id(replaced)
        del replaced, owner
        cache.forget(lambda key: key[0] == stale_id)
        gc.collect()
        assert gone() is None and set(cache._graphs) == {(id(kept), "a")} and cache.evictions == 0  # (forgotten, not evicted)
        if kind == "cpu-script":
            assert set(cache._cheap) == {(id(kept), "a")}
        torch.testing.assert_close(cache.run((id(kept), "a"), affine, (x, x), owner=kept), affine(x, x))
    finally:
        if kind == "cpu-script":
            cache.close()


def test_recordings_in_several_threads_at_once_all_succeed():
    """make_fx keeps its state in torch.fx's module globals: ``script`` records one computation at a time
    in a process (two at once, the compiling thread's and a reload's ``load_recorder``, broke one of them)."""
    import threading

    from service.cpu_scripts import script

    def deep(x, w):
        for _ in range(30):
            x = torch.nn.functional.conv2d(x, w, padding=1).relu()
        return (x.sum(),)

    failures = []

    def record():
        for _ in range(3):
            try:
                script(deep, (torch.rand(1, 2, 8, 8), torch.rand(2, 2, 3, 3)))
            except Exception as error:  # noqa: BLE001 - counted
                failures.append(repr(error))

    threads = [threading.Thread(target=record) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []
