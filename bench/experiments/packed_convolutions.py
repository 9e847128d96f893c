"""A lone MAML session predict with packed convolutions (``FastFull.pack``) against the plain constants, in process.

    python bench/experiments/packed_convolutions.py

Conv4-64 5-way MAML, 5 query images, one torch thread, medians of 300 calls,
interleaved:

- the engine's computation of a lone session predict (``Engine._compute``, traced
  as served): with the session's constants (``FastFull.prepare``: each block
  ``relu(max_pool(scale * conv(h, W) + shift))``, the first block fused from
  window columns), with them packed in the blocks the kernel measures faster
  packed here (``FastFull.packed_blocks``, as the service decides), and packed
  in every block (``FastFull.pack``: ``scale`` folded into each conv weight, in
  oneDNN's own layout, every block one convolution, then the max-pool and the
  ReLU);
- the blocks alone: the first block both ways, and each 64-channel convolution
  with its map, ReLU and pool both ways;
- what packing costs once per session (time and bytes), and the largest
  difference between the two ways' logits.

Over HTTP, a lone client's session predicts (``latency_split.py``-style,
interleaved against the commit before): client p50 1.10 against 1.28 ms.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from engine_graphs import demo_registry, jobs_for, median_us  # noqa: E402

import metalearn  # noqa: E402
from service.engine import Engine, adaptation_from_tensors  # noqa: E402
from service.fastpath import FastFull, _grouped_layout, _inputs, packed_block  # noqa: E402
from metalearn.first_block import pooled_product  # noqa: E402


def main() -> None:
    metalearn.keep_freed_memory()  # as the service does
    torch.set_num_threads(1)
    # A copy of the model per way, each with its own engine (an engine keeps its kernel and traces per model).
    models = {name: demo_registry(["maml"], "cpu").get("maml") for name in ("plain", "measured", "packed")}
    engines = {name: Engine(threads=1, cpu_traces=24, cpu_scripts=0) for name in models}
    fast = engines["packed"]._fast(models["packed"])
    every_block = frozenset(range(len(fast.blocks)))
    engines["plain"]._fast(models["plain"]).packed_blocks = lambda query_x: frozenset()  # the plain constants
    fast.packed_blocks = lambda query_x: every_block  # every block packed, whichever measures faster here
    measured = engines["measured"]._fast(models["measured"]).packed_blocks(torch.rand(5, 1, 28, 28))  # as the service decides
    print(f"# blocks measured faster packed here: {sorted(measured) or 'none'}")
    with torch.no_grad():
        tensors = engines["packed"]._compute(jobs_for(models["packed"], 1, "adapt", seed=1))[0]["tensors"]
        jobs = {name: jobs_for(model, 1, "session", seed=2, sessions=[tensors]) for name, model in models.items()}
        for name, engine in engines.items():
            for _ in range(5):  # eager use, trace, first replays
                engine._compute(jobs[name])
            assert engine.trace_stats()["replays"] > 0 and engine.trace_stats()["failures"] == 0
        assert engines["plain"]._compute(jobs["plain"])[0]["predictions"] == engines["packed"]._compute(jobs["packed"])[0]["predictions"] == engines["measured"]._compute(jobs["measured"])[0]["predictions"]
        print("# a lone MAML session predict (Conv4-64, 5 queries), engine computation, median of 300 calls")
        times = {name: [] for name in engines}
        for rep in range(4):
            for name in engines if rep % 2 == 0 else reversed(list(engines)):
                times[name].append(median_us(lambda: engines[name]._compute(jobs[name])))
        print("  ".join(f"{name} constants: " + ", ".join(f"{us:.0f}" for us in us_list) + " us" for name, us_list in times.items()))

        views = {n: t.unsqueeze(0) for n, t in tensors.items()}
        prepared = fast.prepare(adaptation_from_tensors(views))
        packs = fast.pack(prepared)
        query_x = torch.rand(1, 5, 1, 28, 28)
        difference = (fast.predict_prepared(prepared, query_x) - fast.predict_prepared(packs, query_x)).abs().max().item()
        packed_bytes = sum(t.numel() * t.element_size() for t in packs.values() if t.is_mkldnn)
        print(f"# packing a session: {median_us(lambda: fast.pack(prepared)):.0f} us once (after prepare: "
              f"{median_us(lambda: fast.prepare(adaptation_from_tensors(views))):.0f} us), {packed_bytes / 1024:.0f} KB "
              f"of packed weights for a session of {sum(t.numel() * t.element_size() for t in tensors.values()) / 1024:.0f} KB; "
              f"largest logit difference {difference:.1e}")

        blocks(fast, prepared, packs, query_x)


def blocks(fast: FastFull, prepared: dict, packs: dict, query_x: torch.Tensor) -> None:
    """Each block both ways on the same input."""
    (conv, conv_name, _, bn_name), rest = fast.blocks[0], fast.blocks[1:]
    columns = _inputs(fast.blocks, query_x)

    def fused_first():
        pooled = pooled_product(prepared[conv_name + ".weight"].flatten(-3), columns, channels_last=True)
        h = torch.addcmul(prepared[bn_name + ".shift"].unsqueeze(1), pooled, prepared[bn_name + ".scale"].unsqueeze(1)).relu_()
        return _grouped_layout(h.unflatten(1, (columns.images, columns.pooled_h, columns.pooled_w)))

    images = query_x[0].contiguous(memory_format=torch.channels_last)

    def packed_first():
        return packed_block(conv, images, packs[conv_name + ".packed"], packs[bn_name + ".shift"])

    assert torch.allclose(fused_first(), packed_first(), atol=1e-5)
    print(f"# first block, 5 images: fused from window columns {median_us(lambda: (_inputs(fast.blocks, query_x), fused_first())):.0f} us, "
          f"packed convolution and pool {median_us(packed_first):.0f} us")
    h = packed_first()
    for conv, conv_name, _, bn_name in rest:
        weight, scale, shift = (prepared[conv_name + ".weight"][0], *(prepared[bn_name + part].view(-1, 1, 1) for part in (".scale", ".shift")))
        dense = median_us(lambda: torch.relu(F.max_pool2d(torch.addcmul(shift, F.conv2d(h, weight, None, conv.stride, conv.padding, conv.dilation), scale), 2)))
        packed = median_us(lambda: packed_block(conv, h, packs[conv_name + ".packed"], packs[bn_name + ".shift"]))
        # one weight reordered per call, but scale folded: what packing alone buys
        folded = (weight * scale.view(-1, 1, 1, 1)).contiguous(memory_format=torch.channels_last)
        unpacked = median_us(lambda: packed_block(conv, h, folded, packs[bn_name + ".shift"]))
        print(f"# {conv_name}, {tuple(h.shape)}: conv, map, pool, ReLU {dense:.0f} us; folded {unpacked:.0f} us; "
              f"and packed {packed:.0f} us")
        h = packed_block(conv, h, packs[conv_name + ".packed"], packs[bn_name + ".shift"])


if __name__ == "__main__":
    main()
