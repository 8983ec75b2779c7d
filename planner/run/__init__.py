"""One run of a compiled flow: the ready-set (scheduler), one node's policy (when, retries,
timeouts, defaults), the executor and what watches it (observers, telemetry)."""
