"""The bypass manager against the kernel's rules: examples per rule, then a state machine.

Fakes record every callback into one shared log as ``(object, callback, partner)`` tuples, so a
test can assert the exact sequence the kernel's ``__connect``/``__disconnect`` would emit.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Hashable

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from harness.bypass import (
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
from harness.errors import HarnessError, StateError

Call = tuple[str, str, str]


def name_of(obj: object) -> str:
    return str(getattr(obj, "name", "?"))


class FakeProducer(Producer):
    def __init__(self, name: str, log: list[Call], fail_add: int | None = None) -> None:
        self.name = name
        self.log = log
        self.fail_add = fail_add
        self.irq_seen_at_add: int | None = None
        self.consumer_seen_at_add: Consumer | None = None

    def _record(self, callback: str, partner: object = None) -> None:
        self.log.append((self.name, callback, name_of(partner) if partner is not None else ""))

    def add_consumer(self, consumer: Consumer) -> None:
        self._record("add_consumer", consumer)
        self.irq_seen_at_add = self.irq
        self.consumer_seen_at_add = self.consumer
        if self.fail_add is not None:
            raise CallbackError(self.fail_add)

    def del_consumer(self, consumer: Consumer) -> None:
        self._record("del_consumer", consumer)

    def stop(self) -> None:
        self._record("stop")

    def start(self) -> None:
        self._record("start")


class FakeConsumer(Consumer):
    def __init__(self, name: str, log: list[Call], fail_add: int | None = None) -> None:
        self.name = name
        self.log = log
        self.fail_add = fail_add
        self.irq_seen_at_add: int | None = None

    def _record(self, callback: str, partner: object = None) -> None:
        self.log.append((self.name, callback, name_of(partner) if partner is not None else ""))

    def add_producer(self, producer: Producer) -> None:
        self._record("add_producer", producer)
        self.irq_seen_at_add = producer.irq
        if self.fail_add is not None:
            raise CallbackError(self.fail_add)

    def del_producer(self, producer: Producer) -> None:
        self._record("del_producer", producer)

    def stop(self) -> None:
        self._record("stop")

    def start(self) -> None:
        self._record("start")


class BareConsumer(Consumer):
    """Overrides neither add_producer nor del_producer: the kernel's NULL callbacks."""

    name = "bare"


class HalfConsumer(Consumer):
    def add_producer(self, producer: Producer) -> None:
        pass


def connect_calls(p: str, c: str) -> list[Call]:
    return [(p, "stop", ""), (c, "stop", ""), (p, "add_consumer", c), (c, "add_producer", p),
            (c, "start", ""), (p, "start", "")]


def add_consumer_refused_calls(p: str, c: str) -> list[Call]:
    return [(p, "stop", ""), (c, "stop", ""), (p, "add_consumer", c),
            (c, "start", ""), (p, "start", "")]


def add_producer_refused_calls(p: str, c: str) -> list[Call]:
    return [(p, "stop", ""), (c, "stop", ""), (p, "add_consumer", c), (c, "add_producer", p),
            (p, "del_consumer", c), (c, "start", ""), (p, "start", "")]


def disconnect_calls(p: str, c: str) -> list[Call]:
    return [(p, "stop", ""), (c, "stop", ""), (c, "del_producer", p), (p, "del_consumer", c),
            (c, "start", ""), (p, "start", "")]


@pytest.fixture
def log() -> list[Call]:
    return []


@pytest.fixture
def mgr() -> BypassManager:
    return BypassManager()


# --- helpers ---------------------------------------------------------------------------------


def register(mgr: BypassManager, obj: Producer | Consumer, token: Hashable) -> None:
    if isinstance(obj, Producer):
        mgr.register_producer(obj, token, 9)
    else:
        mgr.register_consumer(obj, token)


