"""The OpenAI Batch API tier: run requests as batches at half the price, exactly once across restarts.

``async for result in scheduler.run_batch(requests, client=client, state=path)`` plans the requests into Batch API
input files, records each step in a journal beside the output before taking it, submits, polls, downloads and
retries; a rerun with the same state re-attaches instead of submitting again. :func:`cancel_batches` cancels the
batches of a state and :func:`batch_status` says where they stand; :meth:`BatchRun.stop` cuts a run over to online
work and :meth:`BatchRun.hand_back` reads what is left for it.

Modules: ``_plan`` (pure: parts and the cut-over), ``_journal`` (the state file), ``_files`` (part files, downloads),
``_judge`` (what each output line means), ``_api`` (calls outside a run), ``_settings`` (options and statistics),
``_runner`` (the run itself). The pure helpers (:func:`split`,
:func:`cutover_at`, :func:`online_seconds`) plan files and the ``auto`` tier's cut-over.
"""

from __future__ import annotations

from ._api import BatchStatus as BatchStatus
from ._api import batch_status as batch_status
from ._api import cancel_batches as cancel_batches
from ._journal import Journal as Journal
from ._journal import parts_dir as parts_dir
from ._plan import BatchLimits as BatchLimits
from ._plan import Splitter as Splitter
from ._plan import cutover_at as cutover_at
from ._plan import online_seconds as online_seconds
from ._plan import split as split
from ._runner import BatchRun as BatchRun
from ._runner import run_batch as run_batch
from ._settings import BatchProgress as BatchProgress
from ._settings import BatchRunStatistics as BatchRunStatistics
from ._settings import Estimate as Estimate
from ._settings import Polling as Polling

__all__ = [
    "BatchLimits",
    "BatchProgress",
    "BatchRun",
    "BatchRunStatistics",
    "BatchStatus",
    "Estimate",
    "Journal",
    "Polling",
    "Splitter",
    "batch_status",
    "cancel_batches",
    "cutover_at",
    "online_seconds",
    "parts_dir",
    "run_batch",
    "split",
]
