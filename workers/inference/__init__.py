"""The batch-inference job: the OpenAI-compatible client (`client`), the chunk task (`chunk`),
its checkpoint and lease state in Redis (`state`) and the merged output (`output`)."""