def assert_failed_registration_left_no_trace(mgr: BypassManager, failed: Producer | Consumer,
                                             survivor: Producer | Consumer,
                                             token: Hashable) -> None:
    assert failed.token is None
    assert survivor.token == token
    assert not mgr.is_connected(token)
    if isinstance(failed, Producer):
        assert isinstance(survivor, Consumer)
        assert failed.consumer is None and survivor.producer is None
        assert mgr.producer_for(token) is None and mgr.consumer_for(token) is survivor
    else:
        assert isinstance(survivor, Producer)
        assert failed.producer is None and survivor.consumer is None
        assert mgr.consumer_for(token) is None and mgr.producer_for(token) is survivor
    assert mgr.tokens() == (token,)


# --- connect ---------------------------------------------------------------------------------


def test_lone_registrations_make_no_calls(mgr: BypassManager, log: list[Call]) -> None:
    mgr.register_producer(FakeProducer("p", log), "efd0", 40)
    mgr.register_consumer(FakeConsumer("c", log), "efd1")
    assert log == []
    assert not mgr.is_connected("efd0") and not mgr.is_connected("efd1")


@pytest.mark.parametrize("producer_first", [True, False])
def test_connect_order_is_the_same_whichever_side_registers_second(
        mgr: BypassManager, log: list[Call], producer_first: bool) -> None:
    p, c = FakeProducer("p", log), FakeConsumer("c", log)
    if producer_first:
        mgr.register_producer(p, "efd", 40)
        mgr.register_consumer(c, "efd")
    else:
        mgr.register_consumer(c, "efd")
        mgr.register_producer(p, "efd", 40)
    assert log == connect_calls("p", "c")
    assert mgr.is_connected("efd")
    assert p.consumer is c and c.producer is p
    assert p.token == c.token == "efd"


def test_irq_is_set_before_connect_and_back_pointers_after(
        mgr: BypassManager, log: list[Call]) -> None:
    p, c = FakeProducer("p", log), FakeConsumer("c", log)
    mgr.register_consumer(c, "efd")
    mgr.register_producer(p, "efd", 77)
    assert p.irq_seen_at_add == 77 and c.irq_seen_at_add == 77
    assert p.consumer_seen_at_add is None  # back-pointers appear only once both adds succeeded


def test_producer_without_callbacks_connects(mgr: BypassManager, log: list[Call]) -> None:
    p, c = Producer(), FakeConsumer("c", log)
    mgr.register_producer(p, "efd", 5)
    mgr.register_consumer(c, "efd")
    assert log == [("c", "stop", ""), ("c", "add_producer", "?"), ("c", "start", "")]
    assert mgr.is_connected("efd")


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("consumer_second", [True, False])
def test_refused_add_consumer_skips_add_producer_and_still_starts(
        mgr: BypassManager, log: list[Call], consumer_second: bool) -> None:
    p, c = FakeProducer("p", log, fail_add=errno.ENOSPC), FakeConsumer("c", log)
    first, second = (p, c) if consumer_second else (c, p)
    register(mgr, first, "efd")
    with pytest.raises(ConnectError) as info:
        register(mgr, second, "efd")
    assert info.value.errno == errno.ENOSPC and info.value.callback == "add_consumer"
    assert isinstance(info.value.__cause__, CallbackError)
    assert log == add_consumer_refused_calls("p", "c")
    assert_failed_registration_left_no_trace(mgr, second, first, "efd")


@pytest.mark.parametrize("consumer_second", [True, False])
def test_refused_add_producer_is_rolled_back_with_del_consumer(
        mgr: BypassManager, log: list[Call], consumer_second: bool) -> None:
    p, c = FakeProducer("p", log), FakeConsumer("c", log, fail_add=errno.EIO)
    first, second = (p, c) if consumer_second else (c, p)
    register(mgr, first, "efd")
    with pytest.raises(ConnectError) as info:
        register(mgr, second, "efd")
    assert info.value.errno == errno.EIO and info.value.callback == "add_producer"
    assert log == add_producer_refused_calls("p", "c")
    assert_failed_registration_left_no_trace(mgr, second, first, "efd")


