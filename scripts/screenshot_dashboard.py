"""Regenerate docs/images/dashboard.png: the gradguard custom-scalars dashboard of the demo runs, in TensorBoard.

Starts ``tensorboard`` on the demo's logs (running ``examples/demo.py`` first when there are none), waits until it
serves the "gradguard" custom-scalars layout, screenshots the Custom Scalars page with headless Chromium and checks
that the picture shows charts rather than a blank or half-loaded page.

Needs Chromium (Debian/Ubuntu: ``apt-get install -y chromium``)::

    python scripts/screenshot_dashboard.py
    python scripts/screenshot_dashboard.py --logdir gradguard_logs --out docs/images/dashboard.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
    "--virtual-time-budget=15000",
)
# the Custom Scalars tab, unsmoothed so that single-step spikes stay visible
PAGE = "#custom_scalars&_smoothingWeight=0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_for_dashboard(base: str, server: subprocess.Popen, timeout: float) -> None:
    """Until TensorBoard serves the gradguard layout and at least one run's gradguard scalars."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"tensorboard exited with code {server.returncode}")
        try:
            layout = get_json(f"{base}/data/plugin/custom_scalars/layout")
            tags = get_json(f"{base}/data/plugin/scalars/tags")
        except OSError:  # still starting
            time.sleep(0.5)
            continue
        has_layout = any(c.get("title") == "gradguard" for c in layout.get("category", []))
        if has_layout and any("gradguard/grad_norm" in run_tags for run_tags in tags.values()):
            return
        time.sleep(0.5)
    raise TimeoutError(f"tensorboard at {base} did not serve the gradguard dashboard within {timeout:.0f} s")


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError(f"none of {BROWSERS} is on PATH; install Chromium (Debian: apt-get install -y chromium)")


def screenshot(url: str, out: Path, browser: str) -> None:
    with tempfile.TemporaryDirectory(prefix="gradguard-chromium-") as profile:
        cmd = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}", url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{browser} failed (code {proc.returncode}):\n{proc.stderr[-3000:]}")


def check_picture(path: Path) -> None:
    """Fail on a page without charts: the chart panel (right of the sidebar, below the header) of an empty or
    half-loaded page is plain white, the charts draw lines, axes and labels in many colours."""
    import numpy as np
    from PIL import Image  # a dependency of tensorboard

    pixels = np.asarray(Image.open(path).convert("RGB"))
    height, width, _ = pixels.shape
    panel = pixels[height // 10 :, int(width * 0.27) :]
    drawn = (panel < 235).any(axis=2).mean()
    colours = len(np.unique(panel.reshape(-1, 3) // 16, axis=0))
    if drawn < 0.02 or colours < 50:
        raise RuntimeError(f"{path} shows no charts ({drawn:.1%} of the chart panel drawn, {colours} colour bins)")
    print(f"wrote {path} ({drawn:.1%} of the chart panel drawn, {colours} colour bins)")


def has_logs(logdir: Path) -> bool:
    return any(logdir.glob("**/events.out.tfevents.*"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", type=Path, default=Path("gradguard_logs"), help="TensorBoard logs to show")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "images" / "dashboard.png")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for tensorboard")
    args = parser.parse_args(argv)
    browser = find_browser()
    if not has_logs(args.logdir):
        print(f"no TensorBoard logs in {args.logdir}: running the demo first", flush=True)
        demo = [sys.executable, str(REPO_ROOT / "examples" / "demo.py"), "--log-dir", str(args.logdir)]
        subprocess.run(demo, check=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(args.logdir), "--host", "127.0.0.1"]
    server = subprocess.Popen([*cmd, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_dashboard(base, server, args.timeout)
        screenshot(f"{base}/{PAGE}", args.out, browser)
    finally:
        server.terminate()
        server.wait(timeout=30)
    check_picture(args.out)


if __name__ == "__main__":
    main()
