"""The architecture, enforced: one subpackage per SELMA stage, and no stage imports another.

The pipeline owns the graph between stages; what they share lives in ``config``, ``core``,
``models``, ``text``, ``diffusion`` and ``lora`` (the merge maths and adapter reading that the
merge stage and serving's on-demand merges both use). The product never imports the test
helpers.
"""

from __future__ import annotations

import itertools

import grimp
import pytest

STAGES = ["prompts", "images", "experts", "merge", "eval", "serving"]
SHARED = ["config", "core", "models", "text", "diffusion", "lora"]


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("selma_ray", include_external_packages=False)


def test_every_stage_and_shared_package_exists(graph):
    for name in STAGES + SHARED:
        assert f"selma_ray.{name}" in graph.modules, f"selma_ray.{name} is missing"
    for stage in ["prompts", "images", "experts", "merge", "eval"]:
        assert f"selma_ray.{stage}.stage" in graph.modules  # its Ray-facing entry point


@pytest.mark.parametrize(("importer", "imported"), list(itertools.permutations(STAGES, 2)))
def test_no_stage_imports_another_stage(graph, importer, imported):
    chains = graph.find_shortest_chains(
        importer=f"selma_ray.{importer}", imported=f"selma_ray.{imported}", as_packages=True
    )
    direct = [c for c in chains if len(c) == 2]
    assert not direct, f"stage {importer} imports stage {imported}: {sorted(direct)}"


@pytest.mark.parametrize("shared", SHARED)
def test_shared_packages_import_no_stage_logic(graph, shared):
    """Shared code may read a stage package's name registry (its light ``__init__``), never
    its modules."""
    for stage in STAGES:
        for module in graph.find_children(f"selma_ray.{stage}"):
            chains = graph.find_shortest_chains(
                importer=f"selma_ray.{shared}", imported=module, as_packages=True
            )
            assert not [c for c in chains if len(c) == 2], f"{shared} imports {module}"


def test_the_product_never_imports_the_test_helpers(graph):
    importers = graph.find_modules_that_directly_import("selma_ray.testing")
    assert importers == set(), f"product modules import selma_ray.testing: {sorted(importers)}"


def test_shared_pieces_import_without_ray():
    """The training recipe, the LoRA merge maths and files and the diffusion engine load on a
    machine with no Ray (the GPU check runs there)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class NoRay:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ImportError('ray is blocked in this check')\n"
        "sys.meta_path.insert(0, NoRay())\n"
        "import selma_ray.lora.methods, selma_ray.lora.files, selma_ray.diffusion.engine\n"
        "import selma_ray.experts.recipe\n"
        "import selma_ray.config, selma_ray.core.lineage\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_readme_architecture_picture_is_generated_from_the_stage_graph():
    from pathlib import Path

    from selma_ray.pipeline import graph_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start, end = "<!-- graph:start -->\n", "\n<!-- graph:end -->"
    if start not in readme or end not in readme:
        pytest.fail("README.md lost its generated architecture picture markers")
    shown = readme.split(start, 1)[1].split(end, 1)[0]
    assert shown == graph_markdown(), (
        "README's picture is stale: paste selma_ray.pipeline.graph_markdown() between the markers"
    )
