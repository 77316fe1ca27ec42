"""StrategyBandit: learns the best proposal strategy on a stationary problem and persists as JSON."""

from __future__ import annotations

import json
import random

import pytest

from promptopt_dagster.errors import OptimizerError
from promptopt_dagster.optimizer.bandit import StrategyBandit
from promptopt_dagster.optimizer.strategies import STRATEGY_NAMES

# True mean improvement per arm; "add_format_rule" is best by a margin typical of real gains.
MEANS = {
    "add_format_rule": 0.12,
    "add_examples": 0.04,
    "shorten": 0.0,
    "restate_task": 0.02,
    "add_reasoning": -0.05,
    "reflect": 0.03,
}
STRATEGIES = tuple(MEANS)


def play(bandit: StrategyBandit, rounds: int, k: int, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(rounds):
        for strategy in bandit.select(k):
            bandit.update(strategy, MEANS[strategy] + rng.gauss(0, 0.08))


def test_the_default_arms_are_the_optimizer_strategies() -> None:
    assert StrategyBandit().strategies == list(STRATEGY_NAMES)


def test_untried_first_and_distinct() -> None:
    bandit = StrategyBandit(STRATEGIES, seed=1)
    first = bandit.select(4)
    assert len(set(first)) == 4
    for s in first:
        bandit.update(s, 0.0)
    second = bandit.select(2)
    assert set(second) == set(STRATEGIES) - set(first), "the two untried arms come before tried ones"
    assert len(bandit.select(8)) == 8 and set(bandit.select(6)) == set(STRATEGIES)
    assert bandit.select(0) == []


@pytest.mark.parametrize(("method", "k"), [("thompson", 1), ("thompson", 2), ("ucb1", 1)])
def test_best_arm_gets_most_pulls(method: str, k: int) -> None:
    bandit = StrategyBandit(STRATEGIES, seed=3, method=method)  # type: ignore[arg-type]
    play(bandit, rounds=150, k=k, seed=4)
    stats = bandit.stats()
    pulls = {s: v["pulls"] for s, v in stats.items()}
    assert max(pulls, key=pulls.__getitem__) == "add_format_rule", pulls
    assert pulls["add_format_rule"] > 0.3 * sum(pulls.values()), pulls
    assert pulls["add_reasoning"] < pulls["add_format_rule"] / 3, pulls
    assert bandit.best() == "add_format_rule"
    assert stats["add_format_rule"]["mean_reward"] == pytest.approx(0.12, abs=0.04)


def test_persistence_round_trip_continues_identically() -> None:
    a = StrategyBandit(STRATEGIES, seed=5)
    play(a, rounds=10, k=2, seed=6)
    state = json.loads(json.dumps(a.to_dict()))  # what an iteration record stores
    b = StrategyBandit(STRATEGIES, seed=5, state=state)
    c = StrategyBandit.from_dict(state)
    assert b.stats() == a.stats() == c.stats()
    for _ in range(5):
        pick = a.select(2)
        assert b.select(2) == pick and c.select(2) == pick
        for s in pick:
            for bandit in (a, b, c):
                bandit.update(s, 0.05)
    assert b.to_dict() == a.to_dict()


def test_state_with_other_strategies_and_clipping() -> None:
    a = StrategyBandit(["shorten", "reflect"], seed=0)
    a.update("shorten", 5.0)  # clipped to 1.0
    a.update("reflect", float("nan"))  # ignored
    b = StrategyBandit(["shorten", "add_examples"], state=a.to_dict())
    assert b.stats()["shorten"] == {"pulls": 1, "mean_reward": 1.0, "total_reward": 1.0}
    assert b.stats()["reflect"]["pulls"] == 0  # kept in the state, not selectable
    assert set(b.select(3)) == {"shorten", "add_examples"}
    assert "reflect" in b.to_dict()["arms"]
    assert StrategyBandit(STRATEGIES, state={}).stats()["shorten"]["pulls"] == 0


def test_errors_are_actionable() -> None:
    bandit = StrategyBandit(STRATEGIES)
    with pytest.raises(OptimizerError, match="unknown strategy 'rewrite'"):
        bandit.update("rewrite", 0.1)
    with pytest.raises(OptimizerError, match="at least one strategy"):
        StrategyBandit([])
    with pytest.raises(OptimizerError, match="malformed"):
        StrategyBandit(STRATEGIES, state={"arms": {"shorten": {"pulls": "x"}}})
    with pytest.raises(OptimizerError, match="method"):
        StrategyBandit(STRATEGIES, method="epsilon")  # type: ignore[arg-type]
