"""The paper's comparisons as experiments: arms that the same stages, lineage and storage run.

An experiment (``table1``, ``table2``, ``table4``, ``figure1``) is a list of **arms**, each a
named adapter of a **data run**: a run directory that the ordinary pipeline fills. Arms on the
same data share its prompts, images and experts, which lineage computes once: ``table4`` adds a
joint LoRA (``experts.joint``) and a subset merge (``merge.subsets``) to the run in
``run.dir``, so its experts and images are those of the plain run. Only ``figure1`` needs other
data (real pairs, and real captions rendered by the generator), each in its own data run under
``<run.dir>/data/<source>``.

    python jobs/full_pipeline.py --config sd2 --experiment table4 [--plan]

writes ``<run.dir>/experiment/<name>/results.json``, ``results.md`` and ``report.html``: one
row per arm with the paper's columns and 95% CIs, and the paper's figure for that setting
beside it where ``paper_numbers.yaml`` has one.
"""

from __future__ import annotations

NAMES = ("table1", "table2", "table4", "figure1")
