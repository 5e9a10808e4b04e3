"""Walk a JSONPath state machine definition as Step Functions would, counting what it limits.

Used by tests/unit/test_state_limits.py on the definitions of template.yaml (substitutions
filled, tests/unit/state_machines.py): each Task's result comes from a Python function
standing in for the Lambda, so a run of 500 shards or 24 simulated hours takes no time.
It measures every state's input and output (Step Functions refuses any over 256 KB with
States.DataLimitExceeded) and counts history events as a standard execution records them
(a workflow fails at 25,000):

* execution: ExecutionStarted + ExecutionSucceeded = 2
* Task (Lambda): TaskStateEntered, LambdaFunctionScheduled, LambdaFunctionStarted,
  LambdaFunctionSucceeded, TaskStateExited = 5
* Wait, Choice, Pass, Succeed: entered + exited = 2; Fail: 1
* Map: MapStateEntered, MapStateStarted, MapStateSucceeded, MapStateExited = 4, plus
  MapIterationStarted + MapIterationSucceeded = 2 per iteration, plus the iterations' states.

Only the happy path is walked (Retry and Catch are not taken).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PAYLOAD_LIMIT = 256 * 1024
HISTORY_LIMIT = 25_000
EVENTS_PER_STATE = {"Task": 5, "Wait": 2, "Choice": 2, "Pass": 2, "Succeed": 2, "Fail": 1}
EXECUTION_EVENTS = 2
MAP_EVENTS = 4
MAP_ITERATION_EVENTS = 2

# A stand-in for one Lambda: (its input, the simulated clock in seconds) -> its result.
TaskFunction = Callable[[dict[str, Any], float], Any]


def size(value: Any) -> int:
    """Bytes of a payload as Step Functions counts them (UTF-8 JSON)."""
    return len(json.dumps(value, separators=(",", ":")).encode())


@dataclass
class Walk:
    tasks: dict[str, TaskFunction]  # function logical id -> stand-in
    execution_name: str = "exec-0001"
    events: int = 0
    clock: float = 0.0
    largest: int = 0
    largest_at: str = ""
    sizes: dict[str, int] = field(default_factory=dict)  # state name -> largest payload seen there

    def run(self, definition: dict[str, Any], execution_input: dict[str, Any]) -> Any:
        self.events += EXECUTION_EVENTS
        self._measure("<execution input>", execution_input)
        output, self.clock = self._states(definition, execution_input, self.clock, {})
        return output

    # -- states -------------------------------------------------------------------------
    def _states(self, machine: dict[str, Any], data: Any, clock: float, map_ctx: dict[str, Any]) -> tuple[Any, float]:
        name = machine["StartAt"]
        while True:
            state = machine["States"][name]
            kind = state["Type"]
            self._measure(f"{name} input", data)
            if kind == "Map":
                data, clock = self._map(name, state, data, clock)
            else:
                self.events += EVENTS_PER_STATE[kind]
                if kind == "Task":
                    data = self._task(name, state, data, clock, map_ctx)
                elif kind == "Pass":
                    context = self._context(map_ctx) | {"State": {"EnteredTime": "2026-11-24T22:15:49.692Z"}}
                    result = _parameters(state["Parameters"], data, context) if "Parameters" in state else data
                    data = _apply_result_path(state, data, result)
                elif kind == "Wait":
                    clock += float(state["Seconds"] if "Seconds" in state else _get(state["SecondsPath"], data, {}))
                elif kind == "Choice":
                    name = _choose(state, data)
                    continue
                elif kind == "Fail":
                    raise AssertionError(f"the walk reached Fail state {name}")
            self._measure(f"{name} output", data)
            if state.get("End") or kind in ("Succeed", "Fail"):
                return data, clock
            name = state["Next"]

    def _task(self, name: str, state: dict[str, Any], data: Any, clock: float, map_ctx: dict[str, Any]) -> Any:
        function = state["Resource"].rsplit(":", 1)[1].removeprefix("cachevault-")
        effective = _parameters(state["Parameters"], data, self._context(map_ctx)) if "Parameters" in state else data
        self._measure(f"{name} task input", effective)
        result = self.tasks[function](copy.deepcopy(effective), clock)
        self._measure(f"{name} result", result)
        if "ResultSelector" in state:
            result = _parameters(state["ResultSelector"], result, self._context(map_ctx))
        return _apply_result_path(state, data, result)

    def _map(self, name: str, state: dict[str, Any], data: Any, clock: float) -> tuple[Any, float]:
        self.events += MAP_EVENTS
        items = _get(state.get("ItemsPath", "$"), data, {})
        processor = state.get("ItemProcessor") or state["Iterator"]
        results, end = [], clock
        for index, item in enumerate(items):
            self.events += MAP_ITERATION_EVENTS
            map_ctx = {"Item": {"Index": index, "Value": item}}
            iteration = (
                _parameters(state["Parameters"], data, self._context(map_ctx)) if "Parameters" in state else item
            )
            self._measure(f"{name} iteration input", iteration)
            result, finished = self._states(processor, iteration, clock, map_ctx)
            results.append(result)
            end = max(end, finished)  # iterations run side by side
        self._measure(f"{name} result", results)
        return _apply_result_path(state, data, results), end

    def _context(self, map_ctx: dict[str, Any]) -> dict[str, Any]:
        return {"Execution": {"Name": self.execution_name}, "Map": map_ctx}

    def _measure(self, where: str, value: Any) -> None:
        n = size(value)
        self.sizes[where] = max(self.sizes.get(where, 0), n)
        if n > self.largest:
            self.largest, self.largest_at = n, where


# -- JSONPath (the subset the definitions use) ----------------------------------------------
def _get(path: str, data: Any, context: dict[str, Any]) -> Any:
    if path.startswith("$$"):
        value, rest = context, path[2:]
    elif path.startswith("$"):
        value, rest = data, path[1:]
    else:
        raise ValueError(f"not a path: {path!r}")
    parts = [p for p in rest.split(".") if p]
    for n, part in enumerate(parts):
        if part.endswith("[*]"):  # a list: the rest of the path from each element
            tail = "$." + ".".join(parts[n + 1 :])
            return [_get(tail, item, context) for item in value[part[:-3]]]
        value = value[part]
    return value


def _intrinsic(expression: str, data: Any, context: dict[str, Any]) -> Any:
    """The intrinsic functions the definitions use: Format, StringSplit, JsonToString."""
    name, _, args_text = expression.partition("(")
    args = [_argument(a, data, context) for a in _split_arguments(args_text.removesuffix(")"))]
    if name == "States.Format":
        text = args[0]
        for arg in args[1:]:
            text = text.replace("{}", arg if isinstance(arg, str) else json.dumps(arg), 1)
        return text
    if name == "States.StringSplit":
        return [p for p in args[0].split(args[1]) if p]
    if name == "States.JsonToString":
        return json.dumps(args[0], separators=(",", ":"))
    raise NotImplementedError(expression)


def _split_arguments(text: str) -> list[str]:
    args, current, quoted = [], "", False
    for char in text:
        if char == "'":
            quoted = not quoted
        if char == "," and not quoted:
            args.append(current.strip())
            current = ""
        else:
            current += char
    return [*args, current.strip()] if current.strip() else args


def _argument(text: str, data: Any, context: dict[str, Any]) -> Any:
    if text.startswith("'"):
        return text[1:-1]
    return _get(text, data, context)


def _parameters(template: Any, data: Any, context: dict[str, Any]) -> Any:
    if isinstance(template, dict):
        out = {}
        for key, value in template.items():
            if key.endswith(".$"):
                resolve = _intrinsic if value.startswith("States.") else _get
                out[key[:-2]] = resolve(value, data, context)
            else:
                out[key] = _parameters(value, data, context)
        return out
    if isinstance(template, list):
        return [_parameters(v, data, context) for v in template]
    return template


def _apply_result_path(state: dict[str, Any], data: Any, result: Any) -> Any:
    if "ResultPath" in state and state["ResultPath"] is None:
        return data  # result discarded
    path = state.get("ResultPath", "$")
    if path == "$":
        return result
    out = copy.deepcopy(data)
    target = out
    parts = path[2:].split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = result
    return out


def _choose(state: dict[str, Any], data: Any) -> str:
    for rule in state["Choices"]:
        if _matches(rule, data):
            return rule["Next"]
    return state["Default"]


def _matches(rule: dict[str, Any], data: Any) -> bool:
    if "And" in rule:
        return all(_matches(r, data) for r in rule["And"])
    if "Or" in rule:
        return any(_matches(r, data) for r in rule["Or"])
    if "Not" in rule:
        return not _matches(rule["Not"], data)
    try:
        value, present = _get(rule["Variable"], data, {}), True
    except (KeyError, TypeError):
        value, present = None, False
    if "IsPresent" in rule:
        return present is rule["IsPresent"]
    if "BooleanEquals" in rule:
        return value is rule["BooleanEquals"]
    if "StringEquals" in rule:
        return value == rule["StringEquals"]
    raise NotImplementedError(f"choice rule {rule}")
