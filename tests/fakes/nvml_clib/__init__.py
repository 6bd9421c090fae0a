"""A fake of NVML's C library (libnvidia-ml.so.1) under the real pynvml wrappers.

The simulator (exporter/backends/sim.py) replaces pynvml at the Python level; this fake sits one layer
lower, where pynvml's `_nvmlGetFunctionPointer` finds each symbol on its loaded library object
(`pynvml.nvmlLib`), so pynvml's own structs, struct versions, argument conversions and error mapping run
as they do on a real driver. It can be an R535, R550 or R580 driver (drivers.py) on an HGX H100 node
(node.py); library.py says what it is faithful to and what it does not model.

    lib = FakeNvmlLibrary(R550, hgx_h100())
    with installed(lib):
        pynvml.nvmlInit()          # -> lib's nvmlInitWithFlags(0); lib.init_count == 1
"""

from .drivers import DRIVERS, R535, R550, R580, Driver
from .install import installed
from .library import Call, FakeNvmlLibrary
from .node import Gpu, Node, hgx_h100

__all__ = ["DRIVERS", "R535", "R550", "R580", "Call", "Driver", "FakeNvmlLibrary", "Gpu", "Node", "hgx_h100",
           "installed"]