def test_a_callback_bug_propagates_but_the_manager_stays_consistent(
        mgr: BypassManager, log: list[Call]) -> None:
    class BuggyConsumer(FakeConsumer):
        def add_producer(self, producer: Producer) -> None:
            super().add_producer(producer)
            raise RuntimeError("bug")

    p, c = FakeProducer("p", log), BuggyConsumer("c", log)
    mgr.register_producer(p, "efd", 1)
    with pytest.raises(RuntimeError):
        mgr.register_consumer(c, "efd")
    assert log == add_producer_refused_calls("p", "c")
    assert_failed_registration_left_no_trace(mgr, c, p, "efd")


def test_after_a_refusal_a_new_partner_can_connect(mgr: BypassManager, log: list[Call]) -> None:
    p = FakeProducer("p", log)
    mgr.register_producer(p, "efd", 1)
    with pytest.raises(ConnectError):
        mgr.register_consumer(FakeConsumer("bad", log, fail_add=errno.EINVAL), "efd")
    log.clear()
    mgr.register_consumer(FakeConsumer("good", log), "efd")
    assert log == connect_calls("p", "good")
    assert mgr.is_connected("efd")


# --- EBUSY / EINVAL --------------------------------------------------------------------------


def test_second_producer_on_a_token_is_busy(mgr: BypassManager, log: list[Call]) -> None:
    p1, p2 = FakeProducer("p1", log), FakeProducer("p2", log)
    mgr.register_producer(p1, "efd", 1)
    with pytest.raises(TokenBusy) as info:
        mgr.register_producer(p2, "efd", 2)
    assert info.value.errno == errno.EBUSY
    assert mgr.producer_for("efd") is p1 and p2.token is None
    assert log == []


def test_second_consumer_on_a_token_is_busy(mgr: BypassManager, log: list[Call]) -> None:
    p, c1, c2 = FakeProducer("p", log), FakeConsumer("c1", log), FakeConsumer("c2", log)
    mgr.register_producer(p, "efd", 1)
    mgr.register_consumer(c1, "efd")
    log.clear()
    with pytest.raises(TokenBusy) as info:
        mgr.register_consumer(c2, "efd")
    assert info.value.errno == errno.EBUSY
    assert log == [] and p.consumer is c1 and c2.producer is None


def test_unregistering_the_busy_loser_leaves_the_winner_alone(
        mgr: BypassManager, log: list[Call]) -> None:
    # 6.1 looked producers up by token here and tore down the winner's pairing.
    p1, p2, c = FakeProducer("p1", log), FakeProducer("p2", log), FakeConsumer("c", log)
    mgr.register_producer(p1, "efd", 1)
    mgr.register_consumer(c, "efd")
    with pytest.raises(TokenBusy):
        mgr.register_producer(p2, "efd", 2)
    log.clear()
    mgr.unregister_producer(p2)
    assert log == [] and mgr.is_connected("efd") and mgr.producer_for("efd") is p1


@pytest.mark.parametrize("second_token", ["efd", "other"])
def test_registering_the_same_object_twice_is_invalid(
        mgr: BypassManager, log: list[Call], second_token: str) -> None:
    p, c = FakeProducer("p", log), FakeConsumer("c", log)
    mgr.register_producer(p, "efd", 1)
    mgr.register_consumer(c, "efd")
    log.clear()
    with pytest.raises(AlreadyRegistered) as pinfo:
        mgr.register_producer(p, second_token, 2)
    with pytest.raises(AlreadyRegistered) as cinfo:
        mgr.register_consumer(c, second_token)
    assert pinfo.value.errno == cinfo.value.errno == errno.EINVAL
    assert log == [] and mgr.tokens() == ("efd",) and mgr.is_connected("efd")
    assert p.irq == 1  # the WARN_ON_ONCE check comes before irq is written


