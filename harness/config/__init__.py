"""Scenario files: YAML read once, at the edge, into frozen dataclasses; and their JSON Schema.

``load_scenario`` and ``load_scenarios`` (a file of several, run in order) are the only way
in; anything they return has passed every check, and anything wrong comes out as one
:class:`~harness.errors.ConfigError` reading ``file:line: key.path: reason``.  Loading runs
nothing, reads only the scenario and the harness's recipes, and is bounded in size, depth and
alias expansion; on a shared host (``HARNESS_SHARED_HOST=1``, or ``shared_host=True``) a
scenario may not name a QEMU binary or pass QEMU arguments.
"""

from harness.config.loader import (
    SHARED_HOST_ENV,
    load_scenario,
    load_scenario_text,
    load_scenarios,
    load_scenarios_text,
    shared_host_from_env,
)
from harness.config.model import (
    VM,
    Accel,
    BuiltinImage,
    CloudImage,
    DeliveryPath,
    Device,
    E1000e,
    Expectation,
    Image,
    KernelImage,
    Scenario,
    Timeouts,
    VfioPci,
    VirtioBlk,
    VirtioNet,
    Workload,
)
from harness.config.schema import scenario_json_schema, scenario_json_schema_text

__all__ = [
    "SHARED_HOST_ENV",
    "VM",
    "Accel",
    "BuiltinImage",
    "CloudImage",
    "DeliveryPath",
    "Device",
    "E1000e",
    "Expectation",
    "Image",
    "KernelImage",
    "Scenario",
    "Timeouts",
    "VfioPci",
    "VirtioBlk",
    "VirtioNet",
    "Workload",
    "load_scenario",
    "load_scenario_text",
    "load_scenarios",
    "load_scenarios_text",
    "scenario_json_schema",
    "scenario_json_schema_text",
    "shared_host_from_env",
]
