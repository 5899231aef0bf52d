"""night-2.merged.json: night-1.merged.json one night later, with one vector's path changed by
hand (see README.md).  Run from this folder: python3 make-night-2.py"""

import json
from datetime import datetime, timedelta
from pathlib import Path

merged = json.loads(Path("night-1.merged.json").read_text())
for run in merged["runs"]:
    report = run["report"]
    run["run_id"] = report["run_id"] = report["run_id"] + "-n2"
    started = datetime.fromisoformat(report["started"]) + timedelta(days=1)
    report["started"] = started.isoformat()
    run["source"] = run["source"].replace("night-1", "night-2")
    if report["scenario"]["name"] == "lab-arm-posted":
        # The regression this tool exists to catch: l2/nic#1 posted last night, bounced
        # tonight; its numbers are those of the same vector in the recorded irqfd run.
        v = next(v for v in report["vectors"] if v["key"] == "l2/nic#1")
        v["path"] = "irqfd-bounce"
        v["evidence"]["host_delta"] = v["evidence"]["guest_delta"]
        v["reason"] = ("producer connected to a KVM irqfd consumer, every IRQ went through "
                       f"the host (host {v['evidence']['guest_delta']} / guest "
                       f"{v['evidence']['guest_delta']} = 1.00)")
for scenario, cells in merged["matrix"].items():
    for cell in cells.values():
        if cell:
            cell["runs"] = [r + "-n2" for r in cell["runs"]]
            if scenario == "lab-arm-posted":
                cell["vectors"]["l2/nic#1"] = "irqfd-bounce"
merged["vector_paths"]["posted"] -= 1
merged["vector_paths"]["irqfd-bounce"] += 1
Path("night-2.merged.json").write_text(json.dumps(merged, indent=2) + "\n")
