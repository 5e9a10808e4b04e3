"""The one way a Lambda handler is built: Powertools decorators around a domain step.

Every ``functions/<name>/app.py`` is ``lambda_handler = step_handler(some_step)``: the
handler stays thin (event in, domain call, JSON out) and all of them get the same
structured logging, tracing and metrics, in the order Powertools' scaffold uses.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from cachevault.core.timeutil import parse_iso, utcnow

# A step that records no metric is normal; Powertools would warn on every such call.
warnings.filterwarnings("ignore", message="No application metrics to publish")

# Explicit service and namespace: this module may be imported (by the CLI, a test) before
# any function environment is applied, and Powertools reads them only at construction.
SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME", "cachevault")
logger = Logger(service=SERVICE)
tracer = Tracer(service=SERVICE)
metrics = Metrics(service=SERVICE, namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "CacheVault"))

Step = Callable[[dict[str, Any]], dict[str, Any]]
# The invocation's LambdaContext, for the few steps that need it (e.g. idempotency timeouts);
# steps keep their plain event -> result signature.
_context: ContextVar[LambdaContext | None] = ContextVar("lambda_context", default=None)


def lambda_context() -> LambdaContext | None:
    return _context.get()


def execution_name(event: Any) -> str | None:
    """The Step Functions execution a step runs in (the state machines pass ``ExecutionName``)."""
    if not isinstance(event, dict):
        return None
    value = event.get("ExecutionName")
    return str(value) if value else None


def step_handler(step: Step, *, correlation_id_path: str | None = None) -> Callable[..., Any]:
    """``correlation_id_path`` is the fallback: a step invoked with an ``ExecutionName``
    (every Task of the state machines) logs under that execution name, so one execution's
    lines can be followed across all of its functions."""
    name = step.__name__

    @logger.inject_lambda_context(correlation_id_path=correlation_id_path, clear_state=True)
    @tracer.capture_lambda_handler
    @metrics.log_metrics
    def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
        execution = execution_name(event)
        if execution:
            logger.set_correlation_id(execution)
            tracer.put_annotation(key="ExecutionName", value=execution)
            # Metadata, not a dimension: one value per execution would explode the metric count.
            metrics.add_metadata(key="ExecutionName", value=execution)
        logger.debug("step input", step=name, event=event)
        token = _context.set(context)
        try:
            return step(event)
        except Exception:
            metrics.add_metric(name=f"{name}Failures", unit=MetricUnit.Count, value=1)
            raise
        finally:
            _context.reset(token)

    lambda_handler.__name__ = f"{name}_handler"
    return lambda_handler


def record_duration(metric: str, started_iso: str | None) -> float | None:
    """Seconds from an ISO timestamp (a record's start time) to now, as a metric."""
    if not started_iso:
        return None
    seconds = max(0.0, (utcnow() - parse_iso(started_iso)).total_seconds())
    metrics.add_metric(name=metric, unit=MetricUnit.Seconds, value=round(seconds, 3))
    return seconds
