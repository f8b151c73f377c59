"""The one thread that owns the decoding engine and steps it for every request of the server.

Design choices:
- The engine (inference/engine.py) is not thread-safe and one model step should serve every running
  request, so a single scheduler thread owns it: request handlers hand it work through a thread-safe
  inbox and get their events back on their own asyncio queue (`loop.call_soon_threadsafe`), so the
  event loop never blocks on the model.
- Admission is bounded: `max_batch` rows decode together, up to `max_queue` more wait for a row, and a
  request beyond both is refused at once (`QueueFullError`, a 429) rather than left to time out.
- Cancelling (a client that went away, a stop string found by the handler) goes through the inbox
  too, so the row is freed before the next step.
- While nothing runs the thread sleeps on the inbox: an idle server costs no CPU.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass

from fucina.errors import FucinaError
from fucina.inference.engine import Engine, StepEvent
from fucina.inference.sampling import SamplingConfig

log = logging.getLogger(__name__)


class QueueFullError(FucinaError):
    """Every row is busy and the waiting queue is full."""


@dataclass
class _Submit:
    prompt: list[int]
    sampling: SamplingConfig
    logprobs: int | None
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    ticket: Ticket


@dataclass
class Ticket:
    """A handler's hold on one submitted request; `cancel` it to free its row."""

    scheduler: Scheduler
    engine_id: int | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        self.scheduler._inbox.put(("cancel", self))


class Scheduler:
    """Steps `engine` in a background thread while any request runs (see the module docstring)."""

    def __init__(self, engine: Engine, max_queue: int):
        self.engine = engine
        self.capacity = len(engine.rows) + max_queue
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._admitted = 0  # requests submitted and not yet finished or cancelled
        self._listeners: dict[int, _Submit] = {}
        self._thread = threading.Thread(target=self._run, name="fucina-scheduler", daemon=True)
        self._stopping = False
        self.generated = 0  # tokens handed to requests since the start

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._inbox.put(("stop", None))
        self._thread.join(timeout=10)

    @property
    def load(self) -> dict[str, int]:
        """Running and waiting requests, as the engine sees them, and the tokens generated so far."""
        return {
            "running": self.engine.running,
            "waiting": len(self.engine.waiting),
            "generated_tokens": self.generated,
        }

    def submit(
        self, prompts: list[tuple[list[int], SamplingConfig, int | None]]
    ) -> list[tuple[Ticket, asyncio.Queue]]:
        """Queue requests (all or none); each gets a ticket and the asyncio queue its events arrive on.

        Raises QueueFullError when they do not all fit in the free rows and the waiting queue.
        """
        with self._lock:
            if self._admitted + len(prompts) > self.capacity:
                raise QueueFullError(
                    f"the server is busy: {self._admitted} requests are running or waiting "
                    f"(at most {self.capacity}); try again later"
                )
            self._admitted += len(prompts)
        loop = asyncio.get_running_loop()
        handles = []
        for prompt, sampling, logprobs in prompts:
            events: asyncio.Queue = asyncio.Queue()
            ticket = Ticket(self)
            self._inbox.put(("submit", _Submit(prompt, sampling, logprobs, events, loop, ticket)))
            handles.append((ticket, events))
        return handles

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1

    def _run(self) -> None:
        while not self._stopping:
            self._drain_inbox(block=self.engine.idle)
            if self.engine.idle:
                continue
            try:
                events = self.engine.step()
            except Exception as err:  # noqa: BLE001 - one bad step must not kill every request silently
                log.exception("decoding step failed")
                for listener in list(self._listeners.values()):
                    self._deliver(listener, err)
                    self.engine.cancel(listener.ticket.engine_id)
                    self._release()
                self._listeners.clear()
                continue
            for event in events:
                listener = self._listeners.get(event.request_id)
                if listener is None:
                    continue
                self.generated += event.token is not None
                self._deliver(listener, event)
                if event.finished is not None:
                    del self._listeners[event.request_id]
                    self._release()

    def _drain_inbox(self, block: bool) -> None:
        """Apply every pending submit and cancel; waits for the first one when `block`."""
        while True:
            try:
                kind, item = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if kind == "submit":
                self._add(item)
            elif kind == "cancel":
                self._cancel(item)

    def _add(self, submit: _Submit) -> None:
        try:
            submit.ticket.engine_id = self.engine.add(submit.prompt, submit.sampling, submit.logprobs)
        except FucinaError as err:
            self._deliver(submit, err)
            self._release()
            return
        self._listeners[submit.ticket.engine_id] = submit

    def _cancel(self, ticket: Ticket) -> None:
        if ticket.cancelled:
            return
        ticket.cancelled = True
        if ticket.engine_id is not None and ticket.engine_id in self._listeners:
            del self._listeners[ticket.engine_id]
            self.engine.cancel(ticket.engine_id)
            self._release()

    @staticmethod
    def _deliver(submit: _Submit, item: StepEvent | Exception) -> None:
        try:
            submit.loop.call_soon_threadsafe(submit.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass
