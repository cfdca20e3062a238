"""The README's shell examples, run as written: docs that cannot drift.

Every ```bash block of README.md runs here, command by command, in a scratch folder that holds
what the examples name: ``jobs/`` (the project's), a synthetic tiny run in ``runs/tiny`` (three
random experts and their merge, ``selma_ray.testing.make_run``) and ``my_photos/`` (two images
with captions). The ``# `` lines under a command are what it prints: each must appear in its
output, in order, with ``...`` eliding and whitespace free; an ``error:`` line means the
command must fail. A block that is too slow or too remote for the suite is marked
``<!-- readme-test: skip: why -->`` above its fence; the test lists those, and a new one must
be added to ``SKIPPED_BY_DESIGN`` here, so a cheap example cannot be marked away unnoticed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARK = re.compile(r"^<!--\s*readme-test:\s*skip:\s*(?P<why>.+?)\s*-->$")
# The first command of every block the README marks as skipped, and why it may be.
SKIPPED_BY_DESIGN = {
    "make run": "the two commands (make run is the pipeline, make test this suite)",
    "python jobs/full_pipeline.py --config sd14 prompts.per_skill=200": "paper scale on GPUs",
    "tensorboard --logdir runs/tiny/experts": "benchmarks take minutes",
    "ray get-auth-token --generate": "AWS (twice: the overview and the cluster launcher)",
    "export RAY_AUTH_MODE=token": "the local-head route: tests/test_e2e.py runs it",
    "REGISTRY=$(aws sts get-caller-identity": "Docker and AWS",
    "eksctl create iamserviceaccount": "Kubernetes",
    "kubectl get rayjob selma-pipeline -w": "Kubernetes",
    "kubectl apply -k deploy/kuberay/serve": "Kubernetes",
    "curl -s http://127.0.0.1:8000/v1/adapters": "Serve answering: e2e and serve tests",
    "bash scripts/prepare_gpu_check.sh": "the GPU check: a CUDA machine (tests/test_gpu_check.py)",
}


@dataclass
class Example:
    line: int  # of the command in README.md
    command: str
    expected: list[str]

    @property
    def fails(self) -> bool:
        return bool(self.expected) and self.expected[0].startswith("error:")


@dataclass
class Block:
    line: int  # of the opening fence
    lines: list[str]
    skip: str | None

    def examples(self) -> list[Example]:
        out: list[Example] = []
        pending = ""
        for offset, raw in enumerate(self.lines, start=self.line + 1):
            text = raw.rstrip()
            if pending:  # a continued command
                pending += " " + text.strip().rstrip("\\").strip()
                if not text.endswith("\\"):
                    out[-1].command, pending = pending, ""
                continue
            if text.startswith("#"):
                if out:
                    out[-1].expected.append(text[1:].strip())
                continue
            if not text.strip():
                continue
            out.append(Example(offset, text.rstrip("\\").strip(), []))
            if text.endswith("\\"):
                pending = out[-1].command
        return out


def readme_blocks() -> list[Block]:
    blocks: list[Block] = []
    lines = README.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            mark = MARK.match(lines[i - 1].strip()) if i else None
            end = lines.index("```", i + 1)
            blocks.append(Block(i + 1, lines[i + 1 : end], mark["why"] if mark else None))
            i = end
        i += 1
    return blocks


def runnable() -> list[Example]:
    return [e for b in readme_blocks() if b.skip is None for e in b.examples()]


def normal(text: str) -> str:
    return " ".join(text.split())


def missing(expected: list[str], output: str) -> str | None:
    """The first expected fragment that the output lacks (in order), or None."""
    out, at = normal(output), 0
    for line in expected:
        for fragment in (normal(f) for f in line.split("...")):
            if not fragment:
                continue
            found = out.find(fragment, at)
            if found < 0:
                return fragment
            at = found + len(fragment)
    return None


def test_every_shell_block_runs_here_or_is_skipped_by_design():
    blocks = readme_blocks()
    assert len(blocks) >= 10, "README.md lost its shell examples"
    skipped = {b.examples()[0].command: b.skip for b in blocks if b.skip is not None}
    print("README examples skipped by design:")
    for command, why in skipped.items():
        print(f"  {command[:70]}: {why}")
        assert len(why) > 10, f"say why {command!r} is skipped"
    keys = set()
    for command in skipped:
        key = next((k for k in SKIPPED_BY_DESIGN if command.startswith(k)), None)
        assert key, f"README.md skips {command!r}: list it in SKIPPED_BY_DESIGN, or let it run"
        keys.add(key)
    assert keys == set(SKIPPED_BY_DESIGN), f"not skipped any more: {set(SKIPPED_BY_DESIGN) - keys}"
    assert len(runnable()) >= 8  # the --plan, bad-value, datasets and merge examples


def test_expected_output_is_matched_in_order_with_elisions():
    """The matcher itself can fail: a missing fragment, or fragments out of order."""
    got = "images:\n    generator: sd2 (native 768px, known hub id)\n  ! resizes"
    assert missing(["images:", "  generator: sd2 (native 768px, ...)", "! resizes"], got) is None
    assert missing(["generator: sd3"], got) == "generator: sd3"
    assert missing(["! resizes", "images:"], got) == "images:"
    block = Block(1, ["cmd a \\", "  --flag b", "# out ...", "cmd c"], None)
    assert [(e.command, e.expected) for e in block.examples()] == [
        ("cmd a --flag b", ["out ..."]),
        ("cmd c", []),
    ]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """What the examples name, in a scratch folder: the project's jobs, a synthetic tiny run,
    two captioned photos."""
    from selma_ray.testing import make_run, random_images

    root = tmp_path_factory.mktemp("readme")
    (root / "jobs").symlink_to(ROOT / "jobs")
    make_run(root / "runs" / "tiny", ["counting", "dense_detail", "everyday_scenes"])
    (root / "my_photos").mkdir()
    captions = ["two red apples on a table", "three cups in a row"]
    for i, (image, caption) in enumerate(zip(random_images(2, size=64), captions, strict=True)):
        image.save(root / "my_photos" / f"{i}.png")
        (root / "my_photos" / f"{i}.txt").write_text(caption)
    return root


@pytest.mark.parametrize(
    "example", runnable(), ids=lambda e: f"L{e.line}-{e.command.split(' --')[0][-30:]}"
)
def test_readme_example_runs_as_written(workdir, example):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        ["bash", "-c", example.command],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    where = f"README.md:{example.line}: {example.command}\n{output[-3000:]}"
    assert (done.returncode != 0) == example.fails, f"exit {done.returncode}: {where}"
    if example.fails:
        assert done.returncode == 2 or "error:" in output, where
    gap = missing(example.expected, output)
    assert gap is None, f"the output lacks {gap!r}: {where}"
    assert "Traceback" not in output, where


def test_the_stage_table_runs_in_the_pipelines_order_and_the_tiny_row_states_its_preset():
    """The numbered stage table follows the stage graph's run order (serve last), and the
    presets table's tiny row gives the tiny preset's own counts."""
    from selma_ray.config import load_config
    from selma_ray.pipeline import ORDER

    text = README.read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d) \| ([a-z ]+?) \|", text, flags=re.M)
    names = {"skill prompts": "prompts", "evaluate": "eval"}
    assert [int(n) for n, _ in rows] == list(range(1, len(ORDER) + 2))
    assert [names.get(s, s) for _, s in rows] == [*ORDER, "serve"]
    tiny = load_config("tiny")
    (row,) = [line for line in text.splitlines() if line.startswith("| `tiny` (default)")]
    assert f"{tiny.prompts.per_skill} prompts/skill" in row
    assert f"{tiny.images.steps} sampling steps per image" in row
    assert f"{tiny.experts.max_steps} training steps per expert" in row
