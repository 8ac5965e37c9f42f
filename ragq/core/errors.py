"""One exception tree for ragq. Catch `RagqError` to catch everything ragq raises on purpose."""

from __future__ import annotations

from dataclasses import dataclass


class RagqError(Exception):
    """Base of every error ragq raises deliberately. Every one pickles and unpickles as itself (they cross from the
    engine process to the worker's task threads)."""


class BadInput(RagqError):
    """A user-supplied input (file, question, option) is unusable. The message names the input and the problem."""

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem

    def __reduce__(self) -> tuple[type[BadInput], tuple[str, str]]:
        return type(self), (self.source, self.problem)


class ConfigError(RagqError):
    """Settings or the models file are invalid."""


class ServiceError(RagqError):
    """An embedded or configured service (Redis, Postgres) could not be started or reached."""


class BudgetExceeded(RagqError):
    """A model or batch cannot fit in the device budget even after evicting everything evictable."""


class ModelLoadFailed(RagqError):
    """A model directory is missing, incomplete or corrupted."""


class BackendUnavailable(RagqError):
    """The requested backend (a role with no model configured, a Triton server that is down)."""


class RequestExpired(RagqError):
    """Control flow: a request's deadline passed before it ran; it is dropped without costing device time."""


class QuestionTimeout(RagqError):
    """An urgent question did not complete within its timeout."""


class JobStillRunning(RagqError):
    """Waiting for a job timed out while it still runs; `status` is its last status (it goes on: `ragq job ID`)."""

    def __init__(self, message: str, status: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.status = status or {}

    def __reduce__(self) -> tuple[type[JobStillRunning], tuple[str, dict[str, object]]]:
        return type(self), (str(self), self.status)


class WorkerLost(RagqError):
    """The worker running a question's stages stopped mid-question (and asking again elsewhere did not help)."""


class DeviceOutOfMemory(RagqError):
    """A backend ran out of device memory (torch.cuda.OutOfMemoryError and the like). The engine treats it as an
    event: it evicts idle models, splits the batch and retries."""


class PoisonMessage(RagqError):
    """A task that started too many times without finishing (its worker died each time): failed, not run again."""


@dataclass
class Failure:
    """One input that failed (a file, a document, a question line) and why: what a job reports per input."""

    path: str
    error: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "error": self.error}
