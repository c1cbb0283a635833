"""Drive the real Linux KVM (/dev/kvm) to cross-check the simulator.

- ``ioctl``: architecture-neutral ioctl wrappers (KvmSystem, RealVm, RealVcpu, dirty ring).
- ``arch`` / ``x86``: the native guest (write a list of pages, MMIO exits at sync points)
  per architecture; x86-64 today, the ``Arch`` protocol says what arm64 would need.
- ``guest``: a VM running write programs (code slot not logged, data slot logged).
- ``replay``: ``kvm_replay_trace(trace)``, the same JSON as the simulator's ``replay_trace``.
- ``traces`` / ``validate``: the built-in trace set and the real-vs-simulator comparison.
- ``errors``: the errno table of the enable-cap / ioctl error cases.
- ``calibrate``: measure this host's costs and emit a host profile.
- ``cli``: the ``kvm-replay``, ``validate`` and ``calibrate`` subcommands.
"""
