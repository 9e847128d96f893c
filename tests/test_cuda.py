"""GPU-only paths: device placement, CUDA == CPU results, the service on a GPU.

Every test is marked ``cuda`` and skips without a GPU; ``scripts/gpu_check.sh``
runs them with ``pytest -m cuda`` on a machine that has one.

The float32 comparisons with the CPU run with TF32 off and cuDNN off (PyTorch's
own CUDA kernels): measured on an H100 (torch 2.11, 2026-11-27,
bench/experiments/cuda_precision.py), cuDNN's float32 convolutions, TF32 off, deterministic or not,
left MAML's conv weights 1.7e-3 from the CPU's after 5 inner steps at lr 0.4
(2e-7 after 1 step), while with cuDNN off they agree to 6e-7 and in float64
with cuDNN on to 2e-15. So cuDNN's rounding is a property of its kernels, not
of this code; ``test_adapt_predict_cuda_equals_cpu_float64`` checks the cuDNN
path itself, in float64, to 1e-10.
"""

from __future__ import annotations

import copy

import pytest
import torch

from metalearn import MLP, Conv4, MetaConfig, MetaLearner, adapt, adapt_many, predict, predict_many
from metalearn.data.tasks import TaskBatch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run scripts/gpu_check.sh on one)"),
]

ATOL, RTOL = 2e-4, 2e-4


@pytest.fixture(autouse=True)
def exact_cuda_math():
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.enabled)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.enabled = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.enabled = saved


def image_batch(tasks=4, ways=5, shots=1, queries=3, size=28, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    labels = lambda k: torch.arange(ways).repeat_interleave(k).expand(tasks, -1).clone()  # noqa: E731
    sx = torch.randn(tasks, ways * shots, 1, size, size, generator=g)
    qx = torch.randn(tasks, ways * queries, 1, size, size, generator=g)
    return TaskBatch(sx, labels(shots), qx, labels(queries))


def regression_batch(tasks=6, shots=5, queries=7, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    amp = torch.rand(tasks, 1, 1, generator=g) * 4 + 0.5
    phase = torch.rand(tasks, 1, 1, generator=g) * 3
    sx = torch.rand(tasks, shots, 1, generator=g) * 10 - 5
    qx = torch.rand(tasks, queries, 1, generator=g) * 10 - 5
    return TaskBatch(sx, amp * torch.sin(sx - phase), qx, amp * torch.sin(qx - phase))


def to(batch: TaskBatch, device) -> TaskBatch:
    return TaskBatch(*(t.to(device) for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)))


def conv_learner(algorithm="maml", steps=3, seed=0) -> MetaLearner:
    torch.manual_seed(seed)
    return MetaLearner(Conv4(1, 5, channels=16, image_size=28), MetaConfig(algorithm, inner_steps=steps, inner_lr=0.4))


def mlp_learner(algorithm="maml", seed=0) -> MetaLearner:
    torch.manual_seed(seed)
    return MetaLearner(MLP(1, (40, 40), 1), MetaConfig(algorithm, "regression", inner_steps=2, inner_lr=0.01))


def close(a: torch.Tensor, b: torch.Tensor, atol=ATOL, rtol=RTOL) -> None:
    torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), atol=atol, rtol=rtol)


def test_learner_moves_to_cuda():
    learner = conv_learner("metasgd").cuda()
    assert all(p.device.type == "cuda" for p in learner.parameters())
    assert all(t.device.type == "cuda" for t in learner.meta_params().values())
    batch = to(image_batch(tasks=2), "cuda")
    result = learner.meta_gradient(batch)
    assert all(g.device.type == "cuda" for g in result.grads.values())


