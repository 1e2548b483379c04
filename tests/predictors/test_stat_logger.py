"""vLLM's `vllm:*` metrics recorded in bulk read exactly as vLLM's own logger records them: the same
engine steps fed to both, the scrapes compared sample by sample."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from predictors import stat_logger


@pytest.fixture(scope="module")
def vllm_config(demo_model_dir: Path) -> Any:
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(demo_model_dir), max_model_len=1024, dtype="float32").create_engine_config()


def _steps(seed: int, n: int) -> list[tuple[Any, Any]]:
    """Engine steps as vLLM's output processor reports them: gauges, counters, latencies per token
    (on bucket bounds, past the last bound, zero) and finished requests of every kind."""
    from vllm.v1.engine import FinishReason
    from vllm.v1.metrics.stats import FinishedRequestStats, IterationStats, PrefixCacheStats, SchedulerStats

    rng = random.Random(seed)
    latencies = [0.0, 0.001, 0.005, 0.02, 0.3, 7.5, 1e6]  # bounds of vLLM's buckets and beyond them
    steps = []
    for _ in range(n):
        sched = SchedulerStats(
            num_running_reqs=rng.randrange(17),
            num_waiting_reqs=rng.randrange(4),
            num_skipped_waiting_reqs=rng.randrange(2),
            kv_cache_usage=rng.random(),
            prefix_cache_stats=PrefixCacheStats(queries=rng.randrange(50), hits=rng.randrange(10)),
        )
        it = IterationStats()
        it.num_generation_tokens = rng.randrange(17)
        it.prompt_token_stats.computed = rng.randrange(30)
        it.prompt_token_stats.total = it.prompt_token_stats.computed
        it.num_preempted_reqs = rng.randrange(2)
        it.inter_token_latencies_iter = [rng.choice([*latencies, rng.random() / 10]) for _ in range(16)]
        it.time_to_first_tokens_iter = [rng.random() for _ in range(rng.randrange(3))]
        it.max_num_generation_tokens_iter = [rng.randrange(1, 64) for _ in range(rng.randrange(3))]
        it.n_params_iter = [1 for _ in range(rng.randrange(3))]
        for _ in range(rng.randrange(3)):
            it.finished_requests.append(
                FinishedRequestStats(
                    finish_reason=rng.choice(list(FinishReason)),
                    e2e_latency=rng.random(),
                    num_prompt_tokens=rng.randrange(1, 40),
                    num_generation_tokens=rng.randrange(1, 33),
                    max_tokens_param=rng.choice([None, 32]),
                    queued_time=rng.random() / 100,
                    prefill_time=rng.random() / 100,
                    inference_time=rng.random(),
                    decode_time=rng.random(),
                    mean_time_per_output_token=rng.random() / 50,
                    num_cached_tokens=rng.randrange(5),
                )
            )
        steps.append((sched, it))
    return steps


def _scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        for s in family.samples:
            if s.name.startswith("vllm:") and not s.name.endswith("_created"):
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _same(a: dict[Any, float], b: dict[Any, float]) -> None:
    assert a.keys() == b.keys()
    # _sum samples may differ in the last bits: added once per flush instead of once per observation.
    different = {k: (a[k], b[k]) for k in a if not math.isclose(a[k], b[k], rel_tol=1e-12, abs_tol=1e-12)}
    assert not different


def test_a_scrape_reads_what_vllms_own_logger_records(
    vllm_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    steps = _steps(seed=7, n=300)

    def run(logger: Any) -> list[dict[Any, float]]:
        logger.log_engine_initialized()
        logger.record_sleep_state(0, 0)
        scrapes = []
        for i, (sched, it) in enumerate(steps):
            logger.record(sched, it, engine_idx=0)
            if i in (0, 99, 250):  # scrapes between steps, and steps past a periodic flush
                scrapes.append(_scrape())
        scrapes.append(_scrape())
        return scrapes

    expected = run(PrometheusStatLogger(vllm_config, [0]))
    monkeypatch.setattr(stat_logger, "FLUSH_EVERY_STEPS", 64)
    bulk = stat_logger.BulkPrometheusStatLogger(vllm_config, [0])
    assert type(bulk.histogram_inter_token_latency[0]).__name__ == "_HistogramBuffer"  # really buffered
    got = run(bulk)

    assert len(got) == len(expected) == 4
    for e, g in zip(expected, got, strict=True):
        _same(e, g)
    # The run moved every kind of metric: gauges, counters and latency buckets past the last bound.
    final = expected[-1]
    assert (
        final[
            (
                "vllm:num_requests_running",
                (("engine", "0"), ("model_name", vllm_config.model_config.served_model_name)),
            )
        ]
        == steps[-1][0].num_running_reqs
    )
    assert sum(v for (n, _), v in final.items() if n == "vllm:generation_tokens_total") == sum(
        it.num_generation_tokens for _, it in steps
    )
    inf = [
        v
        for (n, labels), v in final.items()
        if n == "vllm:inter_token_latency_seconds_bucket" and ("le", "+Inf") in labels
    ]
    assert inf == [16 * len(steps)]


def test_updates_wait_for_a_scrape_or_the_periodic_flush(
    vllm_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held updates do reach the metric itself: on a scrape, or every FLUSH_EVERY_STEPS steps."""
    monkeypatch.setattr(stat_logger, "FLUSH_EVERY_STEPS", 10)
    bulk = stat_logger.BulkPrometheusStatLogger(vllm_config, [0])
    child = bulk.counter_generation_tokens[0].child  # the prometheus_client counter behind the buffer
    steps = _steps(seed=1, n=10)
    for sched, it in steps[:9]:
        bulk.record(sched, it, engine_idx=0)
    assert child._value.get() == 0  # held
    bulk.record(*steps[9], engine_idx=0)
    assert child._value.get() == sum(it.num_generation_tokens for _, it in steps)


def test_a_bad_value_is_dropped_without_failing_the_scrape(
    vllm_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    bulk = stat_logger.BulkPrometheusStatLogger(vllm_config, [0])
    bulk.histogram_inter_token_latency[0].observe(None)
    bulk.histogram_inter_token_latency[0].observe(0.01)
    with caplog.at_level("ERROR", logger=stat_logger.__name__):
        text = generate_latest(REGISTRY).decode()
    assert "vllm:inter_token_latency_seconds_count" in text
    assert "dropped a vLLM metric update" in caplog.text
    with pytest.raises(ValueError):
        bulk.counter_generation_tokens[0].inc(-1)  # what prometheus_client itself refuses, refused at once


def test_a_histogram_without_prometheus_clients_internals_is_observed_value_by_value() -> None:
    """The one-pass update reads prometheus_client's bucket internals; without them, observe() each."""

    class Child:
        def __init__(self) -> None:
            self.observed: list[float] = []

        def observe(self, v: float) -> None:
            self.observed.append(v)

    child = Child()
    stat_logger._observe_all(child, [0.5, 0.01, 3.0])
    assert child.observed == [0.5, 0.01, 3.0]
