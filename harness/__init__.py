"""A harness that boots real QEMU guests and proves how device interrupts reach them.

The library never prints or exits; :mod:`harness.cli` is the only place that does.
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())

from harness.logs import quiet_libraries  # noqa: E402 - after the logger it configures

quiet_libraries()

__version__ = "0.1.0"
