"""benchmarks/gpu/summarise.py on the issue-17 figures: ratios, the share of
llama-batched-bench's rate, and each acceptance line judged as the issue states it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location(
        "summarise", ROOT / "benchmarks" / "gpu" / "summarise.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _level(server: str, c: int, tok_s: float, ttft: float) -> dict:
    return {"server": server, "url": "u", "concurrency": c, "requests": 2 * c, "completed": 2 * c,
            "failed": 0, "wall_s": 1.0, "completion_tokens": 1, "tokens_per_s": tok_s,
            "ttft_p50_s": ttft, "ttft_p95_s": ttft, "itl_p50_s": 0.01, "errors": [],
            "processes": 1}


def _write(folder: Path, table: list[tuple[int, float, float, float, float]]) -> None:
    results = []
    for c, ours, theirs, ttft_ours, ttft_theirs in table:
        results += [_level("target", c, ours, ttft_ours), _level("compare", c, theirs, ttft_theirs)]
    (folder / "side-by-side.json").write_text(json.dumps({
        "commit": "abc", "machine": {"cpu": "x"}, "llama_cpp_python": "0.3.36+llamafleet.cuda",
        "settings": {"concurrent": [c for c, *_ in table], "max_tokens": 128},
        "results": results}))
    lines = [{"kv_unified": False, "pl": 1, "speed_tg": 700.0},
             {"kv_unified": False, "pl": 64, "speed_tg": 19598.0},
             {"kv_unified": True, "pl": 64, "speed_tg": 15000.0}]
    (folder / "batched-bench.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_the_issue_figures_fail_every_throughput_line(tmp_path: Path) -> None:
    _write(tmp_path, [(1, 652, 658, 0.011, 0.028), (4, 1514, 1771, 0.019, 0.044),
                      (64, 4900, 4943, 0.066, 0.920)])
    s = _module().summarise(tmp_path)
    c64 = s["levels"][-1]
    assert c64["share_of_ceiling"] == round(4900 / 19598, 3)
    assert c64["batched_bench_unified_tok_s"] == 15000.0
    assert c64["vs_llama_server"] == round(4900 / 4943, 3)
    verdict = {c["line"]: c["ok"] for c in s["acceptance"]}
    assert verdict == {"c64 >= 60% of llama-batched-bench B=64": False,
                       "c64 >= 1.5x llama-server": False,
                       "c1 at least level with llama-server": False,
                       "c4 at least level with llama-server": False,
                       "TTFT p50 ahead of llama-server at every level": True}


def test_the_target_passes_and_the_files_are_written(tmp_path: Path) -> None:
    _write(tmp_path, [(1, 700, 658, 0.011, 0.028), (4, 1800, 1771, 0.019, 0.044),
                      (64, 12000, 4943, 0.066, 0.920)])
    mod = _module()
    assert mod.main([str(tmp_path)]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert all(c["ok"] for c in s["acceptance"]), s["acceptance"]
    md = (tmp_path / "summary.md").read_text()
    assert "| 64 | 12000 | 4943 |" in md and "61%" in md and "- [x]" in md
