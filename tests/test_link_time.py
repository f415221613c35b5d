"""bench/link_time.py: the wall-time model's arithmetic, the figures it reads from a run, and the delay line."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from bench import link_time as lt


def test_pipe_model_is_half_the_round_trip_plus_the_bytes_on_the_wire():
    got = lt.transfer_seconds(1_000_000, 10e6, 0.02, slow_start=False)
    assert got == pytest.approx(0.01 + 1_000_000 * lt.WIRE_OVERHEAD * 8 / 10e6, rel=1e-12)


def test_slow_start_waits_a_round_trip_per_window_below_the_pipe():
    rate, rtt = 1e9, 0.02  # bandwidth-delay product 2.5 MB: every window below is acked before the next
    iw = lt.INITIAL_WINDOW
    # Within the initial window: nothing to wait for.
    small = iw / lt.WIRE_OVERHEAD
    assert lt.transfer_seconds(small, rate, rtt, True) == pytest.approx(lt.transfer_seconds(small, rate, rtt, False))
    # 3 windows' worth: the first (IW) then one round trip, then the rest (2 IW) in the doubled window.
    three = 3 * iw / lt.WIRE_OVERHEAD
    assert lt.transfer_seconds(three, rate, rtt, True) == pytest.approx(rtt + rtt / 2 + 2 * iw * 8 / rate)
    # A slow link's pipe is smaller than the initial window: slow start costs nothing there.
    assert lt.transfer_seconds(1e6, 1e5, rtt, True) == pytest.approx(lt.transfer_seconds(1e6, 1e5, rtt, False))


def test_emulated_link_lets_the_bucket_burst_through_and_adds_the_unshaped_share():
    rate, rtt = 10e6, 0.02
    burst = lt.tbf_burst(rate)
    assert burst == 64 << 10 and lt.tbf_burst(1e9) == 125_000
    small, big = 1000, 1_000_000  # the first fits in the bucket, the second does not
    got = lt.emulated_network_seconds(small, big, rate, rtt, 0.05)
    pipe = lt.transfer_seconds(small, rate, rtt, False) + lt.transfer_seconds(big, rate, rtt, False)
    assert got == pytest.approx(pipe - (small * lt.WIRE_OVERHEAD + burst) * 8 / rate + 0.05)


def test_step_model_adds_compute_and_both_directions():
    got = lt.step_seconds(0.5, 1000, 9000, 1e6, 0.04, slow_start=False)
    assert got == pytest.approx(0.5 + 0.04 + 10_000 * lt.WIRE_OVERHEAD * 8 / 1e6)


def test_run_figures_take_medians_after_the_compiling_step_and_prefer_wire_bytes():
    records = [{"step": 1, "step_time": 90.0, "wire_uplink_bytes": 1, "wire_downlink_bytes": 1,
                "uplink_bytes": 5, "downlink_bytes": 5, "downlink_bytes_fp32": 8}]
    for s, t in zip(range(2, 6), (1.0, 3.0, 2.0, 10.0)):
        records.append({"step": s, "step_time": t, "wire_uplink_bytes": 100 + s, "wire_downlink_bytes": 1000 + s,
                        "uplink_bytes": 7, "downlink_bytes": 7, "downlink_bytes_fp32": 4000})
    fig = lt.run_figures(records)
    assert fig == {"step_s": 2.5, "steps": 4, "up_bytes": 103.5, "down_bytes": 1003.5, "downlink_bytes_fp32": 4000}
    in_process = [{k: v for k, v in r.items() if not k.startswith("wire_")} for r in records]
    assert lt.run_figures(in_process)["up_bytes"] == 7


def test_model_command_from_given_figures(capsys):
    lt.main(["model", "--compute_s=1", "--up_bytes=0", "--down_bytes=1250000", "--rates=10e6", "--rtt_ms=20"])
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[:3] == ["10", "Mbit/s", "20ms"]
    assert float(row[3]) == pytest.approx(1 + 0.02 + 1250000 * lt.WIRE_OVERHEAD * 8 / 10e6, abs=1e-3)


def test_model_command_errors_name_the_file(tmp_path, capsys):
    with pytest.raises(SystemExit, match="give --metrics"):
        lt.main(["model", "--compute_s=1"])
    with pytest.raises(SystemExit, match="cannot read .*nope.jsonl"):
        lt.main(["model", f"--metrics={tmp_path / 'nope.jsonl'}"])
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "step_time": 1.0}) + "\n" + json.dumps({"step": 2, "step_time": 1.0}) + "\n")
    with pytest.raises(SystemExit, match="no step logged uplink_bytes"):
        lt.main(["model", f"--metrics={path}"])


def test_delay_line_delays_each_direction_and_forwards_every_byte(tmp_path):
    """An echo server behind the delay line (one-way 40 ms): every byte comes back, after >= 80 ms."""
    delay_file = tmp_path / "delay_ms"
    delay_file.write_text("40\n")
    payload = bytes(range(256)) * 4096  # 1 MiB, several reads per direction

    async def scenario():
        async def echo(r, w):
            while data := await r.read(1 << 16):
                w.write(data)
                await w.drain()
            w.close()

        target = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = target.sockets[0].getsockname()[1]
        relay = await lt.start_delay_line(("127.0.0.1", 0), ("127.0.0.1", port), str(delay_file))
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.sockets[0].getsockname()[1])
        t0 = time.perf_counter()
        writer.write(payload[:10])
        await writer.drain()
        first = await reader.readexactly(10)
        rtt = time.perf_counter() - t0
        writer.write(payload[10:])
        writer.write_eof()
        rest = await reader.read()
        relay.close()
        target.close()
        return first + rest, rtt

    echoed, rtt = asyncio.run(scenario())
    assert echoed == payload
    assert rtt >= 0.08

