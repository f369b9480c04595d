"""Derived numbers, markdown tables and the JSON document.

For each (framework, device, case, mode) result, from the rounds of one interleaved measurement
(round i times every variant once, so the i-th samples of two variants are a pair):
- overhead of a spectral-norm row = its median minus the plain row's median (for registration
  there is no plain row: the overhead is the time itself);
- the floor = per part (W v, W^H u, W / sigma, rank-1 gradient term), the fastest form's
  median; summed over the parts;
- ``vs_builtin`` = the median over rounds of (row_i - plain_i) / (builtin_i - plain_i), with
  its quartiles in ``vs_builtin_iqr``; rounds where the built-in's overhead is <= 0 (noise)
  are left out. ``vs_floor`` likewise with floor_i = the sum of the chosen forms' i-th samples;
  ``pct_of_plain`` = 100 (row_i - plain_i) / plain_i (the eval overhead as % of the plain
  forward, in eval mode);
- ``faults_per_call``: the median over rounds of the minor page faults per call;
- train mode of a one-layer case: ``peak_bytes`` / ``kept_bytes`` of one steady-state step
  (see the drivers' ``memory``), and ``extra_peak_bytes`` = the row's peak minus plain's.
"""

from __future__ import annotations

import math
import statistics

from benchmarks.cases import FLOOR_PARTS, floor_part
from benchmarks.timing import Stats, quartiles

SN_ORDER = ("builtin", "dualsn", "dualsn[paddle]")
FLOOR_LABELS = {
    "floor:Wv": "W v",
    "floor:WHu": "W^H u",
    "floor:rescale": "W / sigma",
    "floor:rank1_grad": "rank-1 grad",
}
MiB = 2**20


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def _paired(num: list[float], den: list[float], scale: float = 1.0) -> tuple[float | None, list[float] | None]:
    """Median and [q1, q3] over rounds of scale * num_i / den_i (rounds with den_i <= 0 left out)."""
    vals = [scale * n / d for n, d in zip(num, den) if d > 0 and math.isfinite(n) and math.isfinite(d)]
    if not vals:
        return None, None
    q1, q3 = quartiles(vals)
    return statistics.median(vals), [q1, q3]


def _floor(stats: dict[str, Stats], names) -> dict | None:
    """The floor: per part the fastest candidate form (by median), and per-round totals."""
    if not names:
        return None
    parts: dict[str, dict] = {}
    for name in names:
        part = floor_part(name)
        cand = parts.setdefault(part, {})
        cand[name] = stats[name]
    ops, rounds = {}, None
    for part, cands in parts.items():
        best = min(cands, key=lambda n: cands[n].median_ms)
        st = cands[best]
        ops[part] = dict(
            st.as_dict(),
            form=best.split("@", 1)[1] if "@" in best else "",
            candidates={n.split("@", 1)[-1]: dict(median_ms=c.median_ms, faults_per_call=c.faults_per_call)
                        for n, c in cands.items()},
        )
        rounds = list(st.samples_ms) if rounds is None else [a + b for a, b in zip(rounds, st.samples_ms)]
    return dict(ops=ops, total_ms=sum(op["median_ms"] for op in ops.values()), rounds_ms=rounds)


def summarize(
    label: str,
    framework: str,
    device: str,
    case,
    mode: str,
    stats: dict[str, Stats],
    floor_names,
    memory: dict | None = None,
) -> dict:
    """One result record: per-row statistics plus the derived overheads, ratios and memory."""
    plain = stats.get("plain")
    floor = _floor(stats, floor_names)
    rows = []
    for name, st in stats.items():
        if name.startswith("floor:"):
            continue
        row = dict(variant=name, **st.as_dict())
        if name != "plain":
            row["overhead_ms"] = st.median_ms - plain.median_ms if plain is not None else st.median_ms
            row["_over"] = (
                [r - p for r, p in zip(st.samples_ms, plain.samples_ms)] if plain is not None else list(st.samples_ms)
            )
        rows.append(row)
    builtin = next((r for r in rows if r["variant"] == "builtin"), None)
    for row in rows:
        if row["variant"] == "plain":
            continue
        over = row["_over"]
        row["vs_builtin"], row["vs_builtin_iqr"] = _paired(over, builtin["_over"]) if builtin else (None, None)
        row["vs_floor"], row["vs_floor_iqr"] = _paired(over, floor["rounds_ms"]) if floor else (None, None)
        row["pct_of_plain"], row["pct_of_plain_iqr"] = (
            _paired(over, plain.samples_ms, 100.0) if plain is not None else (None, None)
        )
    for row in rows:
        row.pop("_over", None)
    w_shape = getattr(case, "w_shape", None)
    w_bytes = 4 * w_shape[0] * w_shape[1] if w_shape else None  # float32
    if memory:
        base = memory.get("plain", {}).get("peak_bytes")
        for row in rows:
            m = memory.get(row["variant"])
            if m is None:
                continue
            row.update(m)
            if base is not None and row["variant"] != "plain":
                row["extra_peak_bytes"] = m["peak_bytes"] - base
    return dict(
        label=label,
        framework=framework,
        device=device,
        case=case.name,
        mode=mode,
        description=case.description,
        w_bytes=w_bytes,
        rows=rows,
        floor=floor,
    )


