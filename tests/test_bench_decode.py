"""bench/decode.py: the side-by-side estimator on planted times, and one mode's row on the tiny config
(agreement with full greedy, the planner's record), so the bench's figures rest on tested code."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import decode as bench  # noqa: E402

from conftest import build_random_model  # noqa: E402
from poegpt.modes import ModeSpec  # noqa: E402


def test_best_of_pairs_each_run_with_full_and_keeps_the_median_ratio():
    times, full_times = iter([2.0, 1.0, 4.0]), iter([3.0, 3.0, 2.0])
    outs = iter(["f1", "f2", "f3"])
    out, best, best_full, ratio, full, spread = bench.best_of(lambda: ("mode", next(times)), 3,
                                                              lambda: (next(outs), next(full_times)))
    assert (out, best, best_full) == ("mode", 1.0, 2.0)
    assert ratio == pytest.approx(1.5)            # the pairs' ratios 1.5, 3.0, 0.5: their median
    assert spread == pytest.approx((0.5, 3.0))    # and their range
    assert full == "f3"                          # full's last output, to compare tokens with
    alone = bench.best_of(lambda: ("mode", 1.0), 2)
    assert alone[3] == 1.0 and alone[4] is None and alone[5] == (1.0, 1.0)


def test_a_speculative_row_agrees_with_full_and_reports_its_plan():
    model = build_random_model()
    rows = [[1, 2, 3], [4, 5]]
    a = argparse.Namespace(batches=[1, 2], tokens=5, repeats=1, no_compile=True, compile_modes=None, autotune=False)
    full = bench.measure_mode(model, rows, "full", ModeSpec("full"), a, {}, None, None)
    spec = ModeSpec("speculative", draft_stage="auto", k_draft="auto")
    row = bench.measure_mode(model, rows, "speculative auto", spec, a, {}, full["generated"], ModeSpec("full"))
    assert row["identical_to_full"] and row["agreement_with_full"] == 1.0
    assert row["tokens"] == 10 and row["b1_eager_vs_full"] > 0 and row["b2_eager_vs_full"] > 0
    lo, hi = row["b1_eager_vs_full_pairs"]
    assert lo <= row["b1_eager_vs_full"] <= hi
    plan = row["b2_eager_plan"]
    assert 0.0 <= plan["plain_share"] <= 1.0 and len(plan["cycles_by_draft_stage"]) == model.config.n_stages - 1
