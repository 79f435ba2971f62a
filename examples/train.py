"""LightningCLI entry point for the example workloads and the gradguard callbacks.

Run a recipe from ``configs/``::

    python examples/train.py fit --config configs/full_stack.yaml
    python examples/train.py fit --config configs/clip_zscore.yaml --trainer.max_steps 100
    python examples/train.py fit --config configs/guard_rewind.yaml --print_config   # every argument, resolved

The model is any :class:`~examples.workloads.WorkloadModule` and the data any
:class:`~examples.workloads.WorkloadData` (``class_path`` + ``init_args`` in the YAML). Callbacks go under
``trainer.callbacks`` the same way, e.g.::

    trainer:
      callbacks:
        - class_path: lightning_gradguard.callbacks.clipping.GradientClipping
          init_args: {method: quantile, quantile: 0.9}

``--help`` lists the arguments of every gradguard callback (``--trainer.callbacks.help <class>`` prints one
class's help in the usual jsonargparse format); ``--print_config`` prints every argument of the callbacks a config
uses, defaults included.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from pathlib import Path
from typing import Any, Optional

# examples/ is not an installed package: make ``examples.workloads`` importable however this script is started
# (``python examples/train.py``, or re-run by Lightning's launcher on the other ranks of a DDP run)
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from jsonargparse import ArgumentParser, DefaultHelpFormatter  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402
from typing_extensions import override  # noqa: E402

from examples.workloads import WorkloadData, WorkloadModule  # noqa: E402
from lightning_gradguard.callbacks.clipping import GradientClipping  # noqa: E402
from lightning_gradguard.callbacks.guard import ExplosionGuard  # noqa: E402
from lightning_gradguard.callbacks.monitor import GradientNormMonitor  # noqa: E402
from lightning_gradguard.callbacks.quantization import GradientQuantization  # noqa: E402

__all__ = ["CALLBACKS", "GradGuardCLI", "callbacks_help", "cli_main"]

CALLBACKS = (GradientNormMonitor, ExplosionGuard, GradientClipping, GradientQuantization)
"""The gradguard callbacks, in pipeline order."""

_EPILOG_HEADER = "gradguard callbacks"
_CONFIG_OPTION = re.compile(r"^ +--trainer\.callbacks CONFIG\n +Path to a configuration file\.\n", re.MULTILINE)


@functools.lru_cache(maxsize=None)
def callbacks_help() -> str:
    """The arguments of every gradguard callback, in jsonargparse's help format (the ``init_args`` of each)."""
    sections = [
        f"{_EPILOG_HEADER}: add them under trainer.callbacks as `- class_path: <class>` with these init_args"
        " (`--trainer.callbacks.help <class>` prints one of them alone)."
    ]
    for cls in CALLBACKS:
        helper = ArgumentParser(usage=argparse.SUPPRESS, add_help=False)
        helper.add_class_arguments(cls, "trainer.callbacks")
        # a nested key also gets a "load this key from a file" option, which means nothing here
        text = _CONFIG_OPTION.sub("", helper.format_help()).rstrip()
        sections.append(f"class_path: {cls.__module__}.{cls.__name__}\n{text}")
    return "\n\n".join(sections)


class _HelpFormatter(DefaultHelpFormatter):
    """Keeps the callbacks section of the help as formatted (argparse would re-wrap it into one paragraph)."""

    @override
    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith(_EPILOG_HEADER):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class GradGuardCLI(LightningCLI):
    """``LightningCLI`` over the example workloads whose ``fit --help`` also lists every gradguard callback's
    arguments (jsonargparse prints a subclass-typed list such as ``trainer.callbacks`` as a single option)."""

    @override
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # subcommand parsers take the formatter of the main parser
        kwargs.setdefault("formatter_class", _HelpFormatter)
        return super().init_parser(**kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.epilog = callbacks_help()


def cli_main(args: Optional[list[str]] = None) -> GradGuardCLI:
    """Parse ``args`` (default: ``sys.argv[1:]``) and run the subcommand."""
    return GradGuardCLI(
        WorkloadModule,
        WorkloadData,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    cli_main()
