"""The `mocoplus` command line: one root app (`flows.cli.main`) assembled from command groups.

Each group module (data, run, corpus, serve, demo) holds the commands of one
part of the house as a `typer.Typer` merged into the root, like routers into
an app. Commands import their stage inside the function body, so ``mocoplus
--help`` stays instant and ``serve``/``search`` run where neither torch nor
prefect is installed; option defaults and choices come from the stages'
torch-free config dataclasses and ``Literal`` types (docs/architecture.md,
"The command line").
"""