@pytest.mark.parametrize("algorithm", ["maml", "anil", "metasgd"])
def test_adapt_predict_cuda_equals_cpu(algorithm):
    cpu = conv_learner(algorithm)
    gpu = copy.deepcopy(cpu).cuda()
    batch = image_batch(tasks=1)
    sx, sy, qx = batch.support_x[0], batch.support_y[0], batch.query_x[0]
    a_cpu = adapt(cpu, sx, sy, steps=5)
    a_gpu = adapt(gpu, sx.cuda(), sy.cuda(), steps=5)
    assert all(t.device.type == "cuda" for t in a_gpu.params.values())
    for name in a_cpu.params:
        close(a_gpu.params[name], a_cpu.params[name])
    close(a_gpu.support_loss_after, a_cpu.support_loss_after)
    for transductive in (False, True):
        out_cpu = predict(cpu, a_cpu, qx, transductive=transductive)
        out_gpu = predict(gpu, a_gpu, qx.cuda(), transductive=transductive)
        assert out_gpu.device.type == "cuda"
        close(out_gpu, out_cpu)
        assert torch.equal(out_gpu.argmax(-1).cpu(), out_cpu.argmax(-1))


def test_adapt_predict_cuda_equals_cpu_float64():
    """The cuDNN path (what the service runs), compared in float64, where rounding cannot hide a real difference."""
    torch.backends.cudnn.enabled = True  # the fixture restores it
    cpu = conv_learner("maml").double()
    gpu = copy.deepcopy(cpu).cuda()
    batch = image_batch(tasks=1)
    sx, sy, qx = batch.support_x[0].double(), batch.support_y[0], batch.query_x[0].double()
    a_cpu = adapt(cpu, sx, sy, steps=5)
    a_gpu = adapt(gpu, sx.cuda(), sy.cuda(), steps=5)
    for name in a_cpu.params:
        close(a_gpu.params[name], a_cpu.params[name], atol=1e-10, rtol=1e-10)
    for transductive in (False, True):
        close(predict(gpu, a_gpu, qx.cuda(), transductive=transductive), predict(cpu, a_cpu, qx, transductive=transductive), atol=1e-10, rtol=1e-10)


def test_adapt_many_predict_many_cuda_equals_cpu():
    cpu = conv_learner("maml")
    gpu = copy.deepcopy(cpu).cuda()
    batch = image_batch(tasks=4)
    a_cpu = adapt_many(cpu, batch.support_x, batch.support_y, steps=4)
    a_gpu = adapt_many(gpu, batch.support_x.cuda(), batch.support_y.cuda(), steps=4)
    close(predict_many(gpu, a_gpu, batch.query_x.cuda()), predict_many(cpu, a_cpu, batch.query_x))


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "anil", "mamlpp"])
def test_meta_gradient_cuda_equals_cpu_conv(algorithm):
    cpu = conv_learner(algorithm, steps=2)
    gpu = copy.deepcopy(cpu).cuda()
    batch = image_batch(tasks=4)
    r_cpu = cpu.meta_gradient(batch, strategy="loop")
    for strategy in ("auto", "loop", "vmap"):
        r_gpu = gpu.meta_gradient(to(batch, "cuda"), strategy=strategy)
        assert r_gpu.loss == pytest.approx(r_cpu.loss, rel=1e-4, abs=1e-5)
        for name, g in r_cpu.grads.items():
            close(r_gpu.grads[name], g, atol=5e-4, rtol=1e-3)


@pytest.mark.parametrize("algorithm", ["maml", "reptile", "tamaml"])
def test_meta_gradient_cuda_equals_cpu_mlp(algorithm):
    cpu = mlp_learner(algorithm)
    gpu = copy.deepcopy(cpu).cuda()
    batch = regression_batch()
    r_cpu = cpu.meta_gradient(batch)
    r_gpu = gpu.meta_gradient(to(batch, "cuda"))
    for name, g in r_cpu.grads.items():
        close(r_gpu.grads[name], g, atol=1e-4, rtol=1e-3)


def test_meta_step_trains_on_cuda():
    learner = conv_learner("maml", steps=1).cuda()
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    batch = to(image_batch(tasks=4), "cuda")
    first = learner.meta_step(batch, optimizer).loss
    for i in range(1, 20):
        last = learner.meta_step(batch, optimizer, iteration=i).loss
    assert all(p.device.type == "cuda" for p in learner.parameters())
    assert last < first


