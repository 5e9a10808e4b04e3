"""What exists: snapshot and cache records (DynamoDB), quotas and locks, the cache
registry, and the snapshot bucket's layout (RDB objects, manifests: the durable truth)."""
