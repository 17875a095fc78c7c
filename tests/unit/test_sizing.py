"""The fan-out sizing check-config prints: waves, a message's life, the throttle, the advice."""

from __future__ import annotations

from bridge.sizing import Sizing


def sizing(rate: float, reports: int, windows: int, grace: float = 3600) -> Sizing:
    """A sizing at Svix's 12 s budget."""
    return Sizing(rate=rate, budget=12.0, reports=reports, windows=windows, grace=grace)


def test_one_wave_and_a_message_life_at_the_budget() -> None:
    found = sizing(100, 2000, 24)
    assert found.wave == 1150  # 11.5 s x 100/s
    assert found.life == 8 * 1150
    assert found.floor == 480.0
    assert found.waves == 42


def test_the_throttle_is_nine_tenths_of_the_budget_in_reports() -> None:
    assert sizing(100, 2000, 24).throttle == 0.9 * 100 / 24


def test_a_burst_beyond_svixs_eight_waves_needs_the_throttle() -> None:
    advice = " ".join(sizing(100, 2000, 24).advice())
    assert "needs 42 waves" in advice and "Set the throttle" in advice


def test_a_burst_that_fits_one_wave_makes_the_throttle_optional() -> None:
    assert sizing(25, 10, 24).advice() == ["the burst fits in one wave: the throttle is optional"]


def test_a_burst_longer_than_the_invoice_grace_says_to_coarsen() -> None:
    advice = " ".join(sizing(20, 5000, 24, grace=3600).advice())
    assert "longer than the invoice grace period" in advice and "Coarsen" in advice


def test_a_report_too_wide_for_one_attempt_says_so() -> None:
    advice = " ".join(sizing(100, 1, 200).advice())
    assert "needs more than one attempt" in advice
