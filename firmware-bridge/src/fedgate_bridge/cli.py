"""Command line of fedgate-bridge: ``run`` (the polling bridge), ``simulate`` (a plant),
``simulate-runs`` (simulated runs to a file) and ``plant-broker-config`` (the site broker)."""

from __future__ import annotations

import click
from fedgate_common.click_support import JsonReportingGroup

from fedgate_bridge import __version__
from fedgate_bridge.install_cli import install_service
from fedgate_bridge.plant_broker_cli import plant_broker_config
from fedgate_bridge.run_cli import check, run, status
from fedgate_bridge.simulate_cli import simulate
from fedgate_bridge.simulate_runs_cli import simulate_runs_command

MAIN_EXIT_CODES = """\b
Exit codes (every command):
  0 success            1 unexpected failure     2 bad command line
  3 config invalid     4 outbox unusable        7 simulator failed (simulate, simulate-runs)
  5 install-service: an installed file was changed by hand (use a drop-in, or --force);
    simulate-runs: --out exists (use --force); plant-broker-config: a file in --out
    differs (use --force)
  130 simulate-runs interrupted (nothing written)"""


@click.group(
    cls=JsonReportingGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=MAIN_EXIT_CODES,
)
@click.version_option(__version__, prog_name="fedgate-bridge")
def main() -> None:
    """Bridge PLC registers and OPC-UA nodes to MQTT, or simulate a plant to bridge.

    \b
    Example:
      fedgate-bridge simulate --plant tep --seed 1 --opcua-port 4840 --modbus-port 5020
      fedgate-bridge simulate-runs --out public/sim-runs-1.npz --seed 1 --sets 3
      fedgate-bridge check --config /etc/fedgate/bridge.toml
      fedgate-bridge run --config /etc/fedgate/bridge.toml
      fedgate-bridge status --config /etc/fedgate/bridge.toml --json
      sudo fedgate-bridge install-service --serial-device /dev/ttyUSB0
      fedgate-bridge plant-broker-config --out plant-broker \\
          --config /etc/fedgate/bridge.toml --bridge-listener 10.1.0.5:1884
    """


main.add_command(run)
main.add_command(check)
main.add_command(status)
main.add_command(simulate)
main.add_command(simulate_runs_command)
main.add_command(install_service)
main.add_command(plant_broker_config)
