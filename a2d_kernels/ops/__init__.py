"""Fused kernel backends. Each module defines ``BACKEND`` (see ``backends.KernelBackend``)."""
