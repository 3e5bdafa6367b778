"""mx: a distributed task-graph service for large matrix workloads."""

__version__ = "0.1.0"
