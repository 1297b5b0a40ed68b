"""bn1d against the batch norm a user would pick instead, side by side in one process.

``python -m benchmarks`` (from the repository root) times, for each backend, bn1d
and its peer (Flax linen ``BatchNorm`` under ``jax.jit``, ``torch.nn.BatchNorm1d``
on the ``(B*L, C)`` view, a hand-written NumPy two-pass batch norm) and a plain
copy of the input as a memory-bandwidth reference; then the overhead of synced
statistics (JAX on 4 CPU devices, PyTorch over gloo with 2 processes) in
subprocesses. ``python -m benchmarks --help`` lists the options; the measured
table and how to read it are in ``docs/performance.md``.
"""
