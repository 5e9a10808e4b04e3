"""Redis -> S3: snapshot preflight rules, the replication-protocol capture, its runner,
and the CreateSnapshot state machine's steps."""
