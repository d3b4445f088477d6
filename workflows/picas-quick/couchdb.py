#!/usr/bin/env python3
"""Run the PiCaS quick example on a CouchDB pool, in one command (see picas-couchdb.toml)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

from pilotflow.launcher import CouchDB, CouchPool, couch_credentials  # noqa: E402

DB = "picas-quick"
# the bundle's couchdb_url (a test points both elsewhere)
URL = next(line.split('"')[1] for line in (HERE / "picas-couchdb.toml").read_text().splitlines()
           if line.startswith("couchdb_url"))


def main() -> int:
    server = None
    db = CouchDB(URL, DB, couch_credentials(None), patience=1.0)
    try:
        db.request("GET", "/")
    except Exception:  # noqa: BLE001 - nothing answers: start pouchdb-server there
        from tests.daemons.couchdb import PouchServer, install
        prog = install()
        if isinstance(prog, str):
            print(f"couchdb.py: no CouchDB at {URL} and no pouchdb-server: {prog}", file=sys.stderr)
            return 2
        server = PouchServer(prog, Path(tempfile.mkdtemp(prefix="picas-quick-")), int(URL.rsplit(":", 1)[1]),
                             in_memory=True)
        server.launch()
        print(f"couchdb.py: started pouchdb-server on {URL} (in memory)")
    try:
        db.request("DELETE", "")  # a fresh database each time
        db.ensure()
        # PiCaS's views (as its createViews.py makes them) and its tokens (as pushTokens.py does)
        CouchPool(str(HERE), {"url": URL, "database": DB}, meta={"run": "none"}).ensure_views()
        lines = [s.strip() for s in (HERE / "quickExample.txt").read_text().splitlines()]
        docs = [{"_id": f"token_{i}", "type": "token", "lock": 0, "done": 0, "hostname": "", "scrub_count": 0,
                 "input": s, "exit_code": ""} for i, s in enumerate(x for x in lines if x and not x.startswith("#"))]
        db.bulk(docs)
        print(f"couchdb.py: pushed {len(docs)} PiCaS tokens to {URL}/{DB}")
        r = subprocess.run([sys.executable, "-m", "pilotflow", "submit", "picas-couchdb.toml", "--wait"], cwd=HERE)
        ans = db.view("Monitor", "overview_total", {"group": "true"})
        print("PiCaS's overview_total view:", json.dumps({row["key"]: row["value"] for row in ans["rows"]}))
        return r.returncode
    finally:
        db.close()
        if server:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
