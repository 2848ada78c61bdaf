"""The model worker: one thread owns the model and runs every transcription, batched across requests.

A request's audio arrives decoded and cut into the chunks ``speechformer transcribe`` would
decode (:meth:`Transcriber.chunks <speechformer.transcribe.Transcriber.chunks>`), as a
:class:`Job`, and waits in a bounded queue. The worker takes what has arrived: the chunks of
the waiting jobs that share the first one's options, oldest first, up to ``max_batch_seconds``
of audio, waiting at most ``max_wait_ms`` after the oldest arrived for the requests still arriving
(being uploaded, decoded or cut: :meth:`Worker.arriving`); with none arriving it does not wait, so a
lone request pays no batching delay. It runs
them as one :meth:`Transcriber.transcribe_segments
<speechformer.transcribe.Transcriber.transcribe_segments>` call (which batches them by length)
and hands each chunk's result back to its job as it is done. A long file's chunks may span
several batches; each chunk's result is what it gets alone, so a request's transcript never
depends on its batch-mates.

A batch that raises is run again one job at a time: the job at fault fails alone (its caller
gets a 500), the others get their transcripts, and the worker goes on with the next batch.
``batching=False`` runs one request at a time (its chunks together), as servers without
cross-request batching do: the benchmark's baseline.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from torch import Tensor

from ..options import TranscribeOptions
from ..transcribe import Transcriber, WindowResult
from .metrics import Metrics

log = logging.getLogger("speechformer.serve")

#: What a job is told, from the worker thread: ("window", chunk index, WindowResult) for each
#: chunk as it is decoded, then ("done",); or ("error", message) when its audio failed.
Event = tuple


class QueueFull(Exception):
    """The queue holds ``queue_size`` requests; ``retry_after`` is the estimated wait in seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full, retry after {retry_after} s")
        self.retry_after = retry_after


class Stopping(Exception):
    """The server is shutting down and takes no new requests."""


class Job:
    """One request's audio in the worker: its chunks ``(first sample, waveform)``, its options,
    and ``deliver``, called from the worker thread with each :data:`Event`."""

    def __init__(self, chunks: Sequence[tuple[int, Tensor]], options: TranscribeOptions, sample_rate: int,
                 deliver: Callable[[Event], None]) -> None:
        self.chunks = list(chunks)
        self.options = options
        self.seconds = [len(wav) / sample_rate for _, wav in self.chunks]
        self.deliver = deliver
        self.arrived = time.monotonic()
        self.taken = 0  # chunks handed to a batch
        self.done = 0  # chunks decoded
        self.cancelled = False  # its caller stopped waiting (504) or failed: nothing more to do for it

    @property
    def waiting_seconds(self) -> float:
        """Audio seconds not yet handed to a batch."""
        return sum(self.seconds[self.taken:])


