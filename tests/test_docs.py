"""The documentation stays true to the code: every service setting is in the README's table, and every
relative link in the README and ``docs/`` reaches a file (and, with ``#anchor``, one of its headings)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(markdown: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than ``-`` and ``_`` dropped, spaces to ``-``."""
    found = set()
    for line in markdown.read_text().splitlines():
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            found.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return found


def test_every_setting_is_in_the_readme_table():
    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `METALEARN_")]
    documented = set(re.findall(r"`METALEARN_([A-Z0-9_]+)`", "\n".join(rows)))
    assert documented, "the README's settings table was not found"
    assert {name.upper() for name in Settings.model_fields} - documented == set()
    assert documented - {name.upper() for name in Settings.model_fields} == set()  # no row for a setting that is gone


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_relative_links_reach_their_target(document):
    for target in LINK.findall(document.read_text()):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        assert linked.exists(), f"{document.name}: link to missing {path}"
        if anchor:
            assert anchor in anchors(linked), f"{document.name}: no heading #{anchor} in {linked.name}"


def test_the_readme_library_example_runs():
    """The README's first example, as a newcomer pastes it, with 2 meta-steps of 4 tasks instead of 1000 of 32."""
    example = re.search(r"## The library\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    shortened = example.replace("range(1000)", "range(2)").replace(".sample(32,", ".sample(4,")
    assert shortened.count("range(2)") == 1 and shortened.count(".sample(4,") == 1, "the example changed: update this test"
    namespace: dict = {}
    exec(compile(shortened, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (75, 5)  # 5-way, 15 queries per class
    assert math.isfinite(namespace["result"].loss) and 0.0 <= namespace["result"].accuracy <= 1.0


def test_the_readme_own_model_example_runs(tmp_path):
    """The "Your own model" example registers its class, whose instances then checkpoint and load again."""
    from metalearn import MetaConfig, MetaLearner
    from metalearn.checkpoint import load_checkpoint, save_checkpoint

    section = (ROOT / "README.md").read_text().split("### Your own model", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(example, "README.md", "exec"), namespace)
    model = namespace["model"]
    assert model.spec == {"arch": "my-cnn", "in_channels": 1, "out_features": 5, "width": 8}
    learner = MetaLearner(model, MetaConfig("maml", inner_steps=1))
    save_checkpoint(tmp_path / "mine.safetensors", learner, input_shape=(1, 28, 28), n_way=5)
    loaded = load_checkpoint(tmp_path / "mine.safetensors").learner
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(loaded.model(x), learner.model(x))


def test_the_readme_loss_example_runs():
    """The example of a loss of one's own: registered, named by the config, used by a meta-step."""
    import torch.nn.functional as F

    from metalearn.data.tasks import TaskBatch

    section = (ROOT / "README.md").read_text().split("the config names one of yours:", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {"__name__": "readme_loss_example"}
    exec(compile(example, "README.md", "exec"), namespace)
    learner = namespace["learner"]
    assert learner.config.loss == "smoothed"
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 10, 1, 28, 28, generator=g), torch.arange(5).repeat(2).expand(2, -1)
    result = learner.meta_gradient(TaskBatch(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:]))
    assert math.isfinite(result.loss)
    confident, label = torch.tensor([[9.0, -9.0]]), torch.tensor([0])  # (smoothing keeps the loss above cross-entropy's)
    assert namespace["smoothed"](confident, label) > F.cross_entropy(confident, label) + 0.01
