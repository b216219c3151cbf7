"""Command line of fedgate-bridge."""

from __future__ import annotations

import click

from fedgate_bridge import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fedgate-bridge")
def main() -> None:
    """Bridge PLC registers and OPC-UA nodes to MQTT.

    \b
    Example:
      fedgate-bridge --version
    """
