"""The OpenAI Batch API, self-hosted over the gpujobs queue (`gpujobs api`).

`/v1/files` and `/v1/batches` as the `openai` package calls them, so that code written for the
managed Batch API runs here with only `base_url` and `api_key` changed. A batch is a gpujobs
inference job: its id is `batch_<job id>`, and its status, counts and output files are read from
the job record every time (the record is the one source of truth). Files live under the media
root (`api/files/`). This wing imports the core; the core never imports it.
"""
