"""What the guest writes, when, and on which vCPU: trace replay and seeded workload models."""

from .base import EXIT_DONE, EXIT_NONE, EXIT_SYNC, NO_WRITE, GuestProgram, WriteBatch
from .trace import TraceProgram

__all__ = ["EXIT_DONE", "EXIT_NONE", "EXIT_SYNC", "NO_WRITE", "GuestProgram", "TraceProgram", "WriteBatch"]
