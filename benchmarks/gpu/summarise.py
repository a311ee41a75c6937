"""Summarise a side_by_side.sh run: ratios per level and the acceptance lines of issue 17.

    python3 benchmarks/gpu/summarise.py benchmarks/results/gpu-h100/

Reads side-by-side.json (llamafleet = target, llama-server = compare), batched-bench.jsonl,
and, when present, self-test.json and step-profile.json from that folder; writes
summary.json and summary.md there and prints the markdown. Standard library only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGET_SHARE_OF_CEILING = 0.60  # llamafleet at c64 vs llama-batched-bench's B=64 decode rate
TARGET_VS_LLAMA_SERVER = 1.5  # llamafleet vs llama-server at c64
LEVEL_CHECKED = 64


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _ceilings(path: Path) -> dict[bool, dict[int, float]]:
    """{kv_unified: {batch size: decode tok/s}} from llama-batched-bench's jsonl."""
    out: dict[bool, dict[int, float]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip().startswith("{"):
                r = json.loads(line)
                out.setdefault(bool(r.get("kv_unified", False)), {})[int(r["pl"])] = r["speed_tg"]
    return out


def summarise(folder: Path) -> dict:
    sbs = json.loads((folder / "side-by-side.json").read_text())
    by = {(r["server"], r["concurrency"]): r for r in sbs["results"]}
    ceilings = _ceilings(folder / "batched-bench.jsonl")
    split, unified = ceilings.get(False, {}), ceilings.get(True, {})
    levels = []
    for c in sbs["settings"]["concurrent"]:
        ours, theirs = by.get(("target", c)), by.get(("compare", c))
        if ours is None or theirs is None:
            continue
        ceiling = split.get(c)
        levels.append({
            "concurrency": c,
            "llamafleet_tok_s": ours["tokens_per_s"], "llama_server_tok_s": theirs["tokens_per_s"],
            "vs_llama_server": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3)
            if theirs["tokens_per_s"] else None,
            "ttft_p50_s": {"llamafleet": ours["ttft_p50_s"], "llama_server": theirs["ttft_p50_s"]},
            "failed": {"llamafleet": ours["failed"], "llama_server": theirs["failed"]},
            "client_processes": ours.get("processes", 1),
            "batched_bench_tok_s": ceiling, "batched_bench_unified_tok_s": unified.get(c),
            "share_of_ceiling": round(ours["tokens_per_s"] / ceiling, 3) if ceiling else None,
        })
    at = {lv["concurrency"]: lv for lv in levels}
    checks = []
    c64 = at.get(LEVEL_CHECKED)
    if c64 is not None:
        checks.append({"line": f"c{LEVEL_CHECKED} >= {TARGET_SHARE_OF_CEILING:.0%} of "
                               f"llama-batched-bench B={LEVEL_CHECKED}",
                       "value": c64["share_of_ceiling"],  # of the split-KV rate, as the issue measured
                       "ok": c64["share_of_ceiling"] is not None
                       and c64["share_of_ceiling"] >= TARGET_SHARE_OF_CEILING})
        checks.append({"line": f"c{LEVEL_CHECKED} >= {TARGET_VS_LLAMA_SERVER}x llama-server",
                       "value": c64["vs_llama_server"],
                       "ok": (c64["vs_llama_server"] or 0) >= TARGET_VS_LLAMA_SERVER})
    for c in (1, 4):
        if c in at:
            checks.append({"line": f"c{c} at least level with llama-server",
                           "value": at[c]["vs_llama_server"],
                           "ok": (at[c]["vs_llama_server"] or 0) >= 1.0})
    ttft_ok = [lv["ttft_p50_s"]["llamafleet"] is not None and lv["ttft_p50_s"]["llama_server"]
               is not None and lv["ttft_p50_s"]["llamafleet"] <= lv["ttft_p50_s"]["llama_server"]
               for lv in levels]
    if levels:
        checks.append({"line": "TTFT p50 ahead of llama-server at every level",
                       "value": sum(ttft_ok), "ok": all(ttft_ok)})
    summary: dict = {"machine": sbs.get("machine"), "commit": sbs.get("commit"),
                     "llama_cpp_python": sbs.get("llama_cpp_python"),
                     "max_tokens": sbs["settings"]["max_tokens"], "levels": levels,
                     "acceptance": checks}
    self_test = folder / "self-test.json"
    if self_test.exists():
        st = json.loads(self_test.read_text())["results"]
        summary["client_ceiling_events_s"] = [
            {"concurrency": r["concurrency"], "processes": r["processes"],
             "events_s": r["tokens_per_s"]} for r in st]
    graphs_off = folder / "cuda-graphs-off.json"
    if graphs_off.exists():
        r = json.loads(graphs_off.read_text())["results"][0]
        on = at.get(r["concurrency"])
        summary["cuda_graphs_off"] = {
            "concurrency": r["concurrency"], "tok_s": r["tokens_per_s"],
            "tok_s_with_graphs": on["llamafleet_tok_s"] if on else None}
    profile = folder / "step-profile.json"
    if profile.exists():
        summary["step_profile"] = [
            {"concurrency": lv["concurrency"], **lv["decode_steps"],
             "event_loop_cpu_share": round(lv["thread_cpu_s"].get("event_loop", 0) / lv["wall_s"], 3)
             if lv.get("wall_s") else None}
            for lv in json.loads(profile.read_text())["levels"]]
    return summary


