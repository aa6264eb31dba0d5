"""The reports' shared formatting (``drivers/tables.py``): one number format for every report."""

import math

from prsl_kernels.drivers.tables import fmt, fmt_interval, fmt_mean_ci, fmt_p, table


def test_fmt_missing_signed_and_with_interval():
    assert fmt(None) == fmt(float("nan")) == fmt(float("inf")) == "n/a"
    assert fmt(0.12345) == "0.123" and fmt(0.12345, 2) == "0.12"
    assert fmt(0.5, 2, True) == "+0.50" and fmt(-0.5, 2, True) == "-0.50"
    assert fmt(0.5, 2, half=0.125) == "0.50 ± 0.12" and fmt(0.5, 2, half=float("nan")) == "0.50"


def test_fmt_mean_ci_leaves_out_missing_values():
    assert fmt_mean_ci([0.5, 0.5, float("nan")], 2) == "0.50 ± 0.00"
    assert fmt_mean_ci([0.25], 2) == "0.25"           # one value: no interval
    assert fmt_mean_ci([float("nan")]) == "n/a"


def test_interval_p_value_and_table():
    assert fmt_interval((-0.01, 0.02), 2) == "[-0.01, +0.02]"
    assert fmt_p(0.0312) == "0.031" and fmt_p(2e-5) == "2.0e-05" and fmt_p(math.nan) == "n/a"
    assert table(["a", "b"], [[1, "x"]]).split("\n") == ["| a | b |", "|---|---|", "| 1 | x |"]
