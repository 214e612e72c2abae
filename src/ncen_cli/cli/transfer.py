"""`ncen transfer` (not yet available)."""

from ncen_cli.cli.common import app, fail


@app.command(help="Not yet available in this version.")
def transfer() -> None:
    raise fail("'ncen transfer' is not yet available in this version", 1)
