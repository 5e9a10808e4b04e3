"""Shared by every stage: settings, ElastiCache errors and names, AWS clients, the handler
decorator, status events, node credentials, encryption settings, time, stack discovery."""
