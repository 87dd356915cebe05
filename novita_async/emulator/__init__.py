"""A local emulator of Novita's Merge Face API, for offline tests, demos and benchmarks.

It speaks the contract (statuses, error bodies, limits), merges faces (the
real classical merge with the ``[local]`` extra, else a simple composite),
injects faults on demand and counts what it saw.

Example:
    >>> from novita_async.emulator import Emulator, EmulatorConfig, Faults
    >>> config = EmulatorConfig(latency=0.2, faults=Faults(rates={"503": 0.1}))
"""

from novita_async.emulator._app import STATS, create_app
from novita_async.emulator._config import DEFAULT_API_KEY, FAULT_KINDS, EmulatorConfig, Faults
from novita_async.emulator._merge import composite_merge
from novita_async.emulator._server import Emulator
from novita_async.emulator._stats import EmulatorStats, job_key

__all__ = [
    "DEFAULT_API_KEY",
    "FAULT_KINDS",
    "STATS",
    "Emulator",
    "EmulatorConfig",
    "EmulatorStats",
    "Faults",
    "composite_merge",
    "create_app",
    "job_key",
]
