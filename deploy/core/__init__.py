"""deploy's pure core: the promotion plan and state machine, restart backoff. No I/O here."""
