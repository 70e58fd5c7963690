"""bench/collapse_detector_multivariate.py: its features see no future step (a detector that did would lead every
decline), its three forms of a signal are the ones it names, and its tally counts leads, late warnings, misses and
false alarms as bench/collapse_detector.py defines them (counted by hand here)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def multivariate():
    spec = importlib.util.spec_from_file_location("collapse_detector_multivariate",
                                                  ROOT / "bench" / "collapse_detector_multivariate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def records(kl: list, greedy: dict) -> list:
    out = [{"step": 0, "eval/greedy": greedy[0]}]
    for step, value in enumerate(kl, 1):
        record = {"step": step, "entropy": 0.1 + 0.001 * step, "kl": value, "reward": 0.5 + 0.01 * (step % 3),
                  "majority_ratio": 0.5, "collapse/unanimous_frac": 0.1}
        if step in greedy:
            record["eval/greedy"] = greedy[step]
        out.append(record)
    return out


def test_trailing_mean_trend_and_gain_by_hand(multivariate):
    series = {10: 1.0, 11: 2.0, 20: 4.0, 21: 7.0}
    forms = multivariate.forms(series, [10, 11, 20, 21, 22])
    assert forms[0].tolist() == [1.0, 0.0, 0.0]           # the first window: no trend or gain yet
    assert forms[1].tolist() == [2.0, 1.0, 1.0]           # before step 1 exists: the trend is the gain so far
    assert forms[2].tolist() == [4.0, 3.0, 3.0]           # 10 steps after step 10
    assert forms[3].tolist() == [7.0, 5.0, 6.0]           # 7 - series[11], 7 - series[10]
    assert np.isnan(forms[4]).all()                        # not logged at step 22


def test_features_at_a_step_do_not_depend_on_later_steps(multivariate):
    kl = [0.01 * i for i in range(1, 41)]
    greedy = {0: 0.5, 20: 0.5, 40: 0.5}
    base = multivariate.cd.load_run("a", records(kl, greedy))
    changed = multivariate.cd.load_run("b", records(kl[:25] + [9.0] * 15, greedy))
    steps, feats = multivariate.features(base)
    steps_b, feats_b = multivariate.features(changed)
    assert steps.tolist() == steps_b.tolist() and steps[0] == 10
    upto = steps <= 25
    for signal in multivariate.COMMON:
        assert np.array_equal(feats[signal][upto], feats_b[signal][upto], equal_nan=True), signal
    assert not np.array_equal(feats["kl"][~upto], feats_b["kl"][~upto])       # and later steps do see the change


def test_tally_counts_as_the_univariate_detector_does(multivariate):
    per_run = [{"decline": 30, "warning": 20}, {"decline": 30, "warning": 30}, {"decline": 30, "warning": 45},
               {"decline": 20, "warning": None}, {"decline": None, "warning": 12}, {"decline": None, "warning": None}]
    t = multivariate.tally(per_run)
    assert t == {"leads": [10], "late": 2, "missed": 1, "false_alarms": 1, "declining": 4, "healthy": 2}
