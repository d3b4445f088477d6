"""A run's life: submit (``submit``), keep it going (``supervisor``: wait, follow-ups,
failover, hooks), act on it (``control``: sync, logs, retry, move, cancel), and its records
(``records``, ``mirror``), synced from the pools (``sync``, ``pilots``), checked (``check``)."""
