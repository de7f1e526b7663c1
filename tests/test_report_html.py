"""The HTML run report (roles/report/templates/report.html.j2), from real phase runs, in a real browser.

1. Render: phase1 then phase2 on a small seeded database (pg_cron's database: phase2 schedules jobs).
   Each run writes <phase>_<run id>.html next to the JSON; the HTML parses, has every section, its SVG bars
   have the widths the JSON's numbers give, partitions match the database, nothing is loaded from
   elsewhere, and an operator-supplied title with markup is shown as text.
2. Template data the phase runs do not produce yet (validate_result, maintenance_result.health)
   rendered from a fixture through the same template.
3. Browser: headless Chromium takes a 1280x2000 screenshot (parsed here with zlib: right size,
   not blank, the chart colours are on screen) and dumps the DOM with console logging on; any
   console message fails the check. The check itself fails on a page with a JavaScript error
   and on a blank page. Skipped when chromium is missing, unless CI=true.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections import Counter
from html.parser import HTMLParser

import pytest
import yaml

from conftest import create_db, drop_db
from playbook_runner import ANSIBLE_PLAYBOOK, PYTHON, REPO, new_workdir, run_playbook

TEMPLATE = REPO / "roles" / "report" / "templates" / "report.html.j2"
DEFAULTS = yaml.safe_load((REPO / "roles" / "report" / "defaults" / "main.yml").read_text())
SECTIONS = ["summary", "tables", "partitions", "timings", "backup", "health", "pauses", "migrations", "notices"]
PARTITIONED = ["bcfy_calls_raw", "transcripts", "api_call_metrics", "system_logs"]
FAST = {"partition_round_seconds": 3, "partition_upsert_probe_seconds": 2}
EVIL_TITLE = 'Phase 1 <script>alert("x")</script> & <b>bold</b>'
WINDOW = (1280, 2000)


# ---- parsing ---------------------------------------------------------------------------------
class Page(HTMLParser):
    """Collects what the checks need: ids, bars per SVG, external references, text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.ids, self.tags, self.refs, self.bars, self.svgs = set(), Counter(), [], [], 0
        self.text, self._stack, self._partition_table = [], [], None
        self.h1 = ""
        self.status_class = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags[tag] += 1
        self._stack.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        if a.get("id") == "status":
            self.status_class = a.get("class", "")
        for key in ("src", "href", "xlink:href", "action", "poster", "srcset"):
            if key in a:
                self.refs.append(a[key] or "")
        if tag == "details" and "data-table" in a:
            self._partition_table = a["data-table"]
        if tag == "svg":
            self.svgs += 1
        if tag == "rect" and "bar" in a.get("class", "").split():
            self.bars.append({**a, "svg": self.svgs, "partition_table": self._partition_table})

    def handle_endtag(self, tag):
        if tag == "details":
            self._partition_table = None
        while self._stack and self._stack.pop() != tag:
            pass

    def handle_data(self, data):
        self.text.append(data)
        if self._stack and self._stack[-1] == "h1":
            self.h1 += data

    @property
    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())


def expected_width(bar: dict) -> float:
    value, vmax, scale = float(bar["data-value"]), float(bar["data-max"]), float(bar["data-scale"])
    width = value / vmax * scale if vmax > 0 else 0.0
    return 1.0 if 0 < value and width < 1 else width


def check_bars(page: Page):
    assert page.bars, "no bars in the report"
    for bar in page.bars:
        w = float(bar["width"])
        assert abs(w - expected_width(bar)) <= 0.06, bar
        assert (w > 0) == (float(bar["data-value"]) > 0), bar
        assert 0 <= w <= float(bar["data-scale"]) + 0.06, bar


