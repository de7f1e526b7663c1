"""Filters of the validate role: read EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) output, take medians and
compare the guide's performance tests with the baseline Phase 1 saved (verdicts from numbers only)."""
from __future__ import annotations

DOCUMENTATION = """
name: perf
short_description: EXPLAIN JSON summaries and performance verdicts for the validate role
description: [scanner.dbops.plan_summary, scanner.dbops.median, scanner.dbops.perf_measure, scanner.dbops.perf_compare.]
"""


def _walk(node):
    yield node
    for child in node.get("Plans", []) or []:
        yield from _walk(child)


def plan_summary(explain):
    """One EXPLAIN (FORMAT JSON) result (the list PostgreSQL returns, or its first element)."""
    if isinstance(explain, list):
        explain = explain[0]
    root = explain.get("Plan", {})
    nodes = list(_walk(root))
    planning = float(explain.get("Planning Time") or 0.0)
    execution = float(explain.get("Execution Time") or 0.0)
    return {
        "planning_ms": round(planning, 3),
        "execution_ms": round(execution, 3),
        "total_ms": round(planning + execution, 3),
        "relations": sorted({n["Relation Name"] for n in nodes if n.get("Relation Name")}),
        "index_scans": [{"node": n.get("Node Type"), "index": n["Index Name"]} for n in nodes if n.get("Index Name")],
        "node_types": sorted({n.get("Node Type", "") for n in nodes}),
        "subplans_removed": sum(int(n.get("Subplans Removed") or 0) for n in nodes),
        "buffers_hit": int(root.get("Shared Hit Blocks") or 0),
        "buffers_read": int(root.get("Shared Read Blocks") or 0),
        "top_node": root.get("Node Type"),
        "scan_nodes": [n.get("Node Type") for n in nodes if n.get("Relation Name")],
        # index-only scans that still read the heap: pages not marked all-visible (not vacuumed yet)
        "heap_fetches": sum(int(n.get("Heap Fetches") or 0) for n in nodes if n.get("Node Type") == "Index Only Scan"),
    }


def median(values):
    vals = sorted(float(v) for v in values)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2.0


def perf_measure(results, tests):
    """results: the registered loop results of the measuring task (loop over tests x repetitions).
    Returns one entry per test: median total time (planning + execution), every run, the plan of the
    median run."""
    by_name = {}
    for res in results:
        test = res["item"][0]
        rows = res.get("query_result") or [{}]
        explain = rows[0].get("QUERY PLAN")
        by_name.setdefault(test["name"], []).append(plan_summary(explain))
    out = []
    for test in tests:
        runs = by_name.get(test["name"], [])
        if not runs:
            continue
        totals = [r["total_ms"] for r in runs]
        med = median(totals)
        closest = min(runs, key=lambda r: abs(r["total_ms"] - med))
        out.append({
            "name": test["name"],
            "median_ms": round(med, 3),
            "runs_ms": totals,
            "planning_ms": closest["planning_ms"],
            "execution_ms": closest["execution_ms"],
            "plan": closest,
        })
    return out


def _fmt_ms(v):
    return ("%.2f" % v) if v < 10 else ("%.1f" % v) if v < 1000 else ("%.0f" % v)


def _promise(test):
    lo, hi, target = test.get("speedup_min"), test.get("speedup_max"), test.get("target_ms")
    txt = "%s-%sx" % (lo, hi) if lo and hi else ("%sx" % lo if lo else "")
    if target:
        txt += (" and " if txt else "") + "<%s ms" % target
    return txt


