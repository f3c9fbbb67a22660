"""Tables more than one command prints."""

from __future__ import annotations

from rich.table import Table


def retrieval_table(title: str, rows: list[tuple[str, dict[str, float], float | None]]) -> Table:
    """The retrieval suite side by side: one column per feature set (name, scores, linear probe or None).

    Scores are rows, so four feature sets fit an 80-column terminal or log.
    """
    from pipeline.evaluate.retrieval import SCORE_LABELS

    table = Table(title=title)
    table.add_column("score")
    for name, _, _ in rows:
        table.add_column(name, justify="right")
    for key, label in SCORE_LABELS.items():
        table.add_row(label, *(f"{scores[key]:.2%}" for _, scores, _ in rows))
    if any(linear is not None for _, _, linear in rows):
        table.add_row("linear probe", *("—" if linear is None else f"{linear:.2%}" for _, _, linear in rows))
    return table
