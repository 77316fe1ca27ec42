"""Errors a user can act on: each message names the problem and the fix."""


class PromptoptError(Exception):
    """Base class for every error this package raises on purpose."""


class StudyConfigError(PromptoptError):
    """The study file is missing, malformed or incomplete."""


class DatasetError(PromptoptError):
    """The dataset is missing, empty or lacks a column the study needs."""


class MetricError(PromptoptError):
    """An unknown metric or one that cannot be loaded."""


class ModelError(PromptoptError):
    """A model file is missing or corrupt, or a backend cannot be reached."""


class OptimizerError(PromptoptError):
    """The optimizer LLM never produced a usable reply."""


class StorageError(PromptoptError):
    """A storage location is missing, unreachable or not permitted."""


class InstanceUnavailableError(StorageError):
    """The Dagster instance's database (SQLite files or PostgreSQL) failed or cannot be reached."""


class SettingsError(PromptoptError):
    """A setting (environment variable or `.env`) has a value that cannot work."""


class ExecutorSettingsError(SettingsError):
    """DAGSTER_EXECUTOR names an executor whose settings or package are missing."""
