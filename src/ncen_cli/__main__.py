"""``python -m ncen_cli`` runs the ``ncen`` command line."""

from ncen_cli.launcher import main

main()
