"""MetaModel: it finds a known signal in a synthetic history and ranks candidates better than chance."""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import pytest

from promptopt_dagster.core.meta_model import MetaModel
from promptopt_dagster.core.prompt_features import prompt_features
from promptopt_dagster.errors import OptimizerError
from promptopt_dagster.tracking import MlflowTracker

TASKS = [
    "Classify the sentiment of the review.",
    "What is the sentiment here?",
    "Label this text.",
    "Decide whether the customer is happy.",
    "Read the message and judge its tone.",
]
FILLERS = [
    "",
    "Be careful.",
    "Take your time and consider the whole text before deciding.",
    "This is an important task for our team.",
    "Think about the words the author uses.",
]


def make_prompt(rng: random.Random) -> tuple[dict[str, str], float]:
    """A prompt and its true score: 'only' and an explicit label list help; fillers do nothing."""
    only, labels, example = rng.random() < 0.5, rng.random() < 0.5, rng.random() < 0.3
    parts = [rng.choice(TASKS), rng.choice(FILLERS)]
    if labels:
        parts.append("Answer with one of POSITIVE, NEGATIVE.")
    if only:
        parts.append("Reply with only the label, nothing else.")
    if example:
        parts.append("Example:\nInput: great!\nOutput: POSITIVE")
    system = " ".join(p for p in parts if p) if rng.random() < 0.5 else ""
    user_extra = "" if system else " ".join(p for p in parts if p) + "\n"
    prompt = {"system_prompt": system, "output_prompt": f"{user_extra}Review: {{text}}"}
    score = 0.15 + 0.3 * only + 0.35 * labels + 0.05 * example + rng.gauss(0, 0.04)
    return prompt, min(max(score, 0.0), 1.0)


def history(n: int, studies: int, seed: int = 0) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt, score = make_prompt(rng)
        rows.append(
            {
                **prompt,
                "study": f"s{i % studies}",
                "parent_score": round(rng.uniform(0.1, 0.5), 2),
                "score": score,
            }
        )
    return pd.DataFrame(rows)


def test_features_see_the_cues() -> None:
    f = prompt_features(
        "You are precise.",
        "Reply with only one of POSITIVE, NEGATIVE.\nInput: {text}",
        {"parent_score": 0.4, "n_labels": 2},
    )
    assert f["cue_only"] == 1 and f["cue_one_of"] == 1 and f["cue_reply"] == 1
    assert f["label_tokens"] >= 2 and f["examples"] == 1 and f["placeholders"] == 1 and f["lines"] == 3
    assert f["parent_score"] == 0.4 and f["has_parent_score"] == 1 and f["study_n_labels"] == 2
    bare = prompt_features("", "{text}", None)
    assert bare["has_parent_score"] == 0 and bare["cue_only"] == 0 and bare["has_system"] == 0


@pytest.mark.parametrize("studies", [1, 3])
def test_learns_signal_and_ranks_better_than_random(studies: int) -> None:
    model = MetaModel().fit(history(90, studies))
    cv = model.cross_validate()
    assert cv["status"] == "ok" and cv["scheme"] == ("KFold" if studies == 1 else "GroupKFold(study)")
    assert cv["spearman"] > 0.6, cv
    assert cv["mae"] < cv["mae_mean_baseline"], cv
    assert model.is_useful(0.5)

    # Fresh candidates: the top-1 pick beats a random pick's expected score, in most of 20 draws.
    rng = random.Random(123)
    wins, gains = 0, []
    for _ in range(20):
        drawn = [make_prompt(rng) for _ in range(8)]
        cands, truth = [c for c, _ in drawn], [s for _, s in drawn]
        order = model.rank(cands)
        assert sorted(order) == list(range(8))
        top, expected_random = truth[order[0]], sum(truth) / len(truth)
        wins += top > expected_random
        gains.append(top - expected_random)
    assert wins >= 16 and sum(gains) / len(gains) > 0.1, (wins, gains)


def test_tiny_history_is_reported_not_crashed() -> None:
    model = MetaModel().fit(history(5, 1))
    cv = model.cross_validate()
    assert cv == {"status": "not enough data", "n_rows": 5, "min_rows": 8, "spearman": None, "mae": None}
    assert not model.is_useful(0.0)
    assert len(model.predict([{"system_prompt": "", "output_prompt": "{text}"}])) == 1


def test_noise_only_is_not_useful() -> None:
    data = history(60, 1)
    data["score"] = random.Random(7).choices([0.1, 0.2, 0.3, 0.4], k=len(data))
    model = MetaModel().fit(data)
    assert not model.is_useful(0.5), model.cross_validate()


def test_errors_are_actionable() -> None:
    with pytest.raises(OptimizerError, match="lacks column"):
        MetaModel().fit(pd.DataFrame({"system_prompt": ["a"]}))
    with pytest.raises(OptimizerError, match="not fitted"):
        MetaModel().predict([{"system_prompt": "", "output_prompt": "x"}])
    with pytest.raises(OptimizerError, match="no scored rows"):
        MetaModel().fit(pd.DataFrame({"system_prompt": ["a"], "output_prompt": ["b"], "score": [None]}))


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = MetaModel(estimator="forest").fit(history(40, 2))
    cv = model.cross_validate()
    path = model.save(tmp_path / "meta" / "model.skops")
    loaded = MetaModel.load(path)
    cands = [make_prompt(random.Random(i))[0] for i in range(6)]
    assert loaded.predict(cands) == pytest.approx(model.predict(cands))
    assert loaded.cross_validate() == cv and loaded.is_useful(0.3) == model.is_useful(0.3)
    with pytest.raises(OptimizerError, match="no meta-model"):
        MetaModel.load(tmp_path / "missing.skops")


def test_log_to_mlflow(tmp_path: Path) -> None:
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/mlflow.db")
    run = tracker.iteration_run("meta", 2)
    model = MetaModel().fit(history(30, 1))
    model.log_to_mlflow(tracker, run)
    data = tracker.client.get_run(run).data
    assert data.metrics["meta_model.spearman"] > 0.3
    assert data.params["meta_model.estimator"] == "ridge"
    models = tracker.client.search_logged_models([tracker.experiment_id("meta")])
    assert [m.name for m in models] == ["meta_model"]

    import mlflow.sklearn

    restored = mlflow.sklearn.load_model(models[0].artifact_location)  # file:// on a SQLite store
    cands = [make_prompt(random.Random(i))[0] for i in range(3)]
    frame = model._frame(cands)[["text", *model.feature_columns]]
    assert list(restored.predict(frame)) == pytest.approx(model.predict(cands))
