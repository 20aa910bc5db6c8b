"""The ``radflash`` command: one root click group; each command lives in its own module.

CLI modules only parse options and call the verb functions; a :class:`RadflashError` raised
anywhere below becomes a one-line ``Error: ...`` with exit code 1, never a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util  # find_spec below; `import importlib` alone does not load the submodule
import logging
import sys

import click

from radflash import __version__
from radflash.errors import RadflashError

# command name → "module:attribute"; modules are imported only when their command runs, so
# `radflash --help` does not pay for torch.
COMMANDS = {
    "convert": "radflash.cli.convert:convert",
    "score": "radflash.cli.score:score",
    "segment": "radflash.cli.segment:segment",
    "report": "radflash.cli.report:report",
    "bench": "radflash.cli.bench:bench",
    "train": "radflash.cli.train:train",
    "evaluate": "radflash.cli.train:evaluate",
    "sentences": "radflash.cli.sentences:sentences",
    "export": "radflash.cli.export:export",
    "calibrate": "radflash.cli.calibrate:calibrate",
    "models": "radflash.cli.listing:models",
    "findings": "radflash.cli.listing:findings",
    "doctor": "radflash.cli.doctor:doctor",
    "serve": "radflash.cli.serve:serve",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._available(name)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS or not self._available(name):
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    @staticmethod
    def _available(name: str) -> bool:
        module = COMMANDS[name].split(":")[0]
        return importlib.util.find_spec(module) is not None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RadflashError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="radflash")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """radflash: fast zero-shot chest X-ray scoring, grounding and segmentation."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)


def main() -> None:
    from radflash.util import watchdog

    watchdog.HARD_EXIT_AFTER = watchdog.CLI_HARD_EXIT_S  # this process is ours: a stuck stall ends it
    try:
        cli.main(prog_name="radflash")
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
