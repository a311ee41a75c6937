"""benchmarks/high_concurrency.py's pure parts: llama-batched-bench's step time, host work per
sequence, the ratios per level and issue 30's acceptance lines judged as the issue states them."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location(
        "high_concurrency", ROOT / "benchmarks" / "high_concurrency.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


hc = _module()


def _side(server: str, mode: str, c: int, tok_s: float, ttft: float | None = None) -> dict:
    return {"server": server, "mode": mode, "concurrency": c, "tokens_per_s": tok_s,
            "ttft_p50_s": ttft, "ttft_p90_s": None if ttft is None else 2 * ttft,
            "failed": 0, "short": 0}


def _profile(c: int, decode_ms: float, other_ms: dict[str, float], steps: int = 90) -> dict:
    parts = {"batch": 0.0, "decode": decode_ms, "sample": 0.0, "text": 0.0, "deliver": 0.0,
             "admit": 0.0, "other": 0.0, **other_ms}
    return {"concurrency": c, "decode_steps": {
        "steps": steps, "ms_per_step": round(sum(parts.values()), 3), "parts_ms_per_step": parts,
        "us_per_sequence": {k: round(v * 1e3 / c, 1) for k, v in parts.items()}}}


def _record(ours_plain: float, ours_stream: float, decode_ms: float, sample_ms: float,
            floor_ms: float, c: int = 64) -> dict:
    return {
        "side_by_side": [_side("llamafleet", "plain", c, ours_plain),
                         _side("llamafleet", "stream", c, ours_stream, 0.05),
                         _side("llama-server", "plain", c, 4000.0),
                         _side("llama-server", "stream", c, 2500.0, 0.1)],
        "batched_bench": [{"kv_unified": False, "batch": c, "step_ms": floor_ms},
                          {"kv_unified": True, "batch": c, "step_ms": 4 * floor_ms}],
        "step_profile": [_profile(c, decode_ms, {"sample": sample_ms})],
    }


def test_batched_bench_step_is_generation_time_over_its_steps():
    line = {"n_kv_max": 16384, "pp": 100, "tg": 96, "pl": 64, "n_kv": 12544, "t_pp": 0.5,
            "speed_pp": 12800.0, "t_tg": 0.96, "speed_tg": 6400.0, "t": 1.46, "speed": 12000.0}
    out = "llama_model_loader: noise\n" + json.dumps(line) + "\n\nllama_perf_context_print: x\n"
    rows = hc.parse_batched_bench(out, kv_unified=False)
    assert len(rows) == 1
    assert rows[0]["batch"] == 64 and rows[0]["kv_unified"] is False
    assert rows[0]["step_ms"] == pytest.approx(10.0)  # 0.96 s over 96 steps of 64 tokens


def test_host_work_is_every_part_but_decode():
    assert hc.host_us_per_sequence({"batch": 1.0, "decode": 300.0, "sample": 20.5,
                                    "other": 3.0}) == pytest.approx(24.5)
    assert hc.host_us_per_sequence({}) is None


def test_ratios_per_level():
    s = hc.evaluate(_record(ours_plain=2000.0, ours_stream=3500.0, decode_ms=12.0,
                            sample_ms=1.28, floor_ms=10.0))
    (lv,) = s["levels"]
    assert lv["plain_ratio"] == 0.5 and lv["stream_ratio"] == 1.4
    assert lv["step_ms"] == pytest.approx(13.28)
    assert lv["step_vs_batched_bench"] == pytest.approx(1.328)
    assert lv["decode_vs_batched_bench"] == pytest.approx(1.2)
    assert lv["host_us_per_sequence"] == pytest.approx(20.0)  # 1.28 ms over 64 sequences
    assert lv["batched_bench_unified_step_ms"] == 40.0
    assert lv["ttft_s"]["llamafleet"] == {"p50": 0.05, "p90": 0.1}


def test_acceptance_passes_on_the_bounds_and_fails_beyond_them():
    # Exactly 1.0x plain, 1.3x streaming, 1.2x the floor (11.04 + 0.96 = 12.0 ms vs 10 ms),
    # host 0.96 ms / 64 = 15 µs: every line passes.
    ok = hc.evaluate(_record(4000.0, 3250.0, decode_ms=11.04, sample_ms=0.96, floor_ms=10.0))
    assert [a["ok"] for a in ok["acceptance"]] == [True, True, True, True]
    # Just beyond each bound: plain 0.99x, streaming 1.29x, step 1.21x, host 31.25 µs.
    bad = hc.evaluate(_record(3960.0, 3225.0, decode_ms=10.1, sample_ms=2.0, floor_ms=10.0))
    assert [a["ok"] for a in bad["acceptance"]] == [False, False, False, False]
    assert [a["value"] for a in bad["acceptance"]] == [0.99, 1.29, 1.21, 31.2]


def test_a_missing_figure_fails_its_line():
    rec = _record(5000.0, 5000.0, decode_ms=5.0, sample_ms=0.1, floor_ms=10.0, c=16)
    s = hc.evaluate(rec)  # nothing measured at c64
    assert all(a["value"] is None and not a["ok"] for a in s["acceptance"])
    rec = _record(5000.0, 5000.0, decode_ms=5.0, sample_ms=0.1, floor_ms=10.0)
    rec["step_profile"][0]["decode_steps"]["steps"] = 0  # no pure decode step of 64 seen
    s = hc.evaluate(rec)
    assert [a["ok"] for a in s["acceptance"]] == [True, True, False, False]


def test_markdown_shows_every_line_with_its_verdict():
    rec = _record(4000.0, 3250.0, decode_ms=11.04, sample_ms=0.96, floor_ms=10.0)
    rec.update(time="t", commit="abc", machine={"cpu": "AMD EPYC", "cores": 2},
               run_s={"total": 300.0, "side_by_side": 200.0},
               settings={"model_shape": hc.MODEL_SHAPE, "n_vocab": 259, "max_tokens": 96,
                         "context_per_sequence": 256, "threads": 2, "requests": {64: 128},
                         "processes": 2})
    md = hc.markdown(rec, hc.evaluate(rec))
    assert md.count("**PASS**") == 4
    assert "| 64 | 4000 / 4000 | 1.00 | 3250 / 2500 | 1.30 |" in md


def test_the_streaming_ceiling_is_the_floors_cpu_plus_the_clients_on_all_cores():
    rec = _record(1200.0, 1000.0, decode_ms=45.0, sample_ms=0.8, floor_ms=44.8)
    rec.update(machine={"cores": 2}, settings={"threads": 2})
    for r in rec["side_by_side"]:
        r["completion_tokens"] = 12288
        if r["mode"] == "stream":  # 200 and 260 µs of client CPU per streamed token
            r["client_cpu_s"] = 12288 * (200e-6 if r["server"] == "llamafleet" else 260e-6)
    (lv,) = hc.evaluate(rec)["levels"]
    assert lv["stream_client_us_per_token"] == pytest.approx(230.0)
    # 44.8 ms x 2 threads / 64 = 1400 core-µs per token, + 230: 2 cores / 1630 µs
    assert lv["stream_ceiling_tok_s"] == pytest.approx(2e6 / 1630, abs=0.1)
    rec["machine"] = {}  # no core count, no ceiling (nor for a run without client figures)
    assert hc.evaluate(rec)["levels"][0]["stream_ceiling_tok_s"] is None
