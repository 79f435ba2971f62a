"""A real TensorBoard server serves our scalars and the gradguard dashboard layout over HTTP."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_gradguard import GradientNormMonitor
from tests.helpers.models import TinyMLP, tiny_trainer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, deadline: float):
    last_error = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError as err:  # server still starting
            last_error = err
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer: {last_error}")


def test_tensorboard_serves_scalars_and_custom_scalars_layout(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = tiny_trainer(tmp_path, max_steps=6, callbacks=[GradientNormMonitor(layer_interval=2)], logger=tb)
    trainer.fit(TinyMLP())

    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        str(tmp_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        base = f"http://127.0.0.1:{port}"
        tags = {}
        while time.monotonic() < deadline and "run/version_0" not in tags:
            tags = _get_json(f"{base}/data/plugin/scalars/tags", deadline)
            time.sleep(0.5)
        run_tags = tags["run/version_0"]
        assert "gradguard/grad_norm" in run_tags
        assert "gradguard/grad_norm_max" in run_tags
        assert any(t.startswith("gradguard/layer/") for t in run_tags)

        series = _get_json(f"{base}/data/plugin/scalars/scalars?run=run/version_0&tag=gradguard/grad_norm", deadline)
        assert [point[1] for point in series] == list(range(6))

        layout = _get_json(f"{base}/data/plugin/custom_scalars/layout", deadline)
        categories = {c["title"]: c for c in layout["category"]}
        assert "gradguard" in categories
        chart_titles = [chart["title"] for chart in categories["gradguard"]["chart"]]
        assert "gradient norm" in chart_titles
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            server.kill()
    if server.returncode not in (0, -15, None):
        pytest.fail(f"tensorboard exited with {server.returncode}: {server.stderr.read().decode()[-2000:]}")
