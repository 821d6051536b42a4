"""Fused kernels. ``triton_a2d`` and ``cuda_a2d`` each define ``BACKEND`` (see
``backends.KernelBackend``); ``triton_qk`` holds the QK-mode kernels (``a2d_kernels.qk``)."""
