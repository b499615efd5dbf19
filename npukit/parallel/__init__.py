"""Tensor parallelism: the sharding table (`sharding`), used by `npukit.plan` and the engine's workers."""
