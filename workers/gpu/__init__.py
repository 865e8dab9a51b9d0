"""GPUs on this node: discovery and capabilities (`discovery`), the NVENC budget (`nvenc`) and
`gpujobs doctor` (`doctor`)."""
