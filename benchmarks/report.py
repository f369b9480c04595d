"""Derived numbers, markdown tables and the JSON document.

For each (framework, case, mode) result:
- overhead of a spectral-norm row = its median minus the plain row's median (for
  registration there is no plain row: the overhead is the time itself);
- ``vs_builtin`` = a row's overhead / the built-in's overhead (< 1: cheaper than the built-in);
- ``floor`` = the sum of the floor rows' medians; ``vs_floor`` = a row's overhead / floor.
"""

from __future__ import annotations

import math

from benchmarks.timing import Stats

SN_ORDER = ("builtin", "dualsn", "dualsn[paddle]")
FLOOR_LABELS = {
    "floor:Wv": "W v",
    "floor:WHu": "W^H u",
    "floor:rescale": "W / sigma",
    "floor:rank1_grad": "rank-1 grad",
}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def summarize(framework: str, case, mode: str, stats: dict[str, Stats], floor_names) -> dict:
    """One result record: per-row statistics plus the derived overheads and ratios."""
    plain = stats["plain"].median_ms if "plain" in stats else None
    rows = []
    for name, st in stats.items():
        if name.startswith("floor:"):
            continue
        row = dict(variant=name, **st.as_dict())
        if name != "plain":
            row["overhead_ms"] = st.median_ms - plain if plain is not None else st.median_ms
        rows.append(row)
    builtin_overhead = next((r["overhead_ms"] for r in rows if r["variant"] == "builtin"), None)
    floor = None
    if floor_names:
        ops = {n: stats[n].as_dict() for n in floor_names}
        floor = dict(ops=ops, total_ms=sum(op["median_ms"] for op in ops.values()))
    for row in rows:
        if row["variant"] == "plain":
            continue
        row["vs_builtin"] = _ratio(row["overhead_ms"], builtin_overhead)
        row["vs_floor"] = _ratio(row["overhead_ms"], floor["total_ms"]) if floor else None
    return dict(
        framework=framework,
        case=case.name,
        mode=mode,
        description=case.description,
        rows=rows,
        floor=floor,
    )


def _f(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:.1f}"
    return f"{x:.{digits}f}"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def framework_table(results: list[dict], framework: str) -> str:
    """Rows plain / built-in / dualsn (and the floor) for every case of one framework."""
    lines = [
        "| case | mode | variant | median ms | IQR ms | overhead ms | overhead / built-in's | overhead / floor |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        if res["framework"] != framework:
            continue
        first = True
        for row in res["rows"]:
            label = f"| {res['case']} | {res['mode']} |" if first else "| | |"
            first = False
            lines.append(
                f"{label} {row['variant']} | {_f(row['median_ms'])} | "
                f"{_f(row['q3_ms'] - row['q1_ms'])} | {_f(row.get('overhead_ms'))} | "
                f"{_x(row.get('vs_builtin'))} | {_x(row.get('vs_floor'))} |"
            )
        if res["floor"]:
            lines.append(f"| | | floor | {_f(res['floor']['total_ms'])} | | | | |")
    return "\n".join(lines)


def floor_table(results: list[dict]) -> str:
    """The floor's parts next to each SN row's overhead."""
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
        rows = {r["variant"]: r for r in res["rows"]}
        parts = " | ".join(_f(ops[n]["median_ms"], 4) if n in ops else "-" for n in names)
        lines.append(
            f"| {res['framework']} | {res['case']} | {res['mode']} | {parts} | "
            f"{_f(res['floor']['total_ms'], 4)} | {_f(rows.get('builtin', {}).get('overhead_ms'))} | "
            f"{_f(rows.get('dualsn', {}).get('overhead_ms'))} | {_x(rows.get('dualsn', {}).get('vs_floor'))} |"
        )
    return "\n".join(lines)


def ratio_table(results: list[dict], frameworks: list[str]) -> str:
    """Side by side: dualsn's overhead relative to the built-in's and to the floor, per framework."""
    keys: list[tuple[str, str]] = []
    by_key: dict[tuple[str, str, str], dict] = {}
    for res in results:
        key = (res["case"], res["mode"])
        if key not in keys:
            keys.append(key)
        by_key[(res["framework"], *key)] = {r["variant"]: r for r in res["rows"]}
    head = ["case", "mode"]
    for fw in frameworks:
        head += [f"{fw} dualsn / built-in", f"{fw} dualsn / floor"]
    if "paddle" in frameworks:
        head.append("paddle dualsn[paddle] / built-in")
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for case, mode in keys:
        cells = [case, mode]
        for fw in frameworks:
            row = by_key.get((fw, case, mode), {}).get("dualsn", {})
            cells += [_x(row.get("vs_builtin")), _x(row.get("vs_floor"))]
        if "paddle" in frameworks:
            row = by_key.get(("paddle", case, mode), {}).get("dualsn[paddle]", {})
            cells.append(_x(row.get("vs_builtin")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    meta = doc["meta"]
    frameworks = [fw for fw in meta["frameworks"] if fw in meta["framework_info"]]
    out = ["# dualsn benchmarks", ""]
    out.append(
        f"Command: `{meta['command']}`; device {meta['device']}; threads {meta['threads']}; "
        f"warm-up {meta['warmup']} rounds, {meta['repeats']} timed rounds (interleaved, medians); "
        f"{meta['started']}; {meta['elapsed_s']:.0f} s."
    )
    out.append("")
    for fw in frameworks:
        info = meta["framework_info"][fw]
        sn = "; ".join(f"{k} = `{v}`" for k, v in info["sn_variants"].items())
        out.append(f"- {fw} {info['version']}, threads {info['threads']}: {sn}")
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
        "gradient term (G - <G, W_sn> u v^T) / sigma for train; W v and W / sigma for eval."
    )
    out.append("")
    out += ["## dualsn vs built-in, side by side", "", ratio_table(doc["results"], frameworks), ""]
    for fw in frameworks:
        out += [f"## {fw}", "", framework_table(doc["results"], fw), ""]
    if any(r["floor"] for r in doc["results"]):
        out += ["## The floor", "", floor_table(doc["results"]), ""]
    return "\n".join(out)