def check_self_contained(text: str, page: Page):
    external = [r for r in page.refs if re.match(r"^\s*(https?:)?//", r, re.I)]
    assert not external, external
    assert not re.search(r"""<[^<>]*\b(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert page.tags["script"] == 0 and page.tags["link"] == 0 and page.tags["iframe"] == 0
    assert "@import" not in text and "url(" not in text


def bars_of(page: Page, series: str, table: str | None = None) -> list:
    return [b for b in page.bars if b["data-series"] == series and b["partition_table"] == table]


# ---- the expression lint: every {{ }} of the template is escaped ------------------------------
EXPR = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.S)
MACROS = {"fmt", "chip", "chart"}  # they escape what they print


def _top_level(expr: str) -> str:
    out, depth, quote = [], 0, None
    for ch in expr:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def unescaped_expressions(text: str) -> list:
    bad = []
    for m in EXPR.finditer(text):
        expr = m.group(1)
        if _top_level(expr).strip() in MACROS:
            continue
        if not re.search(r"\|\s*e$", expr) or re.search(r"\s(or|and|if|else)\s|~",
                                                        _top_level(re.sub(r"\|\s*e$", "", expr))):
            bad.append(expr)
    return bad


def test_template_escapes_every_expression():
    """Ansible does not honour {% autoescape %}: the template escapes each expression itself.
    `{{ a or b | e }}` escapes only b, so the whole expression must be in parentheses."""
    assert unescaped_expressions("{{ x | e }} {{ (a or b) | e }} {{ fmt(v, 'ms') }}") == []
    assert unescaped_expressions("{{ x }} {{ a or b | e }} {{ 'y' if c else z | e }}") == [
        "x", "a or b | e", "'y' if c else z | e"]
    assert unescaped_expressions(TEMPLATE.read_text()) == []


# ---- 1. real runs ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(pg_server):
    db = create_db(pg_server, baseline=True, seed_calls=3000, cron=True)
    workdir = new_workdir()
    out = {"db": db, "reports": workdir / "reports"}
    import time
    for name, playbook, extra in (("phase1", "phase1", {"report_title": EVIL_TITLE}),
                                  ("phase2", "phase2", FAST)):
        started = time.monotonic()
        res = run_playbook(db, playbook, extra_vars=extra, workdir=workdir, timeout=900)
        assert res.ok, res.text
        print("\n%s: %.0f s" % (name, time.monotonic() - started))
        phase = "001" if playbook == "phase1" else "002"
        newest = sorted(workdir.joinpath("reports").glob(f"{phase}_*.json"), key=lambda p: p.stat().st_mtime)[-1]
        out[name] = {"res": res, "json": newest, "html": newest.with_suffix(".html"),
                     "data": json.loads(newest.read_text())}
    keep = os.environ.get("REPORT_KEEP_DIR")  # e.g. REPORT_KEEP_DIR=/tmp/reports to open them afterwards
    if keep:
        shutil.copytree(workdir / "reports", keep, dirs_exist_ok=True)
    yield out
    drop_db(pg_server, db.name)


def test_phase1_html_report(runs):
    run = runs["phase1"]
    data, html = run["data"], run["html"]
    assert html.exists() and html.name == "001_%s.html" % data["run_id"]
    assert run["res"].shows(".html")
    text = html.read_text(encoding="utf-8")
    page = Page(text)
    assert set(SECTIONS) <= page.ids, page.ids
    # Header: the operator's title is text, not markup; the data is all there.
    assert page.h1 == EVIL_TITLE
    assert "<script>" not in text and "&lt;script&gt;" in text
    for needle in (data["phase"], data["database"], data["server_version"], data["operator"], data["run_id"],
                   data["finished_utc"], "Check mode"):
        assert needle and needle in page.all_text, needle
    assert page.status_class == "badge ok" and data["status"] == "ok"
    check_self_contained(text, page)
    check_bars(page)
    # One bar per table and state; before == after sizes are the JSON's.
    after = {t: v["bytes"] for t, v in data["tables_after"].items()}
    by_value = sorted(float(b["data-value"]) for b in bars_of(page, "ab"))
    assert by_value == sorted(float(v) for v in after.values())
    assert len(bars_of(page, "bb")) == len(data["tables_before"]) > 0
    assert max(float(b["width"]) for b in bars_of(page, "ab")) == pytest.approx(float(bars_of(page, "ab")[0]["data-scale"]), abs=0.06)
    # Migrations with durations, backup with size and duration.
    assert len(bars_of(page, "ms")) == len(data["migrations"]) == len(data["pending_before"]) > 0
    for m in data["migrations"]:
        assert "%s %s" % (m["version"], m["name"]) in page.all_text
    assert data["backup"]["duration_s"] is not None and data["backup"]["path"] in page.all_text
    # Before Phase 2 nothing is partitioned: the section says so.
    assert data["partitions"] == {}
    assert "No partitioned tables" in page.all_text
    assert "Not measured in this run" in page.all_text and "No health check in this run" in page.all_text


def test_phase2_html_report_partitions(runs):
    run, db = runs["phase2"], runs["db"]
    data = run["data"]
    text = run["html"].read_text(encoding="utf-8")
    page = Page(text)
    assert set(SECTIONS) <= page.ids
    check_self_contained(text, page)
    check_bars(page)
    assert set(data["partitions"]) == set(PARTITIONED)
    per_bars = {}
    assert re.findall(r'<details open class="partition-table" data-table="(\w+)"', text) == PARTITIONED
    for table, info in data["partitions"].items():
        parts = info["partitions"]
        assert info["rows_exact"] is True and info["partition_count"] == len(parts) > 1, table
        assert parts[-1]["is_default"] and parts[-1]["rows"] == 0, (table, parts[-1])
        names = {r[0] for r in db.query(
            "SELECT relid::regclass::text FROM pg_partition_tree(%s::regclass) WHERE isleaf", ("public." + table,))}
        assert {p["name"] for p in parts} == names, table
        assert sum(p["rows"] for p in parts) == info["rows"] == db.scalar(f"SELECT count(*) FROM public.{table}")
        # The chart of this table: a size bar and a rows bar per partition, values from the JSON; past
        # 36 partitions, consecutive partitions share a bar (a year of daily system_logs partitions).
        ranged = [p for p in parts if not p["is_default"]]
        per_bar = int(re.search(r'data-table="%s" data-per-bar="(\d+)"' % table, text).group(1))
        assert per_bar == max(1, math.ceil(len(ranged) / 36)), (table, per_bar)
        groups = [ranged[i:i + per_bar] for i in range(0, len(ranged), per_bar)] + [[p] for p in parts if p["is_default"]]
        sizes, rows = bars_of(page, "bytes", table), bars_of(page, "rows", table)
        assert [float(b["data-value"]) for b in sizes] == [float(sum(p["bytes"] for p in g)) for g in groups]
        assert [float(b["data-value"]) for b in rows] == [float(sum(p["rows"] for p in g)) for g in groups]
        assert len(sizes) <= 37
        assert any(float(b["width"]) > 10 for b in rows), "no partition of %s has a visible rows bar" % table
        per_bars[table] = per_bar
    assert per_bars["bcfy_calls_raw"] == 1 and per_bars["system_logs"] > 1, per_bars  # both layouts were drawn
    assert "Phase 2: online range partitioning" == page.h1
    md = run["html"].with_suffix(".md").read_text(encoding="utf-8")
    for table, info in data["partitions"].items():
        assert "| %s | %d |" % (table, info["partition_count"]) in md, md


# ---- 2. data the phases do not produce (yet): query timings and health -------------------------
SAMPLE = {
    "title": "Sample", "phase": "002", "status": "critical", "run_id": "20250101T000000Z-1",
    "operator": "ops <img src=https://evil.example/x.png>", "host": "testdb", "database": "scanner@db:5432",
    "server_version": "15.8", "finished_utc": "2025-01-01T00:10:00Z", "check_mode": True,
    "pending_before": [], "migrations": [], "notices": ["<b>notice</b>"], "backup": None,
    "tables_before": {"a": {"rows": 10, "bytes": 8192}}, "tables_after": {"a": {"rows": 12, "bytes": 16384}},
    "checks_run": 3, "partitions": {},
    "backfill_pauses": [{"table": "bcfy_calls_raw", "signal": "replay_lag_bytes", "seconds": 12.5, "ongoing": False,
                         "reason": "standby <replica1> replay lag 48 MB > 16 MB", "started_at": "2025-01-01T00:05:00Z"}],
    "query_timings": {"baseline": {"label": "pre_phase1", "taken_utc": "2025-01-01T00:00:00Z", "run_id": "r1"}, "tests": [
        {"name": "calls by feed", "baseline_ms": 800.0, "current_ms": 4.0, "speedup": 200.0, "promise": "10-50x",
         "verdict": "reached: 200.0x faster (800 -> 4 ms; promise 10-50x); under the 100 ms target",
         "plan": {"partitions_scanned": 1, "partitions_total": 5, "gin_used": None}},
        {"name": "rollup <x>", "baseline_ms": 50.0, "current_ms": 75.0, "speedup": 0.67, "promise": "2x",
         "verdict": "not reached: 0.67x at this scale (50 -> 75 ms; promise 2x)", "plan": {"gin_used": False}},
        {"name": "no baseline", "baseline_ms": None, "current_ms": 2.5, "speedup": None, "promise": "",
         "verdict": "no baseline: speedup unknown; 2.5 ms now, no time target"}]},
    "health": {"status": "unhealthy", "findings": [
        {"check": "invalid_indexes", "severity": "ok", "summary": "none", "rows": []},
        {"check": "default_rows", "severity": "warning", "summary": "rows in DEFAULT", "rows": [{"t": "x", "n": 3}]},
        {"check": "cron", "severity": "critical", "summary": "job failed <twice>", "rows": 2}]},
}


def render_sample(tmp_path, data) -> str:
    out = tmp_path / "sample.html"
    play = [{"hosts": "localhost", "gather_facts": False,
             "vars": {"report_data": data, "report_partitioned_tables": DEFAULTS["report_partitioned_tables"],
                      "report_bad_verdicts": DEFAULTS["report_bad_verdicts"]},
             "tasks": [{"name": "Render", "ansible.builtin.template": {"src": str(TEMPLATE), "dest": str(out), "mode": "0600"}}]}]
    (tmp_path / "play.yml").write_text(json.dumps(play))
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_LOCALHOST_WARNING": "false",
           "ANSIBLE_INVENTORY_UNPARSED_WARNING": "false", "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp")}
    proc = subprocess.run([str(ANSIBLE_PLAYBOOK), "-i", "localhost,", "-c", "local",
                           "-e", "ansible_python_interpreter=%s" % PYTHON, str(tmp_path / "play.yml")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out.read_text(encoding="utf-8")


def test_sample_timings_and_health(tmp_path):
    text = render_sample(tmp_path, SAMPLE)
    page = Page(text)
    check_self_contained(text, page)
    check_bars(page)
    assert page.status_class == "badge critical" and "Check mode: nothing was changed" in page.all_text
    assert [float(b["data-value"]) for b in bars_of(page, "b")] == [800.0, 50.0]  # no bar for a missing baseline
    assert [float(b["data-value"]) for b in bars_of(page, "c")] == [4.0, 75.0, 2.5]
    assert "×200.0" in page.all_text and "rollup <x>" in page.all_text and "&lt;x&gt;" in text
    chips = re.findall(r'<tr class="timing">.*?class="chip (\w+)">([^<]*)<', text, re.S)
    assert chips == [("pass", "reached"), ("warning", "not reached"), ("plain", "no baseline")], chips
    assert "reads 1 of 5 partitions" in page.all_text and "GIN index not used by the natural plan" in page.all_text
    assert "Baseline: pre_phase1 taken 2025-01-01T00:00:00Z (run r1)." in page.all_text
    # Findings: worst first, the operator's markup is text.
    order = re.findall(r'<tr class="finding (\w+)"', text)
    assert order == ["critical", "warning", "ok"], order
    assert "job failed <twice>" in page.all_text and "<twice>" not in text
    assert "<img" not in text and "<b>notice</b>" in page.all_text
    # Backfill pauses (issue 11): each with its reason (as text) and duration
    assert "standby <replica1> replay lag 48 MB > 16 MB" in page.all_text and "<replica1>" not in text
    assert "1 pause(s), 12.5 s in all" in page.all_text


# ---- 3. browser ------------------------------------------------------------------------------
def chromium_binary():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("chromium is not installed (scripts/install.sh --test installs it); CI=true requires it")
    pytest.skip("chromium is not installed (scripts/install.sh --test); the browser check runs in CI")


def read_png(path: pathlib.Path):
    """(width, height, bytes per pixel, rows) of an 8-bit RGB/RGBA PNG, decoded with zlib only."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "%s is not a PNG" % path
    pos, idat, ihdr = 8, [], None
    while pos < len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if ctype == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", chunk)
        elif ctype == b"IDAT":
            idat.append(chunk)
        elif ctype == b"IEND":
            break
        pos += 12 + length
    width, height, depth, color, _, _, interlace = ihdr
    assert depth == 8 and interlace == 0 and color in (2, 6), ihdr
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride, rows, prev = width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        base = y * (stride + 1)
        ftype, line = raw[base], bytearray(raw[base + 1:base + 1 + stride])
        if ftype == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif ftype == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, prev))
        elif ftype == 3:
            for i in range(stride):
                line[i] = (line[i] + (((line[i - bpp] if i >= bpp else 0) + prev[i]) >> 1)) & 255
        elif ftype == 4:
            for i in range(stride):
                a, b, c = (line[i - bpp] if i >= bpp else 0), prev[i], (prev[i - bpp] if i >= bpp else 0)
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else (b if pb <= pc else c))) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, bpp, rows


