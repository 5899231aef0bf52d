"""A model of the kernel's IRQ bypass manager (``virt/lib/irqbypass.c``) as of Linux 6.17.

Producers (vfio-pci MSI vectors, vhost-vdpa queues) and consumers (KVM irqfds) register on
their own under a shared token, in practice the eventfd; when both sides of a token are present
the manager connects them through their callbacks in the kernel's exact order.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from harness.errors import HarnessError, StateError

_log = logging.getLogger(__name__)


# --- errors ----------------------------------------------------------------------------------


class BypassError(HarnessError):
    """The manager refused a registration; ``errno`` is what the kernel returns (negated)."""

    def __init__(self, code: int, message: str) -> None:
        self.errno = code
        super().__init__(f"{message} ({errno.errorcode.get(code, str(code))})")


class TokenBusy(BypassError):
    """Another producer (or consumer) already holds this token: ``-EBUSY`` from ``xa_insert``."""

    def __init__(self, side: str, token: Hashable) -> None:
        self.token = token
        super().__init__(errno.EBUSY, f"a {side} is already registered for token {token!r}")


class AlreadyRegistered(BypassError):
    """The object is registered already, under any token: ``-EINVAL`` (6.17's WARN_ON_ONCE)."""

    def __init__(self, side: str, token: Hashable) -> None:
        self.token = token
        super().__init__(errno.EINVAL, f"this {side} is already registered for token {token!r}")


class MissingCallback(BypassError):
    """A consumer without its own ``add_producer``/``del_producer``: ``-EINVAL``."""

    def __init__(self, name: str) -> None:
        self.callback = name
        super().__init__(errno.EINVAL, f"consumer does not implement {name}()")


class InvalidToken(BypassError):
    """``None`` is not a token: ``-EINVAL``, as 6.1 answered a NULL token."""

    def __init__(self) -> None:
        super().__init__(errno.EINVAL, "None is not a valid token")


class CallbackError(BypassError):
    """Raised by an ``add_consumer``/``add_producer`` callback to refuse a connection.

    This is the Python form of the kernel callback's negative return value.
    """

    def __init__(self, code: int, reason: str = "callback refused the connection") -> None:
        super().__init__(code, reason)


class ConnectError(BypassError):
    """A registration failed because an add callback refused; chained to its CallbackError.

    ``errno`` is the callback's code and ``callback`` names the callback that refused.
    The object being registered is left unregistered, as the kernel does.
    """

    def __init__(self, token: Hashable, callback: str, code: int) -> None:
        self.token = token
        self.callback = callback
        super().__init__(code, f"connect on token {token!r} failed in {callback}()")


# --- producers and consumers -----------------------------------------------------------------


class Producer:
    """An interrupt source (``struct irq_bypass_producer``); subclass it and override callbacks.

    As in the kernel, every callback is optional: the defaults do nothing, and the default
    ``add_consumer`` accepts.  ``irq``, ``consumer`` and ``token`` belong to the manager.
    Callbacks run with the manager's lock held and must not call back into the manager.
    ``add_consumer`` refuses by raising :class:`CallbackError`; the others must not raise.
    """

    irq: int = 0
    #: The connected consumer, or None; set only by a successful connect.
    consumer: Consumer | None = None
    _token: Hashable | None = None

    @property
    def token(self) -> Hashable | None:
        """The token this producer is registered under, or None when it is not registered."""
        return self._token

    def add_consumer(self, consumer: Consumer) -> None:
        """Accept ``consumer``, or raise :class:`CallbackError` to refuse."""

    def del_consumer(self, consumer: Consumer) -> None:
        """Undo :meth:`add_consumer` (on disconnect, or when the consumer side refused)."""

    def stop(self) -> None:
        """Quiesce the interrupt source before the pairing changes."""

    def start(self) -> None:
        """Resume after the pairing changed, whether or not the change succeeded."""


class Consumer:
    """An interrupt sink (``struct irq_bypass_consumer``, KVM's irqfd); subclass it.

    ``add_producer`` and ``del_producer`` are required: the base versions stand for the
    kernel's NULL function pointers, and registering a consumer that does not override them
    fails with ``EINVAL``.  ``stop`` and ``start`` are optional.  Same rules as
    :class:`Producer` for the lock and for raising.
    """

    #: The connected producer, or None; set only by a successful connect.
    producer: Producer | None = None
    _token: Hashable | None = None

    @property
    def token(self) -> Hashable | None:
        """The token this consumer is registered under, or None when it is not registered."""
        return self._token

    def add_producer(self, producer: Producer) -> None:
        """Accept ``producer``, or raise :class:`CallbackError` to refuse.  Required."""
        raise NotImplementedError

    def del_producer(self, producer: Producer) -> None:
        """Undo :meth:`add_producer` on disconnect.  Required."""
        raise NotImplementedError

    def stop(self) -> None:
        """Quiesce the sink (arm64 halts the guest) before the pairing changes."""

    def start(self) -> None:
        """Resume after the pairing changed, whether or not the change succeeded."""


def _implements(consumer: Consumer, name: str) -> bool:
    bound = getattr(consumer, name)
    return getattr(bound, "__func__", bound) is not getattr(Consumer, name)


# --- the manager -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenState:
    """What the manager holds for one token at the moment of a snapshot."""

    token: Hashable
    has_producer: bool
    producer_irq: int | None
    has_consumer: bool
    connected: bool


class BypassManager:
    """Producers and consumers keyed by token, connected 1:1, under one lock.

    6.17 keeps two xarrays indexed by the eventfd pointer, so lookups are O(1) (here: dicts).
    Before 6.17 they were two linked lists walked on every call, O(n) per registration and
    O(n^2) to register n irqfds; each registration also took a module reference
    (``try_module_get``, ``-ENODEV`` if the module was going away) and ``might_sleep()``;
    6.17 dropped both.  The lock is not reentrant, like the kernel's mutex: a callback that
    calls back into the manager gets a :class:`~harness.errors.StateError` instead of the
    kernel's deadlock.
    """

    def __init__(self) -> None:
        self._producers: dict[Hashable, Producer] = {}
        self._consumers: dict[Hashable, Consumer] = {}
        self._lock = threading.Lock()
        self._owner: int | None = None

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} producers={len(self._producers)}"
                f" consumers={len(self._consumers)}>")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        me = threading.get_ident()
        if self._owner == me:
            raise StateError("an irqbypass callback called back into the manager")
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    # -- registration ---------------------------------------------------------------------

    def register_producer(self, producer: Producer, token: Hashable, irq: int) -> None:
        """Register ``producer`` under ``token`` and connect it to a waiting consumer.

        ``producer.irq`` is set before any connect (6.17: "KVM expects the IRQ to be valid as
        soon as a connection is possible"); before 6.17 the caller set ``irq`` and ``token``
        in the struct itself.  Raises :class:`AlreadyRegistered`, :class:`InvalidToken`,
        :class:`TokenBusy` or :class:`ConnectError`; on any error the producer is left
        unregistered.  6.17 has no NULL check (a NULL eventfd would take index 0 and could
        never be unregistered); None is rejected here as 6.1 rejected a NULL token.
        """
        with self._locked():
            if producer._token is not None:
                raise AlreadyRegistered("producer", producer._token)
            if token is None:
                raise InvalidToken()
            producer.irq = irq
            if token in self._producers:
                raise TokenBusy("producer", token)
            self._producers[token] = producer
            consumer = self._consumers.get(token)
            if consumer is not None:
                try:
                    self._connect(producer, consumer, token)
                except BaseException:
                    del self._producers[token]
                    raise
            producer._token = token  # published only on success, like producer->eventfd
            _log.debug("producer irq %d registered for token %r", irq, token)

    def register_consumer(self, consumer: Consumer, token: Hashable) -> None:
        """Register ``consumer`` under ``token`` and connect it to a waiting producer.

        Raises as :meth:`register_producer` does, plus :class:`MissingCallback`.  In 6.1 an
        object registered twice got ``-EBUSY``: the token lived in the object, so the list
        walk found the object itself (the consumer walk also compared pointers); 6.17 keeps
        the token out of the caller's hands and answers ``-EINVAL``, as here.
        """
        with self._locked():
            if consumer._token is not None:
                raise AlreadyRegistered("consumer", consumer._token)
            for name in ("add_producer", "del_producer"):
                if not _implements(consumer, name):
                    raise MissingCallback(name)
            if token is None:
                raise InvalidToken()
            if token in self._consumers:
                raise TokenBusy("consumer", token)
            self._consumers[token] = consumer
            producer = self._producers.get(token)
            if producer is not None:
                try:
                    self._connect(producer, consumer, token)
                except BaseException:
                    del self._consumers[token]
                    raise
            consumer._token = token
            _log.debug("consumer registered for token %r", token)

    def unregister_producer(self, producer: Producer) -> None:
        """Disconnect ``producer`` from its consumer, if any, and remove it.

        A no-op for a producer that never registered or whose registration failed.  6.1
        looked the producer up by *token* and disconnected whichever consumer had that token,
        so unregistering a producer whose registration had failed with EBUSY (but whose token
        the caller left set) tore down another producer's pairing; 6.17 follows the
        ``consumer`` back-pointer, as here.
        """
        with self._locked():
            token = producer._token
            if token is None:
                return
            if self._producers.get(token) is not producer:
                raise StateError(f"producer for token {token!r} is registered elsewhere")
            if producer.consumer is not None:
                self._disconnect(producer, producer.consumer, token)
            del self._producers[token]
            producer._token = None
            _log.debug("producer unregistered from token %r", token)

    def unregister_consumer(self, consumer: Consumer) -> None:
        """Disconnect ``consumer`` from its producer, if any, and remove it.

        A no-op for a consumer that never registered or whose registration failed.  (6.1
        matched consumers by object but found the producer to disconnect by token.)
        """
        with self._locked():
            token = consumer._token
            if token is None:
                return
            if self._consumers.get(token) is not consumer:
                raise StateError(f"consumer for token {token!r} is registered elsewhere")
            if consumer.producer is not None:
                self._disconnect(consumer.producer, consumer, token)
            del self._consumers[token]
            consumer._token = None
            _log.debug("consumer unregistered from token %r", token)

    # -- pairing (lock held) --------------------------------------------------------------

    def _connect(self, producer: Producer, consumer: Consumer, token: Hashable) -> None:
        # The order is the kernel's __connect(), unchanged since 2015.  The start callbacks
        # run even when an add failed; a refused add_producer is rolled back with
        # del_consumer.  Back-pointers exist only since 6.17 and are set last, on success.
        producer.stop()
        consumer.stop()
        callback = "add_consumer"
        try:
            producer.add_consumer(consumer)
            callback = "add_producer"
            try:
                consumer.add_producer(producer)
            except BaseException:
                producer.del_consumer(consumer)
                raise
        except CallbackError as exc:
            _log.info("irq bypass connect (token %r) fails in %s: %d",
                      token, callback, -exc.errno)
            raise ConnectError(token, callback, exc.errno) from exc
        finally:
            consumer.start()
            producer.start()
        producer.consumer = consumer
        consumer.producer = producer
        _log.debug("connected producer irq %d to consumer on token %r", producer.irq, token)

    def _disconnect(self, producer: Producer, consumer: Consumer, token: Hashable) -> None:
        # The kernel's __disconnect(): the consumer lets go first, then the producer.
        producer.stop()
        consumer.stop()
        consumer.del_producer(producer)
        producer.del_consumer(consumer)
        consumer.start()
        producer.start()
        producer.consumer = None
        consumer.producer = None
        _log.debug("disconnected producer irq %d from token %r", producer.irq, token)

    # -- queries ----------------------------------------------------------------------------

    def producer_for(self, token: Hashable) -> Producer | None:
        """The producer registered under ``token``, or None."""
        with self._locked():
            return self._producers.get(token)

    def consumer_for(self, token: Hashable) -> Consumer | None:
        """The consumer registered under ``token``, or None."""
        with self._locked():
            return self._consumers.get(token)

    def is_connected(self, token: Hashable) -> bool:
        """Whether the producer and consumer under ``token`` are connected (by back-pointer)."""
        with self._locked():
            producer = self._producers.get(token)
            return producer is not None and producer.consumer is not None

    def tokens(self) -> tuple[Hashable, ...]:
        """Every token with a producer or a consumer: producers' first, in registration order."""
        with self._locked():
            return tuple(dict.fromkeys([*self._producers, *self._consumers]))

    def snapshot(self) -> tuple[TokenState, ...]:
        """One consistent :class:`TokenState` per token, in :meth:`tokens` order."""
        with self._locked():
            states = []
            for token in dict.fromkeys([*self._producers, *self._consumers]):
                producer = self._producers.get(token)
                states.append(TokenState(
                    token=token,
                    has_producer=producer is not None,
                    producer_irq=producer.irq if producer is not None else None,
                    has_consumer=token in self._consumers,
                    connected=producer is not None and producer.consumer is not None,
                ))
            return tuple(states)
