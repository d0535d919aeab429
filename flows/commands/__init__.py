"""The ``houseprice`` commands, one module per group; ``flows/cli.py`` is the entry point."""
