"""S3 -> Redis: the RESTORE loader, verification, and the RestoreSnapshot state machine's steps."""