def test_checkpoint_loads_onto_cuda(tmp_path):
    from metalearn.checkpoint import load_checkpoint, save_checkpoint

    learner = conv_learner("anil")
    save_checkpoint(tmp_path / "m.safetensors", learner.cuda(), input_shape=(1, 28, 28), n_way=5)
    checkpoint = load_checkpoint(tmp_path / "m.safetensors", device="cuda")
    assert all(p.device.type == "cuda" for p in checkpoint.learner.parameters())
    for name, p in learner.state_dict().items():
        assert torch.equal(checkpoint.learner.state_dict()[name], p)


def test_redis_session_tensors_come_back_on_cuda():
    pytest.importorskip("redis")
    from service.redis_store import decode_tensors, encode_tensors

    tensors = {"head.weight": torch.randn(5, 64, device="cuda"), "bn": torch.randn(3, device="cuda")}
    back = decode_tensors(encode_tensors(tensors), device="cuda")
    for name, t in tensors.items():
        assert back[name].device.type == "cuda" and torch.equal(back[name], t)


# ---------------------------------------------------------------------------
# The service on a GPU: registry placement, the engine's batched adaptation
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from metalearn.checkpoint import save_checkpoint

    directory = tmp_path_factory.mktemp("models")
    for algorithm in ("maml", "anil"):
        save_checkpoint(directory / f"conv-{algorithm}.safetensors", conv_learner(algorithm), input_shape=(1, 28, 28), n_way=5)
    save_checkpoint(directory / "sine.safetensors", mlp_learner("maml"), input_shape=(1,))
    return directory


def test_registry_puts_models_on_cuda(model_dir):
    from service.registry import ModelRegistry

    registry = ModelRegistry.load(model_dir, "cuda")
    assert registry.names() == ["conv-anil", "conv-maml", "sine"] and not registry.errors
    for name in registry.names():
        model = registry.get(name)
        assert model.device == "cuda" and model.info()["device"] == "cuda"
        assert all(p.device.type == "cuda" for p in model.learner.parameters())


def test_settings_device_auto_resolves_to_cuda(monkeypatch):
    pytest.importorskip("pydantic_settings")
    from service.settings import Settings

    monkeypatch.delenv("METALEARN_DEVICE", raising=False)
    assert Settings().resolved_device() == "cuda"
    assert Settings(device="cuda").resolved_device() == "cuda"


def test_cpu_only_paths_stay_off_on_cuda(model_dir, monkeypatch):
    """Packed convolutions (oneDNN) and worker pinning are CPU paths: a GPU model's lone session predict
    computes with the plain constants, and a GPU service pins no worker."""
    pytest.importorskip("pydantic_settings")
    from service.engine import Engine
    from service.fastpath import FastFull
    from service.registry import ModelRegistry
    from service.settings import Settings

    model = ModelRegistry.load(model_dir, "cuda").get("conv-maml")
    assert not FastFull(model.learner).can_pack()
    key, _ = Engine()._session_inputs(model, False, lone_query=torch.rand(5, *model.input_shape))
    assert key == ("prepared", "cuda")
    monkeypatch.delenv("METALEARN_DEVICE", raising=False)
    assert Settings().resolved_worker_cpus() is None and Settings(device="cuda", pin_workers=True).resolved_worker_cpus() is None


