"""gpujobs: a distributed job queue that feeds GPUs video transcodes and batch LLM inference.

The public SDK; everything else is internal and may change.
"""

from gpujobs.client import (
    Client,
    Job,
    get_job,
    submit_inference,
    submit_many,
    submit_transcode,
)
from gpujobs.config import Settings
from gpujobs.errors import (
    BrokerUnreachable,
    GpujobsError,
    InvalidSpec,
    JobFailed,
    JobNotFound,
)
from gpujobs.ladder import LadderSpec, submit_ladder
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
