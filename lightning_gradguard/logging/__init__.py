"""Deferred logging: the device-side buffer and TensorBoard specifics."""

from lightning_gradguard.logging.buffer import DeferredBuffer, FlushResult

__all__ = ["DeferredBuffer", "FlushResult"]
