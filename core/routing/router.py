"""The router: inbound messages and service inputs in, workflow steps out.

The router does the I/O; every decision is made by the pure rules of :mod:`.rules`,
and the state is kept by the :class:`~commhub.core.routing.store.StateStore`. For each
inbound message (``{p}.in.*.*``) or workflow input (``{p}.wf.*``) it

1. loads the conversation's state and its revision from the store (from its cache of
   the states this router wrote last, or the KV bucket);
2. if the state already records this input (:func:`.rules.already_handled`): for the
   last input, re-publishes the outputs stored with it; for an earlier one, nothing
   (its outputs went out before the later inputs' steps); then acks;
3. runs the inbound middleware, asks the classifier when
   :func:`.rules.needs_classification` says the rules need it, and gets the step from
   :func:`.rules.decide` (start, restart, step, cancel, clarify, fallback, silence
   during a handoff, ignore, expire);
4. commits the new state together with the step's outputs (its outbox), naming the
   revision it read (optimistic concurrency);
5. publishes the outputs (classification, workflow events, replies), pipelined;
6. acks the input.

Nothing lost, nothing doubled. Outputs are published only after their step committed,
so a conflict or a crash before 4 publishes nothing and the input is computed again.
A crash after 4 redelivers an input that the state records: step 2 publishes the stored
outbox again with the same ids, which JetStream's duplicate window drops if they had
gone out. A failed step is retried in place with backoff, so the conversation's next
input cannot overtake it; a revision conflict (another router wrote the conversation,
or this router's cache is stale) is retried at once on the bucket's state. An input
still failing after a few attempts is nak'd with a growing delay and comes back later;
after its last attempt it is reported as a dead letter on ``{p}.evt.invalid``.

Bad input is refused before anything else: a subject whose conversation or channel is
not a valid id, or a record that is not a valid input for its subject, is terminated
(never redelivered) and reported once on ``{p}.evt.invalid``
(:mod:`commhub.core.routing.inputs`). The fetching, ordering, heartbeats, retries and
acks are the :class:`~commhub.core.delivery.DeliveryLoop`'s.

Around the workflow steps the router also

* publishes due timeouts and idle expiries through its :class:`TimerScheduler`;
* makes the service requests of ``ask`` states after their step committed (see
  :meth:`Router._ask`): at least once, with a stable ``Commhub-Request-Id``.

Concurrency: the inputs are read from ``{p}_inputs``, where the server copies every
``in`` and ``wf`` record into one of N partitions by conversation
(:mod:`commhub.core.streams`); each partition has one durable and is read by one router
at a time, which holds its lease (:mod:`commhub.core.leases`). Routers share the
partitions fairly and take over a dead one's within the lease TTL, so a conversation's
inputs are handled in stream order by one router at a time. Inside a process, one
conversation's inputs run in order and different conversations in parallel, at most
``concurrency`` inputs at once per partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import InvalidKeyError, KeyWrongLastSequenceError

from commhub.core.bus import Bus
from commhub.core.busfaults import BUS_UNAVAILABLE
from commhub.core.classify import BatchingClassifier
from commhub.core.config import DEFAULT_CANCEL_PHRASES, DEFAULT_RESTART_PHRASES
from commhub.core.delivery import Delivery, DeliveryLoop
from commhub.core.engine.fsm import Engine
from commhub.core.envelope import (
    Classification,
    Message,
    Record,
    Sender,
    WorkflowEvent,
    WorkflowInput,
    derived_id,
    now,
)
from commhub.core.leases import Leases
from commhub.core.metrics import HubMetrics, StageTimer
from commhub.core.plugins import Plugins
from commhub.core.retry import Decision as RetryDecision
from commhub.core.retry import Permanent, Retry, RetryPolicy
from commhub.core.routing import rules
from commhub.core.routing.agents import AgentPresence
from commhub.core.routing.inputs import decode_input
from commhub.core.routing.rules import Decision, RoutingPolicy
from commhub.core.routing.smalltalk import SmallTalk
from commhub.core.routing.state import ConversationState, PendingAsk, StepResult
from commhub.core.routing.store import OutboxEntry, StateStore, StoredState
from commhub.core.routing.timers import TimerScheduler
from commhub.core.streams import DEFAULT_PARTITIONS, partitions_of

__all__ = [
    "BOT",
    "DEFAULT_CANCEL_PHRASES",
    "DEFAULT_RESTART_PHRASES",
    "REQUEST_ID_HEADER",
    "RETRY_POLICY",
    "Router",
    "RouterStats",
]

log = logging.getLogger(__name__)

BOT = Sender(id="commhub", kind="bot", name="commhub")
# An input not acked this long is redelivered. A redelivered copy is harmless (the
# state records what was handled), so this is short; a long step sends in_progress().
ACK_WAIT_SECONDS = 10
# A failed step is retried in place 6 times (pauses of 0.05 + 0.1 + 0.2 + 0.4 + 0.8 =
# 1.55 s in all; none after the last) so the conversation's next input waits behind it;
# then it is handed back with a nak whose delay doubles up to a minute; after 30
# attempts (about 20 minutes) it is reported as a dead letter on evt.invalid, raw data
# included, and terminated.
RETRY_POLICY = RetryPolicy(first=0.05, factor=2.0, cap=60.0, in_place_attempts=6,
                           max_attempts=30)
CONFLICTS_IN_A_ROW = 10  # revision conflicts recomputed at once before it counts as a failure
# A failure that says the bus is away for a moment (commhub.core.busfaults), not that
# the step is wrong, is retried in place (the input held, kept alive) for up to this
# long before the retry policy's hand-back, which would let the conversation's later
# inputs overtake it. The pauses between tries double from the first up to the cap.
BUS_PATIENCE_SECONDS = 60.0
BUS_PAUSE_FIRST_SECONDS = 0.2
BUS_PAUSE_CAP_SECONDS = 2.0
# The header that carries an ``ask`` request's stable id, for services to dedupe on.
REQUEST_ID_HEADER = "Commhub-Request-Id"


@dataclass
class RouterStats:
    handled: int = 0
    skipped_redeliveries: int = 0
    conflicts: int = 0
    retries: int = 0
    invalid: int = 0
    handed_back: int = 0
    gave_up: int = 0
    classified: int = 0
    fallbacks: int = 0
    clarified: int = 0
    asked: int = 0
    ask_failures: int = 0


class Router:
    """Routes inputs to workflows; see the module docstring for the guarantees."""

    def __init__(
        self,
        bus: Bus,
        engine: Engine,
        classifier: BatchingClassifier,
        plugins: Plugins,
        threshold: float,
        concurrency: int = 64,
        model: tuple[str, str] = ("", ""),
        exclusive: bool = False,
        clarify_margin: float = 0.1,
        idle_expiry: float = 3600.0,
        cancel_phrases: tuple[str, ...] | list[str] = DEFAULT_CANCEL_PHRASES,
        restart_phrases: tuple[str, ...] | list[str] = DEFAULT_RESTART_PHRASES,
        smalltalk: SmallTalk | None = None,
        agent_ttl: float = 30.0,
        handoff_needs_agent: bool = True,
    ) -> None:
        self.bus = bus
        self.engine = engine
        self.classifier = classifier
        self.plugins = plugins
        self.policy = RoutingPolicy.for_engine(
            engine,
            threshold=threshold,
            clarify_margin=clarify_margin,
            cancel_phrases=cancel_phrases,
            restart_phrases=restart_phrases,
            smalltalk=smalltalk,
        )
        self.concurrency = concurrency
        self.model_name, self.model_version = model
        self.exclusive = exclusive  # unused since partitions: each lease holder rewinds
        self.store = StateStore(bus)
        self.timers = TimerScheduler(bus, idle_expiry, store=self.store)
        # Human agents' heartbeats; None: hand off without asking who is there.
        self.agents = AgentPresence(bus, agent_ttl) if handoff_needs_agent else None
        self.stats = RouterStats()
        self.partitions = DEFAULT_PARTITIONS
        self.metrics: HubMetrics | None = None  # set by the hub
        self.member: str | None = None  # this process's name in the leases (the hub's)
        self.leases: Leases | None = None
        self._loops: dict[str, DeliveryLoop[Message | WorkflowInput]] = {}

    # -- lifecycle --------------------------------------------------------------------
    async def start(self, settle: float = 5.0) -> None:
        """Join the routers: take a fair share of the inputs' partitions (waiting up to
        ``settle`` seconds for the others to hand theirs over) and start fetching them;
        start the timers and the agents' watch."""
        s = self.bus.subjects
        info = await self.bus.js.stream_info(s.inputs_stream)
        self.partitions = partitions_of(info.config) or DEFAULT_PARTITIONS
        self.leases = Leases(self.bus, "router", [str(k) for k in range(self.partitions)],
                             self._take_partition, self._drop_partition, member=self.member)
        await self.leases.start(settle=settle)
        try:
            await self.timers.start()
            if self.agents is not None:
                await self.agents.start()
        except BaseException:
            await self.leases.stop()
            raise

    async def stop(self) -> None:
        """Stop fetching, let the inputs in hand finish (and ack), hand the partitions
        over (the other routers take them at once), then unbind."""
        await self.timers.stop()
        if self.agents is not None:
            await self.agents.stop()
        # Every partition at once (each waits for its pull in flight), then the leases
        # go, so the other routers take the partitions over.
        await asyncio.gather(*(self._drop_partition(k, True) for k in list(self._loops)))
        if self.leases is not None:
            await self.leases.stop()

    @property
    def held_partitions(self) -> list[int]:
        return sorted(int(k) for k in self._loops)

    @property
    def in_hand(self) -> int:
        """Inputs fetched and not yet settled, over every partition held."""
        return sum(loop.held for loop in self._loops.values())

    async def _take_partition(self, slot: str) -> None:
        """This router holds partition ``slot`` now: read it from its ack floor (what a
        router that died held comes back at once; the lease makes this the only one)."""
        s = self.bus.subjects
        k = int(slot)
        config = ConsumerConfig(
            durable_name=s.partition_consumer(k),
            name=s.partition_consumer(k),
            description=f"commhub router: partition {k} of the inputs",
            filter_subject=s.partition(k),
            # Every input since the stream began: channels that started before the first
            # router lose nothing.
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ACK_WAIT_SECONDS,
            max_ack_pending=max(1000, self.concurrency * 8),
        )
        loop: DeliveryLoop[Message | WorkflowInput] = DeliveryLoop(
            self.bus,
            stream=s.inputs_stream,
            consumer=config,
            decode=self._decode,
            handler=self.handle,
            source="router",
            policy=RETRY_POLICY,
            max_in_flight=self.concurrency,
            batch=min(256, self.concurrency),
            fetch_timeout=0.5,
            rewind_unacked=True,
            strict_order=True,  # a lost delivery must not let the next input overtake it
            on_retry=self._on_retry,
            on_give_up=self._on_give_up,
            unwrap=s.unpartitioned,
        )
        self._loops[slot] = loop  # before starting: a stop meanwhile stops it too
        try:
            await loop.start()
        except BaseException:
            self._loops.pop(slot, None)
            raise

    async def _drop_partition(self, slot: str, graceful: bool) -> None:
        """Stop reading partition ``slot``: gracefully, the inputs in hand are finished
        and acked first; otherwise (the lease was lost) they are handed back at once."""
        loop = self._loops.pop(slot, None)
        if loop is not None:
            await loop.stop(grace=None if graceful else 0.0)

    # -- one input ------------------------------------------------------------------
    def _decode(self, subject: str, data: bytes) -> Message | WorkflowInput:
        """The input on ``subject``, or :class:`Permanent` (terminated and reported
        on ``evt.invalid`` by the delivery loop; see :mod:`commhub.core.routing.inputs`)."""
        try:
            return decode_input(self.bus.subjects, subject, data)
        except Exception:
            self.stats.invalid += 1
            raise

    async def handle(self, delivery: Delivery[Message | WorkflowInput]) -> None:
        """Handle one delivered input end to end; the delivery loop acks it when this
        returns.

        Raises :class:`Permanent` for an input no retry can handle (terminated and
        reported), anything else for a failure that may pass: the loop retries it in
        place with backoff, so that the conversation's next input waits behind it (a
        nak would let it overtake), then hands it back with a delay, and reports it as a
        dead letter after its last attempt (``RETRY_POLICY``). Each attempt re-reads the
        state, so a retry after a failure between commit and publish re-publishes the
        same ids. A revision conflict (another router wrote the conversation) is
        recomputed at once on the bucket's state.
        """
        record, conversation = delivery.record, delivery.key
        outage_started: float | None = None
        pause = BUS_PAUSE_FIRST_SECONDS
        conflicts = 0
        while conflicts < CONFLICTS_IN_A_ROW:
            try:
                done, state = await self._route(record, conversation)
                asking = rules.pending_ask(state, record.id)
                if asking is not None:
                    # This input's step entered an ``ask`` state: ask now, after the
                    # commit, and before the ack, so that a crash asks again.
                    await self._ask(delivery.msg, conversation, asking)
            except KeyWrongLastSequenceError:
                self.stats.conflicts += 1  # another router wrote it: recompute on its state
                conflicts += 1
                continue
            except InvalidKeyError as exc:  # no retry makes the key valid
                self.stats.invalid += 1
                raise Permanent(
                    f"conversation {conversation!r} is not a valid key: {exc}"
                ) from None
            except BUS_UNAVAILABLE:
                # The bus is away (a node died, a stream is electing its leader): wait
                # here, holding the input, rather than hand it back, which would let the
                # conversation's next input overtake it. Up to BUS_PATIENCE_SECONDS.
                now = time.monotonic()
                outage_started = outage_started or now
                if now - outage_started > BUS_PATIENCE_SECONDS:
                    self.stats.retries += 1
                    raise
                self.stats.retries += 1
                await asyncio.sleep(pause)
                pause = min(pause * 2, BUS_PAUSE_CAP_SECONDS)
                continue
            except Exception:
                self.stats.retries += 1
                raise
            if not done:
                self.stats.skipped_redeliveries += 1
            return
        self.stats.retries += 1
        raise Retry(f"the state of {conversation} changed under {CONFLICTS_IN_A_ROW} "
                    "attempts in a row")

    async def _on_retry(
        self, delivery: Delivery[Message | WorkflowInput], error: BaseException,
        decision: RetryDecision,
    ) -> None:
        if decision.action == "nak":
            self.stats.handed_back += 1

    async def _on_give_up(
        self, delivery: Delivery[Message | WorkflowInput], error: BaseException | None,
        reason: str,
    ) -> None:
        self.stats.gave_up += 1

    async def _route(
        self, record: Message | WorkflowInput, conversation: str
    ) -> tuple[bool, ConversationState]:
        """Run one step; returns whether it ran (False when the state shows the input
        was already handled) and the conversation's committed state."""
        timer = StageTimer(self.metrics.observe_stage if self.metrics else None)
        with timer("load"):
            stored, revision = await self.store.load(conversation)
        seen = rules.already_handled(stored.state if stored else None, record.id)
        if stored is not None and seen is not None:
            if seen == "last":
                # Committed before, maybe not published: publish again (same ids: no
                # copies). An earlier input's outputs went out before the later steps.
                await self.bus.publish_all([(o.subject, o.record) for o in stored.outbox])
            return False, stored.state
        state = stored.state if stored is not None else ConversationState(
            conversation=conversation
        )
        with timer("decide"):  # the classifier's share is also timed on its own
            decision, routed = await self._decide(record, state, revision)
        outputs: list[tuple[str, Record]] = []
        if decision.classification is not None:
            assert isinstance(routed, Message)  # only messages are classified
            outputs.append(self._classification(routed, decision.classification))
        await self._step_outputs(record, revision, decision.result, outputs)
        new = StoredState(
            state=decision.result.state,
            outbox=[OutboxEntry(subject, rec) for subject, rec in outputs],
        )
        with timer("commit"):
            await self.store.commit(conversation, new, revision)
        with timer("publish"):
            await self.bus.publish_all(outputs)
        self.stats.handled += 1
        timer.total()
        if self.metrics is not None:
            self._observe_outputs(outputs)
        return True, decision.result.state

    def _observe_outputs(self, outputs: list[tuple[str, Record]]) -> None:
        assert self.metrics is not None
        for _subject, record in outputs:
            if isinstance(record, Classification):
                self.metrics.observe_classification(record.decision)
            elif isinstance(record, WorkflowEvent) and record.kind != "transition":
                self.metrics.observe_workflow_event(record.workflow, record.kind)

    async def _decide(
        self, record: Message | WorkflowInput, state: ConversationState, revision: int | None
    ) -> tuple[Decision, Message | WorkflowInput | None]:
        """The I/O the rules need (the inbound middleware, the classifier), then the
        rules' decision, counted in the stats; with the input as the rules saw it (a
        message as the middleware returned it; None when the middleware dropped it)."""
        if isinstance(record, WorkflowInput):
            decision = rules.decide(state, record, None, self.policy, self.engine, revision,
                                    now())
            if decision.action == "ignore":
                log.info("workflow input %s for idle conversation %s ignored", record.id,
                         record.conversation)
            return decision, record
        message = await self.plugins.inbound_message(record)
        if message is None:
            return rules.dropped(state, record.id, now()), None
        alternatives = None
        if rules.needs_classification(state, message, self.policy, self.engine):
            started = time.perf_counter()
            alternatives = await self.classifier.classify(message.text or "")
            if self.metrics is not None:
                self.metrics.observe_stage("classify", time.perf_counter() - started)
            self.stats.classified += 1
        at = now()
        entities = rules.message_entities(state, message, self.engine, at)
        agents = self.agents.available(at) if self.agents is not None else True
        decision = rules.decide(state, message, alternatives, self.policy, self.engine,
                                revision, at, entities=entities, agents_available=agents)
        if decision.action == "fallback":
            self.stats.fallbacks += 1
        elif decision.action == "clarify":
            self.stats.clarified += 1
        return decision, message

    async def _ask(self, msg: Msg, conversation: str, ask: PendingAsk) -> None:
        """Make an ``ask`` state's request and publish the outcome as a ``reply``
        WorkflowInput on ``{p}.wf.{conversation}``, which steps the run like any input.

        At least once: the request goes out after the step committed and before the
        input is acked, so a crash in between asks again, with the same
        ``Commhub-Request-Id`` header (services that must not act twice dedupe on it).
        The reply input's id is derived from the request id, so JetStream's duplicate
        window keeps one copy, and the engine ignores a reply for a request the run no
        longer waits for. Failures (timeout, no responders, a reply that is not a JSON
        object, or one with an ``error`` key) become ``ok: false`` with the reason.
        """
        headers = {REQUEST_ID_HEADER: ask.id, "Commhub-Conversation": conversation}
        beat = asyncio.create_task(_heartbeat(msg))  # a slow service must not cause redelivery
        body: Any = None
        error: str | None = None
        self.stats.asked += 1
        try:
            response = await self.bus.nc.request(
                ask.subject, msgspec.json.encode(ask.data), timeout=ask.timeout, headers=headers
            )
            body = msgspec.json.decode(response.data)
        except nats.errors.NoRespondersError:
            error = "no_responders"
        except (TimeoutError, nats.errors.TimeoutError):
            error = "timeout"
        except msgspec.DecodeError:
            error = "bad_reply"
        finally:
            beat.cancel()
        outcome = rules.ask_reply(ask, conversation, body, error, now())
        if not outcome.data["ok"]:
            self.stats.ask_failures += 1
        await self.bus.publish(self.bus.subjects.workflow_input(conversation), outcome)

    def _classification(
        self, message: Message, fields: rules.ClassificationFields
    ) -> tuple[str, Record]:
        """The Classification record of ``message``, and its subject."""
        record = Classification(
            id=derived_id(message.id, "classification"),
            message_id=message.id,
            conversation=message.conversation,
            text=message.text,
            workflow=fields.workflow,
            confidence=round(float(fields.confidence), 6),
            threshold=self.policy.threshold,
            alternatives=fields.alternatives,
            model=fields.model or self.model_name,
            model_version="" if fields.model else self.model_version,
            ts=now(),
            decision=fields.decision,
            entities=fields.entities,
        )
        return self.bus.subjects.classified(message.conversation), record

    async def _step_outputs(
        self,
        record: Message | WorkflowInput,
        revision: int | None,
        result: StepResult,
        outputs: list[tuple[str, Record]],
    ) -> None:
        """Append everything the step produced to ``outputs``, with ids derived from the
        input and the revision (a recomputed step names its outputs the same way)."""
        s = self.bus.subjects
        state = result.state
        ts = now()
        for i, step_event in enumerate(result.events):
            event = WorkflowEvent(
                id=derived_id(record.id, revision, "event", i),
                run_id=step_event.run_id,
                conversation=record.conversation,
                workflow=step_event.workflow,
                kind=step_event.kind,
                from_state=step_event.from_state,
                to_state=step_event.to_state,
                trigger=step_event.trigger,
                slots_changed=step_event.slots_changed,
                message_id=record.id,
                ts=ts,
                data=step_event.data,
            )
            outputs.append((s.workflow_event(step_event.workflow, step_event.kind), event))
        channel = state.channel or (record.channel if isinstance(record, Message) else None)
        if channel is not None:
            for i, reply in enumerate(result.replies):
                out = Message(
                    id=derived_id(record.id, revision, "reply", i),
                    conversation=record.conversation,
                    channel=channel,
                    direction="out",
                    sender=BOT,
                    text=reply.text,
                    payload={"buttons": reply.buttons} if reply.buttons else None,
                    reply_to=record.id,
                    ts=ts,
                )
                routed = await self.plugins.outbound_message(out)
                if routed is not None:
                    outputs.append((s.outbound(channel, record.conversation), routed))
        workflow = self._workflow_of(result)
        for i, emit in enumerate(result.emits):
            emitted = WorkflowEvent(
                id=derived_id(record.id, revision, "emit", i),
                run_id=self._run_of(result),
                conversation=record.conversation,
                workflow=workflow,
                kind="emitted",
                trigger=emit.name,
                message_id=record.id,
                ts=ts,
                event=emit.name,
                data=emit.data,
            )
            outputs.append((s.workflow_event(workflow, emit.name), emitted))

    @staticmethod
    def _workflow_of(result: StepResult) -> str:
        if result.events:
            return result.events[-1].workflow
        return result.state.workflow or "none"

    @staticmethod
    def _run_of(result: StepResult) -> str:
        if result.events:
            return result.events[-1].run_id
        return result.state.run_id or ""


async def _heartbeat(msg: Msg) -> None:
    """Tell JetStream the input is still being worked on, so it is not redelivered."""
    with contextlib.suppress(Exception):
        while True:
            await asyncio.sleep(ACK_WAIT_SECONDS / 3)
            await msg.in_progress()
