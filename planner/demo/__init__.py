"""The seed's chat backend: its schema, a data generator, and the escalation rules."""
