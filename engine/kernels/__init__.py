"""Kernel operations behind one registry (see registry.py); the torch reference is torch_ops.py."""

from engine.kernels.registry import BACKENDS, OPS, KernelSet, backend_available, implementations, register

__all__ = ["BACKENDS", "OPS", "KernelSet", "backend_available", "implementations", "register"]
