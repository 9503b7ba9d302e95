"""health.py's detectors against hand-made states, and the --p parsing fix."""
import math

import pytest
from hypothesis import given, settings, strategies as st

import health
import train


def result(never=0.0, truncated=0.0, latent=3.0):
    return {"frac_never_exited": never, "frac_truncated": truncated, "mean_latent_steps": latent}


def test_never_leaving_latent_mode_is_fatal_and_stops_the_run():
    problem = health.check_eval(result(never=1.0, truncated=1.0), "init", "--max-response-length")
    assert problem.fatal and "end-of-latent" in problem.message
    with pytest.raises(train.UserError, match="--allow-degenerate"):
        train.report(train.Args(), [problem])
    train.report(train.Args(allow_degenerate=True), [problem])  # goes on
    assert not health.check_eval(result(never=1.0, truncated=1.0), "init", "--max-response-length", True).fatal


def test_truncation_warns_and_healthy_is_silent():
    assert not health.check_eval(result(truncated=1.0, latent=0.0), "e", "--max-new-tokens").fatal
    assert "60%" in health.check_eval(result(truncated=0.6), "e", "--max-new-tokens").message
    assert health.check_eval(result(truncated=0.2), "e", "--max-new-tokens") is None


def test_sft_loss_non_finite_is_fatal_rising_warns():
    assert health.check_sft([1.0, math.nan], 0).fatal
    assert not health.check_sft([1.86, 3.0, 8.46], 0).fatal
    assert health.check_sft([1.86, 1.5, 1.2], 0) is None


@settings(deadline=None, max_examples=20)
@given(st.integers(2, 6))
def test_rl_watch_warns_once_after_patience_steps(patience):
    watch = health.RLWatch(patience)
    same = ["a", "a", "b", "b"]
    found = [watch.update(1.0, same, 2) for _ in range(patience + 2)]
    assert [len(f) for f in found] == [0] * (patience - 1) + [2, 0, 0]
    watch.update(0.5, ["a", "b", "b", "b"], 2)  # a group with variance and distinct texts resets both streaks
    assert watch.zero_std == 0 and watch.identical == 0


def test_dash_p_is_not_an_abbreviation_of_preset():
    args, _, cfg = train.parse_args(["--p", "0.1"])
    assert cfg.p == 0.1 and args.preset == ""
