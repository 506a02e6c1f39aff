"""One line per demo task: the metric of its best epoch, read from each script's ``log.txt``.

Used by ``run_demo.sh`` (retrieval) and ``tools/run_demo_tasks.sh`` (the other tasks); also usable
on any output folder laid out as ``<out>/{retrieval,ve,vqa,nlvr,grounding}/log.txt``. With ``--check``
it exits with status 1 when a task's best epoch is below its floor (``FLOORS``): far above chance and
below what the demo measures (docs/demo.md), so a demo that stopped learning fails loudly.

Example: python tools/demo_summary.py output/demo --check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

# task folder -> (metric that picks the best epoch, metrics printed, chance level as text)
TASKS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "retrieval": ("val_r_mean", tuple(f"test_{side}_r{k}" for side in ("txt", "img") for k in (1, 5, 10)),
                  "R@1 2.0 both ways: 50 test images, 5 captions each"),
    "ve": ("val_acc", ("val_acc", "test_acc"), "0.33"),
    "vqa": ("test_vqa_acc", ("test_vqa_acc",), "below 15: always the most frequent answer"),
    "nlvr": ("val_acc", ("val_acc", "test_acc"), "0.50"),
    "grounding": ("val_d", ("val_d", "testA_d", "testB_d"), "random proposal ~0.22"),
}

# task -> {metric: lowest accepted value}, far above chance and below the demo's results on 2 CPU cores
# (docs/demo.md: retrieval R@1 64-66 / 74, VE 0.76 / 0.83, VQA 39-46, NLVR 0.8, grounding 0.6).
FLOORS: dict[str, dict[str, float]] = {
    "retrieval": {"test_txt_r1": 30.0, "test_img_r1": 30.0},  # chance 2.0
    "ve": {"val_acc": 0.6, "test_acc": 0.6},  # chance 1/3
    "vqa": {"test_vqa_acc": 25.0},  # the most frequent answer: 8.9
    "nlvr": {"val_acc": 0.7, "test_acc": 0.7},  # chance 1/2
    "grounding": {"val_d": 0.45, "testA_d": 0.45, "testB_d": 0.45},  # a random proposal: ~0.22
}


def read_records(log_path: str) -> list[dict]:
    """The JSON lines of a ``log.txt`` (other lines, e.g. 'best epoch: 3', are skipped)."""
    with open(log_path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.startswith("{")]


def best_record(records: list[dict], metric: str) -> dict:
    """The first record with the highest ``metric`` (values may be strings, as VE/NLVR log them);
    records without the metric are ignored."""
    scored = [r for r in records if metric in r]
    if not scored:
        raise ValueError(f"no epoch logged '{metric}'")
    return max(scored, key=lambda r: float(r[metric]))


def summarize(out_dir: str, tasks: Optional[Sequence[str]] = None) -> dict[str, dict]:
    """{task: {'epoch': ..., metric: value, ...}} for every task whose ``<out_dir>/<task>/log.txt``
    exists (all of ``TASKS`` when ``tasks`` is None; a named task without a log is an error)."""
    summary: dict[str, dict] = {}
    for task in tasks or TASKS:
        if task not in TASKS:
            raise ValueError(f"unknown demo task '{task}'; known: {', '.join(TASKS)}")
        log_path = os.path.join(out_dir, task, "log.txt")
        if not os.path.isfile(log_path):
            if tasks:
                raise FileNotFoundError(f"{log_path} not found: run the {task} demo first")
            continue
        select, shown, _ = TASKS[task]
        try:
            best = best_record(read_records(log_path), select)
        except ValueError as error:
            raise ValueError(f"{log_path}: {error}") from None
        summary[task] = {"epoch": best.get("epoch"), **{name: float(best[name]) for name in shown}}
    return summary


def format_summary(summary: dict[str, dict]) -> str:
    lines = []
    for task, values in summary.items():
        metrics = "  ".join(f"{name} {value:.4g}" for name, value in values.items() if name != "epoch")
        lines.append(f"[demo] {task:<9} epoch {values['epoch']}: {metrics}  (chance {TASKS[task][2]})")
    return "\n".join(lines)


def below_floors(summary: dict[str, dict]) -> list[str]:
    """'<task> <metric> <value> < <floor>' for every summarised metric under its ``FLOORS`` entry."""
    return [f"{task} {metric} {values[metric]:.4g} < {floor:g}"
            for task, values in summary.items() for metric, floor in FLOORS[task].items()
            if values[metric] < floor]


def main(argv: Optional[Sequence[str]] = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="the demo output folder (run_demo.sh: output/demo)")
    parser.add_argument("--tasks", nargs="*", default=None, help=f"subset of {', '.join(TASKS)}")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 if a metric is below its floor (far above chance)")
    args = parser.parse_args(argv)
    summary = summarize(args.out_dir, args.tasks)
    if not summary:
        sys.exit(f"no demo task logs under {args.out_dir}")
    print(format_summary(summary))
    failures = below_floors(summary) if args.check else []
    if failures:
        sys.exit("[demo] below the floor of the default demo settings (it did not learn as it should): "
                 + "; ".join(failures))
    return summary


if __name__ == "__main__":
    main()
