"""Plot `scripts/bench --curves` results: python bench_plot.py RESULTS.json OUT.png

Runs in the bench's own tools environment (matplotlib is not a dependency of the project).
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {"ours": "C0", "s5cmd-cp": "C1", "pigz-s5cmd": "C2", "pigz-rclone": "C3", "original": "C4"}
LABELS = {
    "ours": "ours (directory)",
    "s5cmd-cp": "s5cmd cp (prebuilt archive)",
    "pigz-s5cmd": "tar | pigz -1 | s5cmd pipe",
    "pigz-rclone": "tar | pigz -1 | rclone rcat",
    "original": "original",
}


def main(results: str, out: str) -> None:
    with open(results) as f:
        report = json.load(f)
    curves = {name: (curve, x) for name, curve, x in report["datasets"]}
    panels = [("size", "model directory, GiB", "GiB/s"), ("files", "files (1 GiB in all)", "GiB/s")]
    extra = 1 if report.get("many") else 0
    fig, axes = plt.subplots(1, len(panels) + extra, figsize=(5 * (len(panels) + extra), 4))
    for ax, (curve, xlabel, ylabel) in zip(axes, panels, strict=False):
        series: dict[str, list[tuple[float, float]]] = {}
        for row in report["rows"]:
            kind, x = curves.get(row["dataset"], ("", 0))
            if kind == curve:
                series.setdefault(row["contender"], []).append((x, row["input_mib"] / 1024 / row["median_wall_s"]))
        for contender, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=LABELS.get(contender, contender))
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{ylabel} of input (higher is better)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    if extra:
        ax = axes[-1]
        rows = [r for r in report["many"] if r["registrars"] == 1]
        ax.plot([r["uploads"] for r in rows], [r["peak_rss_mib"] for r in rows], marker="o", label="peak RSS, MiB")
        ax.axhline(rows[0]["budget_mib"] + 150, linestyle="--", color="grey", label="budget + 150 MiB")
        ax.set_xscale("log")
        ax.set_xlabel("64 MiB uploads at once, one registrar")
        ax.set_ylabel("MiB")
        twin = ax.twinx()
        twin.plot([r["uploads"] for r in rows], [r["gib_per_s"] for r in rows], marker="s", color="C5", label="GiB/s")
        twin.set_ylabel("GiB/s")
        ax.legend(fontsize=7, loc="upper left")
        twin.legend(fontsize=7, loc="lower right")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
