"""Live job events: the worker thread publishes, SSE clients on the event loop subscribe.

Each job has a channel holding its events so far (so a late subscriber replays them in order) and the asyncio
queues of its current subscribers. Channels exist only while a job is live; once a job is finished its state is
in the store, and the events endpoint answers from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

MAX_BACKLOG = 500  # events kept per live job; older progress events are dropped first


@dataclass
class Event:
    id: int
    type: str  # "status", "progress", or a terminal status: "succeeded", "failed", "canceled"
    data: dict[str, Any]
    terminal: bool = False


@dataclass
class _Channel:
    backlog: list[Event] = field(default_factory=list)
    subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Event]]] = field(default_factory=list)


SHUTDOWN = "shutdown"  # the type of the event that ends every stream when the server stops


def first_event_id() -> int:
    """Where this process's event ids start: the microseconds since 1970, so they are above every id an earlier
    process of this server gave out (it would have needed more than one event a microsecond to reach them).
    A client resuming after a restart sends the last id it saw (Last-Event-ID); counted from 1 in each
    process, that old id was above the rerun's ids, and its events were skipped as already seen. 16 digits:
    within JavaScript's exact integers and the API's 18-digit limit."""
    return time.time_ns() // 1000


class EventHub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._channels: dict[str, _Channel] = {}
        self._ids = itertools.count(first_event_id())

    def publish(self, job_id: str, type_: str, data: dict[str, Any], terminal: bool = False) -> None:
        with self._lock:
            channel = self._channels.setdefault(job_id, _Channel())
            event = Event(next(self._ids), type_, data, terminal)
            if not terminal:
                channel.backlog.append(event)
                if len(channel.backlog) > MAX_BACKLOG:
                    del channel.backlog[1 : len(channel.backlog) - MAX_BACKLOG + 1]
            subscribers = list(channel.subscribers)
            if terminal:
                # Finished: the store has the outcome now, so the channel can go.
                del self._channels[job_id]
        for loop, queue in subscribers:
            with contextlib.suppress(RuntimeError):  # RuntimeError: that client's loop is gone
                loop.call_soon_threadsafe(queue.put_nowait, event)

    def end_all_streams(self) -> None:
        """Shutdown: every open stream gets a SHUTDOWN event, so waiters answer now instead of being cut off.
        Nothing is kept in the backlog: it says nothing about the job."""
        with self._lock:
            subscribers = [pair for channel in self._channels.values() for pair in channel.subscribers]
            event = Event(next(self._ids), SHUTDOWN, {}, False)
        for loop, queue in subscribers:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, event)

    def subscribe(self, job_id: str) -> tuple[list[Event], asyncio.Queue[Event]]:
        """The events so far and a queue of those to come. Call from the event loop."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        with self._lock:
            channel = self._channels.setdefault(job_id, _Channel())
            channel.subscribers.append((loop, queue))
            return list(channel.backlog), queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue[Event]) -> None:
        with self._lock:
            channel = self._channels.get(job_id)
            if channel is None:
                return
            channel.subscribers = [(lp, q) for lp, q in channel.subscribers if q is not queue]
            if not channel.subscribers and not channel.backlog:
                del self._channels[job_id]

    def latest(self, job_id: str, key: str) -> Any | None:
        """The newest value of `key` among a live job's events so far (e.g. its latest preview), or None."""
        with self._lock:
            channel = self._channels.get(job_id)
            backlog = list(channel.backlog) if channel else []
        for event in reversed(backlog):
            if key in event.data:
                return event.data[key]
        return None
