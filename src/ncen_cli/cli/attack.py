"""`ncen attack` (not yet available)."""

from ncen_cli.cli.common import app, fail


@app.command(help="Not yet available in this version.")
def attack() -> None:
    raise fail("'ncen attack' is not yet available in this version", 1)
