"""metalearn.keep_freed_memory: freed tensor memory is reused without page faults (glibc)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from metalearn.allocator import is_glibc

# Each round writes six 16 MB tensors and frees them, as a training step does with its activations.
SCRIPT = """
import resource, sys, torch
import metalearn
applied = metalearn.keep_freed_memory() if sys.argv[1] == "keep" else False
def rounds(n):
    for _ in range(n):
        tensors = [torch.ones(4 << 20) for _ in range(6)]
        del tensors
rounds(2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(5)
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""

glibc_only = pytest.mark.skipif(not is_glibc(), reason="glibc's mallopt")


def faults_per_round(mode: str, **env: str) -> tuple[str, float]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("GLIBC_TUNABLES", "MALLOC_"))}
    environment.update(env)
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, env=environment, timeout=120)
    applied, faults = out.stdout.split()
    return applied, float(faults)


@glibc_only
def test_freed_memory_is_reused_without_page_faults():
    # How much glibc gives back differs from process to process (what else lies on the heap,
    # thread timing): compare totals over three processes per mode.
    kept = [faults_per_round("keep") for _ in range(3)]
    default = [faults_per_round("default")[1] for _ in range(3)]
    assert all(applied == "True" for applied, _ in kept)
    kept_total = sum(faults for _, faults in kept)
    # 96 MB per round is 24576 pages; glibc's defaults mostly trim them off the heap when they are freed.
    assert sum(default) > 15000, f"the default allocator already reuses the memory ({default} faults per round): the test no longer shows anything"
    assert kept_total < sum(default) / 5, (kept, default)


@glibc_only
def test_an_explicit_environment_setting_wins():
    applied, _ = faults_per_round("keep", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")
    assert applied == "False"
    applied, _ = faults_per_round("keep", MALLOC_MMAP_THRESHOLD_="131072")
    assert applied == "False"


def test_other_devices_leave_the_allocator_alone():
    script = "import metalearn; print(metalearn.keep_freed_memory('cuda'), metalearn.allocator._applied)"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["False", "None"]