class Worker:
    """The one thread that owns the model (see the module docstring)."""

    def __init__(self, transcriber: Transcriber, *, max_batch_seconds: float = 240.0, max_wait_ms: float = 50.0,
                 queue_size: int = 256, batching: bool = True, metrics: Metrics | None = None,
                 cache_size: int = 8) -> None:
        self.base = transcriber
        self.bundle = transcriber.bundle
        self.sample_rate = transcriber.sample_rate
        self.max_batch_seconds = max_batch_seconds
        self.max_wait = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self.batching = batching
        self.metrics = metrics or Metrics()
        self.cache_size = cache_size
        self._transcribers: OrderedDict[TranscribeOptions, Transcriber] = OrderedDict(
            [(transcriber.options, transcriber)])
        self._pending: deque[Job] = deque()
        self._arriving = 0  # requests being received, not yet submitted (see ``arriving``)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="speechformer-model", daemon=True)

    # ------------------------------------------------------------------ what the app calls
    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Take no new jobs, finish the queued ones, and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue ``job``, or refuse it: :class:`QueueFull`, :class:`Stopping`."""
        with self._cond:
            if self._stopping:
                raise Stopping()
            if len(self._pending) >= self.queue_size:
                raise QueueFull(self._retry_after())
            self._pending.append(job)
            self._cond.notify_all()

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Around the receiving of one request (its upload read, decoded and cut into chunks, up to
        :meth:`submit`): while any request is arriving, the worker waits for it (at most
        ``max_wait_ms``) before it runs a batch; with none arriving, it runs what is queued at once."""
        with self._cond:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cond:
                self._arriving -= 1
                self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """Its caller stopped waiting: drop what is left of it."""
        with self._cond:
            job.cancelled = True
            if job in self._pending:
                self._pending.remove(job)

    @property
    def queue_length(self) -> int:
        with self._cond:
            return len(self._pending)

    def transcriber(self, options: TranscribeOptions) -> Transcriber:
        """The transcriber for ``options`` (already checked), made once (only the last
        ``cache_size`` are kept). Called in the worker thread or before it starts: making one may
        tune the model for inference."""
        found = self._transcribers.get(options)
        if found is None:
            found = self._transcribers[options] = Transcriber(self.bundle, options, self.base.device)
            while len(self._transcribers) > self.cache_size:
                self._transcribers.popitem(last=False)
        self._transcribers.move_to_end(options)
        return found

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _take(self) -> list[tuple[Job, list[int]]] | None:
        """The next batch (None: stopping and nothing left). Waits for a first job, then (batching),
        while requests are arriving, for more audio until ``max_batch_seconds`` or ``max_wait_ms``
        after the oldest arrived."""
        with self._cond:
            while not self._pending:
                if self._stopping:
                    return None
                self._cond.wait()
            if self.batching:
                deadline = self._pending[0].arrived + self.max_wait
                while (self._pending and self._arriving and not self._stopping
                       and self._ready_seconds() < self.max_batch_seconds):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            return self._gather() if self._pending else []

    def _ready_seconds(self) -> float:
        options = self._pending[0].options
        return sum(job.waiting_seconds for job in self._pending if job.options == options)

    def _gather(self) -> list[tuple[Job, list[int]]]:
        """Chunks of the waiting jobs with the oldest one's options, in order, within the budget
        (the first chunk always). Without batching: the oldest job's chunks, all of them."""
        first = self._pending[0]
        if not self.batching:
            self._pending.popleft()
            taken = list(range(first.taken, len(first.chunks)))
            first.taken = len(first.chunks)
            return [(first, taken)]
        batch, budget = [], self.max_batch_seconds
        for job in list(self._pending):
            if job.options != first.options:
                continue
            taken = []
            while job.taken < len(job.chunks) and (not batch and not taken or job.seconds[job.taken] <= budget):
                budget -= job.seconds[job.taken]
                taken.append(job.taken)
                job.taken += 1
            if taken:
                batch.append((job, taken))
            if job.taken == len(job.chunks):
                self._pending.remove(job)
            if budget <= 0 or job.taken < len(job.chunks):
                break
        return batch

    def _run(self, batch: list[tuple[Job, list[int]]]) -> None:
        """Decode the batch's chunks together; if that raises, each job alone (the faulty one fails)."""
        started = time.perf_counter()
        try:
            transcriber = self.transcriber(batch[0][0].options)
            windows = transcriber.transcribe_segments([job.chunks[i][1] for job, taken in batch for i in taken])
        except Exception:  # noqa: BLE001 - one request's audio must not take the batch or the worker down
            log.exception("a batch of %d request(s) failed; running them one at a time", len(batch))
            self.metrics.count_failed_batch()
            for job, taken in batch:
                self._run_alone(job, taken)
        else:
            results = iter(windows)
            for job, taken in batch:
                self._deliver(job, taken, [next(results) for _ in taken])
        seconds = sum(job.seconds[i] for job, taken in batch for i in taken)
        self.metrics.record_batch(len(batch), sum(len(t) for _, t in batch), seconds, time.perf_counter() - started)

    def _run_alone(self, job: Job, taken: list[int]) -> None:
        try:
            windows = self.transcriber(job.options).transcribe_segments([job.chunks[i][1] for i in taken])
        except Exception as err:  # noqa: BLE001 - this job's fault: it alone fails
            log.exception("a request failed")
            self.cancel(job)
            self._send(job, ("error", f"the model failed on this audio ({type(err).__name__}: {err}); "
                                      "report it with the file"))
            return
        self._deliver(job, taken, windows)

    def _deliver(self, job: Job, taken: list[int], windows: list[WindowResult]) -> None:
        for i, window in zip(taken, windows):
            self._send(job, ("window", i, window))
            job.done += 1
        if job.done == len(job.chunks):
            self._send(job, ("done",))

    def _send(self, job: Job, event: Event) -> None:
        if job.cancelled and event[0] != "error":
            return
        try:
            job.deliver(event)
        except Exception:  # noqa: BLE001 - its caller is gone (a closed event loop): nothing to tell
            log.debug("could not deliver an event to a request", exc_info=True)

    def _retry_after(self) -> int:
        """Seconds until the queue has room, estimated from the audio waiting and the real-time factor."""
        waiting = sum(job.waiting_seconds for job in self._pending)
        return max(1, math.ceil(waiting * (self.metrics.real_time_factor or 1.0)))