@pytest.mark.parametrize("consumer", [BareConsumer(), HalfConsumer()],
                         ids=["no-callbacks", "no-del_producer"])
def test_consumer_without_add_and_del_is_invalid(
        mgr: BypassManager, consumer: Consumer) -> None:
    with pytest.raises(MissingCallback) as info:
        mgr.register_consumer(consumer, "efd")
    assert info.value.errno == errno.EINVAL
    assert consumer.token is None and mgr.tokens() == ()


def test_none_is_not_a_token(mgr: BypassManager, log: list[Call]) -> None:
    with pytest.raises(InvalidToken):
        mgr.register_producer(FakeProducer("p", log), None, 1)
    with pytest.raises(InvalidToken) as info:
        mgr.register_consumer(FakeConsumer("c", log), None)
    assert info.value.errno == errno.EINVAL and mgr.tokens() == ()


def test_errors_belong_to_the_harness_hierarchy() -> None:
    for cls in (TokenBusy, AlreadyRegistered, MissingCallback, InvalidToken, ConnectError,
                CallbackError):
        assert issubclass(cls, BypassError) and issubclass(cls, HarnessError)


# --- disconnect and unregister ---------------------------------------------------------------


@pytest.mark.parametrize("side", ["producer", "consumer"])
def test_unregister_disconnects_in_kernel_order(
        mgr: BypassManager, log: list[Call], side: str) -> None:
    p, c = FakeProducer("p", log), FakeConsumer("c", log)
    mgr.register_producer(p, "efd", 1)
    mgr.register_consumer(c, "efd")
    log.clear()
    if side == "producer":
        mgr.unregister_producer(p)
        assert mgr.producer_for("efd") is None and mgr.consumer_for("efd") is c
    else:
        mgr.unregister_consumer(c)
        assert mgr.consumer_for("efd") is None and mgr.producer_for("efd") is p
    assert log == disconnect_calls("p", "c")
    assert p.consumer is None and c.producer is None and not mgr.is_connected("efd")


def test_unregister_of_an_unconnected_object_makes_no_calls(
        mgr: BypassManager, log: list[Call]) -> None:
    p = FakeProducer("p", log)
    mgr.register_producer(p, "efd", 1)
    mgr.unregister_producer(p)
    assert log == [] and mgr.tokens() == () and p.token is None


def test_unregister_is_a_no_op_for_never_or_failed_registrations(
        mgr: BypassManager, log: list[Call]) -> None:
    mgr.unregister_producer(FakeProducer("never-p", log))
    mgr.unregister_consumer(FakeConsumer("never-c", log))
    mgr.unregister_consumer(BareConsumer())
    p = FakeProducer("p", log, fail_add=errno.EIO)
    c = FakeConsumer("c", log)
    mgr.register_consumer(c, "efd")
    with pytest.raises(ConnectError):
        mgr.register_producer(p, "efd", 1)
    log.clear()
    mgr.unregister_producer(p)
    mgr.unregister_producer(p)
    assert log == [] and mgr.consumer_for("efd") is c and mgr.tokens() == ("efd",)


def test_an_object_can_register_again_after_unregistering(
        mgr: BypassManager, log: list[Call]) -> None:
    p, c = FakeProducer("p", log), FakeConsumer("c", log)
    mgr.register_producer(p, "efd", 1)
    mgr.unregister_producer(p)
    mgr.register_consumer(c, "other")
    mgr.register_producer(p, "other", 2)
    assert mgr.is_connected("other") and p.irq == 2 and p.token == "other"


def test_unregister_with_the_wrong_manager_is_a_state_error(log: list[Call]) -> None:
    p = FakeProducer("p", log)
    BypassManager().register_producer(p, "efd", 1)
    with pytest.raises(StateError):
        BypassManager().unregister_producer(p)


