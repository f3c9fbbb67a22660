"""Drivers: the `mocoplus` command line and the Prefect flows that compose the stages.

The flows start Prefect's ephemeral local server when no ``PREFECT_API_URL``
is set. Two of its defaults do not suit the machines this runs on, so they are
changed here, before Prefect reads its settings (an explicit setting wins):

- its telemetry service phones home at start and logs an ERROR on every
  machine without internet: off;
- it waits 20 s for the server to start, which a loaded 2-core machine can
  exceed (the demo then fails before it begins): 120 s.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
