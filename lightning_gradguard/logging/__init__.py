"""Deferred logging: the device-side buffer (``buffer``) and TensorBoard specifics (``tensorboard``)."""
