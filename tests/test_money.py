"""Budget values: parsed strictly into integer nano-USD (every peer accepts NaN)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from otel_budget.money import MAX_BUDGET_USD, format_usd, parse_usd, to_usd, usd_to_nanos
from otel_budget.settings import BudgetSettings, ScopeRule


@pytest.mark.parametrize(
    ("value", "nanos"),
    [
        (5, 5_000_000_000),
        (0, 0),
        (0.1, 100_000_000),
        (Decimal("2.50"), 2_500_000_000),
        ("5", 5_000_000_000),
        ("$5.00", 5_000_000_000),
        (" $ 0.25 ", 250_000_000),
        ("0.25 USD", 250_000_000),
        (".5", 500_000_000),
        ("0.0000000001", 1),  # below a nano-dollar: rounded up, never to zero
        (1_000_000, 1_000_000 * 10**9),
    ],
)
def test_accepted_values(value: object, nanos: int) -> None:
    assert parse_usd(value) == nanos


@pytest.mark.parametrize(
    "value",
    [
        float("nan"), float("inf"), float("-inf"), Decimal("NaN"), Decimal("Infinity"),
        -1, -0.01, "-5", True, False, None, "", "five", "$", "5$5", "1e3", "0x10",
        [5], {"usd": 5}, MAX_BUDGET_USD + 1, "nan", "inf",
    ],
)
def test_rejected_values(value: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_usd(value, what="max_usd")
    assert "max_usd" in str(info.value)


def test_sums_are_exact() -> None:
    total = sum(parse_usd("0.1") for _ in range(10_000))
    assert total == parse_usd(1000)
    assert to_usd(total) == 1000.0


def test_usd_to_nanos_rounds_up_and_formats() -> None:
    assert usd_to_nanos(1.5e-10) == 1
    assert usd_to_nanos(Decimal("0.00000015")) == 150
    assert format_usd(12_345) == "$0.000012"
    assert format_usd(2 * 10**9) == "$2.0000"


def test_settings_reject_bad_budgets_and_options() -> None:
    with pytest.raises(ValueError):
        BudgetSettings(max_usd=float("nan"))
    with pytest.raises(ValueError):
        BudgetSettings(max_usd=5, failure_policy="maybe")
    with pytest.raises(ValueError):
        BudgetSettings(thresholds=[0.5, 1.5])
    with pytest.raises(ValueError):
        BudgetSettings(thresholds=[float("nan")])
    with pytest.raises(ValueError):
        BudgetSettings(default_max_output_tokens=0)
    with pytest.raises(ValueError):
        BudgetSettings(on_warning="not callable")
    with pytest.raises(ValueError):
        ScopeRule("user", max_usd=-3)
    with pytest.raises(ValueError):
        ScopeRule("user", max_usd=3, window="week")
    with pytest.raises(ValueError):
        BudgetSettings(scopes=[ScopeRule("user", 1), ScopeRule("user", 2)])
    assert BudgetSettings(max_usd="$0").limit_nanos == 0
    assert BudgetSettings(thresholds=[0.9, 0.5, 0.9]).thresholds == (0.5, 0.9)


# -- ASCII only: Unicode digits are not money -------------------------------------------------
UNICODE_AMOUNTS = [
    "５",  # fullwidth five
    "٥",  # Arabic-Indic five
    "۵",  # extended Arabic-Indic five
    "१०",  # Devanagari ten
    "$５.００",
    "0.５",
    "5\u3000",  # ideographic space
    "\u20095",  # thin space
]


@pytest.mark.parametrize("value", UNICODE_AMOUNTS)
def test_unicode_digits_and_spaces_are_rejected(value: str) -> None:
    with pytest.raises(ValueError):
        parse_usd(value, what="max_usd")
    assert parse_usd(" $5.00 USD\n") == 5_000_000_000  # ASCII whitespace still reads


@pytest.mark.parametrize("value", UNICODE_AMOUNTS)
def test_unicode_amounts_are_rejected_in_settings_and_env(value: str) -> None:
    from otel_budget.config import settings_from_env

    with pytest.raises(ValueError):
        BudgetSettings(max_usd=value)
    with pytest.raises(ValueError):
        ScopeRule("user", max_usd=value)
    with pytest.raises(ValueError, match="OTEL_BUDGET_MAX_USD"):
        settings_from_env({"OTEL_BUDGET_MAX_USD": value})


def test_baggage_budgets_are_ascii_and_whole() -> None:
    from otel_budget.propagation import parse_baggage_budget

    for value in ("5\n", "0.5\n", "５", "٥", "0.５", "5 ", " 5"):
        assert parse_baggage_budget(value) is None, repr(value)
    assert parse_baggage_budget("5") == 5_000_000_000