def test_a_callback_that_reenters_the_manager_is_a_state_error(
        mgr: BypassManager, log: list[Call]) -> None:
    class Reentrant(FakeConsumer):
        def add_producer(self, producer: Producer) -> None:
            mgr.producer_for("efd")

    mgr.register_producer(FakeProducer("p", log), "efd", 1)
    with pytest.raises(StateError):
        mgr.register_consumer(Reentrant("c", log), "efd")
    assert mgr.consumer_for("efd") is None and not mgr.is_connected("efd")


# --- queries ---------------------------------------------------------------------------------


def test_snapshot_describes_every_token(mgr: BypassManager, log: list[Call]) -> None:
    p1, p2 = FakeProducer("p1", log), FakeProducer("p2", log)
    c1, c3 = FakeConsumer("c1", log), FakeConsumer("c3", log)
    mgr.register_producer(p1, "efd1", 41)
    mgr.register_producer(p2, "efd2", 42)
    mgr.register_consumer(c1, "efd1")
    mgr.register_consumer(c3, "efd3")
    assert mgr.tokens() == ("efd1", "efd2", "efd3")
    assert mgr.snapshot() == (
        TokenState("efd1", has_producer=True, producer_irq=41, has_consumer=True, connected=True),
        TokenState("efd2", has_producer=True, producer_irq=42, has_consumer=False,
                   connected=False),
        TokenState("efd3", has_producer=False, producer_irq=None, has_consumer=True,
                   connected=False),
    )
    assert mgr.producer_for("efd2") is p2 and mgr.consumer_for("efd2") is None
    assert "producers=2" in repr(mgr)


def test_any_hashable_is_a_token(mgr: BypassManager, log: list[Call]) -> None:
    eventfd = object()  # in practice the eventfd's identity
    mgr.register_consumer(FakeConsumer("c", log), eventfd)
    mgr.register_producer(FakeProducer("p", log), eventfd, 3)
    assert mgr.is_connected(eventfd) and mgr.tokens() == (eventfd,)


# --- threads ---------------------------------------------------------------------------------


class ExclusiveProducer(Producer):
    """Fails the test if two callbacks ever overlap, i.e. if the lock does not serialise."""

    inside = 0
    overlaps = 0
    guard = threading.Lock()

    def _enter(self) -> None:
        with ExclusiveProducer.guard:
            ExclusiveProducer.inside += 1
            if ExclusiveProducer.inside > 1:
                ExclusiveProducer.overlaps += 1
        threading.Event().wait(0.00005)
        with ExclusiveProducer.guard:
            ExclusiveProducer.inside -= 1

    def add_consumer(self, consumer: Consumer) -> None:
        self._enter()

    def del_consumer(self, consumer: Consumer) -> None:
        self._enter()


class CountingConsumer(Consumer):
    def add_producer(self, producer: Producer) -> None:
        pass

    def del_producer(self, producer: Producer) -> None:
        pass


def test_threads_hammering_a_few_tokens_leave_a_consistent_manager(mgr: BypassManager) -> None:
    tokens = [f"efd{i}" for i in range(4)]
    errors: list[BaseException] = []

    def churn(seed: int) -> None:
        try:
            for i in range(300):
                token = tokens[(seed + i) % len(tokens)]
                obj: Producer | Consumer
                if (seed + i) % 2:
                    obj = ExclusiveProducer()
                    try:
                        mgr.register_producer(obj, token, i)
                    except TokenBusy:
                        continue
                    assert mgr.producer_for(token) is obj
                    mgr.unregister_producer(obj)
                else:
                    obj = CountingConsumer()
                    try:
                        mgr.register_consumer(obj, token)
                    except TokenBusy:
                        continue
                    mgr.unregister_consumer(obj)
                assert obj.token is None
        except BaseException as exc:  # surfaced to the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert ExclusiveProducer.overlaps == 0
    assert mgr.tokens() == () and mgr.snapshot() == ()


# --- the state machine -----------------------------------------------------------------------

