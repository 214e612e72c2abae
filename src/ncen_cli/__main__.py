"""``python -m ncen_cli`` runs the ``ncen`` command line."""

from ncen_cli.cli import main

main()
