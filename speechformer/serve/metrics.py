"""What ``GET /metrics`` says, in the Prometheus text format (version 0.0.4): requests by route
and status, the queue's length, batch sizes (requests and chunks per batch), audio seconds
transcribed, model seconds spent, and the real-time factor (model seconds per audio second).

Counted under one lock from the worker thread and the event loop; no client library needed.
"""

from __future__ import annotations

import threading
from collections import Counter

#: Upper bounds of the batch-size histograms' buckets.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:g}", f"{name}_count {self.count}"]


class Metrics:
    """The server's counters; :meth:`render` writes them out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.batch_requests = Histogram(BATCH_BUCKETS)
        self.batch_chunks = Histogram(BATCH_BUCKETS)
        self.audio_seconds = 0.0
        self.model_seconds = 0.0
        self.failed_batches = 0

    def count_request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def record_batch(self, requests: int, chunks: int, audio_seconds: float, model_seconds: float) -> None:
        with self._lock:
            self.batch_requests.observe(requests)
            self.batch_chunks.observe(chunks)
            self.audio_seconds += audio_seconds
            self.model_seconds += model_seconds

    def count_failed_batch(self) -> None:
        with self._lock:
            self.failed_batches += 1

    @property
    def real_time_factor(self) -> float:
        """Model seconds per second of audio so far (0 before any audio)."""
        with self._lock:
            return self.model_seconds / self.audio_seconds if self.audio_seconds else 0.0

    def render(self, queue_length: int) -> str:
        rtf = self.real_time_factor
        with self._lock:
            lines = ["# HELP speechformer_requests_total HTTP requests answered, by route and status.",
                     "# TYPE speechformer_requests_total counter"]
            lines += [f'speechformer_requests_total{{route="{r}",status="{s}"}} {n}'
                      for (r, s), n in sorted(self.requests.items())]
            lines += ["# HELP speechformer_queue_length Requests waiting for the model.",
                      "# TYPE speechformer_queue_length gauge", f"speechformer_queue_length {queue_length}",
                      "# HELP speechformer_batch_requests Requests in each batch the model ran.",
                      "# TYPE speechformer_batch_requests histogram", *self.batch_requests.lines(
                          "speechformer_batch_requests"),
                      "# HELP speechformer_batch_chunks Audio chunks (windows) in each batch the model ran.",
                      "# TYPE speechformer_batch_chunks histogram", *self.batch_chunks.lines(
                          "speechformer_batch_chunks"),
                      "# HELP speechformer_audio_seconds_total Seconds of audio transcribed.",
                      "# TYPE speechformer_audio_seconds_total counter",
                      f"speechformer_audio_seconds_total {self.audio_seconds:g}",
                      "# HELP speechformer_model_seconds_total Seconds the model spent transcribing.",
                      "# TYPE speechformer_model_seconds_total counter",
                      f"speechformer_model_seconds_total {self.model_seconds:g}",
                      "# HELP speechformer_real_time_factor Model seconds per second of audio (below 1: faster "
                      "than real time).", "# TYPE speechformer_real_time_factor gauge",
                      f"speechformer_real_time_factor {rtf:g}",
                      "# HELP speechformer_failed_batches_total Batches that raised (their requests were retried "
                      "one by one).", "# TYPE speechformer_failed_batches_total counter",
                      f"speechformer_failed_batches_total {self.failed_batches}"]
        return "\n".join(lines) + "\n"
