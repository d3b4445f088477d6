"""A deliberately naive, per-task implementation of the launcher policy (test oracle).

Written independently of pilotflow.planning.simulate: no groups, no batching — every node, at every
event time, scans all tokens in rank order. Used to cross-check the aggregated simulator.
"""


def reference(tasks, pilots, steal=True):
    """tasks: list of dict(cores, walltime, memory, deps(list of task idx), rank, pilot)
    pilots: list of dict(nodes, cpn, mem, walltime or None[, gpus per node]); tasks may have "gpus"
    Returns (per pilot makespan, set of unfinished task indices)."""
    state = ["todo"] * len(tasks)
    nodes = [(p, {"free": pl["cpn"], "mem": pl["mem"] if pl["mem"] is not None else float("inf"),
                  "gpus": pl.get("gpus", 0)})
             for p, pl in enumerate(pilots) for _ in range(pl["nodes"])]
    running = []  # (end, task, node)
    order = sorted(range(len(tasks)), key=lambda i: tasks[i]["rank"])
    now = 0.0
    makespan = [0.0] * len(pilots)

    def claimable(i):
        return state[i] == "todo" and all(state[d] == "done" for d in tasks[i]["deps"])

    def fits(i, node, room):
        t = tasks[i]
        return (claimable(i) and t["cores"] <= node["free"] and t["memory"] <= node["mem"]
                and t.get("gpus", 0) <= node["gpus"] and t["walltime"] <= room)

    def fill():
        # owners claim their own work first (every node, in order), then idle pilots steal
        for stealing in (False, True) if steal else (False,):
            for ni, (p, node) in enumerate(nodes):
                limit = pilots[p]["walltime"]
                room = float("inf") if limit is None else limit - now
                while True:
                    if stealing:
                        if any(state[i] == "todo" and tasks[i]["pilot"] == p for i in order):
                            break
                        pick = next((i for i in reversed(order) if fits(i, node, room)), None)
                    else:
                        pick = next((i for i in order if tasks[i]["pilot"] == p and fits(i, node, room)), None)
                    if pick is None:
                        break
                    t = tasks[pick]
                    state[pick] = "locked"
                    node["free"] -= t["cores"]
                    node["mem"] -= t["memory"]
                    node["gpus"] -= t.get("gpus", 0)
                    running.append((now + t["walltime"], pick, ni))

    fill()
    while running:
        now = min(e for e, _, _ in running)
        for item in [r for r in running if r[0] == now]:
            running.remove(item)
            _, i, ni = item
            p, node = nodes[ni]
            node["free"] += tasks[i]["cores"]
            node["mem"] += tasks[i]["memory"]
            node["gpus"] += tasks[i].get("gpus", 0)
            state[i] = "done"
            makespan[p] = max(makespan[p], now)
        fill()
    return makespan, {i for i, s in enumerate(state) if s != "done"}
