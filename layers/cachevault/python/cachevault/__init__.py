"""cachevault: ElastiCache-grade snapshot and restore for self-managed Redis OSS and Valkey."""

__version__ = "0.1.0"
