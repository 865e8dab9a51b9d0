"""Watching the cluster: Flower for gpujobs, Prometheus metrics, `gpujobs top`."""
