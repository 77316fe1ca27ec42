"""Every proposal strategy, in the order they are first tried on a new incumbent: the ones that
most often lift a vague prompt on a small model first (an explicit format, reflection, examples,
then those edits stacked), then answer parsing, combination of the best parts, and edits. A new
strategy is one module here plus one entry below."""

from promptopt_dagster.optimizer.strategies.base import OptimizerLLM, Proposal, Strategy
from promptopt_dagster.optimizer.strategies.combine import Combine
from promptopt_dagster.optimizer.strategies.demonstrations import AddExamples
from promptopt_dagster.optimizer.strategies.edits import AddFormatRule, FirstLine, FrameAnswer, Shorten
from promptopt_dagster.optimizer.strategies.reflect import Reflect
from promptopt_dagster.optimizer.strategies.restate import RestateTask
from promptopt_dagster.optimizer.strategies.stack import Stack

STRATEGIES: tuple[Strategy, ...] = (
    AddFormatRule(),
    Reflect(),
    RestateTask(),
    AddExamples(),
    Stack(),
    FirstLine(),
    Combine(),
    FrameAnswer(),
    Shorten(),
)
STRATEGY_NAMES: tuple[str, ...] = tuple(s.name for s in STRATEGIES)
LLM_STRATEGIES = ("reflect", "restate_task")

__all__ = ["STRATEGIES", "STRATEGY_NAMES", "LLM_STRATEGIES", "OptimizerLLM", "Proposal", "Strategy"]