def run_chromium(args: list, timeout: int = 180) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="report-chromium-") as profile:
        cmd = [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--hide-scrollbars", "--no-first-run", "--user-data-dir=" + profile,
               "--host-resolver-rules=MAP * ~NOTFOUND"] + args  # offline: nothing may be fetched anyway
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "HOME": profile})


def browser_check(html: pathlib.Path, png: pathlib.Path, must_show=()) -> dict:
    """Screenshot + DOM dump of a page; AssertionError when the page logs anything to the console,
    the screenshot is missing, of the wrong size or blank, or must_show colours are absent."""
    url = html.resolve().as_uri()
    shot = run_chromium(["--screenshot=%s" % png, "--window-size=%d,%d" % WINDOW, url])
    assert png.exists(), "no screenshot: " + shot.stderr[-2000:]
    dom = run_chromium(["--enable-logging=stderr", "--v=0", "--dump-dom", url])
    console = [ln for ln in (shot.stderr + dom.stderr).splitlines() if ":CONSOLE" in ln]
    assert not console, "the page logged to the console:\n" + "\n".join(console)
    assert "<body" in dom.stdout, dom.stderr[-2000:]
    width, height, bpp, rows = read_png(png)
    assert (width, height) == WINDOW, (width, height)
    colours = Counter()
    for row in rows[::4]:
        for x in range(0, width * bpp, 4 * bpp):
            colours[bytes(row[x:x + 3])] += 1
    total = sum(colours.values())
    background, most = colours.most_common(1)[0]
    nonwhite = sum(n for c, n in colours.items() if min(c) < 250) / total
    assert len(colours) >= 16 and (total - most) / total >= 0.05, \
        "blank screenshot: %d colours, %.1f%% off the background" % (len(colours), 100 * (total - most) / total)
    for rgb in must_show:
        assert colours.get(bytes(rgb), 0) > 0, "colour %s not on screen" % (rgb,)
    return {"colours": len(colours), "nonwhite": nonwhite, "dom": dom.stdout}


AFTER_BLUE, ROWS_TEAL, HEADER = (0x2F, 0x6F, 0xDE), (0x14, 0x99, 0x8F), (0x17, 0x21, 0x2E)


def test_browser_renders_the_report(runs, tmp_path):
    html = runs["phase2"]["html"]
    png = tmp_path / "report.png"
    result = browser_check(html, png, must_show=(AFTER_BLUE, ROWS_TEAL, HEADER))
    assert 'id="partitions"' in result["dom"] and result["colours"] > 50
    keep = os.environ.get("REPORT_SCREENSHOT")  # e.g. REPORT_SCREENSHOT=/tmp/report.png to look at it
    if keep:
        shutil.copy(png, keep)


def test_browser_check_fails_on_js_error_and_blank_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body style='background:#17212e;color:#fff'><h1>x</h1>"
                    "<p>" + "text " * 2000 + "</p><script>notDefinedAnywhere();</script></body></html>")
    with pytest.raises(AssertionError, match="console"):
        browser_check(page, tmp_path / "broken.png")
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    with pytest.raises(AssertionError, match="blank screenshot"):
        browser_check(blank, tmp_path / "blank.png")
