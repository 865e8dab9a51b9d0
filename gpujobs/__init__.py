"""gpujobs: a distributed job queue that feeds GPUs video transcodes and batch LLM inference.

The public SDK; everything else is internal and may change. The names below are imported on
first use (PEP 562), so `import gpujobs` and the `gpujobs` command start fast and load Celery,
Redis and pydantic only when a job is submitted or read.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpujobs.client import Client, Job
    from gpujobs.config import Settings
    from gpujobs.errors import (
        BrokerUnreachable,
        GpujobsError,
        InvalidSpec,
        JobFailed,
        JobNotFound,
    )
    from gpujobs.ladder import LadderSpec, submit_ladder
    from gpujobs.sdk import get_job, submit_inference, submit_many, submit_transcode
    from gpujobs.specs import InferenceSpec, JobRecord, JobState, Progress, TranscodeSpec

__all__ = [
    "BrokerUnreachable",
    "Client",
    "GpujobsError",
    "InferenceSpec",
    "InvalidSpec",
    "Job",
    "JobFailed",
    "JobNotFound",
    "JobRecord",
    "JobState",
    "LadderSpec",
    "Progress",
    "Settings",
    "TranscodeSpec",
    "get_job",
    "submit_inference",
    "submit_ladder",
    "submit_many",
    "submit_transcode",
]

# Where each public name lives.
_HOMES = {
    "Client": "client", "Job": "client", "get_job": "sdk", "submit_inference": "sdk",
    "submit_many": "sdk", "submit_transcode": "sdk", "Settings": "config",
    "BrokerUnreachable": "errors", "GpujobsError": "errors", "InvalidSpec": "errors",
    "JobFailed": "errors", "JobNotFound": "errors", "LadderSpec": "ladder",
    "submit_ladder": "ladder", "InferenceSpec": "specs", "JobRecord": "specs",
    "JobState": "specs", "Progress": "specs", "TranscodeSpec": "specs",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'gpujobs' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"gpujobs.{home}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
