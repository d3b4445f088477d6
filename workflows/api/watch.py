#!/usr/bin/env python3
"""pilotflow from Python: build a bundle in code, plan it, run it, watch every state change.

    python workflows/api/watch.py            (runs on this machine; about 5 seconds)

The bundle's on_finish hook (a shell command, the event as JSON on stdin) writes a summary,
the way the AIMES demo mailed one.
"""

import json
import tempfile

import pilotflow

work = tempfile.mkdtemp(prefix="pilotflow-api-")
b = pilotflow.from_dict({
    "bundle": {"name": "watched",
               "on_finish": "python3 -c 'import json,sys; d=json.load(sys.stdin); "
                            "print(\"finished:\", d[\"counts\"])' > summary.txt"},
    "task": [
        {"name": "square-{x}", "command": "echo $(( {x} * {x} ))", "matrix": {"x": "1..4"}, "walltime": "5s"},
        {"name": "flaky", "command": "if [ -f seen ]; then echo ok; else touch seen; exit 1; fi",
         "retries": 1, "walltime": "5s"},
        {"name": "sum", "command": "echo all squared", "after": ["square-*"], "walltime": "5s"},
    ],
}, base_dir=work)

print(json.dumps(pilotflow.plan_for(b).to_json()["resources"][0]["pilots"][0]["tasks"]))
run = pilotflow.start(b, cwd=work)
run.on_token(lambda e: print(f"token {e.name:10} {e.old:>6} -> {e.new:<6} (attempt {e.attempt})"))
run.on_pilot(lambda e: print(f"pilot {e.name} {e.old} -> {e.new}"))
print("counts:", run.wait())
print(open(f"{work}/summary.txt").read().strip())
