"""Training curves from ``metrics.jsonl``: did the run converge, and how do recipes compare?

Six panels: loss, learning rate, momentum (by step), kNN top-1 (by epoch, from
the monitor's lines), and the mean similarities the objective sees — the
positive pair, all queue negatives, and the selected hard negatives. Several
runs share one figure, one colour per run, so two recipes read side by side.
Lines that are not JSON (a run killed mid-write) are skipped, not fatal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from artifacts.run_folder import CURVES_FILE, METRICS_FILE, RunFolder
from pipeline.pictures.figures import new_figure, save_png

__all__ = ["CURVES_FILE", "METRICS_FILE", "RunMetrics", "draw_curves", "read_metrics"]

SIMILARITIES = {
    "positive_similarity": ("positive", "-"),
    "negative_similarity": ("all negatives", "--"),
    "selected_negative_similarity": ("selected negatives", ":"),
}


@dataclass
class RunMetrics:
    """One run's logged series: step lines (name → [(step, value)]) and kNN top-1 per epoch."""

    name: str
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    knn: list[tuple[int, float]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.series and not self.knn


def read_metrics(run_dir: Path) -> RunMetrics:
    """The series of ``run_dir/metrics.jsonl`` (a clear error when the run has logged nothing yet)."""
    records = RunFolder(run_dir).metric_records()
    resolved = Path(run_dir).resolve()
    metrics = RunMetrics(f"{resolved.parent.name}/{resolved.name}")  # flows name every run folder "run"
    for record in records:
        if "knn_top1" in record:
            metrics.knn.append((int(record.get("epoch", 0)) + 1, 100 * float(record["knn_top1"])))
            continue
        for name, value in record.items():
            if name not in ("step", "epoch") and isinstance(value, int | float) and not isinstance(value, bool):
                metrics.series.setdefault(name, []).append((record["step"], float(value)))
    return metrics


def draw_curves(runs: list[Path], path: Path) -> Path:
    """Draw the curves of ``runs`` (one or more run folders) to the PNG ``path``."""
    metrics = [read_metrics(run) for run in runs]
    if all(run.empty for run in metrics):
        raise ValueError(f"no metrics logged yet in {', '.join(str(run) for run in runs)}")
    figure = new_figure(13, 7)
    figure.suptitle("training: " + ", ".join(run.name for run in metrics))
    (loss, lr, momentum), (knn, similarity, legend) = figure.subplots(2, 3)
    colours = [f"C{index % 10}" for index in range(len(metrics))]
    for run, colour in zip(metrics, colours, strict=True):
        _plot(loss, run.series.get("loss"), colour, run.name)
        _plot(lr, run.series.get("lr"), colour, run.name)
        _plot(momentum, run.series.get("momentum"), colour, run.name)
        _plot(knn, run.knn, colour, run.name, marker="o")
        for name, (label, style) in SIMILARITIES.items():
            _plot(similarity, run.series.get(name), colour, f"{run.name}: {label}", style=style)
    for axis, title, xlabel in (
        (loss, "loss", "step"),
        (lr, "learning rate", "step"),
        (momentum, "key encoder momentum", "step"),
        (knn, "kNN top-1 (%)", "epoch"),
        (similarity, "mean cosine similarity", "step"),
    ):
        axis.set_title(title, fontsize=10)
        axis.set_xlabel(xlabel, fontsize=9)
        axis.grid(alpha=0.3)
        if not axis.lines:
            axis.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axis.transAxes, color="0.5")
    legend.set_axis_off()
    legend.legend(handles=_legend_handles(metrics, colours), loc="center", fontsize=9, frameon=False)
    return save_png(figure, path)


def _legend_handles(metrics: list[RunMetrics], colours: list[str]) -> list:
    """The runs by colour (when there are several) and the similarities by line style."""
    from matplotlib.lines import Line2D

    runs = [Line2D([], [], color=colour, label=run.name) for run, colour in zip(metrics, colours, strict=True)]
    styles = [Line2D([], [], color="0.3", linestyle=style, label=label) for label, style in SIMILARITIES.values()]
    return (runs if len(metrics) > 1 else []) + styles


def _plot(axis, points, colour: str, label: str, *, style: str = "-", marker: str = "") -> None:
    if points:
        steps, values = zip(*points, strict=True)
        axis.plot(steps, values, style, color=colour, marker=marker, markersize=3, linewidth=1.2, label=label)
