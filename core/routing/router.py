"""The router: inbound messages and service inputs in, workflow steps out.

For each inbound message (``{p}.in.*.*``) or workflow input (``{p}.wf.*``) it

1. reads the conversation's state and its revision from the KV bucket, or from its own
   cache of the states it wrote last;
2. if the state already records this input (a redelivery after commit), re-publishes
   the outputs stored with it and acks;
3. classifies the text when no workflow is active, and starts the best workflow, or
   the fallback below the confidence threshold; otherwise steps the active workflow;
4. writes the new state together with the step's outputs (its outbox) to the bucket,
   naming the revision it read (optimistic concurrency);
5. publishes the outputs (classification, workflow events, replies), pipelined;
6. acks the input.

Nothing lost, nothing doubled. Outputs are published only after their step committed,
so a conflict or a crash before 4 publishes nothing and the input is computed again.
A crash after 4 redelivers an input that the state records: step 2 publishes the stored
outbox again with the same ids, which JetStream's duplicate window drops if they had
gone out. A failed step is retried in place with backoff, so the conversation's next
input cannot overtake it; a revision conflict (another router wrote the conversation,
or this router's cache is stale) is retried at once on the bucket's state. An input
still failing after a few attempts is nak'd and comes back later.

Around the workflow steps the router also

* answers nothing while a conversation is handed off to a human agent (the user's
  messages are only recorded; the agent answers on ``{p}.out...`` and ends the handoff
  with the event ``handoff.end``);
* applies the cancel and restart phrases in any workflow;
* asks "Did you mean A or B?" when the top two candidates are within
  ``clarify_margin`` of each other;
* publishes due timeouts and idle expiries through its :class:`TimerScheduler`;
* makes the service requests of ``ask`` states after their step committed (see
  :meth:`Router._ask`): at least once, with a stable ``Commhub-Request-Id``.

Concurrency: one durable pull consumer shared by every router process (scale out by
running more); inside a process, one conversation's inputs run in order and different
conversations in parallel, at most ``concurrency`` inputs at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from commhub.core.bus import Bus
from commhub.core.classify import BatchingClassifier
from commhub.core.config import DEFAULT_CANCEL_PHRASES, DEFAULT_RESTART_PHRASES
from commhub.core.engine.fsm import Engine, matches_phrase
from commhub.core.envelope import (
    Alternative,
    Classification,
    ClassificationDecision,
    EnvelopeError,
    Message,
    Record,
    Sender,
    WorkflowEvent,
    WorkflowInput,
    decode_tagged,
    derived_id,
    now,
    record_problem,
)
from commhub.core.plugins import Plugins
from commhub.core.routing.state import (
    EXPIRE_EVENT,
    REPLY_EVENT,
    TIMEOUT_EVENT,
    ConversationState,
    PendingAsk,
    Reply,
    StepEvent,
    StepResult,
    Trigger,
)
from commhub.core.routing.timers import TimerScheduler
from commhub.core.serial import KeyedSerialRunner

__all__ = [
    "BOT",
    "DEFAULT_CANCEL_PHRASES",
    "DEFAULT_RESTART_PHRASES",
    "REQUEST_ID_HEADER",
    "OutboxEntry",
    "Router",
    "RouterStats",
    "StoredState",
]

log = logging.getLogger(__name__)

BOT = Sender(id="commhub", kind="bot", name="commhub")
# An input not acked this long is redelivered. A redelivered copy is harmless (the
# state records what was handled), so this is short; a long step sends in_progress().
ACK_WAIT_SECONDS = 10
STATE_CACHE_SIZE = 50_000  # conversations whose last written state this router keeps
RETRIES_IN_PLACE = 6  # about 1.5 s of backoff before an input is handed back with a nak
RECENT_INPUTS = 16  # earlier input ids a state keeps to recognise late redeliveries
# The header that carries an ``ask`` request's stable id, for services to dedupe on.
REQUEST_ID_HEADER = "Commhub-Request-Id"
ASK_SENDER = Sender(id="commhub-ask", kind="service", name="ask")


class OutboxEntry(msgspec.Struct, array_like=True):
    """One output of a committed step: where it goes and what it is."""

    subject: str
    record: Record


class StoredState(msgspec.Struct, kw_only=True):
    """What the state bucket holds per conversation: the state and the last step's
    outbox, written in one KV update so that a step's outputs exist only if it committed."""

    state: ConversationState
    outbox: list[OutboxEntry] = msgspec.field(default_factory=list)


