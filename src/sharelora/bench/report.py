"""The bench's results as a Markdown table (one per model), from the JSON-able results dict."""

from __future__ import annotations


def _ratio(r: dict | None) -> str:
    if not r:
        return "—"
    return f"{r['median']:.3f} ({r['p25']:.3f}–{r['p75']:.3f})"


def _bytes(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def _memory(m: dict | None, device: str) -> str:
    if not m:
        return "—"
    if "error" in m:
        return "error"
    if device.startswith("cuda"):
        return _bytes(m.get("cuda_peak_bytes"))
    return f"{m['peak_rss_bytes'] / 2**20:,.0f} (+{(m['peak_rss_bytes'] - m['rss_after_build_bytes']) / 2**20:,.0f})"


def model_table(res: dict, device: str = "cpu") -> str:
    mem_head = "peak GPU mem" if device.startswith("cuda") else "peak RSS MiB (+over build)"
    head = ["method", "trainable", "step ms, median (p25–p75)", "× floor", "× floor, CPU time", "× PEFT LoRA", mem_head,
            "optimizer state", "adapter file (params × 4 B)", "unmerged × base", "merged × base"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in res["methods"]:
        s = r["step_s"]
        inf = r.get("inference") or {}
        file = _bytes(r["adapter_file_bytes"])
        if r["adapter_file_bytes"] is not None:
            file += f" ({_bytes(r['adapter_expected_bytes'])})"
        cells = [
            r["method"],
            f"{r['trainable_parameters']:,}",
            f"{1e3 * s['median']:.1f} ({1e3 * s['p25']:.1f}–{1e3 * s['p75']:.1f})",
            _ratio(r["ratio_to_floor"]),
            _ratio(r.get("ratio_to_floor_cpu")),
            _ratio(r["ratio_to_peft_lora"]),
            _memory(r.get("memory"), device),
            _bytes(r["optimizer_state_bytes"]),
            file,
            _ratio(inf.get("unmerged_ratio_to_base")),
            _ratio(inf.get("merged_ratio_to_base")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    m = results["machine"]
    out = []
    if results.get("command"):
        out.append(f"Command: `{results['command']}`  ")
    out.append(f"Date {m['date']}; {m['device']}; CPU {m['cpu']} ({m['cpu_cores']} cores); torch {m['torch']} "
               f"with {m['torch_threads']} thread(s); transformers {m.get('transformers', '?')}; "
               f"peft {m.get('peft', '?')}" + (f"; GPU {m['gpu']}" if "gpu" in m else "")
               + f"; allocator: {m.get('allocator', 'default')}"
               + (f"; ShareLoRA's CPU dropout mask: {m['cpu_dropout_kernel']}" if m.get("cpu_dropout_kernel") else "")
               + ".")
    for res in results["models"]:
        spec = res["spec"]
        out.append("")
        out.append(f"### {res['model']} ({res['weights']} weights), batch {spec['batch']} x {spec['seq']} tokens, "
                   f"r={results['config']['rank']} on {', '.join(spec['targets'])}, "
                   f"dropout {results['config']['dropout']}")
        out.append("")
        if res.get("weights_note"):
            out.append(f"_{res['weights_note']}_")
            out.append("")
        out.append(model_table(res, m["device"]))
        if res.get("load_average_before"):
            out.append("")
            out.append(f"Load average (1, 5, 15 min) before timing {res['load_average_before']}, "
                       f"after {res['load_average_after']}. Ratios: median (p25–p75) over the interleaved "
                       "repetitions of the ratio within each repetition; \"CPU time\" uses this process's CPU "
                       "seconds instead of wall seconds (insensitive to time spent waiting for a core).")
        for name, err in res.get("errors", {}).items():
            out.append(f"- {name} not run: {err}")
    return "\n".join(out) + "\n"
