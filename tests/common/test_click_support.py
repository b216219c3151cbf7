"""fedgate_common.click_support: how every command line fails, and refuses bad ids."""

from __future__ import annotations

import json
import math

import click
from click.testing import CliRunner
from fedgate_common.click_support import JsonReportingGroup, echo_json, fail, identifier


@click.group(cls=JsonReportingGroup)
def main() -> None:
    """A command line shaped like fedgate's."""


@main.command()
@click.option("--json", "as_json", is_flag=True)
def refuse(as_json: bool) -> None:
    fail(
        "the manifest is not signed",
        8,
        problems=[
            "the manifest is not signed",
            "cloud-4 has not signed",
            "version 3 does not follow version 1",
        ],
        ok=False,
    )


@main.command()
@click.argument("agent_id", callback=identifier("agent id"))
@click.option("--json", "as_json", is_flag=True)
def take(agent_id: str, as_json: bool) -> None:
    click.echo(agent_id)


def test_fail_lists_what_a_heading_does_not_say_and_reports_json_only_when_asked() -> None:
    runner = CliRunner()
    plain = runner.invoke(main, ["refuse"])
    assert plain.exit_code == 8
    assert plain.stdout == ""
    assert plain.stderr == (
        "error: the manifest is not signed\n"
        "  - cloud-4 has not signed\n"
        "  - version 3 does not follow version 1\n"
    )
    as_json = runner.invoke(main, ["refuse", "--json"])
    assert as_json.exit_code == 8
    assert json.loads(as_json.stdout) == {
        "ok": False,
        "error": "the manifest is not signed",
        "exit_code": 8,
        "problems": [
            "the manifest is not signed",
            "cloud-4 has not signed",
            "version 3 does not follow version 1",
        ],
    }


def test_an_identifier_argument_is_checked_as_the_line_is_parsed() -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["take", "site-1"]).stdout == "site-1\n"
    refused = runner.invoke(main, ["take", "site 1", "--json"])
    assert refused.exit_code == 2
    report = json.loads(refused.stdout)
    assert "invalid agent id 'site 1'" in report["error"]
    assert report["exit_code"] == 2


def test_json_output_writes_numbers_that_are_not_finite_as_null() -> None:
    """ε with no noise to bound it is infinite; JSON has no Infinity (strict parsers refuse
    Python's), so it is written as null, at any depth."""

    @click.command()
    def show() -> None:
        echo_json({"spent": math.inf, "rounds": [{"epsilon": math.nan}, 1.5], "ok": True})

    result = CliRunner().invoke(show)
    assert result.exit_code == 0, result.output
    assert "Infinity" not in result.stdout
    assert "NaN" not in result.stdout
    assert json.loads(result.stdout) == {
        "spent": None,
        "rounds": [{"epsilon": None}, 1.5],
        "ok": True,
    }