_stored_decoder = msgspec.json.Decoder(StoredState)
_stored_encoder = msgspec.json.Encoder()


@dataclass
class RouterStats:
    handled: int = 0
    skipped_redeliveries: int = 0
    conflicts: int = 0
    retries: int = 0
    invalid: int = 0
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
    ) -> None:
        self.bus = bus
        self.engine = engine
        self.classifier = classifier
        self.plugins = plugins
        self.threshold = threshold
        self.concurrency = concurrency
        self.model_name, self.model_version = model
        self.exclusive = exclusive  # the only router on this stream: may rewind on start
        self.clarify_margin = clarify_margin
        self.cancel_phrases = tuple(cancel_phrases)
        self.restart_phrases = tuple(restart_phrases)
        self.timers = TimerScheduler(bus, idle_expiry)
        self.stats = RouterStats()
        self._slots = asyncio.Semaphore(concurrency)
        self._runner = KeyedSerialRunner()
        self._fetch_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._sub: Any = None
        self._cache: OrderedDict[str, tuple[StoredState, int]] = OrderedDict()

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Bind the shared durable consumer (creating it once) and start fetching."""
        s = self.bus.subjects
        config = ConsumerConfig(
            durable_name=s.router_consumer,
            name=s.router_consumer,
            description="commhub router: inbound messages and workflow inputs",
            filter_subjects=[s.all_inbound, s.all_workflow_input],
            deliver_policy=DeliverPolicy.NEW,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT_SECONDS,
            max_deliver=-1,
            max_ack_pending=max(1000, self.concurrency * 8),
        )
        self._sub = await self.bus.bind_durable(
            s.messages_stream, config, rewind_unacked=self.exclusive
        )
        await self.timers.start()
        self._fetch_task = asyncio.create_task(self._fetch_loop(), name="router-fetch")

    async def stop(self) -> None:
        """Stop fetching, let the inputs in hand finish (and ack), then unbind."""
        self._stopping.set()
        await self.timers.stop()
        if self._fetch_task is not None:
            await self._fetch_task
            self._fetch_task = None
        await self._runner.join()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _fetch_loop(self) -> None:
        batch = min(256, self.concurrency)
        while not self._stopping.is_set():
            try:
                msgs = await self._sub.fetch(batch, timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                continue  # nothing pending: not an error
            except Exception:
                if self._stopping.is_set():
                    break
                log.exception("router fetch failed; retrying")
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                await self._slots.acquire()  # bounds the inputs in flight
                self._runner.submit(self._key_of(msg.subject), self._job(msg))

    def _job(self, msg: Msg) -> Any:
        async def run() -> None:
            try:
                await self.handle(msg)
            finally:
                self._slots.release()

        return run

    def _key_of(self, subject: str) -> str:
        # {p}.in.{channel}.{conversation} or {p}.wf.{conversation}: the last token.
        return subject.rsplit(".", 1)[-1]

    # -- one input ------------------------------------------------------------------
    async def handle(self, msg: Msg) -> None:
        """Handle one delivered input end to end, including its ack (or nak)."""
        # The subject says what the record must be, so publishers in other languages
        # may leave out the "type" tag.
        expected = self.bus.subjects.record_tag(msg.subject)
        try:
            record = decode_tagged(msg.data, expected)
        except EnvelopeError as exc:
            await self._reject(msg, f"not a valid {expected} record: {exc}")
            return
        if not isinstance(record, Message | WorkflowInput):
            await self._reject(msg, f"{type(record).__name__} is not an input")
            return
        conversation = self._key_of(msg.subject)
        problem = record_problem(msg.subject, record)  # the bus contract, as on out
        if problem is not None:
            await self._reject(msg, problem)
            return
        # Retry in place, so that the conversation's next input waits behind this one
        # (a nak would let it overtake). Each attempt re-reads the state, so a retry
        # after a failure between publish and commit re-publishes the same ids.
        for attempt in range(RETRIES_IN_PLACE):
            try:
                done, state = await self._route(record, conversation)
                if state.asking is not None and state.asking.id == _ask_id(record.id, state):
                    # This input's step entered an ``ask`` state: ask now, after the
                    # commit, and before the ack, so that a crash asks again.
                    await self._ask(msg, conversation, state.asking)
            except KeyWrongLastSequenceError:
                self.stats.conflicts += 1  # another router wrote it: recompute on its state
            except Exception:
                self.stats.retries += 1
                log.exception("routing %s failed (attempt %d)", record.id, attempt + 1)
                await msg.in_progress()  # keep the server from redelivering meanwhile
                if self._stopping.is_set():
                    break
                await asyncio.sleep(min(2.0, 0.05 * 2**attempt))
            else:
                if not done:
                    self.stats.skipped_redeliveries += 1
                await msg.ack()
                return
        # Still failing (or stopping): let JetStream redeliver it later, to this or
        # another router; the conversation's other inputs go on meanwhile.
        await msg.nak(delay=5.0)

    async def _reject(self, msg: Msg, reason: str) -> None:
        self.stats.invalid += 1
        await self.bus.publish_invalid(msg.subject, msg.data, reason, "router")
        await msg.term()  # redelivering it would not make it valid

    async def _route(
        self, record: Message | WorkflowInput, conversation: str
    ) -> tuple[bool, ConversationState]:
        """Run one step; returns whether it ran (False when the state shows the input
        was already handled) and the conversation's committed state."""
        kv = await self.bus.state_bucket()
        stored, revision = await self._load_state(kv, conversation)
        if stored is not None and stored.state.last_input == record.id:
            # Committed before, maybe not published: publish again (same ids: no copies).
            await self.bus.publish_all([(o.subject, o.record) for o in stored.outbox])
            return False, stored.state
        if stored is not None and record.id in stored.state.recent_inputs:
            # Handled before later inputs, whose steps published after it: its outputs
            # went out then. Only its ack was lost.
            return False, stored.state
        state = stored.state if stored is not None else ConversationState(
            conversation=conversation
        )

        outputs: list[tuple[str, Record]] = []
        if isinstance(record, Message):
            result = await self._on_message(record, state, revision, outputs)
        else:
            result = self._on_input(record, state)
        if result is None:  # dropped by middleware or ignored: still remember it
            new_state = msgspec.structs.replace(state, last_input=record.id, updated=now())
            result = StepResult(state=new_state)
        if state.last_input is not None and result.state.last_input != state.last_input:
            recent = [*state.recent_inputs, state.last_input][-RECENT_INPUTS:]
            result.state = msgspec.structs.replace(result.state, recent_inputs=recent)
        await self._step_outputs(record, revision, result, outputs)
        new = StoredState(
            state=result.state, outbox=[OutboxEntry(subject, rec) for subject, rec in outputs]
        )
        value = _stored_encoder.encode(new)
        try:
            if revision is None:
                new_revision = await kv.create(conversation, value)
            else:
                new_revision = await kv.update(conversation, value, last=revision)
        except KeyWrongLastSequenceError:
            self._cache.pop(conversation, None)  # someone else wrote it: read it again
            raise
        self._remember(conversation, new, new_revision)
        await self.bus.publish_all(outputs)
        self.stats.handled += 1
        return True, result.state

    async def _load_state(
        self, kv: Any, conversation: str
    ) -> tuple[StoredState | None, int | None]:
        """The state and its revision: from this router's cache when it has written the
        conversation last, else from the bucket.

        The cache is never trusted blindly: every write names the revision it read, so
        if another router wrote the conversation since, the write fails with a conflict,
        the entry is dropped, and the retry reads the bucket.
        """
        cached = self._cache.get(conversation)
        if cached is not None:
            self._cache.move_to_end(conversation)
            return cached
        try:
            entry = await kv.get(conversation)
        except KeyNotFoundError:
            return None, None
        stored = _stored_decoder.decode(entry.value) if entry.value else None
        return stored, entry.revision

    def _remember(self, conversation: str, stored: StoredState, revision: int) -> None:
        self._cache[conversation] = (stored, revision)
        self._cache.move_to_end(conversation)
        if len(self._cache) > STATE_CACHE_SIZE:
            self._cache.popitem(last=False)

    async def _on_message(
        self,
        message: Message,
        state: ConversationState,
        revision: int | None,
        outputs: list[tuple[str, Record]],
    ) -> StepResult | None:
        routed = await self.plugins.inbound_message(message)
        if routed is None:
            return None
        message = routed
        if state.channel is None or state.user is None:
            state = msgspec.structs.replace(
                state, channel=message.channel, user=message.sender.id
            )
        if state.handoff:
            # A human agent has the conversation: the bot stays silent. The message is
            # on the bus and recorded, and counts as activity (idle expiry).
            return StepResult(state=msgspec.structs.replace(
                state, last_input=message.id, updated=now(), turns=state.turns + 1))
        ts = message.ts
        payload = message.payload or {}
        start = payload.get("start")
        trigger = Trigger(
            id=message.id,
            kind="button" if "value" in payload else "message",
            text=message.text if message.text is not None else _str_or_none(payload.get("value")),
            payload=payload or None,
            ts=ts,
        )
        if isinstance(start, str) and start in self.engine.definitions:
            # A "start" button (the fallback and clarifying questions offer them)
            # picks the workflow outright.
            outputs.append(self._classification(message, start, 1.0, [], "button",
                                                decision="button"))
            return self._restart(state, start, trigger, revision)
        if state.active and message.text and not self.engine.offers(state, message.text):
            # Phrases that work in any workflow; a state's own button of that name wins.
            if matches_phrase(message.text, self.cancel_phrases):
                return self.engine.cancel(state, trigger, ts)
            if matches_phrase(message.text, self.restart_phrases):
                run_id = derived_id(trigger.id, revision, "run")
                return self.engine.restart(state, trigger, run_id, ts)
        clarifying = state.workflow == self.engine.fallback
        if state.active and not clarifying:
            return self.engine.step(state, trigger, ts)
        text = message.text or ""
        alternatives = await self.classifier.classify(text) if text.strip() else []
        self.stats.classified += 1
        best = alternatives[0] if alternatives else None
        if best is not None and best.confidence >= self.threshold:
            workflow, confidence = best.workflow, best.confidence
        else:
            self.stats.fallbacks += 1
            workflow, confidence = None, best.confidence if best else 0.0
        close = self._too_close(alternatives)
        if close is not None:
            self.stats.clarified += 1
            outputs.append(self._classification(message, None, confidence, alternatives,
                                                decision="clarify"))
            return self._clarify(state, trigger, close, ts)
        decision: ClassificationDecision = "fallback" if workflow is None else "workflow"
        if clarifying:
            if workflow is None:  # still unclear: the fallback goes on (and hands over)
                return self.engine.step(state, trigger, ts)
            # The user said something clear while being asked to clarify: leave the
            # fallback run and start the workflow they asked for.
            outputs.append(self._classification(message, workflow, confidence, alternatives,
                                                decision=decision))
            return self._restart(state, workflow, trigger, revision)
        outputs.append(self._classification(message, workflow, confidence, alternatives,
                                            decision=decision))
        return self._start(state, workflow or self.engine.fallback, trigger, revision)

    def _too_close(self, alternatives: list[Alternative]) -> list[str] | None:
        """The top two workflows when both reach the threshold and are within
        ``clarify_margin`` of each other (too close to guess), else None."""
        if len(alternatives) < 2 or self.clarify_margin <= 0:
            return None
        first, second = alternatives[0], alternatives[1]
        if second.confidence < self.threshold:
            return None
        if first.confidence - second.confidence >= self.clarify_margin:
            return None
        names = [first.workflow, second.workflow]
        if any(n not in self.engine.definitions or n == self.engine.fallback for n in names):
            return None
        return names

    def _clarify(
        self, state: ConversationState, trigger: Trigger, names: list[str], ts: float
    ) -> StepResult:
        """Ask "Did you mean A or B?" with a start button for each; the state stays as
        it was (a run in progress, such as the fallback's, goes on if the user types)."""
        titles = [self.engine.definitions[n].description or n for n in names]
        buttons = [{"title": title, "payload": {"start": name}}
                   for name, title in zip(names, titles, strict=True)]
        reply = Reply(text=f'Did you mean "{titles[0]}" or "{titles[1]}"?', buttons=buttons)
        moved = msgspec.structs.replace(state, last_input=trigger.id, updated=ts,
                                        turns=state.turns + 1)
        return StepResult(state=moved, replies=[reply])

    def _on_input(self, record: WorkflowInput, state: ConversationState) -> StepResult | None:
        if not state.active:
            log.info("workflow input %s for idle conversation %s ignored", record.id,
                     record.conversation)
            return None
        if record.event == EXPIRE_EVENT:
            trigger = Trigger(id=record.id, kind="event", event=record.event,
                              data=record.data, ts=record.ts)
            return self.engine.expire(state, trigger, record.ts)
        kind = {TIMEOUT_EVENT: "timeout", REPLY_EVENT: "reply"}.get(record.event, "event")
        trigger = Trigger(
            id=record.id, kind=kind, event=record.event,  # type: ignore[arg-type]
            data=record.data, ts=record.ts,
        )
        return self.engine.step(state, trigger, record.ts)

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
            if not isinstance(body, dict):
                error, body = "bad_reply", None
            elif "error" in body:
                error = "error"
        except nats.errors.NoRespondersError:
            error = "no_responders"
        except (TimeoutError, nats.errors.TimeoutError):
            error = "timeout"
        except msgspec.DecodeError:
            error = "bad_reply"
        finally:
            beat.cancel()
        if error is not None:
            self.stats.ask_failures += 1
        outcome = WorkflowInput(
            id=derived_id(ask.id, "reply"),
            conversation=conversation,
            event=REPLY_EVENT,
            data={"id": ask.id, "subject": ask.subject, "ok": error is None, "error": error,
                  "reply": body},
            sender=ASK_SENDER,
        )
        await self.bus.publish(self.bus.subjects.workflow_input(conversation), outcome)

    def _start(
        self, state: ConversationState, workflow: str, trigger: Trigger, revision: int | None
    ) -> StepResult:
        run_id = derived_id(trigger.id, revision, "run")
        return self.engine.start(state, workflow, trigger, run_id, trigger.ts)

    def _restart(
        self, state: ConversationState, workflow: str, trigger: Trigger, revision: int | None
    ) -> StepResult:
        """Start ``workflow``; a run still active is recorded as cancelled first."""
        result = self._start(state, workflow, trigger, revision)
        if state.active and state.workflow is not None and state.run_id is not None:
            cancelled = StepEvent(
                kind="cancelled", workflow=state.workflow, run_id=state.run_id,
                from_state=state.state, trigger=trigger.kind,
            )
            result.events.insert(0, cancelled)
        return result

    def _classification(
        self,
        message: Message,
        workflow: str | None,
        confidence: float,
        alternatives: list[Alternative],
        model: str | None = None,
        decision: ClassificationDecision | None = None,
    ) -> tuple[str, Record]:
        record = Classification(
            id=derived_id(message.id, "classification"),
            message_id=message.id,
            conversation=message.conversation,
            text=message.text,
            workflow=workflow,
            confidence=round(float(confidence), 6),
            threshold=self.threshold,
            alternatives=alternatives,
            model=model or self.model_name,
            model_version="" if model else self.model_version,
            ts=now(),
            decision=decision,
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


def _ask_id(input_id: str, state: ConversationState) -> str:
    """The id the engine gives an ``ask`` made on entering ``state`` because of input
    ``input_id`` (see ``Engine._enter``): tells whether this input started the ask."""
    return derived_id(input_id, state.run_id or "", state.state, "ask")


async def _heartbeat(msg: Msg) -> None:
    """Tell JetStream the input is still being worked on, so it is not redelivered."""
    with contextlib.suppress(Exception):
        while True:
            await asyncio.sleep(ACK_WAIT_SECONDS / 3)
            await msg.in_progress()


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)
