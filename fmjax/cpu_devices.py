"""The former home of :func:`fmjax.cpu.use_cpu_devices` and :func:`fmjax.cpu.num_cores`,
kept importable for ``benchmarks/`` (``fmjax.cpu_devices.num_cores()``); use
:mod:`fmjax.cpu`."""

from fmjax.cpu import num_cores, use_cpu_devices

__all__ = ["num_cores", "use_cpu_devices"]
