"""A bandit over proposal strategies (not over prompts).

Why strategies: a study sees a few dozen candidates at most, far too few to learn a value per
prompt text, but enough to learn which kind of edit pays off for this task and model (e.g. with a
small model "add_format_rule" usually beats "add_reasoning"). The optimizer maps a strategy name
to an edit operator; the bandit only picks names and learns from measured improvements.

Default policy: Gaussian Thompson sampling. Rewards are score gains (often 0, sometimes +-0.1),
which is small next to the clipping range [-1, 1]; a UCB1 bonus scaled to that range keeps
exploring almost uniformly over the ~20 pulls of a study. The Gaussian posterior learns the
scale from the data. UCB1 is available as ``method="ucb1"``, with its bonus scaled to the
observed spread of rewards for the same reason. Sampling is seeded by (seed, number of
selections so far), so a bandit restored from `to_dict()` makes the same choices as one that
never stopped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from promptopt_dagster.errors import OptimizerError
from promptopt_dagster.optimizer.strategies import STRATEGY_NAMES

STRATEGIES: tuple[str, ...] = STRATEGY_NAMES

Method = Literal["thompson", "ucb1"]
STATE_VERSION = 1


class StrategyBandit:
    """Chooses edit strategies and learns from their rewards (clipped to ``reward_range``).

    Args:
        strategies: the arms (duplicates ignored; ties are broken at random, not by order).
        seed: makes selection reproducible.
        state: a `to_dict()` result from an earlier iteration (None or {} = fresh).
        method: "thompson" (Gaussian posterior per arm) or "ucb1".
        reward_range: rewards are clipped into it; a gain of a score in [0, 1] lies in [-1, 1].
        prior_std: prior spread of an arm's mean reward (Thompson), in reward units.
        exploration: UCB1 bonus factor, multiplied by the observed spread of rewards.
    """

    def __init__(
        self,
        strategies: Sequence[str] = STRATEGIES,
        seed: int = 0,
        state: Mapping[str, Any] | None = None,
        *,
        method: Method = "thompson",
        reward_range: tuple[float, float] = (-1.0, 1.0),
        prior_std: float = 0.1,
        exploration: float = 1.0,
    ) -> None:
        names = list(dict.fromkeys(strategies))
        if not names:
            raise OptimizerError("StrategyBandit needs at least one strategy name")
        if method not in ("thompson", "ucb1"):
            raise OptimizerError(f"unknown bandit method {method!r}; use 'thompson' or 'ucb1'")
        lo, hi = reward_range
        if not lo < hi:
            raise OptimizerError(f"reward_range must be (low, high) with low < high, got {reward_range}")
        self.strategies = names
        self.seed = int(seed)
        self.method: Method = method
        self.reward_range = (float(lo), float(hi))
        self.prior_std = float(prior_std)
        self.exploration = float(exploration)
        self.selects = 0
        self._arms: dict[str, dict[str, float]] = {}
        if state:
            self._load(state)
        for name in names:
            self._arms.setdefault(name, {"pulls": 0, "sum": 0.0, "sum_sq": 0.0})

    # --- persistence ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable state (arms learnt under other names are kept, not dropped)."""
        return {
            "version": STATE_VERSION,
            "method": self.method,
            "seed": self.seed,
            "selects": self.selects,
            "reward_range": list(self.reward_range),
            "arms": {name: dict(arm) for name, arm in self._arms.items()},
        }

    @classmethod
    def from_dict(
        cls, state: Mapping[str, Any], strategies: Sequence[str] | None = None, **kwargs: Any
    ) -> StrategyBandit:
        """Restore a bandit; its arms are those of `state` unless `strategies` is given."""
        names = list(strategies) if strategies is not None else list(state.get("arms", {}))
        kwargs.setdefault("method", state.get("method", "thompson"))
        if "reward_range" in state:
            kwargs.setdefault("reward_range", tuple(state["reward_range"]))
        return cls(names or STRATEGIES, seed=int(state.get("seed", 0)), state=state, **kwargs)

    def _load(self, state: Mapping[str, Any]) -> None:
        version = state.get("version", STATE_VERSION)
        if version != STATE_VERSION:
            raise OptimizerError(
                f"bandit state version {version} is not supported (expected {STATE_VERSION})"
            )
        try:
            self.selects = int(state.get("selects", 0))
            for name, arm in dict(state.get("arms", {})).items():
                self._arms[str(name)] = {
                    "pulls": int(arm["pulls"]),
                    "sum": float(arm["sum"]),
                    "sum_sq": float(arm["sum_sq"]),
                }
        except (KeyError, TypeError, ValueError) as exc:
            raise OptimizerError(f"bandit state is malformed ({exc!r}); start fresh with state=None") from exc

    # --- policy ----------------------------------------------------------------------------------

    def select(self, k: int = 1) -> list[str]:
        """`k` strategies, best first: untried ones first, then by sampled (or UCB) value. Distinct
        while `k` <= number of strategies; beyond that the ranking repeats."""
        if k <= 0:
            return []
        rng = np.random.default_rng([self.seed, self.selects])
        self.selects += 1
        untried = [s for s in self.strategies if self._arms[s]["pulls"] == 0]
        tried = [s for s in self.strategies if self._arms[s]["pulls"] > 0]
        order = [untried[i] for i in rng.permutation(len(untried))]
        if tried:
            scores = np.array([self._score(s, rng) for s in tried])
            jitter = rng.random(len(tried)) * 1e-12  # random tie-break
            order += [tried[i] for i in np.argsort(-(scores + jitter))]
        return [order[i % len(order)] for i in range(k)]

    def _score(self, name: str, rng: np.random.Generator) -> float:
        arm = self._arms[name]
        n, mean = arm["pulls"], arm["sum"] / arm["pulls"]
        if self.method == "ucb1":
            arms = [a for s, a in self._arms.items() if s in self.strategies and a["pulls"]]
            total = sum(a["pulls"] for a in arms)
            return mean + self.exploration * self._reward_scale(arms) * math.sqrt(
                2.0 * math.log(max(total, 1)) / n
            )
        # Normal-Normal with a pseudo-observation of the prior: the posterior of the mean narrows
        # as 1/sqrt(n) around the sample mean, with the spread learnt from the rewards.
        var = max(arm["sum_sq"] / n - mean * mean, 0.0)
        spread = math.sqrt((self.prior_std**2 + n * var) / (n + 1))
        post_mean = arm["sum"] / (n + 1)  # prior mean 0 counts as one observation
        return float(rng.normal(post_mean, spread / math.sqrt(n + 1)))

    def _reward_scale(self, arms: list[dict[str, float]]) -> float:
        """Spread of the observed rewards (pooled over arms), at least `prior_std`/10: scales the
        UCB bonus to the rewards actually seen instead of the (much wider) clipping range."""
        n = sum(a["pulls"] for a in arms)
        mean = sum(a["sum"] for a in arms) / n
        var = max(sum(a["sum_sq"] for a in arms) / n - mean * mean, 0.0)
        return max(math.sqrt(var), self.prior_std / 10)

    def update(self, strategy: str, reward: float) -> None:
        """Record a measured improvement for `strategy` (clipped into ``reward_range``; NaN ignored)."""
        if strategy not in self._arms:
            raise OptimizerError(f"unknown strategy {strategy!r}; known: {', '.join(self.strategies)}")
        if reward is None or math.isnan(reward):
            return
        r = min(max(float(reward), self.reward_range[0]), self.reward_range[1])
        arm = self._arms[strategy]
        arm["pulls"] += 1
        arm["sum"] += r
        arm["sum_sq"] += r * r

    def stats(self) -> dict[str, dict[str, float]]:
        """Per strategy: pulls, mean reward (0 if never tried) and total reward."""
        return {
            name: {
                "pulls": int(arm["pulls"]),
                "mean_reward": arm["sum"] / arm["pulls"] if arm["pulls"] else 0.0,
                "total_reward": arm["sum"],
            }
            for name, arm in self._arms.items()
        }

    def best(self) -> str:
        """The strategy with the highest mean reward among those tried (first strategy if none)."""
        tried = [s for s in self.strategies if self._arms[s]["pulls"]]
        if not tried:
            return self.strategies[0]
        return max(tried, key=lambda s: self._arms[s]["sum"] / self._arms[s]["pulls"])
