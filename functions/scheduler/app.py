"""Scheduler: automatic snapshots in each cache's window, pruning past retention (one pass per event id)."""

from cachevault.core.handler import step_handler
from cachevault.ops.scheduler import scheduler_tick

lambda_handler = step_handler(scheduler_tick, correlation_id_path="id")
