"""The server's Prometheus metrics, named in vLLM's style with the `mixtrt:` prefix and a model_name label.

    mixtrt:num_requests_running / num_requests_waiting   requests decoding / not yet admitted (gauges)
    mixtrt:num_rows_running                              engine (cache) rows decoding (gauge)
    mixtrt:prompt_tokens_total / generation_tokens_total counters
    mixtrt:mixed_steps_total                             steps that ran a prompt chunk in the decode pass (counter)
    mixtrt:request_success_total{finished_reason}        stop / length, per choice
    mixtrt:request_aborted_total{reason}                 disconnect / stalled / error / shutdown, per request
    mixtrt:request_refused_total{status}                 answered with an error before the engine (400, 429, ...)
    mixtrt:time_to_first_token_seconds, inter_token_latency_seconds, e2e_request_latency_seconds,
    mixtrt:request_queue_time_seconds, request_prefill_time_seconds   histograms (per choice)

Each app has its own registry (several apps may live in one process: the tests). The finish and abort reasons'
series exist from the start, at 0. `mixtrt serve` leaves out prometheus_client's `*_created` series (they double
the series a scrape reads; vLLM leaves them out too).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        label = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"mixtrt:{name}", doc, label, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"mixtrt:{name}", doc, label, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"mixtrt:{name}", doc, label, buckets=buckets, registry=r).labels(model_name)

        self.requests_running = gauge("num_requests_running", "Requests with rows decoding.")
        self.requests_waiting = gauge("num_requests_waiting", "Requests waiting for a free engine row.")
        self.rows_running = gauge("num_rows_running", "Engine (KV-cache) rows decoding.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.mixed_steps = counter("mixed_steps", "Engine steps that ran a prompt chunk in the decode step's pass.")
        self._success = Counter("mixtrt:request_success", "Choices finished, by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self._aborted = Counter("mixtrt:request_aborted", "Requests ended before their end, by reason.",
                                ["model_name", "reason"], registry=r)
        self._refused = Counter("mixtrt:request_refused", "Requests answered with an error before reaching the "
                                "engine (bad request, unknown model or route, queue full, ...), by HTTP status.",
                                ["model_name", "status"], registry=r)
        self.ttft = histogram("time_to_first_token_seconds", "Request received to first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between two tokens of a choice.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Request received to last token.", E2E_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Request received to its prefill.", TTFT_BUCKETS)
        self.prefill = histogram("request_prefill_time_seconds", "Prefill time of a choice.", TTFT_BUCKETS)
        self.model_name = model_name
        # every label value known up front has its series from the start (at 0): a rate() over them is 0, not absent
        for reason in ("stop", "length"):
            self._success.labels(model_name, reason)
        for reason in ("disconnect", "error", "shutdown", "stalled"):
            self._aborted.labels(model_name, reason)

    def success(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def aborted(self, reason: str) -> None:
        self._aborted.labels(self.model_name, reason).inc()

    def refused(self, status: int) -> None:
        self._refused.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
