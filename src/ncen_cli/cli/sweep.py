"""`ncen sweep` (not yet available)."""

from ncen_cli.cli.common import app, fail


@app.command(help="Not yet available in this version.")
def sweep() -> None:
    raise fail("'ncen sweep' is not yet available in this version", 1)
