"""Userspace, as QEMU does it: ring harvesting, collectors, throttles, migration, checkpointing."""