def perf_compare(current, baseline, tests, catalog):
    """current: perf_measure() output now; baseline: the stored row ({taken_utc, tests: [...]}) or None;
    tests: the role's validate_tests; catalog: {calls_partitions: [...], gin_indexes: [...],
    calls_rows: n, transcripts_rows: n, gin_usable: bool|None}. Returns validate_result.tests."""
    base_by = {t["name"]: t for t in ((baseline or {}).get("tests") or [])}
    cur_by = {t["name"]: t for t in current}
    parts = set(catalog.get("calls_partitions") or [])
    gins = set(catalog.get("gin_indexes") or [])
    out = []
    for test in tests:
        cur = cur_by.get(test["name"])
        if cur is None:
            continue
        b = base_by.get(test["name"])
        plan = cur["plan"]
        scanned = len(parts & set(plan["relations"])) if parts else None
        gin_used = any(s["index"] in gins for s in plan["index_scans"])
        cur_ms = cur["median_ms"]
        base_ms = b["median_ms"] if b else None
        speedup = float("%.3g" % (base_ms / cur_ms)) if base_ms and cur_ms > 0 else None  # 3 significant digits
        target = test.get("target_ms")
        met_target = (cur_ms < target) if target else None
        lo, hi = test.get("speedup_min"), test.get("speedup_max")
        met_speedup = (speedup >= lo) if (speedup is not None and lo) else None
        table_rows = catalog.get(test.get("table", "") + "_rows")
        reasons = []
        if speedup is not None and not met_speedup:
            if base_ms < (target or 0):
                reasons.append("the baseline already took only %s ms" % _fmt_ms(base_ms))
            if cur["planning_ms"] > cur["execution_ms"]:
                reasons.append("planning %s ms > execution %s ms%s" % (
                    _fmt_ms(cur["planning_ms"]), _fmt_ms(cur["execution_ms"]),
                    " (%d partitions to consider)" % len(parts) if parts and test.get("table") == "calls" else ""))
            if test.get("table") == "transcripts" and not gin_used:
                reasons.append("the planner chose %s over the GIN index at this size"
                               % ((plan.get("scan_nodes") or [plan.get("top_node") or "another plan"])[0]))
            if plan.get("heap_fetches"):
                reasons.append("its index-only scans still read %d rows from the heap (pages not all-visible: "
                               "VACUUM the partitions)" % plan["heap_fetches"])
            if table_rows and int(table_rows) > 0:
                reasons.append("on a ~%s-row table" % "{:,}".format(int(table_rows)))
        target_txt = ""
        if target:
            target_txt = ("under the %s ms target" if met_target else "NOT under the %s ms target") % target
        if speedup is None:
            verdict = "no baseline: speedup unknown; %s ms now, %s" % (_fmt_ms(cur_ms), target_txt or "no time target")
        elif met_speedup:
            verdict = "reached: %sx faster (%s -> %s ms; promise %s)%s; %s" % (
                speedup, _fmt_ms(base_ms), _fmt_ms(cur_ms), _promise(test),
                " - beyond the promised %sx" % hi if hi and speedup > hi else "", target_txt or "no time target")
        else:
            verdict = "not reached: %sx at this scale (%s -> %s ms; promise %s)%s; %s" % (
                speedup, _fmt_ms(base_ms), _fmt_ms(cur_ms), _promise(test),
                ("; " + "; ".join(reasons)) if reasons else "", target_txt or "no time target")
        out.append({
            "name": test["name"],
            "query": test.get("query", ""),
            "baseline_ms": base_ms,
            "current_ms": cur_ms,
            "speedup": speedup,
            "promise": _promise(test),
            "target_ms": target,
            "met_target": met_target,
            "met_speedup": met_speedup,
            "verdict": verdict,
            "plan": {
                "partitions_scanned": scanned if test.get("table") == "calls" else None,
                "partitions_total": len(parts) if (parts and test.get("table") == "calls") else None,
                "subplans_removed": plan["subplans_removed"],
                "gin_used": gin_used if test.get("table") == "transcripts" else None,
                "gin_usable": catalog.get("gin_usable") if test.get("table") == "transcripts" else None,
                "buffers_hit": plan["buffers_hit"],
                "buffers_read": plan["buffers_read"],
                "heap_fetches": plan.get("heap_fetches", 0),
                "planning_ms": cur["planning_ms"],
                "execution_ms": cur["execution_ms"],
            },
        })
    return out


class FilterModule:
    def filters(self):
        return {
            "plan_summary": plan_summary,
            "median": median,
            "perf_measure": perf_measure,
            "perf_compare": perf_compare,
        }
