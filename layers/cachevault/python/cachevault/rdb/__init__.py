"""The RDB format: wire encodings, the per-type value walk, the streaming reader, DUMP payloads."""
