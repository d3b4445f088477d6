"""`pilotflow report` on real runs, opened in headless Chromium: the page must render its
timeline (the DOM Chromium parsed has the bars, the screenshot has their colours), not only
exist. Chromium is Debian's ``chromium``; installed with apt-get when missing and possible,
else these tests skip and say why."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import zlib
from collections import Counter
from pathlib import Path

import pytest

from pilotflow.report.svg import COLOURS
from tests.conftest import cli, status_json, write_bundle

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=900,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if shutil.which("chromium"):
            return shutil.which("chromium")
    reason = "chromium is missing and cannot be installed here (needs root and apt-get: apt-get install chromium)"
    print(f"SKIP: {reason}")
    pytest.skip(reason)


def open_in_chromium(page: Path, tmp: Path) -> tuple[str, list[tuple[int, ...]]]:
    """The DOM Chromium built from ``page`` and the pixels of a 1400×1000 screenshot."""
    exe = chromium()
    url = page.resolve().as_uri()
    shot = tmp / "shot.png"
    dom = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile-dom'}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0 and "<svg" in dom.stdout, dom.stderr[-2000:]
    p = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile-shot'}", f"--screenshot={shot}", url],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and shot.exists(), p.stderr[-2000:]
    return dom.stdout, png_pixels(shot.read_bytes())


def png_pixels(data: bytes) -> list[tuple[int, ...]]:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG with the standard library."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    width, height, depth, ctype, _, _, interlace = header
    assert depth == 8 and ctype in (2, 6) and interlace == 0, header
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    prev = bytearray(stride)
    pixels = []
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        pixels += [tuple(line[i:i + 3]) for i in range(0, stride, bpp)]
        prev = line
    return pixels


def near(colour: str, pixels: Counter, tol: int = 8) -> int:
    want = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return sum(n for px, n in pixels.items() if all(abs(p - w) <= tol for p, w in zip(px, want)))


def timeline_bars(dom: str) -> list[str]:
    svg = re.search(r'<svg id="timeline".*?</svg>', dom, re.S)
    assert svg, "no timeline SVG in the DOM"
    groups = re.findall(r'<g class="bars o-\w+"[^>]*>(.*?)</g>', svg.group(0), re.S)
    return [t for g in groups for t in re.findall(r"<rect [^>]*><title>([^<]*)</title>", g)]


def test_report_of_a_local_run_renders_in_chromium(work):
    write_bundle(work, """
        [bundle]
        name = "reported"
        [[resource]]
        name = "here"
        scheduler = "local"
        cores_per_node = 4
        [[task]]
        name = "t{i}"
        command = "sleep 0.{i}"
        matrix = { i = "10..27" }
        walltime = "3s"
        [[task]]
        name = "flaky"
        command = "if [ -f flaky.seen ]; then echo second; else touch flaky.seen; echo first >&2; exit 3; fi"
        retries = 1
        walltime = "3s"
        [[task]]
        name = "broken"
        command = "echo 'checksum mismatch in input.dat' >&2; exit 4"
        walltime = "3s"
    """)
    run = cli("submit", "jobs.toml", "--wait", cwd=work, check=1).stdout.strip()
    st = status_json(work, run)
    assert st["counts"] == {"todo": 0, "locked": 0, "done": 19, "error": 1}
    out = cli("report", "-o", "r.html", cwd=work, check=0).stdout
    assert "wrote r.html" in out
    page = work / "r.html"
    html = page.read_text()
    assert "<script" not in html and not re.search(r'(src|href)="(https?:)?//', html)  # self-contained

    dom, pixels = open_in_chromium(page, work)
    bars = timeline_bars(dom)
    # 20 tokens, and flaky's failed first attempt, found on the resource though no sync saw it
    assert len(bars) == 21, bars
    assert any(b.startswith("flaky · attempt 1 · failed, retried") for b in bars)
    assert any(b.startswith("flaky · attempt 2 · done") for b in bars)
    assert any(b.startswith("t17 · attempt 1 · done") for b in bars)
    assert any(b.startswith("broken · attempt 1 · error") and "exit code 4" in b for b in bars)
    assert re.search(r'id="retries">1<', dom) and re.search(r'id="n-error">1 error<', dom)
    assert "checksum mismatch in input.dat" in dom  # the failure's stderr tail
    assert '<svg id="utilisation"' in dom and "pilot p1" in dom
    # one 4-core node: never more than 4 lanes, nor 4 busy cores (late recorded ends absorbed)
    assert len(set(re.findall(r'<rect x="[\d.]+" y="([\d.]+)"', " ".join(
        re.findall(r'<g class="bars o-\w+"[^>]*>.*?</g>', dom, re.S))))) <= 4
    assert int(re.search(r"peak (\d+) busy cores", dom).group(1)) <= 4

    counts = Counter(pixels)
    white = counts[(255, 255, 255)] + near("#fbfcfd", counts, 1)
    assert white < 0.9 * len(pixels), "the screenshot is (nearly) blank"
    # the legend's swatches and texts have a few hundred pixels of these colours: thousands
    # mean the bars, and the node's span behind them, were painted
    assert near(COLOURS["done"], counts) > 5000, "no green done bars were painted"
    assert near("#dfe7f3", counts, 2) > 5000, "no node span was painted"
    assert near(COLOURS["error"], counts) > 20 and near(COLOURS["retried"], counts) > 5
    assert len(counts) > 50


@pytest.mark.slurm
def test_report_of_a_multi_node_slurm_run_renders_in_chromium(work, slurm_cluster):
    env = dict(slurm_cluster.env)
    write_bundle(work, """
        [bundle]
        name = "slurmreport"
        lock_timeout = "20s"
        [[resource]]
        name = "cluster"
        scheduler = "slurm"
        cores_per_node = 4
        max_nodes = 3
        partition = "debug"
        max_walltime = "1m"
        [[task]]
        name = "s{i}"
        command = "sleep 1"
        matrix = { i = "1..60" }
        walltime = "4s"
    """)
    cli("submit", "jobs.toml", "--wait", cwd=work, env=env, check=0, timeout=300)
    cli("report", "-o", "r.html", cwd=work, env=env, check=0)
    dom, pixels = open_in_chromium(work / "r.html", work)
    bars = timeline_bars(dom)
    assert len(bars) >= 60
    nodes = set(re.findall(r"pilot (p\d+), node (\d+)", " ".join(bars)))
    assert len(nodes) >= 2, nodes  # spread over several nodes, drawn as several rows
    assert int(re.search(r"peak (\d+) busy cores", dom).group(1)) <= 12  # 3 nodes × 4 cores at most
    assert near(COLOURS["done"], Counter(pixels)) > 5000
