"""Look at a report the way a reader does: headless Chromium at 1400 px.

    python bench/check_report.py REPORT_DIR_OR_HTML [--out DIR] [--width 1400]

Writes DIR/screenshot.png (the whole page at that width, for a person to look at) and DIR/check.json, and exits
1 if the page scrolls sideways, an element sticks out of the page, or an image does not load. Needs the Debian
`chromium` package (`apt-get install -y chromium`); tests/test_report_browser.py runs it and skips when chromium
is absent.

How: a copy of report.html with a small checking script appended is opened with ``--dump-dom``; the script
writes its findings into the DOM, which chromium prints once the page has loaded. The screenshot is a second run
with ``--screenshot`` and a window as tall as the page.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--hide-scrollbars", "--force-device-scale-factor=1"]

# Runs after load: page width, elements whose right edge passes the viewport (the widest few), broken images.
_CHECK_JS = """
<script>
window.addEventListener("load", function () {
  var width = window.innerWidth, out = {viewport: width,
    scroll_width: document.documentElement.scrollWidth, page_height: document.documentElement.scrollHeight,
    overflowing: [], images: 0, broken_images: []};
  document.querySelectorAll("body *").forEach(function (el) {
    var r = el.getBoundingClientRect();
    if (r.width > 0 && r.right > width + 1 && !el.closest("details:not([open])")) {
      var inScroller = false, p = el.parentElement;
      while (p && p !== document.body) {
        var style = getComputedStyle(p);
        if ((style.overflowX === "auto" || style.overflowX === "scroll") && p.getBoundingClientRect().right <= width + 1) { inScroller = true; break; }
        p = p.parentElement;
      }
      if (!inScroller) out.overflowing.push(el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") + " right=" + Math.round(r.right));
    }
  });
  document.querySelectorAll("img").forEach(function (img) {
    out.images += 1;
    if (!img.complete || img.naturalWidth === 0) out.broken_images.push(img.alt || img.src.slice(0, 40));
  });
  out.overflowing = out.overflowing.slice(0, 20);
  var pre = document.createElement("pre"); pre.id = "hybridlora-check";
  pre.textContent = "CHECK" + JSON.stringify(out) + "END";
  document.body.appendChild(pre);
});
</script>
"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(browser: str, args: list[str], timeout: float = 120.0) -> str:
    with tempfile.TemporaryDirectory(prefix="hybridlora-chromium-") as profile:
        done = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.stdout


def check_report(html: Path, out_dir: Path, width: int = 1400) -> dict:
    """Check ``html`` at ``width`` px; write ``screenshot.png`` and ``check.json`` under ``out_dir``."""
    browser = find_chromium()
    if browser is None:
        raise RuntimeError("no chromium found: apt-get install -y chromium")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hybridlora-check-") as tmp:
        probe = Path(tmp) / "report.html"
        probe.write_text(html.read_text(encoding="utf-8").replace("</body>", _CHECK_JS + "</body>"),
                         encoding="utf-8")
        dom = _run(browser, [f"--window-size={width},1000", "--virtual-time-budget=10000", "--dump-dom",
                             probe.as_uri()])
    found = re.search(r"CHECK(\{.*?\})END", dom, re.S)
    if not found:
        raise RuntimeError("the checking script left no result (did the page load?)")
    result = json.loads(found.group(1))
    height = min(int(result["page_height"]) + 50, 16000)
    shot = out_dir / "screenshot.png"
    _run(browser, [f"--window-size={width},{height}", f"--screenshot={shot}", html.resolve().as_uri()])
    result["screenshot"] = str(shot)
    result["ok"] = (result["scroll_width"] <= result["viewport"] and not result["overflowing"]
                    and not result["broken_images"] and result["images"] > 0)
    (out_dir / "check.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", help="a report directory or its report.html")
    parser.add_argument("--out", default="report-check", help="where screenshot.png and check.json go")
    parser.add_argument("--width", type=int, default=1400)
    args = parser.parse_args(argv)
    html = Path(args.report)
    html = html / "report.html" if html.is_dir() else html
    if not html.is_file():
        print(f"error: {html}: no report.html; give a report directory made by `hybridlora report`", file=sys.stderr)
        return 2
    try:
        result = check_report(html, Path(args.out), args.width)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