def markdown(s: dict) -> str:
    out = [f"# side by side: {(s.get('machine') or {}).get('cpu', '?')}, "
           f"llama-cpp-python {s.get('llama_cpp_python')}, {s['max_tokens']} tokens per stream",
           "", "| conc | llamafleet tok/s | llama-server tok/s | ratio | TTFT p50 ours / theirs ms "
           "| batched-bench split / unified tok/s | share of ceiling |",
           "|---|---|---|---|---|---|---|"]
    for lv in s["levels"]:
        t = lv["ttft_p50_s"]
        share = lv["share_of_ceiling"]
        out.append(f"| {lv['concurrency']} | {lv['llamafleet_tok_s']:.0f} | "
                   f"{lv['llama_server_tok_s']:.0f} | {lv['vs_llama_server']} | "
                   f"{_ms(t['llamafleet'])} / {_ms(t['llama_server'])} | "
                   f"{_num(lv['batched_bench_tok_s'])} / {_num(lv['batched_bench_unified_tok_s'])} | "
                   f"{'-' if share is None else f'{share:.0%}'} |")
    out += ["", "Acceptance (issue 17):", ""]
    out += [f"- [{'x' if c['ok'] else ' '}] {c['line']}: {c['value']}" for c in s["acceptance"]]
    if "client_ceiling_events_s" in s:
        out += ["", "Client ceiling (no-op server): " + ", ".join(
            f"c{r['concurrency']} x{r['processes']} proc {r['events_s']:.0f}/s"
            for r in s["client_ceiling_events_s"])]
    if "cuda_graphs_off" in s:
        g = s["cuda_graphs_off"]
        out += ["", f"CUDA graphs off, c{g['concurrency']}: {g['tok_s']:.0f} tok/s "
                    f"(on: {g['tok_s_with_graphs']})"]
    if "step_profile" in s:
        out += ["", "| conc | step ms | " + " | ".join(s["step_profile"][0]["parts_ms_per_step"])
                + " | loop CPU |", "|---" * (len(s["step_profile"][0]["parts_ms_per_step"]) + 3) + "|"]
        for p in s["step_profile"]:
            out.append(f"| {p['concurrency']} | {p['ms_per_step']} | "
                       + " | ".join(str(v) for v in p["parts_ms_per_step"].values())
                       + f" | {p['event_loop_cpu_share']} |")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    folder = Path(argv[0])
    s = summarise(folder)
    (folder / "summary.json").write_text(json.dumps(s, indent=2))
    md = markdown(s)
    (folder / "summary.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
