"""The `gpujobs` command (`gpujobs.cli.main:app`): thin over the SDK, rendering with rich."""
