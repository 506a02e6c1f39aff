"""Compare two kernel tables of bench_pretrain.py (``--profile N --kernel_table PATH``): where the time moved.

    python bench/compare_kernels.py bench_logs/pretrain_bf16_compile_graph_b64.kernels.json \
        bench_logs/pretrain_bf16_compile_graph_b64_merged.kernels.json

Prints one JSON line: the total milliseconds per step of each table, the time of each kernel family
(``bench_pretrain.KERNEL_GROUPS``) in both, and the kernels whose time changed the most (name, ms per
step and calls per step in each table; a kernel missing from one table counts 0 there; inductor's
kernels are matched without their per-compilation number).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pretrain import group_kernel_times  # noqa: E402


def kernel_key(name: str) -> str:
    """Inductor numbers its generated kernels per compilation (``triton_poi_fused_gelu_view_8``): without
    the number the same fusion matches across two runs."""
    return re.sub(r"^(triton_\w+?)_\d+$", r"\1", name)


def load_table(path: str) -> dict[str, dict]:
    """kernel key -> {ms, calls} per step of a kernel table file (kernels of one key summed); a clear
    error for anything else."""
    try:
        rows = json.loads(Path(path).read_text())["rows"]
        table: dict[str, dict] = {}
        for row in rows:
            entry = table.setdefault(kernel_key(row["name"]), {"ms": 0.0, "calls": 0.0})
            entry["ms"] += float(row["ms_per_step"])
            entry["calls"] += float(row["calls_per_step"])
        return table
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"{path}: not a kernel table of bench_pretrain.py --kernel_table ({error})") from None


def compare(before: dict[str, dict], after: dict[str, dict], top: int = 20) -> dict:
    groups_before = group_kernel_times({name: row["ms"] for name, row in before.items()})
    groups_after = group_kernel_times({name: row["ms"] for name, row in after.items()})
    families = sorted(set(groups_before) | set(groups_after),
                      key=lambda name: -max(groups_before.get(name, 0.0), groups_after.get(name, 0.0)))
    empty = {"ms": 0.0, "calls": 0.0}
    changes = []
    for name in set(before) | set(after):
        a, b = before.get(name, empty), after.get(name, empty)
        changes.append({"name": name[:120], "ms_before": round(a["ms"], 3), "ms_after": round(b["ms"], 3),
                        "delta_ms": round(b["ms"] - a["ms"], 3), "calls_before": a["calls"],
                        "calls_after": b["calls"]})
    changes.sort(key=lambda row: abs(row["delta_ms"]), reverse=True)
    return {
        "total_ms_before": round(sum(row["ms"] for row in before.values()), 2),
        "total_ms_after": round(sum(row["ms"] for row in after.values()), 2),
        "groups_ms": {name: [groups_before.get(name, 0.0), groups_after.get(name, 0.0)] for name in families},
        "largest_changes": changes[:top],
    }


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--top", type=int, default=20, help="kernels listed, by the size of their change")
    args = parser.parse_args(argv)
    result = compare(load_table(args.before), load_table(args.after), args.top)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