@pytest.mark.parametrize("name", ["conv-maml", "conv-anil"])
def test_engine_on_cuda_equals_cpu(model_dir, name):
    """Batched adapt-and-predict on the GPU (vmap) gives the CPU's predictions; sessions from CPU tensors work."""
    from service.engine import Engine, Job
    from service.registry import ModelRegistry

    results = {}
    for device in ("cpu", "cuda"):
        model = ModelRegistry.load(model_dir, device).get(name)
        engine = Engine(max_batch_size=8, max_wait_ms=20.0)
        engine.start()
        try:
            # Three rounds of the same requests: on the GPU the worker captures CUDA graphs of the
            # batch shapes it sees twice and replays them; every round must give the same answers.
            rounds = []
            for _ in range(3):
                jobs = []
                for seed in range(8):
                    batch = image_batch(tasks=1, seed=seed)
                    jobs.append(Job("adapt", model, support_x=batch.support_x[0], support_y=batch.support_y[0],
                                    steps=5, lr=0.4, query_x=batch.query_x[0], keep_session=True))
                futures = [engine.submit_nowait(job) for job in jobs]
                adapted = [f.result(timeout=120) for f in futures]
                # session predictions from CPU copies of the session tensors (what the Redis store returns)
                predicted = []
                for seed, result in enumerate(adapted):
                    session = {n: t.cpu() for n, t in result["tensors"].items()}
                    query = image_batch(tasks=1, seed=seed).query_x[0]
                    predicted.append(engine.submit_nowait(Job("predict", model, query_x=query, session=session)))
                rounds.append((adapted, [f.result(timeout=120) for f in predicted]))
        finally:
            engine.stop()
        adapted, predicted = rounds[0]
        for later_adapted, later_predicted in rounds[1:]:
            for r_first, r_later in zip(adapted + predicted, later_adapted + later_predicted):
                close(torch.tensor(r_later["probabilities"]), torch.tensor(r_first["probabilities"]), atol=1e-4, rtol=1e-3)
        if device == "cuda":
            assert all(t.device.type == "cuda" for t in adapted[0]["tensors"].values())
            assert engine.graph_stats()["replays"] > 0 and engine.graph_stats()["failures"] == 0
        else:
            assert engine.graph_stats() == {"held": 0, "captures": 0, "replays": 0, "failures": 0}
        results[device] = (adapted, predicted)
    for (a_cpu, p_cpu), (a_gpu, p_gpu) in [(results["cpu"], results["cuda"])]:
        for r_cpu, r_gpu in zip(a_cpu + p_cpu, a_gpu + p_gpu):
            assert r_gpu["predictions"] == r_cpu["predictions"]
            close(torch.tensor(r_gpu["probabilities"]), torch.tensor(r_cpu["probabilities"]), atol=1e-4, rtol=1e-3)
        for r_cpu, r_gpu in zip(a_cpu, p_gpu):
            # a session prediction equals the adapt-and-predict of the same request
            close(torch.tensor(r_gpu["probabilities"]), torch.tensor(r_cpu["probabilities"]), atol=1e-4, rtol=1e-3)


def test_a_reload_on_cuda_frees_the_replaced_model_and_its_graphs(model_dir, tmp_path):
    """A reload while the worker replays CUDA graphs: the new version is loaded onto the GPU beside it (in
    another thread), the replaced model's graphs are dropped by the worker, and its GPU memory goes."""
    import gc
    import shutil
    import weakref

    from service.engine import Engine, Job
    from service.registry import ModelRegistry

    served_dir = shutil.copytree(model_dir, tmp_path / "served")
    registry = ModelRegistry.load(served_dir, "cuda")
    engine = Engine(max_batch_size=8, max_wait_ms=5.0)
    engine.start()
    try:
        def adapt(model):
            batch = image_batch(tasks=1, seed=0)
            job = Job("adapt", model, support_x=batch.support_x[0], support_y=batch.support_y[0], steps=5, lr=0.4, query_x=batch.query_x[0])
            return engine.submit_nowait(job).result(timeout=120)

        for _ in range(3):
            adapt(registry.get("conv-maml"))
        assert engine.graph_stats()["held"] > 0
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        shutil.copyfile(served_dir / "conv-anil.safetensors", served_dir / "conv-maml.safetensors")
        reloaded = ModelRegistry.load(served_dir, "cuda", previous=registry)
        assert reloaded.changes_from(registry)["updated"] == ["conv-maml"]
        replaced = weakref.ref(registry.get("conv-maml"))
        engine.serve_only(reloaded.models.values())
        registry = None
        assert adapt(reloaded.get("conv-maml"))["probabilities"]  # the new version, on the worker that dropped the old graphs
        gc.collect()
        assert replaced() is None
        assert engine.graph_stats()["failures"] == 0
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() <= before  # the old weights and graphs' memory went (the new model is as small)
    finally:
        engine.stop()
