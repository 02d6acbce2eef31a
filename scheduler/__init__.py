"""scheduler: an asyncio request scheduler and worker pool for OpenAI-compatible LLM APIs."""

from importlib.metadata import PackageNotFoundError, version

from .admission import Limiter as Limiter
from .batch_api import BatchLimits as BatchLimits
from .batch_api import BatchRun as BatchRun
from .batch_api import cancel_batches as cancel_batches
from .batch_api import run_batch as run_batch
from .endpoints import Endpoint as Endpoint
from .errors import AuthenticationFailed as AuthenticationFailed
from .errors import BatchFailed as BatchFailed
from .errors import BudgetExhausted as BudgetExhausted
from .errors import ConfigurationError as ConfigurationError
from .errors import DeadlineExceeded as DeadlineExceeded
from .errors import InternalError as InternalError
from .errors import InvalidResponse as InvalidResponse
from .errors import JobError as JobError
from .errors import LimiterUnavailable as LimiterUnavailable
from .errors import OutputInvalid as OutputInvalid
from .errors import PoolClosed as PoolClosed
from .errors import QuotaExhausted as QuotaExhausted
from .errors import RequestRejected as RequestRejected
from .errors import RequestTooLarge as RequestTooLarge
from .errors import RetriesExhausted as RetriesExhausted
from .errors import RunStopped as RunStopped
from .errors import SchedulerError as SchedulerError
from .errors import StreamIncomplete as StreamIncomplete
from .fallbacks import Fallback as Fallback
from .limits import Limits as Limits
from .pool import Pool as Pool
from .requests import Request as Request
from .results import ErrorInfo as ErrorInfo
from .results import Result as Result
from .results import Usage as Usage
from .retry import Backoff as Backoff
from .sinks import CallbackSink as CallbackSink
from .sinks import JsonlSink as JsonlSink
from .sinks import MemorySink as MemorySink
from .statistics import PoolStatistics as PoolStatistics
from .streaming import PoolStream as PoolStream
from .trim import ContextWindow as ContextWindow
from .trim import TrimPolicy as TrimPolicy

try:
    __version__ = version("llm-request-scheduler")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "AuthenticationFailed",
    "Backoff",
    "BatchFailed",
    "BatchLimits",
    "BatchRun",
    "BudgetExhausted",
    "CallbackSink",
    "ConfigurationError",
    "ContextWindow",
    "DeadlineExceeded",
    "Endpoint",
    "ErrorInfo",
    "Fallback",
    "InternalError",
    "InvalidResponse",
    "JobError",
    "JsonlSink",
    "Limiter",
    "LimiterUnavailable",
    "Limits",
    "MemorySink",
    "OutputInvalid",
    "Pool",
    "PoolClosed",
    "PoolStatistics",
    "PoolStream",
    "QuotaExhausted",
    "Request",
    "RequestRejected",
    "RequestTooLarge",
    "Result",
    "RetriesExhausted",
    "RunStopped",
    "SchedulerError",
    "StreamIncomplete",
    "TrimPolicy",
    "Usage",
    "cancel_batches",
    "run_batch",
]
