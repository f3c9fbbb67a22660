"""Tables more than one command prints."""

from __future__ import annotations

from rich.table import Table


def retrieval_table(title: str, rows: list[tuple[str, dict[str, float], float | None]]) -> Table:
    """The retrieval suite side by side: one row per feature set (name, scores, linear probe or None).

    Scores are short-headed columns in %, so six feature sets and the probe fit an 80-column terminal or log.
    """
    from pipeline.evaluate.retrieval import SCORE_HEADERS

    probe = any(linear is not None for _, _, linear in rows)
    table = Table(
        title=f"{title} (%)",
        caption="kNN-200: weighted kNN-200 (τ 0.1) · P@10: precision@10" + (" · linear: linear probe" if probe else ""),
    )
    table.add_column("features", no_wrap=True)
    for header in [*SCORE_HEADERS.values(), *(["linear"] if probe else [])]:
        table.add_column(header, justify="right", no_wrap=True)
    for name, scores, linear in rows:
        values = [f"{scores[key]:.2%}".removesuffix("%") for key in SCORE_HEADERS]
        if probe:
            values.append("—" if linear is None else f"{linear:.2%}".removesuffix("%"))
        table.add_row(name, *values)
    return table


def view_recall_table(title: str, rows: list[tuple[str, dict[str, float]]]) -> Table:
    """Label-free scores side by side: recall@k of each picture's original from its altered views, in %.

    The table is narrow, so the title is short; say what was searched in a line above it."""
    table = Table(title=f"{title} (%)", caption="recall@k: original in the top k")
    table.add_column("features", no_wrap=True)
    headers = list(rows[0][1]) if rows else []
    for header in headers:
        table.add_column(header, justify="right", no_wrap=True)
    for name, scores in rows:
        table.add_row(name, *[f"{scores[header]:.2%}".removesuffix("%") for header in headers])
    return table
