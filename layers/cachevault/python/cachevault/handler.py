"""The one way a Lambda handler is built: Powertools decorators around a domain step.

Every ``functions/<name>/app.py`` is ``lambda_handler = step_handler(some_step)``: the
handler stays thin (event in, domain call, JSON out) and all of them get the same
structured logging, tracing and metrics, in the order Powertools' scaffold uses.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

# A step that records no metric is normal; Powertools would warn on every such call.
warnings.filterwarnings("ignore", message="No application metrics to publish")

logger = Logger()
tracer = Tracer()
metrics = Metrics()

Step = Callable[[dict[str, Any]], dict[str, Any]]


def step_handler(step: Step, *, correlation_id_path: str | None = None) -> Callable[..., Any]:
    name = step.__name__

    @logger.inject_lambda_context(correlation_id_path=correlation_id_path, clear_state=True)
    @tracer.capture_lambda_handler
    @metrics.log_metrics
    def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
        logger.debug("step input", step=name, event=event)
        try:
            return step(event)
        except Exception:
            metrics.add_metric(name=f"{name}Failures", unit=MetricUnit.Count, value=1)
            raise

    lambda_handler.__name__ = f"{name}_handler"
    return lambda_handler
