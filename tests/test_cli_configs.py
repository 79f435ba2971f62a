"""Every recipe in configs/ runs through the real LightningCLI of examples/train.py, and the CLI documents every
gradguard callback argument in --help and --print_config."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import torch
import yaml

from examples.train import CALLBACKS, cli_main
from lightning_gradguard.callbacks.clipping import GradientClipping
from lightning_gradguard.callbacks.monitor import GradientNormMonitor
from lightning_gradguard.callbacks.quantization import GradientQuantization
from lightning_gradguard.functional.clipping import Method as ClipMethod
from tests.helpers.tb import read_scalars

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))
STEPS = 3
# a few steps of each recipe: the point is that the config parses, builds and trains, not what it learns
SHORT = [f"--trainer.max_steps={STEPS}", "--trainer.enable_progress_bar=false", "--trainer.num_sanity_val_steps=0"]


@pytest.fixture(autouse=True)
def _cli_process(monkeypatch):
    """As if started as ``python examples/train.py``, on one thread (tiny models; no oversubscription on CI)."""
    monkeypatch.setattr(sys, "argv", ["examples/train.py"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(config: Path) -> dict:
    return yaml.safe_load(config.read_text())


def _is_multiprocess(config: Path) -> bool:
    return (_load(config)["trainer"].get("devices") or 1) != 1


def _callback_paths(config: Path) -> list[str]:
    return [cb["class_path"] for cb in _load(config)["trainer"].get("callbacks") or []]


def _init_args(cls: type) -> list[str]:
    return list(inspect.signature(cls).parameters)


def _expected_tags(config: Path) -> set[str]:
    """Per-step tags the recipe's callbacks must have written (the guard writes only on events)."""
    names = {path.rsplit(".", 1)[-1] for path in _callback_paths(config)}
    tags = set()
    if names & {GradientNormMonitor.__name__, GradientClipping.__name__}:
        tags.add("gradguard/grad_norm")
    if GradientClipping.__name__ in names:
        tags |= {"gradguard/clip_threshold", "gradguard/clip_coef", "gradguard/grad_norm_clipped"}
    if GradientQuantization.__name__ in names:
        tags |= {"gradguard/quant/rel_error", "gradguard/quant/clamped"}
    return tags


def test_every_recipe_is_there():
    names = {c.stem for c in CONFIGS}
    expected = {"monitor", "quantization", "guard_skip", "guard_rewind", "full_stack", "ddp"}
    expected |= {f"clip_{method}" for method in get_args(ClipMethod)}  # one recipe per clipping method
    assert expected <= names, f"missing recipes: {sorted(expected - names)}"
    for config in CONFIGS:
        first = config.read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) > 20, f"{config.name}: no first-line comment saying what it shows"


@pytest.mark.parametrize("config", [c for c in CONFIGS if not _is_multiprocess(c)], ids=lambda c: c.stem)
def test_recipe_trains_through_the_cli(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipes log to ./gradguard_logs
    cli = cli_main(["fit", "--config", str(config), *SHORT])
    trainer = cli.trainer
    assert trainer.global_step == STEPS
    attached = {f"{type(cb).__module__}.{type(cb).__name__}" for cb in trainer.callbacks}
    assert set(_callback_paths(config)) <= attached
    scalars = read_scalars(trainer.logger.log_dir)
    for tag in _expected_tags(config):
        assert sorted(scalars.get(tag, {})) == list(range(STEPS)), f"{tag} of {config.name}"


@pytest.mark.distributed
@pytest.mark.parametrize("config", [c for c in CONFIGS if _is_multiprocess(c)], ids=lambda c: c.stem)
def test_multiprocess_recipe_trains_through_the_cli(config, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, str(REPO_ROOT / "examples" / "train.py"), "fit", "--config", str(config), *SHORT]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-6000:]
    log_dirs = [p.parent for p in tmp_path.glob("gradguard_logs/**/events.out.tfevents.*")]
    assert len(set(log_dirs)) == 1, f"expected one log directory (rank 0 only), got {log_dirs}"
    scalars = read_scalars(log_dirs[0])
    for tag in _expected_tags(config):
        assert sorted(scalars.get(tag, {})) == list(range(STEPS)), tag


def test_help_lists_every_callback_argument(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for cls in CALLBACKS:
        assert f"class_path: {cls.__module__}.{cls.__name__}" in out
        for name in _init_args(cls):
            assert re.search(rf"--trainer\.callbacks\.{name}\b", out), f"{cls.__name__}.{name} is not in --help"


def test_print_config_shows_every_argument_of_each_recipe_callback(capsys):
    seen = set()
    for config in CONFIGS:
        with pytest.raises(SystemExit):
            cli_main(["fit", "--config", str(config), "--print_config"])
        printed = yaml.safe_load(capsys.readouterr().out)
        for callback in printed["trainer"]["callbacks"]:
            cls = next((c for c in CALLBACKS if callback["class_path"] == f"{c.__module__}.{c.__name__}"), None)
            if cls is None:
                continue
            seen.add(cls)
            assert set(callback["init_args"]) == set(_init_args(cls)), f"{config.name}: {cls.__name__}"
    assert seen == set(CALLBACKS), "some gradguard callback is used by no recipe"


def test_a_config_that_no_longer_parses_fails(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    recipe = _load(REPO_ROOT / "configs" / "full_stack.yaml")
    recipe["trainer"]["callbacks"][0]["init_args"] = {"no_such_argument": 1}
    broken.write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(broken), *SHORT])
    assert exit_info.value.code != 0
    assert "no_such_argument" in capsys.readouterr().err