# -- formatting --------------------------------------------------------------------------------


def _f(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:.1f}"
    return f"{x:.{digits}f}"


def _x(x: float | None, iqr: list[float] | None = None) -> str:
    """A ratio with its IQR: ``0.31 [0.27, 0.36]``."""
    if x is None:
        return "-"
    if iqr is None:
        return f"{x:.2f}"
    return f"{x:.2f} [{iqr[0]:.2f}, {iqr[1]:.2f}]"


def _pct(x: float | None, iqr: list[float] | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f} [{iqr[0]:.0f}, {iqr[1]:.0f}]"


def _mib(b: float | None, signed: bool = False) -> str:
    if b is None:
        return "-"
    v = b / MiB
    digits = 2 if abs(v) < 10 else 1
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _faults(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def _rows(res: dict) -> dict[str, dict]:
    return {r["variant"]: r for r in res["rows"]}


def _labels(results: list[dict]) -> list[str]:
    out: list[str] = []
    for res in results:
        if res["label"] not in out:
            out.append(res["label"])
    return out


def summary_table(results: list[dict]) -> str:
    """Per case and framework: dualsn against the built-in and the floor, and the eval %."""
    by = {(r["label"], r["case"], r["mode"]): r for r in results}
    cases: list[str] = []
    for res in results:
        if res["mode"] in ("train", "eval") and res["case"] not in cases:
            cases.append(res["case"])
    lines = [
        "| case | framework | train: dualsn / built-in | train: dualsn / floor | eval: dualsn / built-in "
        "| eval: dualsn / floor | eval % of plain: built-in | eval % of plain: dualsn |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        for label in _labels(results):
            train, ev = by.get((label, case, "train")), by.get((label, case, "eval"))
            if train is None and ev is None:
                continue
            t = _rows(train).get("dualsn", {}) if train else {}
            e = _rows(ev).get("dualsn", {}) if ev else {}
            eb = _rows(ev).get("builtin", {}) if ev else {}
            lines.append(
                f"| {case} | {label} | {_x(t.get('vs_builtin'), t.get('vs_builtin_iqr'))} "
                f"| {_x(t.get('vs_floor'), t.get('vs_floor_iqr'))} "
                f"| {_x(e.get('vs_builtin'), e.get('vs_builtin_iqr'))} "
                f"| {_x(e.get('vs_floor'), e.get('vs_floor_iqr'))} "
                f"| {_pct(eb.get('pct_of_plain'), eb.get('pct_of_plain_iqr'))} "
                f"| {_pct(e.get('pct_of_plain'), e.get('pct_of_plain_iqr'))} |"
            )
    return "\n".join(lines)


def memory_table(results: list[dict]) -> str:
    """Per case and framework, one training step: peak memory above plain's and page faults."""
    lines = [
        "| case | framework | W MiB | plain peak MiB | built-in peak above plain MiB | dualsn peak above plain MiB "
        "| dualsn extra peak in W | plain faults/step | built-in faults/step | dualsn faults/step |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["label"], r["case"]): r for r in results if r["mode"] == "train"}
    cases = list(dict.fromkeys(case for _, case in by))
    for res in (by[(label, case)] for case in cases for label in _labels(results) if (label, case) in by):
        rows = _rows(res)
        p, b, d = rows.get("plain", {}), rows.get("builtin", {}), rows.get("dualsn", {})
        extra = d.get("extra_peak_bytes")
        in_w = f"{extra / res['w_bytes']:.2f}" if extra is not None and res.get("w_bytes") else "-"
        lines.append(
            f"| {res['case']} | {res['label']} | {_mib(res.get('w_bytes'))} | {_mib(p.get('peak_bytes'))} "
            f"| {_mib(b.get('extra_peak_bytes'), True)} | {_mib(extra, True)} | {in_w} "
            f"| {_faults(p.get('faults_per_call'))} | {_faults(b.get('faults_per_call'))} "
            f"| {_faults(d.get('faults_per_call'))} |"
        )
    return "\n".join(lines)


def framework_table(results: list[dict], label: str) -> str:
    """Every row of one framework (and device), with the floor."""
    lines = [
        "| case | mode | variant | median ms | IQR ms | overhead ms | overhead / built-in's | overhead / floor "
        "| overhead % of plain | faults/call | peak MiB | kept MiB | reserved peak MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        if res["label"] != label:
            continue
        first = True
        for row in res["rows"]:
            head = f"| {res['case']} | {res['mode']} |" if first else "| | |"
            first = False
            lines.append(
                f"{head} {row['variant']} | {_f(row['median_ms'])} | {_f(row['q3_ms'] - row['q1_ms'])} "
                f"| {_f(row.get('overhead_ms'))} | {_x(row.get('vs_builtin'), row.get('vs_builtin_iqr'))} "
                f"| {_x(row.get('vs_floor'), row.get('vs_floor_iqr'))} "
                f"| {_pct(row.get('pct_of_plain'), row.get('pct_of_plain_iqr'))} "
                f"| {_faults(row.get('faults_per_call'))} | {_mib(row.get('peak_bytes'))} "
                f"| {_mib(row.get('kept_bytes'))} | {_mib(row.get('reserved_peak_bytes'))} |"
            )
        if res["floor"]:
            fl = res["floor"]
            lines.append(
                f"| | | floor | {_f(fl['total_ms'])} | | | | | | "
                f"{_faults(sum(op['faults_per_call'] for op in fl['ops'].values()))} | | | |"
            )
    return "\n".join(lines)


def floor_table(results: list[dict]) -> str:
    """The floor's parts (fastest form of each, named) next to each SN row's overhead."""
    names = list(FLOOR_LABELS)
    lines = [
        "| framework | case | mode | " + " | ".join(FLOOR_LABELS[n] for n in names)
        + " | floor ms | built-in overhead ms | dualsn overhead ms | dualsn / floor |",
        "|---|---|---|" + "---:|" * (len(names) + 4),
    ]
    for res in results:
        if not res["floor"]:
            continue
        ops = res["floor"]["ops"]
        rows = _rows(res)
        parts = " | ".join(
            f"{_f(ops[n]['median_ms'], 4)} ({ops[n]['form']})" if n in ops else "-" for n in names
        )
        d = rows.get("dualsn", {})
        lines.append(
            f"| {res['label']} | {res['case']} | {res['mode']} | {parts} | "
            f"{_f(res['floor']['total_ms'], 4)} | {_f(rows.get('builtin', {}).get('overhead_ms'))} | "
            f"{_f(d.get('overhead_ms'))} | {_x(d.get('vs_floor'), d.get('vs_floor_iqr'))} |"
        )
    return "\n".join(lines)


def footer(meta: dict) -> list[str]:
    """How every column is measured."""
    out = ["## How these numbers are measured", ""]
    isolation = meta.get("isolation", "one process")
    out.append(
        f"- Processes: {isolation}. In one process torch and Paddle would share the C allocator (and "
        "OpenMP state): whether a freed W-sized block is reused or faulted in fresh would then depend "
        "on the other framework."
    )
    out.append(
        "- Timing: every variant of a case (plain, built-in, dualsn, the floor's forms) is timed once "
        "per round, in an order rotated every round; a sample is enough back-to-back calls to last the "
        "minimum sample time. Times are medians over the timed rounds; IQR = third minus first quartile."
    )
    out.append(
        "- Ratios and % are paired: computed per round from that round's samples, then the median "
        "[first quartile, third quartile] over rounds. Overhead = row - plain. eval % of plain = eval "
        "overhead / the plain layer's no-grad forward."
    )
    parts = "; ".join(f"{m}: " + ", ".join(FLOOR_LABELS[p] for p in ps) for m, ps in FLOOR_PARTS.items())
    out.append(
        f"- Floor ({parts}): each part is timed in several correct forms (see the drivers' docstrings; "
        "outputs into preallocated buffers, or fresh where the framework has no one-pass buffer form) and "
        "the fastest form's median counts; the floor table names it."
    )
    out.append(
        "- Page faults: minor faults of the whole process (getrusage(RUSAGE_SELF).ru_minflt, every "
        "thread) across each sample's calls, per call; median over rounds. A W-sized allocation the "
        "allocator takes fresh from the kernel shows as W bytes / 4 KiB faults. With glibc's defaults, "
        "every allocation of 32 MiB or more (float32 W from 4096x2048 up) is a fresh mmap, so there "
        "faults/step / (W / 4 KiB) counts the W-sized allocations per step; below that, whether a freed "
        "block is reused depends on malloc's state and can change between runs."
    )
    out.append(
        "- Peak memory (train, one-layer cases): a fresh model per row, outside the timing, "
        "built, stepped twice, then one measured step. peak = the most bytes live during the measured "
        "step among those allocated since just before the model was built (W, its gradient and whatever "
        "the spectral norm keeps are in; the shared input is not); kept = live after the step. "
        "Above plain = the row's peak minus the plain layer's. Counted: tensor memory from the "
        "framework's allocator; not counted: scratch that BLAS/oneDNN allocate themselves, Python objects."
    )
    for label, info in meta["framework_info"].items():
        if info.get("memory_method"):
            out.append(f"  - {label}: {info['memory_method']}.")
    for note in meta.get("notes", []):
        out.append(f"- {note}")
    out.append("")
    return out


def markdown(doc: dict) -> str:
    meta = doc["meta"]
    results = doc["results"]
    labels = [lb for lb in _labels(results)]
    out = ["# dualsn benchmarks", ""]
    load = meta.get("loadavg")
    load_txt = (
        f"; load average (1 min) {load['start'][0]:.2f} at start, {load['end'][0]:.2f} at end"
        if load else ""
    )
    out.append(
        f"Command: `{meta['command']}`; devices {', '.join(meta['devices'])}; threads {meta['threads']}; "
        f"warm-up {meta['warmup']} rounds, {meta['repeats']} timed rounds (interleaved, medians); "
        f"{meta['started']}; {meta['elapsed_s']:.0f} s; {meta['cpu_count']} CPUs{load_txt}."
    )
    out.append("")
    for label, info in meta["framework_info"].items():
        sn = "; ".join(f"{k} = `{v}`" for k, v in info["sn_variants"].items())
        out.append(f"- {label} {info['version']}, threads {info['threads']}: {sn}")
    for note in meta.get("skipped", []):
        out.append(f"- skipped: {note}")
    out.append("")
    out.append("Cases:")
    for name, desc in meta["cases"].items():
        st = meta["case_settings"][name]
        out.append(
            f"- `{name}`: {desc} (warm-up {st['warmup']}, {st['repeats']} timed rounds, "
            f"samples of >= {st['min_sample_s'] * 1e3:g} ms)"
        )
    out.append("")
    out.append(
        "Overhead = median - plain median. Floor = one W v, one W^H u, W / sigma and the rank-1 "
        "gradient term (G - <G, W_sn> u v^T) / sigma for train; W v and W / sigma for eval. "
        "Ratios: paired median [IQR] over rounds."
    )
    out.append("")
    if any(r["mode"] in ("train", "eval") for r in results):
        out += ["## Summary: time", "", summary_table(results), ""]
    if any(r["mode"] == "train" for r in results):
        out += ["## Summary: memory and page faults of a training step", "", memory_table(results), ""]
    for label in labels:
        out += [f"## {label}", "", framework_table(results, label), ""]
    if any(r["floor"] for r in results):
        out += ["## The floor", "", floor_table(results), ""]
    out += footer(meta)
    return "\n".join(out).rstrip() + "\n"
