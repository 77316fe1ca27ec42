"""The meta-model: predicts a candidate prompt's validation score from its text, before it costs
LLM calls, so the optimizer can screen many proposals and evaluate only the promising ones.

It is a plain scikit-learn Pipeline: TF-IDF over the prompt text plus hand-made numeric cues
(`core.prompt_features`: lengths, format and constraint words, examples, the parent's score), then a
Ridge regression (small histories; a random forest is an option). It is only trusted when its
cross-validated rank correlation says so (`is_useful`): with a few dozen rows it often is not,
and then the optimizer should ignore it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import pandas as pd

from promptopt_dagster.core.prompt_features import prompt_features
from promptopt_dagster.errors import OptimizerError

if TYPE_CHECKING:
    from promptopt_dagster.core.prompt_store import PromptStore
    from promptopt_dagster.core.records import Candidate


class RunLogger(Protocol):
    """What `MetaModel.log_to_mlflow` needs of a tracker; `tracking.MlflowTracker` is one. A
    Protocol, because core/ sits below tracking/ and does not import it."""

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None: ...

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None: ...

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None: ...

    def log_sklearn_model(self, run_id: str, model: Any, name: str = "meta_model") -> None: ...


MIN_ROWS = 8  # below this, cross-validation says "not enough data"
REQUIRED_COLUMNS = ("system_prompt", "output_prompt", "score")

def _as_text(system_prompt: str, output_prompt: str) -> str:
    return f"{system_prompt}\n{output_prompt}"


class MetaModel:
    """Predicts a candidate's validation score. Fit on the history of scored prompts.

    History columns: system_prompt, output_prompt, score (required); study, parent_score and any
    numeric study facts (optional; the same keys go into `predict`'s candidate dicts).
    """

    def __init__(
        self, estimator: Literal["ridge", "forest"] = "ridge", seed: int = 0, min_rows: int = MIN_ROWS
    ) -> None:
        if estimator not in ("ridge", "forest"):
            raise OptimizerError(f"unknown meta-model estimator {estimator!r}; use 'ridge' or 'forest'")
        self.estimator = estimator
        self.seed = seed
        self.min_rows = min_rows
        self.pipeline: Any = None
        self.feature_columns: list[str] = []
        self.history: pd.DataFrame | None = None
        self.cv_result: dict[str, Any] | None = None

    # --- data ------------------------------------------------------------------------------------

    def _frame(self, rows: Sequence[Mapping[str, Any]] | pd.DataFrame) -> pd.DataFrame:
        records = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else list(rows)
        out = []
        for rec in records:
            extra = {
                k: v for k, v in rec.items() if k not in ("system_prompt", "output_prompt", "score", "study")
            }
            feats = prompt_features(
                str(rec.get("system_prompt") or ""), str(rec.get("output_prompt") or ""), extra
            )
            feats["text"] = _as_text(str(rec.get("system_prompt") or ""), str(rec.get("output_prompt") or ""))
            out.append(feats)
        frame = pd.DataFrame(out)
        for col in self.feature_columns:  # predict: same columns as in fit, missing ones = 0
            if col not in frame:
                frame[col] = 0.0
        return frame

    def _build(self) -> Any:
        from sklearn.compose import ColumnTransformer
        from sklearn.ensemble import RandomForestRegressor
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        columns = ColumnTransformer(
            [
                ("text", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, max_features=5000), "text"),
                ("num", StandardScaler(), self.feature_columns),
            ]
        )
        model = (
            Ridge(alpha=1.0)
            if self.estimator == "ridge"
            else RandomForestRegressor(n_estimators=200, min_samples_leaf=2, random_state=self.seed, n_jobs=1)
        )
        return Pipeline([("features", columns), ("model", model)])

    # --- fit / predict ---------------------------------------------------------------------------

    def fit(self, history: pd.DataFrame) -> MetaModel:
        missing = [c for c in REQUIRED_COLUMNS if c not in history.columns]
        if missing:
            raise OptimizerError(
                f"meta-model history lacks column(s) {missing}; it needs {list(REQUIRED_COLUMNS)} "
                "(plus optional study, parent_score)"
            )
        history = history.dropna(subset=["score"]).reset_index(drop=True)
        if history.empty:
            raise OptimizerError(
                "meta-model history has no scored rows yet; fit it after the first evaluation"
            )
        self.history = history
        frame = self._frame(history)
        self.feature_columns = sorted(c for c in frame.columns if c != "text")
        self.pipeline = self._build().fit(
            frame[["text", *self.feature_columns]], history["score"].astype(float)
        )
        self.cv_result = None
        return self

    def predict(self, candidates: Sequence[Mapping[str, Any]]) -> list[float]:
        """Predicted scores; each candidate has system_prompt, output_prompt and optionally
        parent_score and the study facts the history had."""
        if self.pipeline is None:
            raise OptimizerError("the meta-model is not fitted; call fit(history) or load(path) first")
        if not candidates:
            return []
        frame = self._frame(candidates)
        return [float(x) for x in self.pipeline.predict(frame[["text", *self.feature_columns]])]

    def rank(self, candidates: Sequence[Mapping[str, Any]]) -> list[int]:
        """Candidate indices, best predicted first; ties go to the shorter prompt."""
        preds = self.predict(candidates)
        lengths = [
            len(str(c.get("system_prompt") or "")) + len(str(c.get("output_prompt") or ""))
            for c in candidates
        ]
        return sorted(range(len(candidates)), key=lambda i: (-round(preds[i], 9), lengths[i], i))

    # --- quality -----------------------------------------------------------------------------------

    def cross_validate(self) -> dict[str, Any]:
        """Out-of-fold Spearman correlation and MAE. GroupKFold by study when the history holds
        several studies (does it generalize to an unseen study?), else shuffled KFold."""
        from scipy.stats import spearmanr
        from sklearn.model_selection import GroupKFold, KFold

        if self.history is None:
            if self.cv_result is not None:
                return self.cv_result
            raise OptimizerError("the meta-model has no history; call fit(history) first")
        history = self.history
        n = len(history)
        if n < self.min_rows:
            self.cv_result = {
                "status": "not enough data",
                "n_rows": n,
                "min_rows": self.min_rows,
                "spearman": None,
                "mae": None,
            }
            return self.cv_result
        groups = history["study"].astype(str) if "study" in history else pd.Series(["study"] * n)
        n_groups = groups.nunique()
        if n_groups >= 2:
            splitter: Any = GroupKFold(n_splits=min(5, n_groups))
            scheme = "GroupKFold(study)"
        else:
            splitter = KFold(n_splits=min(5, n // 2), shuffle=True, random_state=self.seed)
            scheme = "KFold"
        frame = self._frame(history)  # only for the splitters' length checks
        y = history["score"].astype(float).to_numpy()
        oof = np.zeros(n)
        split = splitter.split(frame, y, groups) if n_groups >= 2 else splitter.split(frame, y)
        for train_idx, test_idx in split:
            model = MetaModel(self.estimator, self.seed, self.min_rows)
            model.fit(history.iloc[train_idx])
            oof[test_idx] = model.predict(history.iloc[test_idx].to_dict("records"))
        rho = spearmanr(oof, y).statistic if np.ptp(oof) > 0 and np.ptp(y) > 0 else 0.0
        within = []
        for group in groups.unique():
            pos = np.flatnonzero(groups.to_numpy() == group)
            if len(pos) >= 3 and np.ptp(oof[pos]) > 0 and np.ptp(y[pos]) > 0:
                within.append(float(spearmanr(oof[pos], y[pos]).statistic))
        self.cv_result = {
            "status": "ok",
            "n_rows": n,
            "n_studies": int(n_groups),
            "scheme": scheme,
            "spearman": float(rho),
            "spearman_within_study": float(np.mean(within)) if within else None,
            "mae": float(np.mean(np.abs(oof - y))),
            "mae_mean_baseline": float(np.mean(np.abs(y - y.mean()))),
        }
        return self.cv_result

    def is_useful(self, threshold: float = 0.3) -> bool:
        """Whether its cross-validated rank correlation reaches `threshold` (False on too little data)."""
        result = self.cv_result or self.cross_validate()
        return result.get("spearman") is not None and result["spearman"] >= threshold

    # --- persistence -------------------------------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        return {
            "estimator": self.estimator,
            "seed": self.seed,
            "min_rows": self.min_rows,
            "feature_columns": self.feature_columns,
            "cv_result": self.cv_result,
            "n_rows": 0 if self.history is None else len(self.history),
        }

    def save(self, path: str | Path) -> Path:
        """A skops file (safe to load: no arbitrary pickle) plus ``<path>.json`` with the metadata."""
        import skops.io as sio

        if self.pipeline is None:
            raise OptimizerError("nothing to save: the meta-model is not fitted")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sio.dump(self.pipeline, path)
        path.with_name(path.name + ".json").write_text(json.dumps(self._meta(), indent=2), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> MetaModel:
        import skops.io as sio

        path = Path(path)
        meta_path = path.with_name(path.name + ".json")
        if not path.exists() or not meta_path.exists():
            raise OptimizerError(
                f"no meta-model at {path} (expected it and {meta_path.name}); fit and save one first"
            )
        untrusted = sio.get_untrusted_types(file=path)
        unexpected = [t for t in untrusted if not t.startswith(("sklearn.", "numpy.", "scipy."))]
        if unexpected:
            raise OptimizerError(f"{path} holds unexpected types {unexpected}; refusing to load it")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        model = cls(meta["estimator"], meta["seed"], meta["min_rows"])
        model.pipeline = sio.load(path, trusted=untrusted)
        model.feature_columns = list(meta["feature_columns"])
        model.cv_result = meta.get("cv_result")
        return model

    def log_to_mlflow(self, tracker: RunLogger, run_id: str, name: str = "meta_model", step: int = 0) -> None:
        """Log the fitted pipeline (`mlflow.sklearn.log_model` on the tracker's URI, explicit pip
        requirements), its CV quality as metrics and its settings as params."""
        if self.pipeline is None:
            raise OptimizerError("nothing to log: the meta-model is not fitted")
        result = self.cv_result or (self.cross_validate() if self.history is not None else {})
        tracker.log_params(run_id, {f"{name}.estimator": self.estimator})
        # Tags, not params: a refit in the same run (re-materialization) may see more rows.
        tracker.set_tags(
            run_id,
            {
                f"{name}.n_rows": self._meta()["n_rows"],
                f"{name}.cv": result.get("scheme", result.get("status", "none")),
            },
        )
        metrics = {
            f"{name}.{k}": v
            for k, v in result.items()
            if k in ("spearman", "spearman_within_study", "mae", "mae_mean_baseline") and v is not None
        }
        if metrics:
            tracker.log_metrics(run_id, metrics, step=step)
        tracker.log_sklearn_model(run_id, self.pipeline, name=name)


# --- the history it learns from, where it is kept, and how the optimizer uses it ---------------

HISTORY_COLUMNS = (
    "study",
    "iteration",
    "prompt_id",
    "strategy",
    "system_prompt",
    "output_prompt",
    "parent_score",
    "score",
)
STORE_DIR = "meta_model"
MODEL_FILE = "model.skops"
INFO_FILE = "model.json"


def history_from_store(store: PromptStore, studies: Sequence[str] | None = None) -> pd.DataFrame:
    """Every screened candidate of every iteration of every study: its texts, its minibatch score
    (``score``) and the incumbent's score on the same minibatch (``parent_score``). The minibatch
    score is the one every candidate has (only the best go on to validation), and it is exactly
    what the meta-model stands in for. Candidates whose text was not saved are skipped."""
    rows: list[dict[str, Any]] = []
    for study in studies if studies is not None else store.studies():
        for record in store.records(study):
            for cand in record.candidates:
                try:
                    prompt = store.load_prompt(study, cand.candidate_id)
                except FileNotFoundError:
                    continue
                rows.append(
                    {
                        "study": study,
                        "iteration": record.iteration,
                        "prompt_id": cand.candidate_id,
                        "strategy": cand.strategy,
                        "system_prompt": prompt.system_prompt,
                        "output_prompt": prompt.output_prompt,
                        "parent_score": record.incumbent_train_score,
                        "score": cand.train_score,
                    }
                )
    return pd.DataFrame(rows, columns=list(HISTORY_COLUMNS))


def training_frame(history: pd.DataFrame) -> pd.DataFrame:
    """The columns `MetaModel.fit` learns from (ids, iteration and strategy are bookkeeping)."""
    return history[["study", "system_prompt", "output_prompt", "parent_score", "score"]]


def save_to_store(model: MetaModel, root: str, info: Mapping[str, Any]) -> str:
    """The fitted pipeline (skops) and `info` (CV quality, whether it is trusted, the optimizer
    policy) under ``<root>/meta_model/``, local or gs://, for the next iteration's optimizer."""
    import skops.io as sio

    from promptopt_dagster.storage import join, write_bytes, write_text

    if model.pipeline is None:
        raise OptimizerError("nothing to save: the meta-model is not fitted")
    folder = join(root, STORE_DIR)
    write_bytes(join(folder, MODEL_FILE), sio.dumps(model.pipeline))
    write_text(join(folder, INFO_FILE), json.dumps({**model._meta(), **dict(info)}, indent=2, default=str))
    return folder


def load_from_store(root: str) -> tuple[MetaModel, dict[str, Any]] | None:
    """The saved meta-model and its info, or None when none was trained yet."""
    import skops.io as sio

    from promptopt_dagster.storage import exists, join, read_bytes, read_text

    folder = join(root, STORE_DIR)
    if not exists(join(folder, INFO_FILE)) or not exists(join(folder, MODEL_FILE)):
        return None
    info = json.loads(read_text(join(folder, INFO_FILE)))
    data = read_bytes(join(folder, MODEL_FILE))
    untrusted = sio.get_untrusted_types(data=data)
    unexpected = [t for t in untrusted if not t.startswith(("sklearn.", "numpy.", "scipy."))]
    if unexpected:
        raise OptimizerError(f"{folder} holds unexpected types {unexpected}; refusing to load it")
    model = MetaModel(info["estimator"], info["seed"], info["min_rows"])
    model.pipeline = sio.loads(data, trusted=untrusted)
    model.feature_columns = list(info["feature_columns"])
    model.cv_result = info.get("cv_result")
    return model, info


def ranker_for(model: MetaModel, parent_score: float) -> Callable[[list[Candidate]], list[float]]:
    """An `optimizer.context.Ranker`: predicted minibatch scores of candidates derived from an
    incumbent that scored `parent_score` on this iteration's minibatch."""

    def rank(candidates: list[Candidate]) -> list[float]:
        return model.predict(
            [
                {
                    "system_prompt": c.prompt.system_prompt,
                    "output_prompt": c.prompt.output_prompt,
                    "parent_score": parent_score,
                }
                for c in candidates
            ]
        )

    return rank


@dataclass
class RankingPlan:
    """How the optimizer uses the meta-model this iteration (`propose_candidates` keywords)."""

    ranker: Callable[[list[Candidate]], list[float]] | None = None
    overgenerate: int = 1
    keep: int | None = None
    note: str = "no meta-model yet"

    def kwargs(self) -> dict[str, Any]:
        return {"ranker": self.ranker, "overgenerate": self.overgenerate, "keep": self.keep}


def ranking_plan(root: str, parent_score: float, candidates_per_iteration: int) -> RankingPlan:
    """Use the saved meta-model only if it was trusted when trained (its CV rank correlation
    cleared the threshold the meta_model asset applied); else the default path, unchanged."""
    loaded = load_from_store(root)
    if loaded is None:
        return RankingPlan()
    model, info = loaded
    cv = info.get("cv_result") or {}
    quality = f"CV spearman {cv.get('spearman')}, {cv.get('n_rows', 0)} rows"
    if not info.get("useful"):
        return RankingPlan(note=f"meta-model not trusted ({quality}; needs {info.get('min_spearman')})")
    overgenerate = max(1, int(info.get("overgenerate", 2)))
    keep = max(1, math.ceil(candidates_per_iteration * float(info.get("keep_fraction", 0.5))))
    return RankingPlan(
        ranker=ranker_for(model, parent_score),
        overgenerate=overgenerate,
        keep=keep,
        note=(
            f"meta-model ranks {overgenerate}x{candidates_per_iteration} proposals, "
            f"screens {keep} ({quality})"
        ),
    )