TOKENS = ("efd0", "efd1")  # two are enough to show tokens are independent; fewer waste steps
N_PRODUCERS = 3
N_CONSUMERS = 3  # plus one BareConsumer at index N_CONSUMERS, always refused with EINVAL
FAILURES = st.sampled_from([None, None, errno.EIO, errno.ENOSPC])
Outcome = tuple[type[BypassError], int] | None


class BypassMachine(RuleBasedStateMachine):
    """Random register/unregister sequences against a plain reference model.

    The model: which token each object holds, the irq each producer was given, and which
    tokens are connected.  Each rule predicts the callbacks and the error before calling the
    manager, then compares; the invariants compare the whole registry after every step.
    A registration also sets whether the object's own add callback will refuse from now on,
    so a refusal can come from either side of a connect.
    """

    def __init__(self) -> None:
        super().__init__()
        self.log: list[Call] = []
        self.mgr = BypassManager()
        self.producers = [FakeProducer(f"p{i}", self.log) for i in range(N_PRODUCERS)]
        self.consumers: list[Consumer] = [FakeConsumer(f"c{i}", self.log)
                                          for i in range(N_CONSUMERS)]
        self.consumers.append(BareConsumer())
        self.prod_token: dict[int, str] = {}
        self.cons_token: dict[int, str] = {}
        self.prod_irq: dict[int, int] = {}
        self.connected: set[str] = set()

    # -- model helpers --------------------------------------------------------------------

    def _producer_at(self, token: str) -> int | None:
        return next((i for i, t in self.prod_token.items() if t == token), None)

    def _consumer_at(self, token: str) -> int | None:
        return next((i for i, t in self.cons_token.items() if t == token), None)

    def _predict_connect(self, p: int, c: int) -> tuple[list[Call], Outcome]:
        prod, cons = self.producers[p], self.consumers[c]
        assert isinstance(cons, FakeConsumer)
        if prod.fail_add is not None:
            return add_consumer_refused_calls(prod.name, cons.name), (ConnectError, prod.fail_add)
        if cons.fail_add is not None:
            return add_producer_refused_calls(prod.name, cons.name), (ConnectError, cons.fail_add)
        return connect_calls(prod.name, cons.name), None

    def _run(self, method: str, args: tuple[object, ...], expected_calls: list[Call],
             expected: Outcome) -> None:
        self.log.clear()
        outcome: Outcome = None
        try:
            getattr(self.mgr, method)(*args)
        except BypassError as exc:
            outcome = (type(exc), exc.errno)
        assert outcome == expected, f"{method}: raised {outcome}, model says {expected}"
        assert self.log == expected_calls, (
            f"{method} callbacks:\n  got      {self.log}\n  expected {expected_calls}")
        # --hypothesis-show-statistics shows how often each path was taken.
        event(f"{method}: {expected[0].__name__ if expected else 'ok'}, "
              f"{len(expected_calls)} calls")

    # -- rules --------------------------------------------------------------------------------

    @rule(p=st.integers(0, N_PRODUCERS - 1), token=st.sampled_from(TOKENS),
          irq=st.integers(0, 255), fail=FAILURES)
    def register_producer(self, p: int, token: str, irq: int, fail: int | None) -> None:
        self.producers[p].fail_add = fail
        calls: list[Call] = []
        expected: Outcome = None
        partner = self._consumer_at(token)
        if p in self.prod_token:
            expected = (AlreadyRegistered, errno.EINVAL)
        elif self._producer_at(token) is not None:
            expected = (TokenBusy, errno.EBUSY)
        elif partner is not None:
            calls, expected = self._predict_connect(p, partner)
        self._run("register_producer", (self.producers[p], token, irq), calls, expected)
        if expected is None:
            self.prod_token[p] = token
            self.prod_irq[p] = irq
            if partner is not None:
                self.connected.add(token)

    @rule(c=st.integers(0, N_CONSUMERS), token=st.sampled_from(TOKENS), fail=FAILURES)
    def register_consumer(self, c: int, token: str, fail: int | None) -> None:
        cons = self.consumers[c]
        if isinstance(cons, FakeConsumer):
            cons.fail_add = fail
        calls: list[Call] = []
        expected: Outcome = None
        partner = self._producer_at(token)
        if c in self.cons_token:
            expected = (AlreadyRegistered, errno.EINVAL)
        elif not isinstance(cons, FakeConsumer):
            expected = (MissingCallback, errno.EINVAL)
        elif self._consumer_at(token) is not None:
            expected = (TokenBusy, errno.EBUSY)
        elif partner is not None:
            calls, expected = self._predict_connect(partner, c)
        self._run("register_consumer", (cons, token), calls, expected)
        if expected is None:
            self.cons_token[c] = token
            if partner is not None:
                self.connected.add(token)

    @rule(p=st.integers(0, N_PRODUCERS - 1))
    def unregister_producer(self, p: int) -> None:
        calls: list[Call] = []
        token = self.prod_token.get(p)
        if token is not None and token in self.connected:
            partner = self._consumer_at(token)
            assert partner is not None
            calls = disconnect_calls(f"p{p}", f"c{partner}")
        self._run("unregister_producer", (self.producers[p],), calls, None)
        if token is not None:
            del self.prod_token[p]
            self.connected.discard(token)

    @rule(c=st.integers(0, N_CONSUMERS))
    def unregister_consumer(self, c: int) -> None:
        calls: list[Call] = []
        token = self.cons_token.get(c)
        if token is not None and token in self.connected:
            partner = self._producer_at(token)
            assert partner is not None
            calls = disconnect_calls(f"p{partner}", f"c{c}")
        self._run("unregister_consumer", (self.consumers[c],), calls, None)
        if token is not None:
            del self.cons_token[c]
            self.connected.discard(token)

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def registry_matches_model(self) -> None:
        expected_states = set()
        for token in TOKENS:
            p, c = self._producer_at(token), self._consumer_at(token)
            # 1:1 is structural in the model.  Connected iff both are present, because a
            # refused connect leaves the second object out.
            assert (token in self.connected) == (p is not None and c is not None)
            assert self.mgr.producer_for(token) is (self.producers[p] if p is not None else None)
            assert self.mgr.consumer_for(token) is (self.consumers[c] if c is not None else None)
            assert self.mgr.is_connected(token) == (token in self.connected)
            if p is not None or c is not None:
                expected_states.add(TokenState(
                    token, p is not None, self.prod_irq[p] if p is not None else None,
                    c is not None, token in self.connected))
        snapshot = self.mgr.snapshot()
        assert len(snapshot) == len(expected_states) and set(snapshot) == expected_states
        assert set(self.mgr.tokens()) == {s.token for s in expected_states}

    @invariant()
    def objects_match_model(self) -> None:
        for p, prod in enumerate(self.producers):
            token = self.prod_token.get(p)
            assert prod.token == token  # a refused registration leaves no token behind
            if token in self.connected:
                assert prod.consumer is not None and prod.consumer.producer is prod
                assert prod.consumer.token == token
            else:
                assert prod.consumer is None
            if token is not None:
                assert prod.irq == self.prod_irq[p]
        for c, cons in enumerate(self.consumers):
            token = self.cons_token.get(c)
            assert cons.token == token
            if token in self.connected:
                assert cons.producer is not None and cons.producer.consumer is cons
            else:
                assert cons.producer is None


# 1000 sequences of up to 40 steps: about 37,000 steps and 10 s on a 2-core runner.
# Lower max_examples if the unit suite gets slow; a failure is shrunk and replayed from
# .hypothesis/ either way.
BypassMachine.TestCase.settings = settings(max_examples=1000, stateful_step_count=40,
                                           deadline=None)
TestBypassMachine = BypassMachine.TestCase
