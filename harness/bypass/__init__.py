"""The kernel's IRQ bypass manager, modelled: producers and consumers paired by eventfd token.

See :mod:`harness.bypass.manager` for the 6.17 semantics it follows and where older kernels differ.
"""

from harness.bypass.manager import (
    AlreadyRegistered,
    BypassError,
    BypassManager,
    CallbackError,
    ConnectError,
    Consumer,
    InvalidToken,
    MissingCallback,
    Producer,
    TokenBusy,
    TokenState,
)

__all__ = [
    "AlreadyRegistered",
    "BypassError",
    "BypassManager",
    "CallbackError",
    "ConnectError",
    "Consumer",
    "InvalidToken",
    "MissingCallback",
    "Producer",
    "TokenBusy",
    "TokenState",
]
