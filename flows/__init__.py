"""Drivers: the `mocoplus` command line and the Prefect flows that compose the stages."""
