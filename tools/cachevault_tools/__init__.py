"""The laptop-side tools, never shipped to Lambda: the ``cachevault`` CLI, the embedded AWS
(Lambda runtime, ECS, template deploy), the local Redis fleet, benchmarks, the demo."""
