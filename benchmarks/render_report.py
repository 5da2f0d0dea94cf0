"""Render a run's report.html in headless Chromium: no console messages, and a screenshot.

Usage: python benchmarks/render_report.py RUN_DIR [--screenshot docs/report.png]
Needs Debian's chromium (apt-get install chromium). Prints one JSON line; exits 1 when the
page logged anything to the console (errors, warnings or messages) or Chromium failed.
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

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0", "--hide-scrollbars",
]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(html: Path, screenshot: Path, width: int = 1280, height: int = 6000) -> dict:
    """Load ``html`` in headless Chromium; return console lines and the screenshot path."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [exe, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={screenshot}",
             f"--window-size={width},{height}", html.resolve().as_uri()],
            capture_output=True, text=True, timeout=120,
        )
    console = [line for line in proc.stderr.splitlines() if re.search(r":CONSOLE[:(]", line)]
    return {"returncode": proc.returncode, "console": console,
            "screenshot": str(screenshot), "ok": proc.returncode == 0 and not console
            and screenshot.is_file() and screenshot.stat().st_size > 0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--screenshot", type=Path, default=None)
    parser.add_argument("--height", type=int, default=6000)
    args = parser.parse_args()
    shot = args.screenshot or Path(tempfile.mkdtemp()) / "report.png"
    result = render(args.run_dir / "report.html", shot, height=args.height)
    for line in result["console"]:
        print(line)
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
