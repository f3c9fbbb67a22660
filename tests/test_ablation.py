"""`benchmarks/ablation.py`'s bookkeeping: runs accumulate across sessions, budgets become steps, tables add up."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import ablation  # benchmarks/ is a folder of scripts, not a package


def run(variant: str, seed: int, knn: float, minutes: float = 15.0, overrides: list[str] | None = None) -> dict:
    scores = dict.fromkeys(ablation.COLUMNS, knn)
    return {"kind": "run", "variant": variant, "seed": seed, "minutes": minutes, "overrides": overrides or [],
            "steps": 1000 + seed, **scores}  # fmt: skip


def test_a_run_is_done_only_for_its_variant_seed_budget_and_overrides():
    args = ablation.parse_args(["--train", "t", "--test", "e", "--minutes", "15"])
    records = [run("+ plain key BN", 0, 0.9), run("+ plain key BN", 1, 0.9, minutes=3)]
    assert ablation.is_done(records, "+ plain key BN", 0, args)
    assert not ablation.is_done(records, "+ plain key BN", 1, args)  # another budget
    assert not ablation.is_done(records, "+ mild gray augmentation", 0, args)
    other = ablation.parse_args(["--train", "t", "--test", "e", "--set", "model.width=0.5"])
    assert not ablation.is_done(records, "+ plain key BN", 0, other)  # other overrides: another experiment


def test_a_budget_buys_the_steps_of_the_calibrated_pace():
    pace = {"kind": "pace", "variant": "v", "overrides": [], "images_per_s": 423.0, "batch": 64}
    assert ablation.budget_steps(pace, 15) == round(900 * 423 / 64)  # 5,948
    assert ablation.known_pace([pace], "v", []) is pace
    assert ablation.known_pace([pace], "v", ["augment.rotation=5"]) is None


def test_the_table_has_mean_and_sample_spread_per_variant(tmp_path):
    path = tmp_path / "runs.jsonl"
    for record in (run("preset (band negatives)", 0, 0.88), run("preset (band negatives)", 1, 0.90)):
        ablation.append_result(path, record)
    records = ablation.read_results(path)
    table = ablation.summarise(records)
    row = table["preset (band negatives)"]
    assert row["seeds"] == "2" and row["steps"] == "1,000"  # mean of 1,000 and 1,001, rounded
    assert row["nn1"] == "89.00 ± 1.41"  # sample std of 88 and 90
    assert "MoCo v2 (no enhancement)" not in table  # no runs, no row
    lines = ablation.markdown(table, 15).splitlines()
    assert lines[0].startswith("| variant (15 min each) | seeds | steps | kNN-200")
    assert len(lines) == 3 and lines[2].count("|") == lines[0].count("|")
    assert json.loads(path.read_text().splitlines()[0])["seed"] == 0


def test_training_needs_its_shards_and_a_report_needs_its_file(capsys):
    with pytest.raises(SystemExit):
        ablation.parse_args(["--minutes", "15"])
    assert "--train and --test" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablation.parse_args(["--report"])
    assert "--report reads --results" in capsys.readouterr().err


def test_a_variant_moves_the_preset_only_beyond_the_seeds_spread_on_most_retrieval_scores_and_worse_on_none():
    preset, moco = "preset (band negatives)", "MoCo v2 (no enhancement)"
    multi, mild = "+ multi-crop (2 × 16 px)", "+ mild gray augmentation"
    runs = [run(preset, 0, 0.880), run(preset, 1, 0.884), run(preset, 2, 0.882)]  # range 0.4 points
    runs += [run(multi, 0, 0.892), run(multi, 1, 0.890), run(multi, 2, 0.891)]  # +0.9 points: beyond both ranges
    runs += [run(mild, 0, 0.878), run(mild, 1, 0.892), run(mild, 2, 0.885)]  # +0.3 points, range 1.4: within
    runs += [run(moco, 0, 0.899)]  # one seed decides nothing, however far ahead
    verdicts = ablation.against_preset(runs)
    assert verdicts[multi]["nn1"] == {"difference": 0.9, "spread": 0.4, "beyond": True, "better": True, "seeds": 3}
    assert verdicts[mild]["nn1"]["beyond"] is False and verdicts[moco]["nn1"]["beyond"] is False
    assert ablation.winners(verdicts) == [multi]
    assert ablation.winners(ablation.against_preset(runs[:2] + runs[3:5])) == []  # two seeds a side: not yet
    for row in runs[3:6]:
        row["nn20"] = row["precision_at_10"] = 0.882  # level on two of five: still above on most
    assert ablation.winners(ablation.against_preset(runs)) == [multi]
    for row in runs[3:6]:
        row["linear_top1"] = 0.87  # below beyond the spread on the probe: a trade, not a win
    assert ablation.winners(ablation.against_preset(runs)) == []
    for row in runs[3:6]:
        row["linear_top1"] = 0.891
        row["nn5"] = 0.882  # above on two of five only
    assert ablation.winners(ablation.against_preset(runs)) == []
    runs += [run(moco, 1, 0.899), run(moco, 2, 0.899)]  # above on all five, by more: ranked before multi-crop
    for row in runs[3:6]:
        row["nn5"] = 0.891
    assert ablation.winners(ablation.against_preset(runs)) == [moco, multi]
    table = ablation.markdown_against_preset(verdicts).splitlines()
    assert table[2:] == [
        "| MoCo v2 (no enhancement) | +1.90 | +1.90 | +1.90 | +1.90 | +1.90 | +1.90 |",  # seed 0 against seed 0
        "| + multi-crop (2 × 16 px) | +0.90 * | +0.90 * | +0.90 * | +0.90 * | +0.90 * | +0.90 * |",
        "| + mild gray augmentation | +0.30 | +0.30 | +0.30 | +0.30 | +0.30 | +0.30 |",
    ]


def test_paired_differences_compare_each_seed_with_the_presets_run_of_that_seed():
    preset, multi = "preset (band negatives)", "+ multi-crop (2 × 16 px)"
    runs = [run(preset, 0, 0.880), run(preset, 1, 0.870)]  # seed 1 is poor for every variant
    runs += [run(multi, 1, 0.872), run(multi, 0, 0.879), run(multi, 2, 0.990)]  # seed 2 has no preset run
    paired = ablation.paired_against_preset(runs)
    assert paired[multi]["nn1"] == [-0.1, 0.2]  # seed 0, then seed 1
    assert preset not in paired
    assert ablation.markdown_paired(paired).splitlines()[2] == "| + multi-crop (2 × 16 px) |" + " 1 of 2 |" * 6


def test_winners_with_as_many_scores_above_rank_by_how_far_and_a_variant_missing_a_score_never_wins():
    preset, moco, multi = "preset (band negatives)", "MoCo v2 (no enhancement)", "+ multi-crop (2 × 16 px)"
    runs = [run(preset, seed, 0.880) for seed in range(3)]
    runs += [run(moco, seed, 0.890) for seed in range(3)]  # +1.0 on all six
    runs += [run(multi, seed, 0.900) for seed in range(3)]  # +2.0 on all six: as many scores, further
    assert ablation.winners(ablation.against_preset(runs)) == [multi, moco]  # not the table's order
    for row in runs[6:]:
        row["linear_top1"] = None  # no probe score: the rule cannot see it lose there
    assert ablation.winners(ablation.against_preset(runs)) == [moco]
