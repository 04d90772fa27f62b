"""Each bench script runs briefly and writes its figures; speed is never checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import ceiling, codec, connections, load, profile

TINY = [
    "--connections=4",
    "--rate=40",
    "--warmup=0.5",
    "--duration=1",
    "--drain=2",
    "--no-progress",
]


def _figures(path: Path) -> dict[str, Any]:
    figures: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return figures


def test_load_run_writes_summary_json_and_plots(tmp_path: Path) -> None:
    load.main([*TINY, "--memory", f"--out={tmp_path}", "--name=run"])

    figures = _figures(tmp_path / "run.json")
    for key in (
        "offered_per_s",
        "acked_per_s",
        "delivered_per_s",
        "e2e_latency_ms",
        "ack_latency_ms",
        "ramp",
        "errors",
        "disconnects",
        "cpu",
        "series",
        "ceiling",
    ):
        assert key in figures
    assert set(figures["e2e_latency_ms"]) >= {"p50", "p90", "p99", "p99.9", "max"}
    assert (tmp_path / "run-latency.png").stat().st_size > 0
    assert (tmp_path / "run-timeline.png").stat().st_size > 0


def test_profiled_run_writes_the_servers_samples_and_summarises_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    load.main(
        [
            *TINY,
            "--memory",
            "--no-ceiling",
            "--no-plots",
            "--profile",
            f"--out={tmp_path}",
            "--name=profiled",
        ]
    )

    samples = tmp_path / "profiled-profile.txt"
    assert samples.stat().st_size > 0
    assert "samples holding the GIL" in capsys.readouterr().out


def test_profile_summary_counts_own_and_inclusive_samples(tmp_path: Path) -> None:
    samples = tmp_path / "samples.txt"
    samples.write_text(
        "main (msgnet/_cli.py:1);read (msgnet/_session.py:5) 3\n"
        "main (msgnet/_cli.py:1);pack (protocol/_codec.py:9) 1\n"
    )

    text = profile.summarise_samples(samples)

    assert "75.0%  read (msgnet/_session.py)" in text
    assert "100.0%  main (msgnet/_cli.py)" in text
    assert "4 samples" in text


def test_group_sweep_reports_a_sustainable_rate_and_plots_the_sweep(
    tmp_path: Path,
) -> None:
    load.main(
        [
            *TINY,
            "--memory",
            "--group-size=2",
            "--sweep",
            "--sweep-factor=2",
            "--max-rate=80",
            "--p99-bound-ms=60000",
            "--workers=2",
            "--no-ceiling",
            f"--out={tmp_path}",
            "--name=sweep",
        ]
    )

    figures = _figures(tmp_path / "sweep.json")
    assert len(figures["sweep"]) == 2
    assert "sustainable_rate" in figures
    assert (tmp_path / "sweep-sweep.png").stat().st_size > 0


def test_codec_comparison_has_both_rates_and_the_ratio() -> None:
    figures = codec.compare(count=200, seconds=0.05)

    for name in ("Send", "Deliver"):
        assert set(figures[name]) == {
            "encode_per_s",
            "bare_encode_per_s",
            "decode_per_s",
            "bare_decode_per_s",
            "encode_ratio",
            "decode_ratio",
        }


def test_embedded_ceiling_appends_and_reads_every_record() -> None:
    records = ceiling.sample_records(
        ["a", "b", "c"], partitions=4, size=10, group_size=0
    )
    figures = ceiling.embedded_pipeline(
        None, records, count=300, partitions=4, appenders=10
    )

    assert figures["records"] == 300
    assert figures["pipeline_per_s"] > 0


@pytest.mark.kafka
def test_kafka_ceiling_produces_and_consumes_every_record(
    kafka_bootstrap: str,
) -> None:
    records = ceiling.sample_records(
        ["a", "b", "c", "d"], partitions=4, size=10, group_size=2
    )
    figures = ceiling.kafka_pipeline(kafka_bootstrap, records, count=500, partitions=4)

    assert figures["records"] == 500
    assert figures["pipeline_per_s"] > 0


@pytest.mark.kafka
def test_kafka_ceiling_at_a_rate_paces_its_sends_and_reports_its_cpu(
    kafka_bootstrap: str,
) -> None:
    records = ceiling.sample_records(["a", "b"], partitions=2, size=10, group_size=0)
    figures = ceiling.kafka_pipeline(
        kafka_bootstrap, records, count=50, partitions=2, rate=200
    )

    assert figures["records"] == 50
    # The 50th record is due 49 / 200 s after the first.
    assert figures["append_seconds"] >= 49 / 200
    assert figures["cpu_percent"] > 0
    assert figures["cpu_us_per_record"] > 0


@pytest.mark.kafka
def test_kafka_load_run_reports_the_ceiling_and_its_cpu_at_the_runs_pace(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    load.main(
        [
            *TINY,
            "--backplane=kafka",
            f"--kafka-bootstrap={kafka_bootstrap}",
            "--partitions=4",
            "--no-plots",
            f"--out={tmp_path}",
            "--name=kafka",
        ]
    )

    figures = _figures(tmp_path / "kafka.json")
    assert figures["acked_per_s"] > 0
    assert figures["ceiling"]["msgnet_ratio"] > 0
    assert set(figures["ceiling"]["paced"]) == {
        "records_per_s",
        "cpu_percent",
        "cpu_us_per_record",
    }


def test_connections_bench_holds_connections_and_reports_memory() -> None:
    figures = connections.hold_connections(connections=20, workers=2, time_limit=60)

    assert figures["held"] == 20
    assert figures["bytes_per_connection"] is not None
    assert figures["handshakes_per_s"] is not None
