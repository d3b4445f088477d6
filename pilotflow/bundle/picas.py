"""Tasks from tokens that PiCaS's own tools pushed into a CouchDB database (``[[tasks_from]]``
with ``picas_view``): the way a PiCaS user's existing token list gets a planner, a report and
walltime-aware pilots without pushing it again.

The view is read when the bundle is read (``plan`` too): the tasks are those tokens. ``submit``
then adopts them in place (their ids, ``input`` and PiCaS fields stay; pilotflow's key is
added), so PiCaS's views and tools keep working on them.
"""

from __future__ import annotations

from typing import Any

from pilotflow.bundle import fields as F
from pilotflow.bundle.model import DEFAULT_WALLTIME_S, Resource, Task
from pilotflow.launcher import CLIENT_PATIENCE, COUCH_PAGE, CouchDB, PoolError, couch_credentials


def picas_tasks(vals: dict[str, Any], resources: list[Resource], origin: tuple, pb) -> list[Task]:
    """The todo-or-other view's PiCaS tokens (not yet taken by a pilotflow run) as tasks.
    ``vals``: the [[tasks_from]] table with the defaults applied."""
    view = vals.pop("picas_view")
    res = next((r for r in resources if r.name == vals.get("resource")), None)
    if res is None or res.pool != "couchdb":
        pb.add(origin, '[[tasks_from]] with picas_view needs resource = the name of a [[resource]] with '
                       'pool = "couchdb" (the database that holds the tokens)')
        return []
    try:
        db = CouchDB(res.couchdb_url, res.couchdb_database, couch_credentials(res.couchdb_credentials),
                     patience=CLIENT_PATIENCE)
        docs = _view_docs(db, view)
    except PoolError as e:
        pb.add(origin + ("picas_view",), f'picas_view = "{view}": {e}')
        return []
    finally:
        if "db" in locals():
            db.close()
    if docs is None:
        pb.add(origin + ("picas_view",), f'picas_view = "{view}": database {res.couchdb_database} has no view '
                                         f'Monitor/{view} (PiCaS\'s createViews.py makes todo, locked, done, error)')
        return []
    tasks, bad = [], []
    keep = {k: vals[k] for k in ("cores", "retries", "resource", "gpus") if k in vals}
    keep.update(walltime_s=vals.get("walltime", DEFAULT_WALLTIME_S), memory_mb=vals.get("memory"),
                env=tuple(vals.get("env", ())), inputs=tuple(vals.get("inputs", ())),
                outputs=tuple(vals.get("outputs", ())))
    for doc in docs:
        if doc.get("type") != "token" or doc.get("pilotflow") or not isinstance(doc.get("input"), str) \
                or not doc["input"].strip():
            continue
        if not F.TASK_NAME_RE.fullmatch(doc["_id"]):
            bad.append(doc["_id"])
            continue
        tasks.append(Task(name=doc["_id"], command=doc["input"], picas=True, origin=origin, **keep))
    if bad:
        pb.add(origin + ("picas_view",), f"{len(bad)} token id(s) cannot be task names (letters, digits and "
                                         f"_.+=- only, at most 200), for example {bad[0]!r}")
    return tasks


def _view_docs(db: CouchDB, view: str) -> list[dict] | None:
    """Every document of Monitor/VIEW, a page per request; None if the view does not exist."""
    out: list[dict] = []
    query: dict[str, Any] = {"include_docs": "true", "limit": COUCH_PAGE}
    while True:
        status, ans = db.request("GET", f"_design/Monitor/_view/{view}", query=query)
        if status == 404:
            return None
        if status != 200:
            raise PoolError(f"CouchDB at {db.url}: view Monitor/{view} failed (HTTP {status}: {ans})")
        rows = ans.get("rows") or []
        out.extend(r["doc"] for r in rows if r.get("doc"))
        if len(rows) < COUCH_PAGE:
            return out
        query = dict(query, startkey=rows[-1]["key"], skip=1)  # PiCaS's views are keyed by id
