#!/usr/bin/env python3
"""pilotflow launcher: the program every pilot runs, and the token-pool protocol.

ONE FILE, STANDARD LIBRARY ONLY, PYTHON 3.6 SYNTAX. It is carried inside every batch script
and runs on clusters we do not control; the client imports the same file for the pool
protocol, so there is exactly one definition of a token's states and transitions.

Pool layout (``POOL`` = ROOT/RUN on the resource's shared filesystem)::

    run.json                 run metadata (lock_timeout, work directory, ...)
    defs/NNNNNN.json         token definitions, in batches; never rewritten (new batches may appear)
    plans/PILOT.json         a pilot's planned tokens (in order) and its stage
    state/SS/TOKEN.N         THE file of TOKEN (SS: a hash of its name, so that no directory
                             holds more than ~256 on average): created exclusively by the
                             claim of attempt N as a hard link to the claimer's journal, where
                             its lock record (pilot, host, start, where its output goes) and
                             then the attempt's result follow as lines (the state: the
                             journal's last record of TOKEN); anyone else rewrites it as a
                             regular file of its own (tmp + rename); removed by the claim of
                             attempt N+1. (A regular file created exclusively, the result
                             appended, where the filesystem refuses hard links.)
    journals/HOST.PID.R.K    a process's records, one per line, appended; the states of the
                             tokens linked to it (R random; K: a new one every 10,000 claims)
    state/SS/TOKEN.N.x       attempt N was handed back (whoever created this wrote the todo)
    returns/HOST.PID         lines "TOKEN N": tokens a process handed back or retried (wakes
                             idle pilots); one append-only file per process
    agents/PILOT.I.json      a launcher's record; its mtime is the heartbeat
    agents/PILOT.I.end       written when that launcher exits, with the reason
    logs/PILOT.I.L.out|.err  the output of launcher PILOT.I's lane L: one task at a time, each
                             attempt's offsets in its record (logs = "per-token": TOKEN.N.out|.err)
    work/                    the tasks' working directory (unless run.json names another)
    pilots/renew.json|.sh    how a pilot on this resource submits its successor (written at submit)
    followups/NNNNNN.json    follow-up round N: created exclusively by whoever submits it (a pilot
                             or the client's ``wait``), then its outcome; base.json: rounds up to
                             it do not count against the budget (``retry``)
    agents/PILOT.gone        the client saw the pilot finish (it will never start)
    cancelled                the user cancelled the run: nobody submits follow-ups

States are PiCaS's: ``todo`` (no state file also means todo), ``locked``, ``done``, ``error``.
A token runs only after its file for the next attempt was created exclusively (a hard link
fails if the name exists, as an O_EXCL create does), so no token runs twice at the same time
whatever the number of pilots and nodes. That file is a name for its claimer's journal, so a
task costs one link (a directory entry: no inode, no data block, no object on a parallel
filesystem's storage servers; on this VM's ext4 a link costs 5-20 us where a file's create
costs 60-300), two appends to a file the launcher keeps open, and one removal at the next
attempt: the pool holds one file per token and a few inodes in all (inode quotas count
those). A reader finds a token's record in the journal its file links to (one read of each
journal, then only its new part: a sync reads what was appended since the last one, not a
file per token); a half-written line is skipped. Other writers (hand-backs, retries) rewrite
a token's file with tmp-file + rename (atomic on POSIX filesystems, NFS and Lustre included);
nothing is fsynced on the hot path.

Commands: ``run`` (be a pilot's node agent) and helpers the client calls, locally or over
SSH, in one round trip each: ``changes``, ``scrub``, ``move``, ``round``, ``info``.

Renewal: a launcher that ends (walltime nearly over, or nothing it can fit) while its run
still has work that no live pilot will take submits a follow-up pilot from the node, with the
resource's own submit command as ``pilots/renew.json`` spells it, sized from what is left and
the runtimes observed so far. Rounds are numbered and claimed exclusively; a round proceeds
only once every earlier round has an outcome, and then only if nobody is alive to take the
work, so pilots ending together (and the client's ``wait``) submit each round once.
"""

import _thread
import errno
import json
import math
import os
import random
import select
import signal
import socket
import stat
import sys
import time
import zlib

TODO, LOCKED, DONE, ERROR = "todo", "locked", "done", "error"
MOVED = "moved"  # handed over to another resource's pool: never claimable here again
FINAL = (DONE, ERROR, MOVED)
STATES = (TODO, LOCKED, DONE, ERROR, MOVED)
LOST_LIMIT = 5  # attempts lost to dying pilots before a token is given up as error
REAPER_NAP = 0.2  # seconds between the reaper's looks at what its launcher told it
VERSION = 1
# Helper answers are framed: a cluster's shell start-up files (.bashrc, module banners) may
# print before the helper runs; the client reads only what follows the last marker.
GPU_VARS = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "ZE_AFFINITY_MASK")  # what the vendors read
HELPER_MARK = "\n--pilotflow-helper-answer--\n"


# --- files ---------------------------------------------------------------------------------

def _write_all(fd, data):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_atomic(path, data):
    """Write bytes so that readers see the old file or the new one, never a part."""
    tmp = "%s.%d.tmp" % (path, os.getpid())
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise
        os.unlink(tmp)  # a leftover of a crashed process that had our pid (a link there, say:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # never written through)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    finally:
        os.close(fd)
    os.rename(tmp, path)


_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True)  # (dumps would make one per call)


def dump(obj):
    return _ENCODER.encode(obj).encode("utf-8")


def read_record(path):
    """A state file's record: its last complete line (the holder's result appended after the
    lock line, possibly half-written), or its whole content (a file rewritten atomically, or
    of an older format); None if missing or garbage."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    lines = data.split(b"\n")
    for raw in (lines if len(lines) == 1 else lines[-2::-1]):
        try:
            return json.loads(raw.decode("utf-8"))
        except ValueError:
            continue
    return None


def read_json(path):
    """The JSON in ``path``, or None if it is missing, half-written by a crash, or garbage."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None


def fs_now(directory):
    """The filesystem's clock (not ours): the mtime of a file we just touched.

    Heartbeats are compared with this, so clock skew between nodes and the file server does
    not make live pilots look dead.
    """
    # unique per thread too: agents run in threads of one process in tests and the Python API
    probe = os.path.join(directory, ".clock.%s.%d.%d" % (socket.gethostname(), os.getpid(), _thread.get_ident()))
    with open(probe, "w"):
        pass
    t = os.stat(probe).st_mtime
    os.unlink(probe)
    return t


# --- the pool ------------------------------------------------------------------------------

class PoolError(Exception):
    """A pool this launcher cannot work on; the message says why and what to do."""


class PoolUnreachable(PoolError):
    """The pool's server did not answer (after retries): an external failure, not bad input."""


def shard_width(tokens):
    """Hex digits of the state directories' names: at most ~256 tokens per directory. Small
    directories keep an incremental scan close to what changed (it lists and stats only the
    directories whose mtime moved); more, smaller ones cost more than they save (a pool of
    200,000 tokens filled 2.5x slower with 3 per directory than with 49: every directory is
    an inode and a block of its own)."""
    width = 1
    while tokens > 256 * 16 ** width and width < 5:
        width += 1
    return width


class Pool(object):
    """A run's token pool on a (shared) filesystem."""

    SUBDIRS = ("defs", "plans", "state", "journals", "returns", "agents", "logs", "work", "followups", "pilots")
    CONDITIONAL = False  # whether the holder's result write fails by itself once its attempt was handed back
    STEAL_SPREAD = 1  # thieves pick at random among this many tokens at the back (1: the very last)
    FORMAT = 4  # 2: one state file per token (the claim is its creation), packed logs; 3: results appended
    # to the claim; 4: a claim is a hard link to its launcher's journal, which holds the records
    JOURNAL_LINKS = 10000  # claims linked to one journal before the next one: under every filesystem's
    # limit of links per file (ext4 and Lustre: 65,000) and a small first read for a reader

    def __init__(self, root):
        self.root = os.path.abspath(root)
        self.meta = read_json(os.path.join(self.root, "run.json")) or {}
        self._width = None  # hex digits of the state directories' names
        self._shards = {}  # hash → state directory (those used so far)
        self._jw = None  # the journal this process writes: [fd, path, links made, pid, number]
        self._jfds = []  # all journals this process opened (results go to the one of their claim)
        self._jtorn = set()  # journal descriptors whose last write failed (maybe half a line)
        self._jread = {}  # journal inode → [bytes read, {token: offset of its last record}]
        self._links = True  # False once this filesystem refused a hard link

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    # creation (client side) ------------------------------------------------------------
    @classmethod
    def create(cls, root, meta):
        for d in cls.SUBDIRS:
            mkdirs(os.path.join(root, d))
        write_atomic(os.path.join(root, "run.json"), dump(dict({"format": cls.FORMAT}, **meta)))
        return cls(root)

    def check_format(self):
        """Refuse a pool this launcher cannot read (written by an older pilotflow)."""
        fmt = int(self.meta.get("format", 1))
        if fmt != self.FORMAT:
            raise PoolError("%s was written by %s pilotflow (pool format %s; this one reads %d): let "
                            "that version finish the run, or submit it again"
                            % (self.root, "an older" if fmt < self.FORMAT else "a newer", fmt, self.FORMAT))

    def add_defs(self, tokens):
        """Append a batch of token definitions (dicts with name, command, cores, ...)."""
        existing = sorted(os.listdir(self.path("defs")))
        n = int(existing[-1].split(".")[0]) + 1 if existing else 0
        write_atomic(self.path("defs", "%06d.json" % n), dump(tokens))
        return n

    def write_plan(self, pilot, tokens, stage=0, extra=None):
        doc = {"pilot": pilot, "tokens": list(tokens), "stage": stage}
        doc.update(extra or {})
        write_atomic(self.path("plans", pilot + ".json"), dump(doc))

    # reading -----------------------------------------------------------------------------
    def defs(self, seen=None):
        """All token definitions in batch order; with ``seen`` (a set of batch file names),
        only batches not seen before, and ``seen`` is updated."""
        out = []
        for fn in sorted(os.listdir(self.path("defs"))):
            if not fn.endswith(".json") or (seen is not None and fn in seen):
                continue
            batch = read_json(self.path("defs", fn))
            if batch is None:
                continue  # being written; picked up next time
            if seen is not None:
                seen.add(fn)
            out.extend(batch)
        return out

    def defs_and_states(self, seen):
        """New definitions (as ``defs(seen)``) and, for many, every token's state from one
        scan (None: few enough for a look each)."""
        new = self.defs(seen)
        return new, (self.states() if len(new) > 200 else None)

    def plans(self):
        out = {}
        for fn in os.listdir(self.path("plans")):
            if fn.endswith(".json"):
                doc = read_json(self.path("plans", fn))
                if doc:
                    out[doc["pilot"]] = doc
        return out

    # reading a token's state ---------------------------------------------------------------
    # state/SHARD/NAME.N is the one file of token NAME, created exclusively by the claim of
    # attempt N: a hard link to its launcher's journal (journals/HOST.PID.R.K, that process's
    # append-only file of records), made before the attempt's lock record is appended there;
    # the holder appends the result. The token's state is the journal's last record of NAME
    # (a link without one yet: locked, the claim being written). So a task costs no inode:
    # a link (a directory entry) and two appends, and the pool holds one file per token but
    # a few inodes in all. Anyone else rewrites the state as a regular file of its own (tmp +
    # rename over the link), holding the record; the claim of attempt N+1 removes it. Where a
    # filesystem refuses hard links, the claim is a regular file created exclusively with the
    # lock record, the result appended as its next line (the last complete line is the
    # state). NAME.N.x marks attempt N as handed back. No file: todo, unclaimed.

    def shard(self, name):
        """The state directory of a token (a hash of its name: no directory grows too big)."""
        if self._width is None:
            self._width = int(self.meta.get("shard_width", 2))
        key = zlib.crc32(name.encode("utf-8")) % (16 ** self._width)
        d = self._shards.get(key)
        if d is None:
            d = self._shards[key] = self.path("state", "%0*x" % (self._width, key))
        return d

    def _file(self, name, attempt, suffix=""):
        return "%s/%s.%d%s" % (self.shard(name), name, attempt, suffix)

    def latest(self, name, hint=None):
        """The newest attempt that has a file (0: none), probing upwards from ``hint``."""
        if hint is not None:
            n = max(0, int(hint))
            # (a hint of 0 with no first attempt's file is no lead: the token may never have
            # been claimed, or attempt 2's claim removed attempt 1's file; the listing tells)
            if os.path.exists(self._file(name, n if n else 1)):
                while os.path.exists(self._file(name, n + 1)):
                    n += 1
                return n
        best = 0
        prefix = name + "."
        try:
            for fn in os.listdir(self.shard(name)):
                if fn.startswith(prefix) and fn[len(prefix):].isdigit():
                    best = max(best, int(fn[len(prefix):]))
        except OSError:
            pass
        return best

    def state(self, name, hint=None):
        """A token's state: the record of its newest attempt (``hint``: an attempt it had)."""
        n = self.latest(name, hint)
        if n == 0:
            return {"token": name, "state": TODO, "attempt": 0, "failures": 0}
        return self._read(name, n, self._file(name, n))

    def _read(self, name, n, path, depth=0, st=None, ino=None, known=None):
        """``st``: the file's lstat, if known; ``ino``: instead, the inode of the journal it
        links to (known from a listing), and ``known`` that journal's records by token, if
        they were just read."""
        if ino is None:
            try:
                st = st or os.lstat(path)
            except OSError:
                st = None
        if ino is not None or (st is not None and st.st_nlink > 1):  # a claim linked to a journal
            if known is not None:
                doc = known.get(name)
            else:
                doc = self._journal_record(path, ino or st.st_ino, 0 if ino else st.st_size, name)
            if isinstance(doc, dict) and int(doc.get("attempt") or 0) < n:
                doc = None  # (its last record there is of an earlier attempt)
            if doc is None and st is None:
                try:
                    st = os.lstat(path)
                except OSError:
                    pass
            if doc is None and st is not None and time.time() - st.st_mtime < self.lock_timeout():
                return {"token": name, "state": LOCKED, "attempt": n}  # its lock record is being written
        else:
            doc = read_record(path) if st is not None else None
        if isinstance(doc, dict) and doc.get("token") == name and int(doc.get("attempt") or n) > n:
            doc = None  # the journal's record is of a newer attempt: ours was superseded
            st = None
        if not isinstance(doc, dict) or doc.get("token") != name or doc.get("state") not in STATES:
            if st is None:  # superseded while we looked (a newer attempt was claimed): look again
                if depth < 5:
                    newer = self.latest(name)
                    if newer > n or (newer == n and depth == 0):
                        return self._read(name, newer, self._file(name, newer), depth + 1)
                return {"token": name, "state": LOCKED, "attempt": n + 1}
            if stat.S_ISREG(st.st_mode) and st.st_size == 0 and time.time() - st.st_mtime < self.lock_timeout():
                return {"token": name, "state": LOCKED, "attempt": n}  # its claim is being written
            return {"token": name, "state": TODO, "attempt": n, "failures": 0,
                    "reason": "state file was unreadable"}
        if doc.get("attempt") != n:
            doc = dict(doc, attempt=n)
        if doc["state"] == LOCKED and os.path.exists(path + ".x"):
            doc.update(state=TODO, reason=doc.get("reason") or "handed back")  # its releaser died mid-way
        return doc

    # journals ------------------------------------------------------------------------------
    def _journal_tail(self, path, ino):
        """Read a journal (through any of its names) from where this process stopped: the
        last record of each token in its new complete lines ({token: record}), indexed.
        Read from the end, so that a record a later one supersedes is not decoded: records
        are written with sorted keys, "token" last, so a line's token is read off its end."""
        ent = self._jread.get(ino)
        if ent is None:
            ent = self._jread[ino] = [0, {}]
        try:
            with open(path, "rb") as f:
                f.seek(ent[0])
                data = f.read()
        except OSError:
            return {}
        out = {}
        pos, index = ent[0], ent[1]
        end = data.rfind(b"\n") + 1
        stop = end - 1  # the newline that ends the line being read
        while stop >= 0:
            start = data.rfind(b"\n", 0, stop) + 1
            line = data[start:stop]
            stop = start - 1
            at = line.rfind(b'"token":"')
            name = line[at + 9:-2] if at >= 0 and line.endswith(b'"}') else b"\\"
            if b"\\" not in name and b'"' not in name:
                name = name.decode("utf-8", "replace")
                if name in out:
                    continue  # superseded by a later record
            try:
                doc = json.loads(line.decode("utf-8"))
            except ValueError:
                continue  # a line its writer could not finish (a full disk), then went on
            if isinstance(doc, dict) and isinstance(doc.get("token"), str) and doc["token"] not in out:
                out[doc["token"]] = doc
                index[doc["token"]] = pos + start
        ent[0] = pos + end
        return out

    def _journal_record(self, path, ino, size, name):
        """The last record of ``name`` in the journal ``path`` links to (None: none yet)."""
        ent = self._jread.get(ino)
        if ent is None or ent[0] < size:
            self._journal_tail(path, ino)
            ent = self._jread[ino]
        off = ent[1].get(name)
        if off is None and len(ent) > 2:  # read from a sync's cursor only: the record may be before it
            del self._jread[ino]
            self._journal_tail(path, ino)
            off = self._jread[ino][1].get(name)
        if off is None:
            return None
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            data = b""
            while not data.endswith(b"\n"):
                more = os.pread(fd, 65536, off + len(data))
                if not more:
                    break
                data += more[:more.find(b"\n") + 1] if b"\n" in more else more
        finally:
            os.close(fd)
        try:
            return json.loads(data.decode("utf-8"))
        except ValueError:
            return None

    def journals(self):
        """The pool's journals: [(path, inode)]."""
        try:
            return [(e.path, e.inode()) for e in os.scandir(self.path("journals"))]
        except OSError:
            return []

    def states(self):
        """Every token that has a file (name → state): each journal read once, not a file
        per token."""
        return self.scan()[0]

    def scan(self, since=None, journals=None):
        """The states (all, or with ``since`` only those changed since a sync's cursor: at or
        after ``since``, filesystem time, for rewritten states — regular files; unchanged shard
        directories are skipped whole — and the new records of the journals after
        ``journals``, {journal name: bytes read}), and how far each journal was read, for the
        next call: read before the state directories, as a claim's link comes before its
        record. A full scan reads every journal whole, and takes the states from what it read."""
        out = {}
        linked = {}  # journal inode → its last records by token, if read whole now
        offsets = {}
        hints = {}
        for path, ino in self.journals():
            linked[ino] = None
            if since is not None:  # from where the last look stopped
                start = int((journals or {}).get(os.path.basename(path), 0))
                self._jread[ino] = [start, {}] + ([start] if start else [])
                for name, doc in self._journal_tail(path, ino).items():
                    out[name] = None  # changed: its current state is looked up below
                    hints[name] = (doc.get("attempt"), ino, doc)
            else:
                self._jread.pop(ino, None)
                linked[ino] = self._journal_tail(path, ino)
            offsets[os.path.basename(path)] = self._jread[ino][0]
        top = self.path("state")
        try:
            shards = os.listdir(top)
        except OSError:
            shards = []
        for sd in shards:
            d = os.path.join(top, sd)
            if since is not None:
                try:
                    if os.stat(d).st_mtime < since:
                        continue
                except OSError:
                    continue
            newest = {}
            marked = set()  # NAME.N.x: handed back (from the listing: no stat per token)
            try:
                entries = list(os.scandir(d))
            except OSError:
                continue
            for e in entries:
                name, _, n = e.name.rpartition(".")
                if not n.isdigit() or not name:
                    if n == "x":
                        marked.add(name)
                    continue
                n = int(n)
                if n > newest.get(name, (0, None))[0]:
                    newest[name] = (n, e)
            for name, (n, e) in newest.items():
                try:
                    ino = e.inode()
                    if ino in linked:  # a claim linked to a journal: its record is in there
                        if since is not None and e.name not in marked:
                            continue  # (and so are its changes)
                        out[name] = self._read(name, n, e.path, ino=ino, known=linked[ino])
                        continue
                    st = e.stat(follow_symlinks=False)
                    if since is not None and e.name not in marked and (st.st_nlink > 1 or st.st_mtime < since):
                        continue  # (linked to a journal made after the listing: next time)
                except OSError:
                    continue
                out[name] = self._read(name, n, e.path, st=st)
        for name in [k for k, v in out.items() if v is None]:
            attempt, ino, doc = hints.get(name) or (None, None, None)
            n = self.latest(name, attempt)
            if n and n == attempt:  # the record just read, if the token's file links to its journal
                path = self._file(name, n)
                try:
                    if os.lstat(path).st_ino == ino:
                        out[name] = self._read(name, n, path, ino=ino, known={name: doc})
                        continue
                except OSError:
                    pass
            out[name] = self.state(name, hint=n)
        return out, offsets

    def agents(self):
        """Launcher records with their heartbeat (mtime) and end marker, if any."""
        out = {}
        d = self.path("agents")
        for fn in os.listdir(d):
            if not fn.endswith(".json"):
                continue
            key = fn[:-5]
            rec = read_json(os.path.join(d, fn)) or {}
            try:
                rec["beat"] = os.stat(os.path.join(d, fn)).st_mtime
            except OSError:
                continue
            end = read_json(os.path.join(d, key + ".end"))
            if end is not None:
                rec["end"] = end
            out[key] = rec
        return out

    def dead_agents(self, timeout, now=None, since=None):
        """Launchers that may have left locks behind: ended, or silent longer than ``timeout``.
        With ``since``: not those that ended after it saying they held nothing (a launcher
        running since then has seen every state they wrote; one started later must look, as
        a file may contradict an end record)."""
        now = self.now() if now is None else now
        return set(k for k, rec in self.agents().items()
                   if ("end" in rec or now - rec["beat"] > timeout) and not (
                       since is not None and isinstance(rec.get("end"), dict) and rec["end"].get("held") == 0
                       and float(rec["end"].get("end") or 0) >= since))

    # transitions ---------------------------------------------------------------------------
    def claim(self, name, attempt, record, keep=False):
        """Create the token's file for ``attempt`` exclusively, holding ``record``: True if the
        attempt is ours now. The previous attempt's files go (one file per token). With
        ``keep``, a handle instead of True, through which ``append`` writes the result."""
        path = self._file(name, attempt)
        if not self._links:
            return self._claim_file(name, attempt, record, keep)
        journal = self._journal()
        try:
            os.link(journal[1], path)
        except OSError as e:
            if e.errno == errno.EEXIST:
                return False
            if e.errno == errno.ENOENT:
                if os.path.isdir(os.path.dirname(path)):
                    journal[2] = self.JOURNAL_LINKS  # our journal was removed: a new one
                else:
                    mkdirs(os.path.dirname(path))
            elif e.errno == errno.EMLINK:
                journal[2] = self.JOURNAL_LINKS  # full: the next one
            elif e.errno in (errno.EPERM, errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS):
                self._links = False  # no hard links here: claims are files of their own
            else:
                raise
            return self.claim(name, attempt, record, keep)
        journal[2] += 1
        if os.path.exists(self._file(name, attempt + 1)):
            # a newer attempt exists (its claim removed this one's file before we came):
            # our view was old; that attempt, not ours, is the token's
            os.unlink(path)
            return False
        try:
            self._journal_write(journal[0], record)
        except OSError:
            os.unlink(path)  # (a full disk: undone, nobody else can hold this attempt yet)
            raise
        self._drop_previous(name, attempt)
        return (journal[0], name, attempt) if keep else True

    def _claim_file(self, name, attempt, record, keep):
        """A claim where hard links cannot be: a file of its own, created exclusively."""
        path = self._file(name, attempt)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            if e.errno == errno.EEXIST:
                return False
            if e.errno != errno.ENOENT:
                raise
            mkdirs(os.path.dirname(path))
            return self._claim_file(name, attempt, record, keep)
        try:
            _write_all(fd, record + b"\n")
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        if not keep:
            os.close(fd)
        if os.path.exists(self._file(name, attempt + 1)):
            if keep:
                os.close(fd)
            os.unlink(path)
            return False
        self._drop_previous(name, attempt)
        return fd if keep else True

    def _drop_previous(self, name, attempt):
        if attempt > 1:  # (a first attempt has nothing before it, but for the rare error written
            # for a token whose dependency failed, which a retry then claims: a stale NAME.0 stays)
            for old in (self._file(name, attempt - 1), self._file(name, attempt - 1, ".x")):
                try:
                    os.unlink(old)
                except OSError:
                    pass

    def _journal(self):
        """[fd, path, links, pid]: the journal this process appends to, a new one after
        JOURNAL_LINKS claims (and in a forked child)."""
        jw = self._jw
        if jw is None or jw[2] >= self.JOURNAL_LINKS or jw[3] != os.getpid():
            k = 0 if jw is None or jw[3] != os.getpid() else jw[4] + 1
            # (a random part: containers on several nodes may share a host name and a pid)
            path = self.path("journals", "%s.%d.%s.%d" % (socket.gethostname(), os.getpid(), os.urandom(3).hex(), k))
            mkdirs(os.path.dirname(path))
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._jfds.append(fd)
            jw = self._jw = [fd, path, 0, os.getpid(), k]
        return jw

    def close_journals(self):
        """Close the journals this process appended to; a later claim opens a new one."""
        for fd in getattr(self, "_jfds", ()):
            try:
                os.close(fd)
            except OSError:
                pass
        self._jfds, self._jw = [], None

    def _journal_write(self, fd, record):
        """One record, one line: after a failed write (a full disk) a newline first, so that
        what it left of a line stays a line of its own, which readers skip."""
        data = record + b"\n"
        if fd in self._jtorn:
            data = b"\n" + data
        try:
            _write_all(fd, data)
        except OSError:
            self._jtorn.add(fd)
            raise
        self._jtorn.discard(fd)

    def flush(self):
        """Write what is held back (nothing: every file write is made at once)."""
        return {}

    def append(self, handle, name, doc, later=False):
        """The holder's result for the attempt it claimed with ``keep``: a line in the journal
        its claim links to (a reader that sees it half-written still reads the lock record), or
        after the lock line of a claim of its own (whose directory is touched: incremental
        scans skip directories that did not change)."""
        if isinstance(handle, tuple):
            self._journal_write(handle[0], dump(doc))
            return True
        _write_all(handle, dump(doc) + b"\n")
        try:
            os.utime(self.shard(name))
        except OSError:
            pass
        return True

    def put(self, name, doc):
        """Rewrite the record of the attempt ``doc`` is about (tmp + rename: atomic)."""
        path = self._file(name, int(doc.get("attempt", 0)))
        try:
            write_atomic(path, dump(doc))
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
            mkdirs(os.path.dirname(path))
            write_atomic(path, dump(doc))

    def release(self, name, doc, reason, give_up_after=None):
        """Hand a lost attempt (its launcher died or stopped) back to todo, exactly once.

        ``NAME.N.x`` marks attempt N as handed back: whoever creates it first (the launcher
        itself on SIGTERM, its reaper, another pilot taking over a stale lock, or ``retry
        --stale``) writes the todo state; a launcher still running attempt N kills it when it
        sees the marker. Returns the new state, or None if someone else did it.
        """
        attempt = int(doc.get("attempt", 0))
        try:
            fd = os.open(self._file(name, attempt, ".x"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOENT):
                return None
            raise
        os.close(fd)
        if os.path.exists(self._file(name, attempt + 1)):  # a newer attempt exists: settled already
            try:
                os.unlink(self._file(name, attempt, ".x"))
            except OSError:
                pass
            return None
        lost = int(doc.get("lost", 0)) + 1
        new = dict(doc, state=TODO, lost=lost, end=doc.get("end") or time.time(), reason=reason, exit_code=None)
        if give_up_after is not None and lost > give_up_after:
            new.update(state=ERROR, reason="%s; lost %d times, giving up" % (reason, lost))
        self.put(name, new)
        if new["state"] == TODO:
            self.note_return(name, attempt)
        return new

    def released(self, name, attempt):
        """Whether attempt N is no longer its holder's: handed back, or superseded."""
        return os.path.exists(self._file(name, attempt, ".x")) or os.path.exists(self._file(name, attempt + 1))

    def note_return(self, name, attempt):
        """Tell idle launchers a token is claimable again: a line in this process's own
        append-only notes file (``returns/HOST.PID``), not a file per token."""
        try:
            fd = os.open(self.path("returns", "%s.%d" % (socket.gethostname(), os.getpid())),
                         os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, ("%s %d\n" % (name, attempt)).encode("utf-8"))
            finally:
                os.close(fd)
        except OSError:
            pass

    def scrub(self, failed=False, stale=False, names=None, timeout=None, reason="", pilots=None):
        """PiCaS scrubbing: error (``failed``) and stale-locked (``stale``) tokens back to todo.

        Stale means locked by a launcher whose heartbeat is older than ``timeout`` (default:
        the run's lock_timeout) or that belongs to one of ``pilots`` (known to have ended).
        Returns the names scrubbed.
        """
        dead = self.dead_agents(timeout if timeout is not None else self.lock_timeout()) if stale else set()
        done = []
        for name, doc in sorted(self.states().items()):
            if names is not None and name not in names:
                continue
            st = doc.get("state")
            if failed and st == ERROR:
                new = dict(doc, state=TODO, failures=0, scrubs=doc.get("scrubs", 0) + 1,
                           reason=reason or "scrubbed after error", exit_code=None)
                self.put(name, new)
                self.note_return(name, doc.get("attempt", 0))
                done.append(name)
            elif stale and st == LOCKED and (agent_key(doc) in dead or doc.get("pilot") in (pilots or ())):
                if self.release(name, doc, reason or "pilot %s stopped while running it" % doc.get("pilot")):
                    done.append(name)
        return done

    def move_out(self, names, to):
        """Take todo tokens out of this pool for another resource, exactly once each: the
        next attempt is claimed with a ``moved`` record (no launcher can claim it after that)
        and the state says where it went. Returns the names moved; a token a launcher claimed
        meanwhile is not moved."""
        out = []
        for name in names:
            doc = self.state(name)
            if doc.get("state") != TODO:
                continue
            attempt = int(doc.get("attempt", 0)) + 1
            rec = dict(doc, token=name, state=MOVED, attempt=attempt, to=to, end=time.time(),
                       reason="moved to resource %s" % to)
            if self.claim(name, attempt, dump(rec)):
                self.put(name, rec)
                out.append(name)
        return out

    # what launchers and helpers need besides token states (a database pool keeps these elsewhere)
    def now(self):
        """The pool's clock: the time heartbeats are compared with."""
        return fs_now(self.path("agents"))

    def changes(self, since):
        """(cursor, states changed since ``cursor``): rewritten states re-read from 2 s before
        the last look (coarse filesystem clocks), journals from where the last look stopped.
        The cursor: {"t": the filesystem's time, "j": {journal: bytes read}}."""
        now = self.now()
        if since is None:
            out, offsets = self.scan()
        else:
            if not isinstance(since, dict):
                since = {"t": since}
            out, offsets = self.scan(float(since.get("t") or 0) - 2.0, since.get("j") or {})  # (no "j": all read)
        return {"t": now, "j": offsets}, out

    def defs_count(self):
        return len(os.listdir(self.path("defs")))

    def defs_changed(self, seen):
        """Whether definition batches appeared that ``defs(seen)`` has not returned yet."""
        return self.defs_count() != len(seen)

    def returned(self, seen):
        """Tokens others handed back or retried since we last looked (new lines in the
        processes' notes files; ``seen``: notes file → bytes read, updated)."""
        out = []
        d = self.path("returns")
        for fn in os.listdir(d):
            done = seen.get(fn, 0)
            try:
                if os.stat(os.path.join(d, fn)).st_size <= done:
                    continue
                with open(os.path.join(d, fn), "rb") as f:
                    f.seek(done)
                    data = f.read()
            except OSError:
                continue
            data = data[:data.rfind(b"\n") + 1]  # whole lines only
            seen[fn] = done + len(data)
            out.extend(line.split(b" ")[0].decode("utf-8", "replace") for line in data.splitlines() if line)
        return out

    def close_claim(self, handle):
        if not isinstance(handle, tuple):
            os.close(handle)

    def current(self, tokens):
        """[(token, its current state)] for launcher tokens (a look at each one's file)."""
        return [(t, self.state(t.name, hint=t.attempt)) for t in tokens]

    def write_agent(self, key, rec):
        write_atomic(self.path("agents", key + ".json"), dump(rec))

    def beat_agent(self, key):
        """Heartbeat (the record's mtime); False if the record is gone."""
        try:
            os.utime(self.path("agents", key + ".json"), None)
            return True
        except OSError:
            return False

    def agent_end(self, key):
        return read_json(self.path("agents", key + ".end"))

    def end_agent(self, key, end):
        write_atomic(self.path("agents", key + ".end"), dump(end))

    def gone(self):
        """Pilots the client saw finish (they will never start)."""
        try:
            return set(fn[:-5] for fn in os.listdir(self.path("agents")) if fn.endswith(".gone"))
        except OSError:
            return set()

    def lock_timeout(self):
        return float(self.meta.get("lock_timeout", 300))

    def workdir(self):
        w = self.meta.get("workdir") or "work"
        return w if os.path.isabs(w) else self.path(w)


# --- a token pool in CouchDB (PiCaS's database) -------------------------------------------------
# The same protocol with a database in place of the shared filesystem's state files: one
# document per token in PiCaS's form (type "token", lock, done, hostname, scrub_count, input,
# exit_code, the latest attempt's output as attachments) with pilotflow's definition and state
# record under the key "pilotflow"; launchers' records are documents too. Every transition is
# a conditional update on the revision the writer read: CouchDB accepts one update per
# revision and answers 409 to the others, so a claim is exclusive (as the file pool's O_EXCL
# create is) and a hand-back happens exactly once. Node-local things (the packed log lanes,
# the reaper) stay in the launcher's own directory; follow-up rounds stay in the run directory
# where there is one (a node that cannot submit jobs cannot renew anyway).

CLIENT_PATIENCE = 20.0  # seconds a client's helper call retries a database that does not answer
COUCH_PAGE = 1000  # documents per request when reading the run's tokens
LOG_CAP = 65536  # bytes of each stream kept as an attachment (the tail: where errors are)
MONITOR_VIEWS = {  # PiCaS's standard views (the picas-tutorial's createViews.py), created if missing
    "todo": "doc.lock == 0 && doc.done == 0",
    "locked": "doc.lock > 0 && doc.done == 0",
    "done": "doc.lock > 0 && doc.done > 0 && parseInt(doc.exit_code) == 0",
    "error": "doc.lock > 0 && doc.done > 0 && parseInt(doc.exit_code) != 0",
}


def couch_credentials(path):
    """(user, password) from the environment (PILOTFLOW_COUCHDB_USER / _PASSWORD) or from a
    file holding ``user:password`` that only its owner may read; None: no credentials."""
    user = os.environ.get("PILOTFLOW_COUCHDB_USER")
    if user:
        return user, os.environ.get("PILOTFLOW_COUCHDB_PASSWORD", "")
    if not path:
        return None
    path = os.path.expanduser(path)
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            text = f.read().decode("utf-8").strip()
    except OSError as e:
        raise PoolError("cannot read the CouchDB credentials file %s (%s): create it with one line "
                        "user:password and chmod 600 it, or set PILOTFLOW_COUCHDB_USER and "
                        "PILOTFLOW_COUCHDB_PASSWORD" % (path, e.strerror or e))
    if st.st_mode & 0o077:
        raise PoolError("the CouchDB credentials file %s may be read by others (mode %o): chmod 600 %s"
                        % (path, st.st_mode & 0o777, path))
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise PoolError("the CouchDB credentials file %s must hold one line user:password" % path)
    return user, password


class CouchDB(object):
    """A CouchDB database over HTTP (one kept-alive connection; standard library only).

    Connection failures and 5xx answers are retried for ``patience`` seconds (a restarting
    server loses nothing: every write is conditional, so a retried write that had landed
    answers 409 and the caller re-reads). 401/403 are a PoolError saying what to fix."""

    def __init__(self, url, database, credentials=None, patience=120.0):
        import base64
        from urllib.parse import urlsplit, quote
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise PoolError("CouchDB URL %r: expected http(s)://HOST[:PORT]" % url)
        self.url = "%s://%s%s" % (u.scheme, u.hostname, ":%d" % u.port if u.port else "")
        self.https = u.scheme == "https"
        self.host, self.port = u.hostname, u.port or (443 if self.https else 80)
        self.prefix = (u.path.rstrip("/") + "/" + quote(database, safe="")).replace("//", "/")
        if not self.prefix.startswith("/"):
            self.prefix = "/" + self.prefix
        self.database = database
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if credentials:
            token = base64.b64encode(("%s:%s" % credentials).encode("utf-8")).decode("ascii")
            self.headers["Authorization"] = "Basic " + token
        self.patience = patience
        self.conn = None
        self.retried = False  # whether the last request had to be sent again
        self.skew = None  # server clock minus ours (from the Date header)
        self._quote = quote

    def _connect(self):
        import http.client
        if self.https:
            import ssl
            return http.client.HTTPSConnection(self.host, self.port, timeout=60, context=ssl.create_default_context())
        return http.client.HTTPConnection(self.host, self.port, timeout=60)

    def docpath(self, doc_id):
        if doc_id.startswith("_design/"):  # CouchDB wants that slash as it is
            return "%s/_design/%s" % (self.prefix, self._quote(doc_id[8:], safe=""))
        return "%s/%s" % (self.prefix, self._quote(doc_id, safe=":"))

    def request(self, method, path="", body=None, query=None):
        """(status, parsed JSON) for ``method`` on the database (``path`` below it)."""
        status, raw = self.send(method, path, body, query)
        try:
            doc = json.loads(raw.decode("utf-8")) if raw else None
        except ValueError:
            doc = None
        return status, doc

    def send(self, method, path="", body=None, query=None):
        """(status, body bytes); retried while the server cannot be reached."""
        from urllib.parse import urlencode
        target = path if path.startswith("/") else self.prefix + ("/" + path if path else "")
        if query:
            target += "?" + urlencode(dict((k, v if isinstance(v, str) else json.dumps(v)) for k, v in query.items()))
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode("utf-8"))
        deadline = time.time() + self.patience
        delay = 0.2
        self.retried = False
        while True:
            try:
                if self.conn is None:
                    self.conn = self._connect()
                self.conn.request(method, target, body=data, headers=self.headers)
                resp = self.conn.getresponse()
                raw = resp.read()
                status = resp.status
                if self.skew is None:
                    self._clock(resp.getheader("Date"))
            except (OSError, IOError, ValueError) as e:
                why = e
                status = None
                self.close()
            except Exception as e:  # http.client's own errors (BadStatusLine, RemoteDisconnected ...)
                if type(e).__module__ != "http.client":
                    raise
                why = e
                status = None
                self.close()
            if status is not None and status < 500:
                break
            if status is not None:
                why = "HTTP %d: %s" % (status, raw[:200].decode("utf-8", "replace"))
            self.retried = True
            if time.time() >= deadline:
                raise PoolUnreachable("CouchDB at %s did not answer %s %s for %.0f s (%s): check that the "
                                      "server runs and the URL is right"
                                      % (self.url, method, target.split("?")[0], self.patience, why))
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        if status == 401:
            raise PoolError("CouchDB at %s refused the credentials for database %s (HTTP 401): check the "
                            "user and password (the resource's couchdb_credentials file, or "
                            "PILOTFLOW_COUCHDB_USER / PILOTFLOW_COUCHDB_PASSWORD)" % (self.url, self.database))
        if status == 403:
            raise PoolError("CouchDB at %s: this user may not %s %s of database %s (HTTP 403): ask its admin to "
                            "make the user a member (pilotflow writes tokens and views)"
                            % (self.url, method, target.split("?")[0], self.database))
        return status, raw

    def _clock(self, date):
        if not date:
            return
        try:
            import email.utils
            self.skew = email.utils.mktime_tz(email.utils.parsedate_tz(date)) - time.time()
        except (TypeError, ValueError, OverflowError):
            pass

    def now(self):
        """The server's clock (to the second, from its Date header): heartbeats written by
        nodes with different clocks are compared on one clock."""
        if self.skew is None:
            self.request("GET", "")
        return time.time() + (self.skew if abs(self.skew or 0) >= 2.0 else 0.0)

    def get(self, doc_id, query=None):
        status, doc = self.request("GET", self.docpath(doc_id), query=query)
        return doc if status == 200 else None

    def put(self, doc):
        """The new revision, or None on a conflict (someone else updated it first)."""
        status, ans = self.request("PUT", self.docpath(doc["_id"]), body=doc)
        if status in (200, 201, 202):
            return ans["rev"]
        if status == 409:
            return None
        raise PoolError("CouchDB at %s refused to store %s (HTTP %d: %s)" % (self.url, doc["_id"], status, ans))

    def bulk(self, docs):
        """Store many documents in one request; [(id, rev or None on conflict)]."""
        status, ans = self.request("POST", "_bulk_docs", body={"docs": docs})
        if status not in (200, 201, 202):
            raise PoolError("CouchDB at %s refused a batch of %d documents (HTTP %d: %s)"
                            % (self.url, len(docs), status, ans))
        return [(a.get("id"), a.get("rev") if "error" not in a else None) for a in ans]

    def view(self, design, name, query):
        status, ans = self.request("GET", "_design/%s/_view/%s" % (design, name), query=query)
        if status != 200:
            raise PoolError("CouchDB at %s: view %s/%s of %s failed (HTTP %d: %s)"
                            % (self.url, design, name, self.database, status, ans))
        return ans

    def ensure(self):
        """Create the database if missing."""
        status, ans = self.request("GET", "")
        if status == 404:
            status, ans = self.request("PUT", "")
            if status not in (201, 202, 412):
                raise PoolError("cannot create database %s on %s (HTTP %d: %s)" % (self.database, self.url, status, ans))

    def close(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
            self.conn = None


class Claim(object):
    """A claim in the database: the claimed document as written (the holder's result is the
    next revision of it)."""
    __slots__ = ("doc",)

    def __init__(self, doc):
        self.doc = doc


def picas_fields(rec):
    """PiCaS's fields for a pilotflow state record: PiCaS's views and tools count them."""
    st = rec.get("state")
    if st == TODO:
        return {"lock": 0, "done": 0, "exit_code": ""}
    start = int(rec.get("start") or 0)
    if st == LOCKED:
        return {"lock": max(1, start), "done": 0, "exit_code": "", "hostname": rec.get("host") or ""}
    code = rec.get("exit_code")
    if st == DONE:
        return {"lock": max(1, start), "done": max(1, int(rec.get("end") or 0)), "exit_code": 0,
                "hostname": rec.get("host") or ""}
    return {"lock": max(1, start) if start else 99, "done": max(1, int(rec.get("end") or 0)),
            "exit_code": code if code not in (None, 0) else -1, "hostname": rec.get("host") or ""}


class CouchPool(Pool):
    """A run's token pool in a CouchDB database (see above). ``root`` is a local directory
    for what stays on the node; ``spec`` says where the database is."""

    CONDITIONAL = True
    # a lost race costs a request or two here (an O_EXCL create that fails costs nothing):
    # thieves spread over the back of the queue, as PiCaS's pilots pick at random from a view page
    STEAL_SPREAD = 16

    def __init__(self, root, spec, meta=None, patience=120.0):
        self.root = os.path.abspath(root)
        self.spec = dict(spec)
        self.db = CouchDB(spec["url"], spec["database"], couch_credentials(spec.get("credentials")), patience)
        self.meta = meta if meta is not None else (read_json(os.path.join(self.root, "run.json")) or {})
        self.run = self.meta.get("run") or spec.get("run")
        if not self.meta.get("run") and self.run:  # a node with no run directory: the run's record
            doc = self.db.get("pilotflow-run:" + self.run) or {}
            self.meta = dict(doc.get("meta") or {}, couchdb=self.spec)
        self._docs = {}  # token name → its document as last read (with _rev)
        self._ids = {}  # token name → document id (tokens pushed by PiCaS keep theirs)
        self._seq = None  # where the launcher's look at the changes feed stopped
        self._changed = set()  # tokens the feed reported that the agent has not looked at
        self._fresh = set()  # tokens whose cached document came from the feed and was not read yet
        self._fed = 0.0  # when the feed was last read
        self._agent_docs = {}  # launcher key → its record as this process last wrote it
        self._pending = []  # (name, next document, record): results held back for the next request
        self._width = None
        self._shards = {}

    @classmethod
    def create(cls, root, meta):
        for d in cls.SUBDIRS:
            mkdirs(os.path.join(root, d))
        meta = dict({"format": cls.FORMAT}, **meta)
        write_atomic(os.path.join(root, "run.json"), dump(meta))
        pool = cls(root, meta["couchdb"], meta)
        pool.setup()
        return pool

    def setup(self):
        """The database (if missing), the views, and the run's record (for nodes that do not
        see the run directory)."""
        self.db.ensure()
        self.ensure_views()
        rec = {"_id": "pilotflow-run:" + self.run, "type": "pilotflow-run",
               "meta": dict((k, v) for k, v in self.meta.items() if k != "couchdb")}
        if self.db.put(rec) is None:
            raise PoolError("database %s already holds a run named %s" % (self.db.database, self.run))

    def ensure_views(self):
        """PiCaS's Monitor views and pilotflow's own, where missing (never rewritten: a PiCaS
        user's own views stay as they are)."""
        code = 'function(doc) { if (doc.type == "token") { if (%s) { emit(doc._id, doc._id); } } }'
        views = dict((k, {"map": code % c}) for k, c in MONITOR_VIEWS.items())
        views["overview_total"] = {
            "map": 'function(doc) { if (doc.type == "token") { %s } }' % " ".join(
                "if (%s) { emit('%s', 1); }" % (c, k) for k, c in MONITOR_VIEWS.items()),
            "reduce": "_sum"}
        own = {"tokens": {"map": 'function(doc) { if (doc.type == "token" && doc.pilotflow) '
                                 '{ emit([doc.pilotflow.run, doc._id], null); } }'},
               "agents": {"map": 'function(doc) { if (doc.type == "pilotflow-agent") '
                                 '{ emit([doc.run, doc._id], null); } }'}}
        for name, want in (("Monitor", views), ("pilotflow", own)):
            doc = self.db.get("_design/" + name)
            if doc is None:
                self.db.put({"_id": "_design/" + name, "language": "javascript", "views": want})
            elif name == "Monitor" and [k for k in want if k not in doc.get("views", {})]:
                doc["views"] = dict(want, **doc.get("views", {}))
                self.db.put(doc)

    # documents ------------------------------------------------------------------------------
    def doc_id(self, name):
        return self._ids.get(name) or "%s:%s" % (self.run, name)

    def _remember(self, doc):
        pf = doc.get("pilotflow") or {}
        name = pf.get("name") or doc["_id"]
        self._ids[name] = doc["_id"]
        self._docs[name] = doc
        return name

    def _fetch(self, name):
        self._fresh.discard(name)
        for doc_id in ((self._ids[name],) if name in self._ids else (self.doc_id(name), name)):
            doc = self.db.get(doc_id)  # (a token adopted from PiCaS keeps its own id)
            if doc is not None and (doc.get("pilotflow") or {}).get("run") == self.run:
                self._remember(doc)
                return doc
        return None

    def _scan(self, view, run, docs=True):
        """Every row of the view for ``run`` (keyed [run, id]), a page (one request) at a time:
        the documents, or (``docs`` false) their ids."""
        out = []
        page = COUCH_PAGE if docs else COUCH_PAGE * 10
        query = {"startkey": [run, ""], "endkey": [run, {}], "limit": page}
        if docs:
            query["include_docs"] = "true"
        while True:
            rows = self.db.view("pilotflow", view, query).get("rows") or []
            out.extend((r["doc"] for r in rows if r.get("doc")) if docs else (r["id"] for r in rows))
            if len(rows) < page:
                return out
            query = dict(query, startkey=rows[-1]["key"], skip=1)

    def record_of(self, name, doc):
        """The token's state record, as the file pool's would be. PiCaS's own tools reset a
        token by setting lock and done to 0 (scrub): that is todo, whatever pilotflow wrote."""
        pf = doc.get("pilotflow") or {}
        rec = pf.get("state")
        if not rec:
            return {"token": name, "state": TODO, "attempt": 0, "failures": 0}
        rec = dict(rec, token=name)
        if doc.get("lock") == 0 and doc.get("done") == 0 and rec.get("state") != TODO:
            rec.update(state=TODO, failures=0, exit_code=None,
                       scrubs=int(doc.get("scrub_count") or 0), reason="scrubbed in the database (PiCaS)")
        return rec

    # creation and definitions ------------------------------------------------------------------
    def add_defs(self, tokens):
        """Push token definitions as PiCaS tokens (one request per COUCH_PAGE). A token that
        exists already (a batch pushed again after a lost answer) is left as it is; tokens
        PiCaS's tools pushed (``picas`` in their definition) are adopted where they are."""
        self.adopt([d for d in tokens if d.get("picas")])
        tokens = [d for d in tokens if not d.get("picas")]
        for i in range(0, len(tokens), COUCH_PAGE):
            docs = []
            for d in tokens[i:i + COUCH_PAGE]:
                doc = {"_id": self.doc_id(d["name"]), "type": "token", "lock": 0, "done": 0, "hostname": "",
                       "scrub_count": 0, "input": d.get("command", ""), "exit_code": "",
                       "pilotflow": {"run": self.run, "name": d["name"], "def": d}}
                docs.append(doc)
            self.db.bulk(docs)
        return 0

    def adopt(self, defs):
        """Take tokens PiCaS's own tools pushed into this run where they are (their ids and
        fields stay; pilotflow's key is added): the names adopted. One that a PiCaS pilot
        locked, or another run took, since the bundle was read is left alone."""
        out = []
        for i in range(0, len(defs), COUCH_PAGE):
            page = defs[i:i + COUCH_PAGE]
            status, ans = self.db.request("POST", "_all_docs", body={"keys": [d["name"] for d in page]},
                                          query={"include_docs": "true"})
            if status != 200:
                raise PoolError("CouchDB at %s: reading %d PiCaS tokens failed (HTTP %d)" % (self.db.url, len(page),
                                                                                           status))
            docs = dict((r["key"], r.get("doc")) for r in ans.get("rows") or ())
            batch = []
            for d in page:
                doc = docs.get(d["name"])
                if doc and not doc.get("pilotflow") and doc.get("lock") == 0 and doc.get("done") == 0:
                    batch.append(dict(doc, pilotflow={"run": self.run, "name": d["name"], "def": d}))
            for (doc_id, rev), doc in zip(self.db.bulk(batch), batch) if batch else ():
                if rev:
                    self._ids[doc_id] = doc_id
                    out.append(doc_id)
        return out

    def defs(self, seen=None):
        self._start_feed()  # from before the scan: no change is missed between the two
        docs = self._scan("tokens", self.run)
        out = []
        for doc in docs:
            name = self._remember(doc)
            if seen is not None:
                if name in seen:
                    continue
                seen.add(name)
            out.append(doc["pilotflow"]["def"])
        return out

    def defs_count(self):
        return len(self._scan("tokens", self.run, docs=False))

    def _feed(self):
        """Tokens of this run changed since the launcher last looked (the changes feed)."""
        if self._seq is None or time.time() - self._fed < 0.05:
            return
        self._fed = time.time()
        self._seq, names = self._read_changes(self._seq)
        self._changed.update(names)
        self._fresh.update(names)

    def _read_changes(self, seq):
        """(the feed's new sequence, this run's tokens changed after ``seq``), their documents
        remembered; a request per page of changes."""
        names = []
        while True:
            status, ans = self.db.request("GET", "_changes", query={"since": seq, "include_docs": "true",
                                                                    "limit": COUCH_PAGE})
            if status != 200:
                raise PoolError("CouchDB at %s: the changes feed of %s failed (HTTP %d)" % (self.db.url,
                                                                                        self.db.database, status))
            results = ans.get("results") or []
            for r in results:
                doc = r.get("doc") or {}
                if doc.get("type") == "token" and (doc.get("pilotflow") or {}).get("run") == self.run:
                    names.append(self._remember(doc))
            seq = ans.get("last_seq", seq)
            if len(results) < COUCH_PAGE:
                return seq, names

    def _start_feed(self):
        if self._seq is None:
            status, ans = self.db.request("GET", "")
            self._seq = (ans or {}).get("update_seq", 0)

    def defs_changed(self, seen):
        self._feed()
        return any(n not in seen for n in self._changed)

    def returned(self, seen):
        self._feed()
        out, self._changed = list(self._changed), set()
        return out

    # states --------------------------------------------------------------------------------------
    def latest(self, name, hint=None):
        return int(self.state(name).get("attempt") or 0)

    def state(self, name, hint=None):
        if name in self._fresh:  # the feed just brought it: no request
            self._fresh.discard(name)
            return self.record_of(name, self._docs[name])
        doc = self._fetch(name)
        if doc is None:
            return {"token": name, "state": TODO, "attempt": 0, "failures": 0}
        return self.record_of(name, doc)

    def states(self, since=None):
        return self.defs_and_states(None)[1]

    def defs_and_states(self, seen):
        """Both from one scan of the run's documents (a launcher's start read them twice)."""
        self._start_feed()  # from before the scan: no change is missed between the two
        defs, states = [], {}
        for doc in self._scan("tokens", self.run):
            name = self._remember(doc)
            states[name] = self.record_of(name, doc)
            if seen is not None:
                if name in seen:
                    continue
                seen.add(name)
            defs.append(doc["pilotflow"]["def"])
        return defs, states

    def changes(self, since):
        """(cursor, states changed since it): the database's changes feed, from its sequence."""
        if since is None:
            status, info = self.db.request("GET", "")
            seq = (info or {}).get("update_seq", 0)
            return seq, self.states()
        seq, names = self._read_changes(since)
        return seq, dict((n, self.record_of(n, self._docs[n])) for n in names)

    @staticmethod
    def _next(doc, rec, attachments=None):
        """The next revision of a token's document, holding ``rec``."""
        new = dict(doc)
        new.update(picas_fields(rec))
        new["pilotflow"] = dict(doc.get("pilotflow") or {}, state=rec)
        if attachments is not None:
            new["_attachments"] = attachments
        return new

    def _stored(self, name, new, rev, rec, retried):
        """The document as stored (``rev``), or None if the update conflicted."""
        if rev is None:
            self._docs.pop(name, None)
            if not retried:
                return None
            # our own write may have landed with its answer lost with the connection (the
            # retry then conflicts with it): ours if the database holds what we wrote
            cur = self._fetch(name)
            if cur is None or (cur.get("pilotflow") or {}).get("state") != rec:
                return None
            return cur
        new = dict(new, _rev=rev)
        if "_attachments" in new:  # what a read would give back
            new["_attachments"] = dict((k, {"stub": True}) for k in new["_attachments"])
        self._docs[name] = new
        return new

    def _write(self, name, doc, rec, attachments=None):
        """The token's next revision holding ``rec`` (with the results waiting to be written,
        in one request): its new document, or None (conflict)."""
        new = self._next(doc, rec, attachments)
        if self._pending:
            return self.flush(extra=(name, new, rec)).get(name)
        out = self._stored(name, new, self.db.put(new), rec, self.db.retried)
        if out is None and not self.db.retried:
            self._feed()  # our view was old: bring it up to date in one request
        return out

    def flush(self, extra=None):
        """Write the results held back (``append(..., later=True)``) and ``extra`` (name, doc,
        record) in one request: {name: stored document or None}. A held-back result that
        conflicts (its attempt was handed back meanwhile) is void; the agent rechecks it."""
        items, self._pending = self._pending, []
        if extra is not None:
            items.append(extra)
        if not items:
            return {}
        answers = self.db.bulk([doc for _, doc, _ in items])
        retried = self.db.retried
        out = {}
        lost = False
        for (name, doc, rec), (_, rev) in zip(items, answers):
            out[name] = self._stored(name, doc, rev, rec, retried)
            if out[name] is None:
                lost = True
                self._changed.add(name)
        if lost and not retried:
            self._feed()
        return out

    # transitions -------------------------------------------------------------------------------------
    def claim(self, name, attempt, record, keep=False):
        rec = json.loads(record.decode("utf-8")) if isinstance(record, bytes) else record
        doc = self._docs.get(name) or self._fetch(name)
        if doc is None:
            return False
        cur = self.record_of(name, doc)
        if int(cur.get("attempt") or 0) != attempt - 1 or cur.get("state") != TODO:
            return False  # the agent learns the news from the feed (``returned``)
        new = self._write(name, doc, dict(rec, attempt=attempt))
        if new is None:
            return False
        return Claim(new) if keep else True

    def append(self, handle, name, doc, later=False):
        """The holder's result: the next revision of the document it claimed, with the
        attempt's output attached. A conflict means the attempt was handed back meanwhile:
        the result is void (False). ``later``: held back and written with the next claim or
        ``flush`` (one request for both; the agent flushes every turn of its loop)."""
        if later:
            self._pending.append((name, self._next(handle.doc, doc, self._attachments(doc)), doc))
            return True
        return self._write(name, handle.doc, doc, self._attachments(doc)) is not None

    def close_claim(self, handle):
        pass

    def current(self, tokens):
        """One scan of the run's tokens (a request per page) rather than one per token."""
        if len(tokens) <= 2:
            return [(t, self.state(t.name)) for t in tokens]
        states = self.states()
        return [(t, states.get(t.name) or self.state(t.name)) for t in tokens]

    def put(self, name, doc):
        for _ in range(10):
            cur = self._fetch(name)
            if cur is None:
                raise PoolError("token %s is not in database %s" % (name, self.db.database))
            if self._write(name, cur, doc) is not None:
                return
        raise PoolError("token %s of database %s kept changing while written" % (name, self.db.database))

    def release(self, name, doc, reason, give_up_after=None):
        """Hand a lost attempt back exactly once: written only over the revision that still
        holds that attempt locked."""
        attempt = int(doc.get("attempt", 0))
        cur = self._fetch(name)
        if cur is None:
            return None
        now = self.record_of(name, cur)
        if now.get("state") != LOCKED or int(now.get("attempt") or 0) != attempt:
            return None
        lost = int(now.get("lost", 0)) + 1
        new = dict(now, state=TODO, lost=lost, end=now.get("end") or time.time(), reason=reason, exit_code=None)
        if give_up_after is not None and lost > give_up_after:
            new.update(state=ERROR, reason="%s; lost %d times, giving up" % (reason, lost))
        if self._write(name, cur, new) is None:
            return None
        return new

    def released(self, name, attempt):
        cur = self._fetch(name)
        if cur is None:
            return True
        now = self.record_of(name, cur)
        return int(now.get("attempt") or 0) != attempt or now.get("state") == TODO

    def note_return(self, name, attempt):
        pass  # the changes feed tells idle launchers

    def move_out(self, names, to):
        raise PoolError("tokens of a CouchDB pool are not moved to other resources")

    def _attachments(self, doc):
        """The attempt's stdout and stderr, each capped at LOG_CAP bytes (the tail kept)."""
        out = {}
        log = doc.get("log")
        import base64
        for i, stream in enumerate(("out", "err")):
            try:
                if log and len(log) >= 5:
                    with open(self.path("logs", "%s.%s" % (log[0], stream)), "rb") as f:
                        start, end = int(log[1 + i]), int(log[3 + i])
                        f.seek(max(start, end - LOG_CAP))
                        data = f.read(min(end - start, LOG_CAP))
                        cut = end - start - len(data)
                elif not log:
                    path = self.path("logs", "%s.%d.%s" % (doc["token"], int(doc.get("attempt") or 0), stream))
                    size = os.path.getsize(path)
                    with open(path, "rb") as f:
                        f.seek(max(0, size - LOG_CAP))
                        data = f.read()
                        cut = size - len(data)
                else:
                    continue
            except (OSError, ValueError):
                continue
            if not data:
                continue  # nothing printed: no attachment (one less blob per quiet task)
            if cut > 0:
                data = ("[pilotflow: %d earlier bytes cut]\n" % cut).encode("utf-8") + data
            out["std%s.txt" % stream] = {"content_type": "text/plain",
                                         "data": base64.b64encode(data).decode("ascii")}
        return out

    def output(self, name):
        """The latest ended attempt's stdout and stderr, from the token's attachments."""
        out = {}
        for stream in ("out", "err"):
            if name not in self._ids:
                self._fetch(name)
            status, data = self.db.send("GET", self.db.docpath(self.doc_id(name)) + "/std%s.txt" % stream)
            out[stream] = data.decode("utf-8", "replace") if status == 200 else ""
        return out

    # launchers' records ---------------------------------------------------------------------------------
    def _agent_id(self, key):
        return "pilotflow-agent:%s:%s" % (self.run, key)

    def write_agent(self, key, rec):
        for _ in range(5):
            cur = self.db.get(self._agent_id(key)) or {"_id": self._agent_id(key)}
            doc = dict(cur, type="pilotflow-agent", run=self.run, key=key, record=rec, beat=self.now())
            doc.pop("end", None)
            rev = self.db.put(doc)
            if rev is not None:
                self._agent_docs[key] = dict(doc, _rev=rev)
                return
        raise PoolError("the record of launcher %s in database %s kept changing while written" % (key, self.db.database))

    def beat_agent(self, key):
        """One PUT over the revision this launcher wrote last (another read only if someone
        else wrote its record meanwhile)."""
        for _ in range(5):
            cur = self._agent_docs.get(key) or self.db.get(self._agent_id(key))
            if cur is None:
                return False
            cur = dict(cur, beat=self.now())
            rev = self.db.put(cur)
            if rev is not None:
                self._agent_docs[key] = dict(cur, _rev=rev)
                return True
            self._agent_docs.pop(key, None)
        return True

    def agent_end(self, key):
        return (self.db.get(self._agent_id(key)) or {}).get("end")

    def end_agent(self, key, end):
        for _ in range(5):
            cur = self.db.get(self._agent_id(key)) or {"_id": self._agent_id(key), "type": "pilotflow-agent",
                                                       "run": self.run, "key": key, "record": {}, "beat": self.now()}
            cur["end"] = end
            if self.db.put(cur) is not None:
                self._agent_docs.pop(key, None)
                return

    def agents(self):
        out = {}
        for doc in self._scan("agents", self.run):
            rec = dict(doc.get("record") or {}, beat=float(doc.get("beat") or 0))
            if doc.get("end") is not None:
                rec["end"] = doc["end"]
            out[doc["key"]] = rec
        return out

    def now(self):
        return self.db.now()


def open_pool(root, spec=None, patience=120.0):
    """The pool at ``root``: a CouchDB pool when its run.json (or ``spec``) names a database.
    ``patience``: how long a database that does not answer is retried (a launcher rides out a
    server restart; a client command says so sooner)."""
    meta = read_json(os.path.join(os.path.abspath(root), "run.json"))
    spec = spec or (meta or {}).get("couchdb")
    if spec:
        if meta is None:  # a node with no run directory: a local one, the run's record from the database
            for d in Pool.SUBDIRS:
                mkdirs(os.path.join(root, d))
        pool = CouchPool(root, spec, meta, patience)
        if meta is None:
            if not pool.meta.get("run"):
                raise PoolError("database %s on %s holds no run %s" % (spec["database"], spec["url"], spec.get("run")))
            write_atomic(os.path.join(pool.root, "run.json"), dump(pool.meta))  # the reaper reopens it
        return pool
    return Pool(root)


HISTORY = 5  # earlier attempts a token's record keeps (its file holds only the newest attempt)
HISTORY_KEYS = ("attempt", "state", "start", "end", "pilot", "agent", "host", "exit_code", "reason", "log", "gpus")


def earlier(doc):
    """The earlier attempts a token's next record carries: those its current record carries,
    and the current one itself once it has ended (a report can show them all)."""
    out = list(doc.get("history") or ())
    if int(doc.get("attempt") or 0) >= 1 and doc.get("state") != LOCKED:
        out.append(dict((k, doc[k]) for k in HISTORY_KEYS if k in doc))
    return tuple(out[-HISTORY:])


def agent_key(doc):
    return "%s.%s" % (doc.get("pilot"), doc.get("agent", 0))


def mkdirs(path):
    try:
        os.makedirs(path)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise


# --- tokens in a launcher's memory ----------------------------------------------------------

class Token(object):
    __slots__ = ("name", "command", "shell", "cores", "walltime", "memory", "env", "deps", "retries", "rank",
                 "stage", "own", "status", "attempt", "failures", "lost", "unmet", "queued", "scrubs",
                 "nodes", "mpi", "ranks", "ranks_per_node", "gpus", "gpu_ids", "gpu_held", "lane", "log", "history",
                 "claim_fd", "ended", "beat0")

    def __init__(self, d, rank):
        self.name = d["name"]
        self.command = d["command"]
        # the shell that runs the command as ``SHELL -c COMMAND`` (a Snakemake job run directly
        # uses Snakemake's shell, bash); a name is looked up in the task's PATH
        self.shell = d.get("shell") or None
        self.cores = int(d.get("cores", 1))
        self.walltime = float(d.get("walltime", 600))
        self.memory = int(d.get("memory") or 0)
        self.env = d.get("env") or []
        self.deps = d.get("after") or []
        self.retries = int(d.get("retries", 0))
        self.nodes = int(d.get("nodes", 1))  # > 1: whole nodes at once, started by the pilot's leader
        self.mpi = bool(d.get("mpi", False))
        self.ranks = int(d.get("ranks", 0))
        self.ranks_per_node = int(d.get("ranks_per_node", 0))
        self.gpus = int(d.get("gpus", 0))
        self.gpu_ids = None  # the devices of its current (or last) attempt
        self.gpu_held = False  # whether it holds them now
        self.lane = None  # the packed-log lane of its current attempt
        self.log = None  # where its current attempt's output is: [lane, out start, err start(, ends)]
        self.history = ()  # its earlier attempts, as its record keeps them (see HISTORY)
        self.claim_fd = None  # its current attempt's file, held open to append the result
        self.ended = None  # when its current attempt was seen to end (its result is written later)
        self.beat0 = 0.0  # our last heartbeat before its current attempt started
        self.rank = rank
        self.stage = 0
        self.own = False
        self.status = TODO  # TODO | "other" (claimed elsewhere, not known final) | LOCKED (ours) | DONE | ERROR
        self.attempt = 0
        self.failures = 0
        self.lost = 0
        self.scrubs = 0
        self.unmet = 0
        self.queued = False


# --- the reaper: tasks never outlive their launcher -------------------------------------------

def start_reaper(pool_root, pilot, agent):
    """Fork a watcher in its own session that holds the read end of a pipe. If the launcher
    dies, even by SIGKILL, the pipe closes and the watcher kills the tasks still registered
    and hands their tokens back to todo. Returns (write end, pid), or (None, None)."""
    r, w = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        return None, None
    if pid:
        os.close(r)
        return w, pid
    try:
        os.close(w)
        os.setsid()
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(s, signal.SIG_IGN)
        live = {}
        buf = b""
        os.set_blocking(r, False)
        eof = False
        while not eof:
            # a look every REAPER_NAP seconds, not a wake-up per message: the launcher's
            # writes then wake nobody (two context switches per task on the pilot's cores)
            time.sleep(REAPER_NAP)
            while True:
                try:
                    chunk = os.read(r, 65536)
                except (BlockingIOError, InterruptedError):
                    break
                if not chunk:
                    eof = True
                    break
                buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                parts = line.decode("utf-8").split(" ")
                if parts[0] == "+":
                    live[int(parts[1])] = (parts[2], int(parts[3]))
                elif parts[0] == "-":
                    live.pop(int(parts[1]), None)
        if live:
            kill_groups(list(live), grace=0.0)
            pool = open_pool(pool_root)
            for pgid, (name, attempt) in live.items():
                doc = pool.state(name, hint=attempt)
                if doc.get("state") == LOCKED and doc.get("attempt") == attempt:
                    pool.release(name, doc, "launcher of pilot %s died; its task was killed" % pilot)
    finally:
        os._exit(0)


def kill_groups(pgids, grace, reap=False):
    """SIGTERM (then SIGKILL after ``grace`` seconds) every process group; wait until gone.

    With ``reap`` (a dict), our own children are reaped meanwhile (a zombie child keeps its
    group "alive" until its parent reaps it) and their wait statuses kept in it by pid."""
    for sig in ((signal.SIGTERM, signal.SIGKILL) if grace > 0 else (signal.SIGKILL,)):
        for g in pgids:
            try:
                os.killpg(g, sig)
            except OSError:
                pass
        deadline = time.time() + (grace if sig == signal.SIGTERM else 5.0)
        while time.time() < deadline:
            if reap is not False:
                _reap_all(reap if isinstance(reap, dict) else None)
            if not [g for g in pgids if _group_alive(g)]:
                return
            time.sleep(0.02)


def _reap_all(statuses=None):
    try:
        while True:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid <= 0:
                break
            if statuses is not None:
                statuses[pid] = status
    except OSError:
        pass


def _group_alive(pgid):
    """Whether any process of the group is still running (zombies do not count)."""
    try:
        os.killpg(pgid, 0)
    except OSError as e:
        if e.errno != errno.EPERM:
            return False
    if not os.path.isdir("/proc"):
        return True
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d, "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IOError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


# --- the node agent ----------------------------------------------------------------------------

class Agent(object):
    """One launcher: claims tokens for one node's cores until no claimable work remains.

    Claim order (the planner's simulator follows the same policy): the claimable token of
    best rank that fits the free cores, free memory and remaining walltime, among the
    pilot's own planned tokens; once those are all claimed, other tokens of the same or an
    earlier stage, taken from the back of the rank order (work stealing: the thief takes
    what its owner would run last), and only ones claimable for ``steal_delay`` seconds so
    that their owner gets them first.

    It exits when nothing is claimable and nothing is worth waiting for: own tokens whose
    dependencies still run elsewhere, stealable tokens still inside their steal delay, and
    tokens held by launchers whose heartbeat went quiet (taken over once stale).
    """

    def __init__(self, pool, pilot, agent=0, cores=1, memory=0, walltime=None, stage=0,
                 lock_timeout=None, idle_timeout=0.0, poll=0.5, steal_delay=1.0, warn_grace=10.0,
                 deadline=None, mpi="mpiexec", node=None, gpus=(), mpi_plugin=None):
        self.pool = pool
        self.pilot = pilot
        self.agent = agent
        self.key = "%s.%d" % (pilot, agent)
        self.cores = self.free = cores
        self.memory = self.mem_free = memory  # 0: not limited
        self.started = time.time()
        self.last_beat = 0.0  # when our heartbeat was last written
        self.idle_s = 0.0  # seconds with no task running (in its end record; status and report show it)
        self.idle_since = self.started
        if deadline is None and walltime:
            deadline = self.started + walltime
        self.deadline = deadline  # when the scheduler ends the pilot (None: never)
        # what still runs shortly before the end is stopped and handed back, so a follow-up
        # pilot can take it without waiting for a lock to go stale
        self.handback = None if deadline is None else deadline - handback_guard(deadline - self.started)
        self.stage = stage
        self.lock_timeout = lock_timeout if lock_timeout else pool.lock_timeout()
        self.idle_timeout = idle_timeout
        self.poll = poll
        self.steal_delay = steal_delay
        self.warn_grace = warn_grace
        self.host = node or node_name()
        self.mpi = mpi  # how ranks start: srun | mpirun (Open MPI's, daemons through srun) | mpiexec
        self.mpi_plugin = mpi_plugin  # srun --mpi=...; None: the site's default
        self.gpu_all = list(gpus)  # this node's devices for the pilot's tasks
        self.gpu_free = list(gpus)
        # task output: packed into per-launcher lane files (one task at a time per lane, its
        # offsets in its state), or one file per stream and attempt (logs = "per-token")
        self.per_token_logs = pool.meta.get("logs") == "per-token"
        self.lanes = {}  # lane → (out fd, err fd)
        self.lane_free = []
        self.gang_pilot = False  # the pilot has multi-node tokens: its agents coordinate
        self.gangs = {"draining": None, "running": []}  # the leader's reservations (agents/PILOT.gangs.json)
        self.gangs_mtime = None
        self.gang_pids = {}  # leader: pid → reservation of a running gang
        self.busy_written = None
        self.tokens = {}
        self.ready_own = []
        self.ready_other = []
        self.ready_since = {}
        self.waiting_on = {}  # dep name → tokens waiting for it
        self.own_open = set()  # own tokens in todo (claimable or blocked): no stealing while any
        self.running = {}  # pid → (token, start)
        self.unwritten = []  # (token, state) that a full disk kept us from writing
        self.blocked_until = 0.0
        self.disk_since = 0.0
        self.suspects = []  # (seen, token, start, code): killed by a signal, maybe by our scheduler
        self.returns_seen = {}  # notes file → bytes read
        self.defs_seen = set()
        self.stopping = None
        self.exit_reason = "no claimable work left"
        self.reaper = None
        self.reaper_buf = []  # "-" lines not yet written (they go with the next "+")
        self.ran = 0
        self.taken_over = 0  # tokens of stale launchers this one handed back
        env = dict(os.environ)
        env["PILOTFLOW_RUN"] = pool.meta.get("run", os.path.basename(pool.root))
        env["PILOTFLOW_PILOT"] = pilot
        self.base_env = env

    # what we know of tokens -------------------------------------------------------------
    def set_status(self, t, status):
        t.status = status
        if t.own:
            if status == TODO:
                self.own_open.add(t.name)
            else:
                self.own_open.discard(t.name)

    def load(self):
        """Read new definition batches (all of them the first time) and the pilots' plans."""
        plans = self.pool.plans()
        mine = plans.get(self.pilot, {})
        self.stage = mine.get("stage", self.stage)
        owner_stage = {}
        for p in sorted(plans.values(), key=lambda d: (d.get("created", 0), _pilot_number(d["pilot"]))):
            for name in p.get("tokens", []):
                owner_stage[name] = (p["pilot"], p.get("stage", 0))
        own_order = dict((n, i) for i, n in enumerate(mine.get("tokens", [])))
        defs, known = self.pool.defs_and_states(self.defs_seen)
        new = [Token(d, d.get("rank", len(self.tokens) + i)) for i, d in enumerate(defs)]
        for t in new:
            owner = owner_stage.get(t.name)
            t.stage = owner[1] if owner else 0
            t.own = owner is not None and owner[0] == self.pilot
            if t.own:
                t.rank = own_order.get(t.name, t.rank)
            self.tokens[t.name] = t
            doc = known.get(t.name) if known is not None else self.pool.state(t.name)
            if doc is not None and (doc.get("attempt") or doc.get("state") != TODO):
                self.absorb(t, doc)
            else:
                self.set_status(t, TODO)
        for t in new:
            self.link(t)
        self.gang_pilot = self.gang_pilot or any(t.own and t.nodes > 1 for t in new)
        return len(new)

    def absorb(self, t, doc):
        """Take what a state file says about a token into our view of it."""
        st = doc.get("state", TODO)
        t.history = earlier(doc)
        t.attempt = int(doc.get("attempt", 0))
        t.failures = int(doc.get("failures", 0))
        t.lost = int(doc.get("lost", 0))
        t.scrubs = int(doc.get("scrubs", 0))
        self.set_status(t, st if st in FINAL or st == TODO else "other")

    def link(self, t):
        """Count unmet dependencies and queue the token if it is claimable."""
        if t.status != TODO:
            return
        t.unmet = 0
        for dep in t.deps:
            d = self.tokens.get(dep)
            if d is not None and d.status == ERROR:
                self.fail_dependant(t, dep)
                return
            if d is None or d.status != DONE:
                t.unmet += 1
                self.waiting_on.setdefault(dep, []).append(t)
        if t.unmet == 0:
            self.enqueue(t)

    def enqueue(self, t):
        if t.queued or t.status != TODO:
            return
        t.queued = True
        if t.own:
            _insort(self.ready_own, (t.rank, t.name))
        else:
            _insort(self.ready_other, (t.rank, t.name))
            self.ready_since[t.name] = time.time()

    # the loop -------------------------------------------------------------------------------
    def run(self):
        self.install_signals()
        self.reaper, self.reaper_pid = start_reaper(self.pool.root, self.pilot, self.agent)
        self.record()
        self.load()
        self.write_busy(force=True)
        os.chdir(self.pool.workdir())
        last_beat = last_poll = last_stale = time.time()
        idle_since = time.time()
        sleep = self.poll
        beat_every = max(0.5, min(30.0, self.lock_timeout / 5.0))
        while True:
            ended = self.reap()
            # start the next tasks before writing the states of the ended ones: the state
            # writes then overlap with running tasks instead of leaving cores idle
            writable = self.flush_unwritten() and time.time() >= self.blocked_until
            if self.gang_pilot and self.agent == 0 and writable and not self.stopping:
                self.lead()
            started = 0 if self.stopping or not writable else self.fill()
            self.conclude(ended)
            self.settle_suspects()
            if ended and not self.stopping and not self.unwritten:
                started += self.fill()
            self.pool.flush()  # results held back for this turn's claims: written by now
            if self.reaper_buf:
                self.tell_reaper("")  # ends not sent with a start
            if self.stopping == "term":
                break
            now = time.time()
            if self.handback is not None and now >= self.handback:
                self.exit_reason = "walltime nearly over: tokens handed back"
                break
            if now - last_beat >= beat_every:
                self.beat()
                last_beat = now
            if started or self.running:
                idle_since = now
                sleep = self.poll
            if self.running or self.suspects or (self.gang_pilot and self.gang_busy()):
                if self.free > 0 and now - last_poll >= max(self.poll, 1.0) and not self.stopping:
                    self.refresh()  # free cores: look for work others made claimable
                    last_poll = now
                self.wait(min(sleep, beat_every, 0.25 if self.suspects else sleep))
                continue
            if self.stopping:
                break
            changed = self.refresh()
            if now - last_stale >= max(1.0, self.lock_timeout / 4.0):
                changed += self.take_over_stale()
                last_stale = now
            if changed:
                sleep = self.poll
                continue
            if not self.worth_waiting() and now - idle_since >= self.idle_timeout:
                # a last look before leaving: a quiet launcher may have gone stale since the
                # last check (it is no longer "quiet", and not yet taken over)
                before = self.taken_over
                self.take_over_stale()
                last_stale = now
                if self.taken_over > before:
                    continue
                break
            self.wait(sleep)
            sleep = min(sleep * 1.5, 5.0)
        self.shutdown()
        if self.stopping != "term":  # a cancel or a kill is not a reason to carry on
            self.renew()
        return 0

    def fill(self):
        """Claim and start tasks while something fits; returns how many started."""
        n = 0
        room = None if self.handback is None else self.handback - time.time()
        if self.gang_pilot:
            mine = self.my_reservation()
            if mine == "running":
                return 0  # our node runs a gang
            if mine is not None:  # reserved for a gang: only what ends before it starts
                room = mine - time.time() if room is None else min(room, mine - time.time())
        while self.free > 0:
            t = self.pick(self.ready_own, room, False)
            if t is None and not self.own_open:
                t = self.pick(self.ready_other, room, True)
            if t is None:
                break
            t.attempt += 1
            now = time.time()
            self.take_gpus(t)
            try:
                self.take_lane(t)
                lock = self.doc(t, LOCKED, start=now, end=None, exit_code=None, reason="", pid=os.getpid())
                mine = self.pool.claim(t.name, t.attempt, dump(lock), keep=True)
            except OSError as e:  # a full disk or quota: keep the token, try again later
                t.attempt -= 1
                self.give_gpus(t)
                self.give_lane(t)
                self.enqueue(t)
                self.disk_trouble(e)
                break
            if not mine:
                t.attempt -= 1
                self.give_gpus(t)
                self.give_lane(t)
                self.set_status(t, "other")
                continue
            t.claim_fd = mine
            self.start(t, now)
            n += 1
        return n

    def disk_trouble(self, e):
        """Writes to the pool fail (ENOSPC, EDQUOT, EIO...): say so once, stop claiming for a
        while; finished results wait in memory and are written when space comes back."""
        if not self.blocked_until:
            sys.stderr.write("pilotflow-launcher %s: cannot write to the pool (%s); waiting\n" % (self.key, e))
            self.disk_since = time.time()
        self.blocked_until = time.time() + 2.0

    def flush_unwritten(self):
        """Write the states that could not be written before; True when none are left."""
        while self.unwritten:
            name, doc = self.unwritten[0]
            try:
                self.pool.put(name, doc)
                if doc.get("state") == TODO:
                    self.pool.note_return(name, doc.get("attempt", 0))
            except OSError as e:
                self.disk_trouble(e)
                return False
            self.unwritten.pop(0)
        if self.blocked_until and time.time() >= self.blocked_until:
            self.blocked_until = 0.0
        return True

    def pick(self, ready, room, stealing):
        """The first fitting token (from the back when stealing); it leaves the ready list."""
        now = time.time()
        order = range(len(ready) - 1, -1, -1) if stealing else range(len(ready))
        drop = []
        found = None
        spread = self.pool.STEAL_SPREAD if stealing else 1
        fitting = []
        for i in order:
            t = self.tokens[ready[i][1]]
            if t.status != TODO:
                drop.append(i)
                continue
            if t.nodes > 1:
                continue  # whole-node gangs are started by the pilot's leader only
            if (t.cores <= self.free and (not self.memory or t.memory <= self.mem_free)
                    and t.gpus <= len(self.gpu_free) and (room is None or t.walltime <= room)
                    and (not stealing or (t.stage <= self.stage
                                          and now - self.ready_since.get(t.name, 0) >= self.steal_delay))):
                fitting.append(i)
                if len(fitting) >= spread:
                    break
        if fitting:
            i = fitting[0] if len(fitting) == 1 else random.choice(fitting)
            found = self.tokens[ready[i][1]]
            drop.append(i)
        for i in sorted(drop, reverse=True):
            self.tokens[ready[i][1]].queued = False
            del ready[i]
        return found

    def start(self, t, now):
        t.ended = None
        t.beat0 = self.last_beat
        env = dict(self.base_env)
        env["PILOTFLOW_TOKEN"] = t.name
        env["PILOTFLOW_CORES"] = str(t.cores)
        env["PILOTFLOW_ATTEMPT"] = str(t.attempt)
        if self.gpu_all:  # each task sees only its own devices, in every vendor's variable
            ids = ",".join(t.gpu_ids or ())
            for var in GPU_VARS:
                env[var] = ids
            env["PILOTFLOW_GPUS"] = ids
            env.pop("HIP_VISIBLE_DEVICES", None)  # would index into ROCR's list, not the node's
        for k, v in t.env:
            env[k] = v
        self.set_status(t, LOCKED)
        argv = None
        if t.mpi:  # ranks on this node, through the scheduler's launcher
            n = t.ranks or t.cores
            hosts = self.pool.path("logs", "%s.%d.hosts" % (t.name, t.attempt))
            argv = mpi_argv(self.mpi, t, [(self.host, n)], hosts, max(1, t.cores // n), env,
                            self.mpi_plugin)
        elif t.shell:
            argv = [t.shell, "-c", t.command]
        direct = None if argv else plain_argv(t.command, env)
        if direct:
            path, argv = direct
        else:
            path = None
        try:
            pid = spawn(t.command, env, *self.outputs(t), argv=argv, path=path)
        except OSError as e:
            self.give_lane(t)
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS):
                self.drop_claim(t)
                self.disk_trouble(e)  # cannot create its log files: not the task's fault
                self.unwritten.append((t.name, self.doc(t, TODO, start=now, end=time.time(), exit_code=None,
                                                        reason="could not create its log files: %s" % e)))
                self.set_status(t, TODO)
                self.give_gpus(t)
                self.enqueue(t)
                return
            self.give_gpus(t)
            self.finish(t, now, 127, "could not start %s: %s" % ((argv or ["/bin/sh"])[0], e))
            return
        self.busy_from(now)
        self.running[pid] = (t, now)
        self.free -= t.cores
        self.mem_free -= t.memory
        self.ran += 1
        self.tell_reaper("+ %d %s %d\n" % (pid, t.name, t.attempt))
        self.write_busy()

    def conclude(self, ended):
        """Results of tasks that ended; a task killed by SIGTERM/SIGKILL is only a suspect:
        a scheduler cancelling the job signals the tasks and us together, in no set order,
        and a task lost to our own end is handed back, not failed."""
        for t, start, code in ended:
            if code in (128 + signal.SIGTERM, 128 + signal.SIGKILL):
                self.suspects.append((time.time(), t, start, code))
            else:
                self.finish(t, start, code, "")

    def settle_suspects(self, final=False):
        """Tasks killed by SIGTERM/SIGKILL: handed back if we are stopping too (the job is
        being cancelled or timed out), failures if we are not after half a second."""
        while self.suspects and (self.stopping or final or time.time() - self.suspects[0][0] > 0.5):
            _, t, start, code = self.suspects.pop(0)
            if self.stopping:
                self.drop_claim(t)
                self.pool.release(t.name, self.doc(t, LOCKED, start=start, end=time.time()),
                                  "pilot %s stopped (%s)" % (self.pilot, self.exit_reason))
                self.set_status(t, "other")
            else:
                self.finish(t, start, code, "")

    def take_gpus(self, t):
        t.gpu_ids = None
        if t.gpus and t.nodes == 1:
            t.gpu_ids, self.gpu_free = self.gpu_free[:t.gpus], self.gpu_free[t.gpus:]
            t.gpu_held = True

    def give_gpus(self, t):
        """Its devices back to the node's free list (in the node's own order), exactly once;
        ``gpu_ids`` stays, for the attempt's state record."""
        if t.gpu_held:
            back = set(t.gpu_ids) | set(self.gpu_free)
            self.gpu_free = [g for g in self.gpu_all if g in back]
            t.gpu_held = False

    def take_lane(self, t):
        """A lane of the packed log files for the attempt; its start offsets go into its
        lock record (a launcher that dies leaves its output there, marked as cut)."""
        t.lane, t.log = None, None
        if self.per_token_logs:
            return
        lane = self.lane_free.pop(0) if self.lane_free else len(self.lanes)
        if lane not in self.lanes:
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
            base = self.pool.path("logs", "%s.%d" % (self.key, lane))
            out = os.open(base + ".out", flags, 0o644)
            try:
                err = os.open(base + ".err", flags, 0o644)
            except OSError:
                os.close(out)
                self.lane_free.insert(0, lane)
                raise
            self.lanes[lane] = (out, err)
        t.lane = lane
        out, err = self.lanes[lane]
        # compact (a client keeps a record per token): [lane, out start, err start(, out end, err end)]
        t.log = ["%s.%d" % (self.key, lane), os.fstat(out).st_size, os.fstat(err).st_size]

    def give_lane(self, t):
        """The attempt's output ends here: its end offsets are recorded, the lane is free."""
        if t.lane is None:
            return
        if len(t.log) == 3:
            out, err = self.lanes[t.lane]
            try:
                t.log += [os.fstat(out).st_size, os.fstat(err).st_size]
            except OSError:
                pass
        self.lane_free.append(t.lane)
        self.lane_free.sort()
        t.lane = None

    def outputs(self, t):
        """What the task's stdout and stderr are: the lane's files, or files of its own."""
        if t.lane is not None:
            return self.lanes[t.lane]
        base = self.pool.path("logs", "%s.%d" % (t.name, t.attempt))
        return base + ".out", base + ".err"

    def doc(self, t, state, **kw):
        d = {"token": t.name, "state": state, "attempt": t.attempt, "failures": t.failures, "lost": t.lost,
             "scrubs": t.scrubs, "pilot": self.pilot, "agent": self.agent, "host": self.host}
        if t.gpu_ids:
            d["gpus"] = list(t.gpu_ids)
        if t.log:
            d["log"] = t.log
        if t.history:
            d["history"] = list(t.history)
        d.update(kw)
        return d

    def reap(self):
        """Collect ended tasks and free their cores; returns [(token, start, exit code)]."""
        ended = []
        while self.running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except OSError as e:
                if e.errno == errno.ECHILD:
                    self.running.clear()
                break
            if pid == 0:
                break
            item = self.running.pop(pid, None)
            if item is None:
                continue
            t, start = item
            t.ended = time.time()
            if not self.running:
                self.idle_since = t.ended
            gang = self.gang_pids.pop(pid, None)
            if gang is not None:
                self.end_gang(gang)
            else:
                self.free += t.cores
                self.mem_free += t.memory
                self.give_gpus(t)
            self.give_lane(t)
            self.tell_reaper("- %d\n" % pid, later=True)
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
            ended.append((t, start, code))
        if ended:
            self.write_busy()
        return ended

    def drop_claim(self, t):
        """Close the attempt's file if we still hold it open (its result is not appended)."""
        fd, t.claim_fd = t.claim_fd, None
        if fd is not None:
            try:
                self.pool.close_claim(fd)
            except OSError:
                pass
            return True
        return False

    def write_result(self, t, doc):
        """The attempt's result into its file: appended to the claim we hold open (no new
        file), or the file rewritten (tmp + rename) when we do not hold it."""
        fd, t.claim_fd = t.claim_fd, None
        if fd is None:
            self.pool.put(t.name, doc)
            return None
        try:
            # a result nothing here waits for may go with the next claim (a database pool
            # writes both in one request); one that wakes dependants is written now
            return self.pool.append(fd, t.name, doc, later=t.name not in self.waiting_on)
        finally:
            self.pool.close_claim(fd)

    def finish(self, t, start, code, reason):
        # the end it was reaped at: its result is written after the next tasks started
        end = t.ended or time.time()
        # others hand an attempt back only once our heartbeat is older than lock_timeout: not
        # if it never was older than half of that while the task ran (two looks at files saved)
        if (not (self.pool.CONDITIONAL and t.claim_fd is not None) and end - t.beat0 >= self.lock_timeout / 2.0
                and self.pool.released(t.name, t.attempt)):
            # handed back while it ran (we looked dead to others): the result is void
            t.ended = None
            self.drop_claim(t)
            self.set_status(t, "other")
            return
        t.ended = None
        if code == 0:
            self.set_status(t, DONE)
            doc = self.doc(t, DONE, start=start, end=end, exit_code=0, reason="")
        else:
            t.failures += 1
            why = reason or ("exit code %d" % code if code < 128 else "killed by signal %d" % (code - 128))
            if t.failures <= t.retries:
                self.set_status(t, TODO)
                why = "attempt %d failed (%s); will retry" % (t.attempt, why)
            else:
                self.set_status(t, ERROR)
            doc = self.doc(t, t.status, start=start, end=end, exit_code=code, reason=why)
        try:
            if self.write_result(t, doc) is False:  # a conditional write lost: handed back meanwhile
                self.set_status(t, "other")
                return
            if t.status == TODO:
                self.pool.note_return(t.name, t.attempt)
        except OSError as e:
            self.unwritten.append((t.name, doc))
            self.disk_trouble(e)
        if t.status == TODO:
            t.history = earlier(doc)  # the next attempt's record remembers this one
            self.enqueue(t)
        self.settled(t)

    def settled(self, t):
        """A token reached done or error: wake (or fail) what waits for it. A token moved to
        another resource takes its dependants with it: they are left alone here."""
        if t.status not in FINAL or t.status == MOVED:
            return
        for w in self.waiting_on.pop(t.name, []):
            if w.status != TODO:
                continue
            if t.status == DONE:
                w.unmet -= 1
                if w.unmet == 0:
                    self.enqueue(w)
            else:
                self.fail_dependant(w, t.name)

    def fail_dependant(self, w, dep):
        """A dependency ended in error: so does the dependant, with the reason (no run)."""
        w.attempt += 1
        doc = self.doc(w, ERROR, start=None, end=time.time(), exit_code=None,
                       reason="dependency %s ended in error" % dep)
        if self.pool.claim(w.name, w.attempt, dump(dict(doc, state=LOCKED))):
            self.set_status(w, ERROR)
            self.pool.put(w.name, doc)
            self.settled(w)
        else:
            w.attempt -= 1
            self.set_status(w, "other")

    # learning what others did ------------------------------------------------------------------
    def refresh(self):
        """Cheap checks for work others made claimable: new definitions, returned tokens and
        dependencies that finished elsewhere. Returns how many tokens became claimable."""
        before = len(self.ready_own) + len(self.ready_other)
        if self.pool.defs_changed(self.defs_seen):
            self.load()
        for name in self.pool.returned(self.returns_seen):
            t = self.tokens.get(name)
            if t is not None and t.status != LOCKED:
                self.recheck(t)
        for dep in list(self.waiting_on):
            d = self.tokens.get(dep)
            if d is not None and d.status not in FINAL and d.status != LOCKED:
                self.recheck(d)
        return len(self.ready_own) + len(self.ready_other) - before

    def recheck(self, t):
        was = t.status
        self.absorb(t, self.pool.state(t.name, hint=t.attempt))
        if t.status == TODO and was != TODO:
            self.link(t)
        elif t.status in FINAL:
            self.settled(t)

    def take_over_stale(self):
        """Tokens locked by launchers whose heartbeat stopped go back to todo (and usually
        to us, since we are idle). Returns how many became claimable."""
        dead = self.pool.dead_agents(self.lock_timeout, since=self.started)
        dead.discard(self.key)
        if not dead:
            return 0
        before = len(self.ready_own) + len(self.ready_other)
        others = [t for t in self.tokens.values() if t.status == "other"]
        for t, doc in self.pool.current(others):
            if doc.get("state") == LOCKED and agent_key(doc) in dead:
                new = self.pool.release(t.name, doc, "pilot %s stopped beating; taken over" % doc.get("pilot"),
                                        give_up_after=LOST_LIMIT + t.retries)
                if new is not None:
                    doc = new
                    self.taken_over += 1
            was = t.status
            self.absorb(t, doc)
            if t.status == TODO and was != TODO:
                self.link(t)
            elif t.status in FINAL:
                self.settled(t)
        return len(self.ready_own) + len(self.ready_other) - before

    def worth_waiting(self):
        """Whether something may still become claimable for us (see the class docstring)."""
        if (self.unwritten or self.blocked_until) and time.time() - self.disk_since < max(300.0, self.lock_timeout):
            return True  # the pool's disk is full: wait (a while) for space to come back
        room = None if self.handback is None else self.handback - time.time()
        for name in self.own_open:
            t = self.tokens[name]
            if (t.unmet > 0 or t.nodes > 1) and (room is None or t.walltime <= room):
                return True  # waiting for dependencies, or a gang our leader will start
        if not self.own_open:
            for _, name in self.ready_other:
                t = self.tokens[name]
                if (t.status == TODO and t.stage <= self.stage and t.cores <= self.cores
                        and (room is None or t.walltime <= room)):
                    return True  # still inside its steal delay
        return bool(self.quiet_agents())

    def quiet_agents(self):
        """Other launchers, not ended, whose heartbeat is late but not yet stale."""
        agents = self.pool.agents()
        now = self.pool.now()
        late = 2 * max(0.5, min(30.0, self.lock_timeout / 5.0))
        return [k for k, a in agents.items()
                if k != self.key and "end" not in a and late < now - a["beat"] <= self.lock_timeout]

    # gangs: multi-node tokens ------------------------------------------------------------------
    # The pilot's leader (agent 0) is the only writer of agents/PILOT.gangs.json. It reserves,
    # for the best-ranked ready multi-node token, the agents whose nodes free up first; a
    # reserved agent only backfills tasks that end before the reservation's start and then
    # says it is idle (agents/PILOT.I.busy); the leader then claims the token and starts it
    # on those nodes with the scheduler's launcher. One reservation drains at a time, gangs
    # already running keep their nodes: no deadlock, and small tasks keep the other nodes.

    def gangs_path(self):
        return self.pool.path("agents", "%s.gangs.json" % self.pilot)

    def read_gangs(self):
        try:
            m = os.stat(self.gangs_path()).st_mtime
        except OSError:
            return self.gangs
        if m != self.gangs_mtime:
            doc = read_json(self.gangs_path())
            if doc is not None:
                self.gangs, self.gangs_mtime = doc, m
                d = doc.get("draining")
                if d and self.agent in d.get("agents", []):
                    self.write_busy(force=True)  # acknowledge: the leader waits for it
        return self.gangs

    def my_reservation(self):
        """"running" if our node runs a gang, the reserved start time if it is reserved."""
        g = self.read_gangs()
        if any(self.agent in r.get("agents", []) for r in g.get("running", [])):
            return "running"
        d = g.get("draining")
        if d and self.agent in d.get("agents", []):
            return float(d.get("start", 0))
        return None

    def gang_busy(self):
        return bool(self.gang_pids) or self.my_reservation() == "running"

    def busy_from(self, now):
        """A task starts: the idle stretch (if any) ends."""
        if not self.running and self.idle_since is not None:
            self.idle_s += max(0.0, now - self.idle_since)
            self.idle_since = None

    def write_busy(self, force=False):
        if not self.gang_pilot:
            return
        until = max([start + t.walltime for t, start in self.running.values()] or [time.time()])
        doc = {"idle": not self.running, "until": until, "t": time.time(), "node": self.host}
        key = (doc["idle"], round(until, 1))
        if not force and key == self.busy_written:
            return
        self.busy_written = key
        try:
            write_atomic(self.pool.path("agents", "%s.busy" % self.key), dump(doc))
        except OSError:
            pass

    def read_busy(self):
        out = {}
        prefix = self.pilot + "."
        for fn in os.listdir(self.pool.path("agents")):
            if fn.startswith(prefix) and fn.endswith(".busy"):
                idx = fn[len(prefix):-5]
                if idx.isdigit():
                    doc = read_json(self.pool.path("agents", fn))
                    if doc:
                        out[int(idx)] = doc
        return out

    def lead(self):
        """The leader's step: start a drained reservation, or make the next one."""
        g = self.gangs
        now = time.time()
        busy = self.read_busy()
        changed = False
        d = g.get("draining")
        if d:
            t = self.tokens.get(d["token"])
            if t is None or t.status != TODO:
                g["draining"], changed = None, True
            elif all((not self.running) if a == self.agent else
                     (busy.get(a, {}).get("idle") and busy[a].get("t", 0) >= d["t"]) for a in d["agents"]):
                self.start_gang(t, d, busy)
                g["draining"], changed = None, True
        if not g.get("draining"):
            held = set(a for r in g.get("running", []) for a in r["agents"])
            free = sorted((a for a in busy if a not in held),
                          key=lambda a: (busy[a]["until"] if not busy[a]["idle"] else now, a))
            room = None if self.handback is None else self.handback - now
            for name in sorted(self.own_open, key=lambda n: self.tokens[n].rank):
                t = self.tokens[name]
                if t.nodes <= 1 or t.unmet > 0 or t.status != TODO or t.nodes > len(free):
                    continue
                chosen = free[:t.nodes]
                start = max([now] + [busy[a]["until"] for a in chosen if not busy[a]["idle"]])
                if room is None or start - now + t.walltime <= room:
                    g["draining"] = {"token": name, "agents": chosen, "start": start, "t": now}
                    changed = True
                break
        if changed:
            self.gangs = g
            try:
                write_atomic(self.gangs_path(), dump(g))
                self.gangs_mtime = os.stat(self.gangs_path()).st_mtime
            except OSError as e:
                self.disk_trouble(e)

    def start_gang(self, t, d, busy):
        now = time.time()
        t.attempt += 1
        self.take_lane(t)
        lock = self.doc(t, LOCKED, start=now, end=None, exit_code=None, reason="", pid=os.getpid(),
                        nodes=[busy[a]["node"] for a in d["agents"]])
        if not self.pool.claim(t.name, t.attempt, dump(lock)):
            t.attempt -= 1
            self.give_lane(t)
            self.set_status(t, "other")
            return
        log = self.pool.path("logs", "%s.%d" % (t.name, t.attempt))
        names = [busy[a]["node"] for a in d["agents"]]
        per_node = t.ranks_per_node or max(1, (t.ranks or len(names)) // len(names))
        env = dict(self.base_env, PILOTFLOW_TOKEN=t.name, PILOTFLOW_CORES=str(t.cores * len(names)),
                   PILOTFLOW_ATTEMPT=str(t.attempt), PILOTFLOW_NODELIST=",".join(names),
                   PILOTFLOW_HOSTFILE=log + ".hosts")
        for k, v in t.env:
            env[k] = v
        argv = None
        if t.mpi:
            argv = mpi_argv(self.mpi, t, [(n, per_node) for n in names], log + ".hosts",
                            max(1, self.cores // per_node), env, self.mpi_plugin)
        else:
            with open(log + ".hosts", "w") as f:
                f.write("".join("%s slots=%d\n" % (n, self.cores) for n in names))
        self.set_status(t, LOCKED)
        try:
            pid = spawn(t.command, env, *self.outputs(t), argv=argv)
        except OSError as e:
            self.give_lane(t)
            self.finish(t, now, 127, "could not start the gang: %s" % e)
            return
        self.busy_from(now)
        self.running[pid] = (t, now)
        self.gang_pids[pid] = dict(d, attempt=t.attempt)
        if self.agent in d["agents"]:
            self.free = 0  # our own node is part of it
        self.gangs.setdefault("running", []).append(dict(d, attempt=t.attempt, started=now))
        self.ran += 1
        self.tell_reaper("+ %d %s %d\n" % (pid, t.name, t.attempt))

    def end_gang(self, d):
        self.gangs["running"] = [r for r in self.gangs.get("running", [])
                                 if not (r["token"] == d["token"] and r.get("attempt") == d.get("attempt"))]
        if self.agent in d["agents"]:
            self.free = self.cores
        try:
            write_atomic(self.gangs_path(), dump(self.gangs))
            self.gangs_mtime = os.stat(self.gangs_path()).st_mtime
        except OSError as e:
            self.disk_trouble(e)

    # signals, heartbeat, shutdown --------------------------------------------------------------
    def install_signals(self):
        r, w = os.pipe()
        for fd in (r, w):
            _nonblock(fd)
        self.wake_r = r
        signal.set_wakeup_fd(w)
        signal.signal(signal.SIGCHLD, lambda s, f: None)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGHUP, self._on_term)
        signal.signal(signal.SIGUSR1, self._on_warn)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def _on_term(self, signum, frame):
        self.stopping = "term"
        self.exit_reason = "signal %d: tokens handed back" % signum

    def _on_warn(self, signum, frame):
        # the scheduler warns before the walltime: no new claims; what still runs at
        # now + warn_grace is stopped and handed back
        if self.stopping is None:
            self.stopping = "warn"
            end = time.time() + self.warn_grace
            self.handback = end if self.handback is None else min(self.handback, end)

    def wait(self, timeout):
        try:
            select.select([self.wake_r], [], [], max(0.0, timeout))
        except (OSError, select.error):
            pass
        try:
            while os.read(self.wake_r, 4096):
                pass
        except OSError:
            pass

    def record(self):
        now = time.time()
        self.pool.write_agent(self.key, {"pilot": self.pilot, "agent": self.agent, "host": self.host, "node": self.host,
                           "pid": os.getpid(),
                           "start": self.started, "cores": self.cores, "version": VERSION,
                           "reaper": getattr(self, "reaper_pid", None),
                           "deadline": self.deadline})
        self.last_beat = now

    def beat(self):
        """Heartbeat; and stop any task whose attempt was handed back to others meanwhile."""
        now = time.time()
        if self.pool.beat_agent(self.key):
            self.last_beat = now
        else:
            try:
                self.record()
            except OSError:
                pass
        for pid, (t, _) in list(self.running.items()):
            if self.pool.released(t.name, t.attempt):
                try:
                    os.killpg(pid, signal.SIGKILL)  # the main loop reaps it
                except OSError:
                    pass

    def renew(self):
        """Submit the next follow-up round if the run's work would otherwise stop with us (see
        the module docstring). Why it did not, when work is left, goes into our end record."""
        spec = read_json(self.pool.path("pilots", "renew.json"))
        if not spec or os.path.exists(self.pool.path("cancelled")):
            return
        try:
            note = self._renew(spec)
        except Exception as e:  # noqa: BLE001 - renewal must never break the launcher's exit
            note = "renewal failed: %s: %s" % (type(e).__name__, e)
        if note:
            sys.stderr.write("pilotflow-launcher %s: %s\n" % (self.key, note))
            end = self.pool.agent_end(self.key) or {}
            end["renewal"] = note
            try:
                self.pool.end_agent(self.key, end)
            except OSError:
                pass

    def nothing_left(self):
        """Whether, without reading every state, no work can be left for a follow-up: no new
        definitions, every token ended or held by another launcher as we saw it last, nothing
        handed back since, and no launcher that may hold tokens died (the others, still
        running or ended with nothing held, finish theirs and make this check in their turn)."""
        pool = self.pool
        if pool.defs_changed(self.defs_seen) or any(t.status not in FINAL and t.status != "other"
                                                    for t in self.tokens.values()):
            return False
        for name in pool.returned(self.returns_seen):  # (a retry may have made one todo again)
            t = self.tokens.get(name)
            if t is None or t.status not in FINAL or pool.state(name, hint=t.attempt).get("state") not in FINAL:
                return False
        return not (pool.dead_agents(self.lock_timeout, since=self.started) - set([self.key]))

    def _renew(self, spec):
        pool, me = self.pool, self.key
        if live_pilots(pool, me):
            return None  # a live pilot takes what is left (and renews in its turn)
        if self.nothing_left():
            return None  # no scan of every token's state (at a million tokens: seconds)
        defs = pool.defs()
        dead = pool.dead_agents(self.lock_timeout)
        if not work_left(pool, defs, pool.states(), dead):
            return None
        budget = int(spec.get("max_follow_ups", 3))
        mine = pool.plans().get(self.pilot, {})
        if mine.get("round"):
            ran = sum(int((a.get("end") or {}).get("ran", 0)) for a in pool.agents().values()
                      if a.get("pilot") == self.pilot)
            if not ran:
                return "follow-up pilot %s ran nothing: not renewing it (pilotflow wait or retry goes on)" % self.pilot
        if rounds_spent(pool) >= budget:
            return "work is left but the follow-up budget (max_follow_ups = %d) is spent" % budget
        k = claim_round(pool, me)
        if k is None:
            return None  # another launcher (or the client) does this round
        until = time.time() + ROUND_WAIT
        if self.deadline is not None:
            until = min(until, self.deadline - 1.0)
        if not wait_earlier_rounds(pool, k, until, beat=self.touch):
            end_round(pool, k, "void", reason="an earlier round was still being submitted")
            return None
        states = pool.states()
        left = work_left(pool, defs, states, pool.dead_agents(self.lock_timeout))
        if live_pilots(pool, me) or not left:
            end_round(pool, k, "void", reason="a live pilot takes the work" if left else "no work left")
            return None
        if rounds_spent(pool) >= budget:
            end_round(pool, k, "void", reason="budget spent")
            return "work is left but the follow-up budget (max_follow_ups = %d) is spent" % budget
        ratio = observed_ratio(defs, states)
        stage = max([p.get("stage", 0) for p in pool.plans().values()] or [0])
        done, error = submit_round(pool, spec, k, size_round(spec, left, ratio), stage)
        end_round(pool, k, "done" if done else "failed", pilots=done, ratio=ratio, error=error, tokens=len(left))
        if error:
            return "submitting follow-up round %d from %s failed: %s" % (k, self.host, error)
        return None

    def touch(self):
        self.pool.beat_agent(self.key)

    def tell_reaper(self, line, later=False):
        """Tell the reaper a task's process group started ("+") or ended ("-"). An end may
        wait for the next message (one write per task): the reaper only acts when we die, on
        what it was told by then, and a late "-" only costs a kill of a group already gone."""
        self.reaper_buf.append(line)
        if later or self.reaper is None:
            if self.reaper is None:
                del self.reaper_buf[:]
            return
        data, self.reaper_buf = "".join(self.reaper_buf), []
        try:
            os.write(self.reaper, data.encode("utf-8"))
        except OSError:
            self.reaper = None

    def shutdown(self):
        """Stop what runs (if anything) and hand those tokens back; leave an end record."""
        self.pool.flush()
        self.settle_suspects(final=True)
        for _ in range(3):
            if self.flush_unwritten():
                break
            time.sleep(1.0)
        if self.unwritten:
            sys.stderr.write("pilotflow-launcher %s: %d finished token state(s) could not be written; they "
                             "stay locked and are run again once this launcher's lock is stale\n"
                             % (self.key, len(self.unwritten)))
        if self.running:
            # what ended by itself just now is a result, not a loss -- unless a signal ended it:
            # the scheduler stopping the job signals the tasks too, sometimes before us
            self.conclude(self.reap())
            self.settle_suspects(final=True)
            statuses = {}
            kill_groups(list(self.running), grace=2.0, reap=statuses)
            _reap_all(statuses)
            for pid, (t, start) in list(self.running.items()):
                self.give_lane(t)
                st = statuses.get(pid)
                if st is not None and os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0 and pid not in self.gang_pids:
                    self.finish(t, start, 0, "")  # it completed as we stopped it: done, not lost
                else:
                    self.drop_claim(t)
                    self.pool.release(t.name, self.doc(t, LOCKED, start=start, end=time.time()),
                                      "pilot %s stopped (%s)" % (self.pilot, self.exit_reason))
                self.tell_reaper("- %d\n" % pid)
            self.running.clear()
        self.pool.flush()
        try:
            end = time.time()
            idle = self.idle_s + (end - self.idle_since if self.idle_since is not None else 0.0)
            # "held": tokens it leaves locked (results it could not write); with none, the
            # others need not look through what it ran for locks to take over
            self.pool.end_agent(self.key, {"end": end, "reason": self.exit_reason, "ran": self.ran,
                                           "idle": round(idle, 1), "held": len(self.unwritten)})
        except OSError:
            pass  # no end record: others see the heartbeat stop instead
        if self.reaper is not None:
            self.tell_reaper("")
            os.close(self.reaper)
            self.reaper = None


# --- renewal: follow-up rounds ---------------------------------------------------------------

ROUND_STALE = 300.0  # a round claimed this long ago with no outcome: its claimant died
ROUND_WAIT = 60.0  # how long a claimant waits for earlier rounds' outcomes


def rounds(pool):
    """Follow-up rounds: number → record (``state``: claimed | done | void | failed)."""
    out = {}
    try:
        names = os.listdir(pool.path("followups"))
    except OSError:
        return out
    for fn in names:
        if fn.endswith(".json") and fn[:-5].isdigit():
            doc = read_json(pool.path("followups", fn))
            if not isinstance(doc, dict):  # a claim being written (or garbage): claimed when made
                try:
                    made = os.stat(pool.path("followups", fn)).st_mtime
                except OSError:
                    made = 0
                doc = {"state": "claimed", "time": made}
            out[int(fn[:-5])] = doc
    return out


def rounds_spent(pool, recs=None):
    """Rounds that submitted pilots since the last ``retry`` (the follow-up budget's count)."""
    recs = rounds(pool) if recs is None else recs
    base = int((read_json(pool.path("followups", "base.json")) or {}).get("base", 0))
    return sum(1 for k, d in recs.items() if k > base and d.get("state") == "done")


def claim_round(pool, by):
    """Claim the next follow-up round exclusively; its number, or None if another claimant
    took that number first (it will do the round)."""
    mkdirs(pool.path("followups"))
    recs = rounds(pool)
    k = max(recs) + 1 if recs else 1
    doc = {"round": k, "state": "claimed", "by": by, "host": socket.gethostname(), "time": time.time()}
    # written aside, then linked into place: the claim is exclusive and never seen half-written
    # (another launcher took an empty claim for a stale one and did a second round)
    path = pool.path("followups", "%06d.json" % k)
    tmp = "%s.%s.%d.%d.tmp" % (path, socket.gethostname(), os.getpid(), _thread.get_ident())
    with open(tmp, "wb") as f:
        f.write(dump(doc))
    try:
        os.link(tmp, path)
    except OSError as e:
        if e.errno == errno.EEXIST:
            return None
        raise
    finally:
        os.unlink(tmp)
    return k


def round_open(pool, doc, agents=None, now=None):
    """Whether a claimed round may still be submitting: it was claimed less than ROUND_STALE
    ago and, when a launcher claimed it, that launcher still beats (it has written its end
    record already: it renews on its way out, beating while it does)."""
    if doc.get("state") != "claimed":
        return False
    now = time.time() if now is None else now
    if now - float(doc.get("time") or 0) >= ROUND_STALE:
        return False
    agents = pool.agents() if agents is None else agents
    a = agents.get(doc.get("by") or "")
    return a is None or pool.now() - a["beat"] <= pool.lock_timeout()


def wait_earlier_rounds(pool, k, until, beat=None):
    """Wait (until ``until``) for every round before ``k`` to have an outcome; True if they do.
    ``beat`` is called meanwhile (a launcher's heartbeat: its own round stays open)."""
    while True:
        if beat is not None:
            beat()
        agents = pool.agents()
        if not [j for j, d in rounds(pool).items() if j < k and round_open(pool, d, agents)]:
            return True
        if time.time() >= until:
            return False
        time.sleep(0.2)


def end_round(pool, k, state, **info):
    doc = read_json(pool.path("followups", "%06d.json" % k)) or {"round": k}
    doc.update(info, state=state, ended=time.time())
    write_atomic(pool.path("followups", "%06d.json" % k), dump(doc))
    return doc


def live_pilots(pool, me=None, now=None):
    """Pilots that are running (a launcher with a fresh heartbeat) or may still start (queued:
    planned, no launcher yet, not seen finished by the client, and — for a follow-up — its
    round submitted it or is still submitting), other than the launcher ``me``."""
    agents = pool.agents()
    now = pool.now() if now is None else now
    timeout = pool.lock_timeout()
    live = set()
    started = set()
    for key, a in agents.items():
        pilot = a.get("pilot") or key.rsplit(".", 1)[0]
        started.add(pilot)
        if key != me and "end" not in a and now - a["beat"] <= timeout:
            live.add(pilot)
    gone = pool.gone()
    recs = rounds(pool)
    for pilot, plan in pool.plans().items():
        if pilot in started or pilot in gone or plan.get("void"):
            continue
        k = plan.get("round")
        if k is not None:
            rec = recs.get(int(k), {})
            submitted = pilot in [p.get("id") for p in rec.get("pilots") or ()]
            if not (submitted or round_open(pool, rec, agents)):
                continue  # its submission failed or its submitter died before it
        live.add(pilot)
    return live


def work_left(pool, defs, states, dead):
    """Definitions of the tokens nobody alive will finish: todo ones, and those locked by a
    launcher in ``dead`` (they are taken over once stale)."""
    out = []
    for d in defs:
        doc = states.get(d["name"])
        st = doc.get("state") if doc else TODO
        if st == TODO or (st == LOCKED and agent_key(doc) in dead):
            out.append(d)
    return out


def observed_ratio(defs, states):
    """Median of (observed runtime / estimate) over done tokens: how wrong the estimates are."""
    est = dict((d["name"], float(d.get("walltime", 600))) for d in defs)
    ratios = sorted((float(doc["end"]) - float(doc["start"])) / est[n]
                    for n, doc in states.items()
                    if doc.get("state") == DONE and n in est and est[n] > 0
                    and doc.get("start") is not None and doc.get("end") is not None)
    if not ratios:
        return 1.0
    return min(20.0, max(0.25, ratios[len(ratios) // 2]))


def size_round(spec, left, ratio):
    """Pilots for the work ``left`` (token definitions in rank order): a list of (nodes,
    walltime seconds (0: no limit), token names), as the resource's limits allow. Runtimes
    are the estimates times ``ratio`` (what was observed so far)."""
    cpn = int(spec["cores_per_node"])
    max_nodes = int(spec.get("max_nodes") or 1)
    wmax = spec.get("max_walltime")
    margin = float(spec.get("margin", 0.05))
    overhead = float(spec.get("overhead", 20))
    step = int(spec.get("walltime_step") or 1)
    runtime = dict((d["name"], float(d.get("walltime", 600)) * ratio) for d in left)
    gpn = int(spec.get("gpus_per_node") or 0)

    def cores_taken(d):  # a GPU's share of the node counts where GPUs bind
        if int(d.get("nodes", 1)) > 1:
            return cpn * int(d.get("nodes", 1))
        gpu_share = int(math.ceil(int(d.get("gpus", 0)) * cpn / float(gpn))) if gpn else 0
        return min(cpn, max(int(d.get("cores", 1)), gpu_share))
    width = dict((d["name"], cores_taken(d)) for d in left)
    widest = max(-(-width[n] // cpn) for n in runtime)
    node_s = sum(width[n] * runtime[n] for n in runtime) / float(cpn)
    if wmax is None:
        return [(max(1, min(max_nodes, widest)), 0, [d["name"] for d in left])]
    cap = max(float(wmax) / (1 + margin) - overhead, max(runtime.values()), 1.0)
    nodes_total = max(widest, int(math.ceil(node_s / cap)))
    n_pilots = max(1, int(math.ceil(nodes_total / float(max_nodes))))
    if spec.get("max_pilots"):
        n_pilots = min(n_pilots, int(spec["max_pilots"]))
    nodes = min(max_nodes, max(widest, int(math.ceil(nodes_total / float(n_pilots)))))
    share = node_s / n_pilots
    chunks, cur, acc = [], [], 0.0
    for d in left:
        if acc >= share and len(chunks) < n_pilots - 1:
            chunks.append(cur)
            cur, acc = [], 0.0
        cur.append(d["name"])
        acc += width[d["name"]] * runtime[d["name"]] / float(cpn)
    chunks.append(cur)
    out = []
    for names in chunks:
        span = _list_schedule([(runtime[n], width[n]) for n in names], nodes * cpn)
        walltime = min(int(wmax), int(math.ceil((span * (1 + margin) + overhead) / step)) * step)
        out.append((nodes, walltime, names))
    return out


def _list_schedule(tasks, lanes):
    """Makespan of the tasks (runtime, cores) on ``lanes`` cores, longest first, each on the
    cores that free up first: what a pilot of that size will roughly need."""
    import heapq
    free = [0.0] * max(1, lanes)
    for t, c in sorted(tasks, reverse=True):
        c = min(max(1, c), len(free))
        taken = [heapq.heappop(free) for _ in range(c)]
        end = max(taken) + t
        for _ in taken:
            heapq.heappush(free, end)
    return max(free)


def submit_round(pool, spec, k, pilots, stage):
    """Write the plans and submit the pilots of round ``k``; returns (submitted, error)."""
    done, error = [], None
    keep = set(spec.get("keep_env", ()))
    env = dict((n, v) for n, v in os.environ.items()
               if n in keep or not any(n.startswith(p) for p in spec.get("clear_env", ())))
    for i, (nodes, walltime, names) in enumerate(pilots, 1):
        pid = "r%dp%d" % (k, i)
        pool.write_plan(pid, names, stage, {"round": k, "created": time.time()})
        values = {"{pilot}": pid, "{nodes}": str(nodes), "{slots}": str(nodes * int(spec["cores_per_node"])),
                  "{walltime_s}": str(walltime), "{walltime_hms}": _hms(walltime),
                  "{script}": pool.path("pilots", "renew.sh")}
        argv = []
        for a in spec["argv"]:
            for key, v in values.items():
                a = a.replace(key, v)
            argv.append(a)
        job, error = _submit(argv, env, pool.path("pilots"), spec.get("job_id_re", r"(\d+)"))
        if job is None:
            pool.write_plan(pid, names, stage, {"round": k, "created": time.time(), "void": True})
            break
        done.append({"id": pid, "job_id": job, "nodes": nodes, "walltime_s": walltime, "tokens": len(names),
                     "gpus_per_node": int(spec.get("gpus_per_node") or 0)})
    return done, error


def _submit(argv, env, cwd, job_re):
    import re
    import subprocess
    try:
        p = subprocess.Popen(argv, cwd=cwd, env=env, stdin=open(os.devnull, "rb"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = p.communicate()
    except OSError as e:
        return None, "%s: %s" % (argv[0], e)
    out, err = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    lines = [x for x in out.strip().splitlines() if x.strip()]
    m = re.search(job_re, lines[-1]) if lines else None
    if p.returncode != 0 or m is None:
        tail = (err.strip() or out.strip())[-400:]
        return None, "%s exited %d: %s" % (" ".join(argv[:1]), p.returncode, tail or "(no output)")
    return m.group(1), None


def _hms(seconds):
    seconds = int(seconds)
    return "%02d:%02d:%02d" % (seconds // 3600, seconds % 3600 // 60, seconds % 60)


def handback_guard(walltime):
    """Seconds before a pilot's deadline at which its launchers stop what still runs and hand
    it back (so a follow-up takes it at once, not after a stale lock); the Snakemake plugin's
    late binding counts with the same figure."""
    return max(2.0, min(15.0, 0.05 * walltime))


def node_name(var=None):
    """The node as the scheduler names it (``var``: the variable the batch script says holds
    it; several slurmd may share one hostname), else the host name; PILOTFLOW_NODE overrides."""
    return os.environ.get("PILOTFLOW_NODE") or (os.environ.get(var) if var else None) or socket.gethostname()


def _pilot_number(pid):
    digits = "".join(c for c in pid if c.isdigit())
    return int(digits) if digits else 0


def _insort(lst, item):
    lo, hi = 0, len(lst)
    while lo < hi:
        mid = (lo + hi) // 2
        if lst[mid] < item:
            lo = mid + 1
        else:
            hi = mid
    lst.insert(lo, item)


def _nonblock(fd):
    import fcntl
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


_POSIX_SPAWN = getattr(os, "posix_spawn", None)
_DEFAULT_SIGNALS = tuple(getattr(signal, n) for n in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, n))

# A command of plain words runs without a shell: the same program, arguments and exit code
# as through ``sh -c``, one exec fewer (a null task's cost is mostly its execs). Plain: no
# quotes, escapes, variables, globs, redirections, separators or newlines; the first word
# no assignment and nothing the shell itself implements differently from the program of that
# name (keywords, builtins, echo's options); found on the task's PATH, else the shell reports.
_PLAIN = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./:,+@%=- \t")
_SHELL_WORDS = frozenset("""! { } [ [[ ]] case do done elif else esac fi for function if in select then time until
    while . : alias bg break builtin cd command continue declare echo eval exec exit export fc fg getopts
    hash jobs kill let local printf pwd read readonly return set shift source test times trap type typeset
    ulimit umask unalias unset wait""".split())
_found = {}  # (program, PATH) -> its path, for programs found before


def plain_argv(command, env):
    """(path, argv) to run ``command`` directly, or None when it needs a shell (see above)."""
    if not command or not _PLAIN.issuperset(command):
        return None
    argv = command.split()
    if not argv or "=" in argv[0] or argv[0] in _SHELL_WORDS or argv[0].startswith("-"):
        return None
    key = (argv[0], env.get("PATH"))
    path = _found.get(key)
    if path is None:
        try:
            path = _which(argv[0], env)
        except OSError:
            return None
        if not os.access(path, os.X_OK) or os.path.isdir(path):
            return None
        if "/" not in argv[0]:
            _found[key] = path
    return path, argv


def spawn(command, env, out, err, argv=None, path=None):
    """Start ``/bin/sh -c command`` (or ``argv``; ``path``: its program, already found) in
    its own process group, its stdout and stderr to ``out`` and ``err``: open descriptors (a
    packed log's lane, appended to) or paths (files of its own, created)."""
    argv = argv or ["/bin/sh", "-c", command]
    if _POSIX_SPAWN is not None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)]  # novm
        for fd, target in ((1, out), (2, err)):
            if isinstance(target, int):
                actions.append((os.POSIX_SPAWN_DUP2, target, fd))  # novm
            else:
                actions.append((os.POSIX_SPAWN_OPEN, fd, target, flags, 0o644))  # novm
        try:
            # setsigdef: Python ignores SIGPIPE and SIGXFSZ, and an ignored signal stays ignored
            # across exec (`producer | head` would not end, but fail writing)
            return _POSIX_SPAWN(path or _which(argv[0], env), argv, env, file_actions=actions, setpgroup=0,
                                setsigdef=_DEFAULT_SIGNALS)
        except OSError as e:
            if path is None or e.errno != errno.ENOEXEC:
                raise
            # a script without a #! line: the shell runs those itself
            return spawn(command, env, out, err)
    import subprocess
    files = [open(x, "wb") if not isinstance(x, int) else None for x in (out, err)]
    try:
        with open(os.devnull, "rb") as nul:
            p = subprocess.Popen(argv, stdin=nul, stdout=files[0] or out, stderr=files[1] or err, env=env,
                                 start_new_session=True)
    finally:
        for f in files:
            if f is not None:
                f.close()
    p._child_created = False  # we reap it ourselves with waitpid
    return p.pid


def _which(prog, env):
    if "/" in prog:
        return prog
    for d in env.get("PATH", "/usr/bin:/bin").split(":"):
        path = os.path.join(d or ".", prog)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    raise OSError(errno.ENOENT, "%s: command not found" % prog)


def mpi_argv(style, t, hosts, hostfile, per_rank=1, env=None, plugin=None):
    """How ranks start inside the allocation, in the style the batch script chose: ``srun``
    (Slurm's own), ``mpirun`` (Open MPI's, its daemons started through srun) or ``mpiexec``
    with a host file of the allocation. ``hosts`` are (node name, ranks there) pairs."""
    ranks = sum(n for _, n in hosts)
    shell = ["/bin/sh", "-c", t.command]
    if style == "mpirun":
        # Open MPI's mpirun starts its daemons with srun; they share the CPUs our own step holds
        if env is not None:
            env["SLURM_OVERLAP"] = "1"
        return (["mpirun", "-np", str(ranks), "--oversubscribe", "--host", ",".join("%s:%d" % h for h in hosts)]
                + shell)
    if style == "srun":
        return (["srun", "--overlap", "--nodes=%d" % len(hosts), "--nodelist=" + ",".join(h for h, _ in hosts),
                 "--ntasks=%d" % ranks, "--cpus-per-task=%d" % per_rank, "--kill-on-bad-exit=1"]
                + (["--mpi=%s" % plugin] if plugin else []) + shell)
    with open(hostfile, "w") as f:
        for h, n in hosts:
            f.write("%s slots=%d\n" % (h, n))
    return ["mpiexec", "--hostfile", hostfile, "-n", str(ranks)] + shell


# --- command line ------------------------------------------------------------------------------

def changes(pool, since):
    """Everything a client's sync needs, in one round trip: the filesystem clock, the state
    files changed since ``since`` (fs clock), the launcher records, the defs count and the
    follow-up rounds (with the pilots the launchers submitted)."""
    now, states = pool.changes(since)
    agents = pool.agents()
    return {"now": now, "states": states, "agents": agents, "defs": pool.defs_count(),
            "followups": dict((str(k), d) for k, d in rounds(pool).items()), "spent": rounds_spent(pool)}


def info():
    return {"python": list(sys.version_info[:3]), "host": socket.gethostname(), "cwd": os.getcwd(),
            "version": VERSION}


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="pilotflow-launcher", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="be one node's launcher for a pilot")
    r.add_argument("pool")
    r.add_argument("--pilot", required=True)
    r.add_argument("--agent", type=int, default=None, help="node index (default: from --agent-var, else 0)")
    r.add_argument("--agent-var", default=None, help="environment variable holding the node index "
                   "(the batch script names its scheduler's, e.g. SLURM_NODEID)")
    r.add_argument("--node-var", default=None, help="environment variable naming this node (e.g. SLURMD_NODENAME)")
    r.add_argument("--cores", type=int, default=0, help="cores to use (default: all of this node)")
    r.add_argument("--memory", type=int, default=0, help="memory (MB) to use; 0 = not limited")
    r.add_argument("--walltime", type=float, default=0, help="seconds this pilot may run; 0 = no limit")
    r.add_argument("--deadline", type=float, default=None, help="epoch seconds when the scheduler ends the pilot")
    r.add_argument("--mpi", default="mpiexec", choices=("srun", "mpirun", "mpiexec"),
                   help="how MPI ranks start (the batch script chooses its scheduler's way)")
    r.add_argument("--mpi-plugin", default=None, help="srun --mpi=PLUGIN (default: the site's MpiDefault)")
    r.add_argument("--gpus", type=int, default=0, help="GPUs of this node the pilot's tasks may use")
    r.add_argument("--gpu-var", default=None, help="environment variable listing the node's devices "
                   "(default: the first of %s that is set, else 0..GPUS-1)" % ", ".join(GPU_VARS))
    r.add_argument("--launchers", type=int, default=1, help="launchers on this node, each with an equal share of "
                   "its cores and memory (the resource's launchers_per_node): one loop starts ~1,000-1,500 tasks/s, "
                   "blocked in posix_spawn while each task's exec loads; several start very short tasks faster")
    r.add_argument("--idle-timeout", type=float, default=0.0)
    r.add_argument("--poll", type=float, default=0.5)
    r.add_argument("--steal-delay", type=float, default=1.0)
    r.add_argument("--warn-grace", type=float, default=10.0)
    r.add_argument("--couchdb", default=None, help="a CouchDB pool's server URL, for a node that does not see the "
                   "run directory: POOL is then a local directory (with --database and --run)")
    r.add_argument("--database", default=None)
    r.add_argument("--run", default=None)
    r.add_argument("--credentials", default=None, help="file holding user:password (mode 600); or set "
                   "PILOTFLOW_COUCHDB_USER and PILOTFLOW_COUCHDB_PASSWORD")
    sub.add_parser("info", help="python version and host, as JSON")
    h = sub.add_parser("helper", help="a client helper call (arguments as JSON on stdin), answered as JSON")
    h.add_argument("pool")
    h.add_argument("command")
    a = p.parse_args(argv)
    if a.cmd == "run":
        try:
            spec = None
            if a.couchdb:
                spec = {"url": a.couchdb, "database": a.database, "credentials": a.credentials, "run": a.run}
            pool = open_pool(a.pool, spec)
            if not pool.meta:
                sys.stderr.write("pilotflow-launcher: %s is not a token pool (no run.json)\n" % a.pool)
                return 2
            pool.check_format()
        except PoolError as e:
            sys.stderr.write("pilotflow-launcher: %s\n" % e)
            return 2
        agent = a.agent if a.agent is not None else int((os.environ.get(a.agent_var) if a.agent_var else None)
                                                         or os.environ.get("PILOTFLOW_AGENT") or 0)
        cores = a.cores or _node_cores()
        memory = a.memory
        others = []
        if a.launchers > 1:
            agent, cores, memory, others = split_node(a.launchers, agent, cores, memory)
            if others is None:  # a forked launcher: a pool object of its own (a database pool's connection)
                pool = open_pool(a.pool, spec)
        ag = Agent(pool, a.pilot, agent=agent, cores=cores, memory=memory, walltime=a.walltime or None,
                   idle_timeout=a.idle_timeout, poll=a.poll, steal_delay=a.steal_delay, warn_grace=a.warn_grace,
                   deadline=a.deadline, mpi=a.mpi, node=node_name(a.node_var), gpus=node_gpus(a.gpus, a.gpu_var),
                   mpi_plugin=a.mpi_plugin)
        rc = ag.run()
        if others is None:  # a forked launcher never returns into its parent's caller
            _exit_now(rc)
        for pid in others:  # the batch script's end (and the pilot's exit record) waits for all of them
            try:
                os.waitpid(pid, 0)  # (retried after a signal's handler: PEP 475)
            except OSError:
                pass  # reaped already, by the loop's waitpid(-1)
        return rc
    if a.cmd == "info":
        answer(info())
        return 0
    if a.cmd == "helper":
        text = sys.stdin.read()
        try:
            answer(helper(a.pool, a.command, json.loads(text) if text.strip() else {}))
        except PoolError as e:
            sys.stderr.write("pilotflow-launcher: %s\n" % e)
            return 3 if isinstance(e, PoolUnreachable) else 2
        return 0
    p.print_help()
    return 2


def helper(root, command, args):
    """The client's helper calls: one definition, run in-process for this machine and as
    ``launcher.py helper POOL COMMAND`` (arguments as JSON on stdin) over SSH."""
    if command == "info":
        return info()
    pool = open_pool(root, patience=CLIENT_PATIENCE)
    try:
        pool.check_format()
        return _helper(pool, command, args)
    finally:
        pool.close_journals()  # (a call that claimed, e.g. ``move``: no descriptor left behind)


def _helper(pool, command, args):
    if command == "changes":
        return changes(pool, args.get("since"))
    if command == "scrub":
        names, pilots = args.get("names"), args.get("pilots")
        return {"scrubbed": pool.scrub(failed=bool(args.get("failed")), stale=bool(args.get("stale")),
                                       names=set(names) if names is not None else None,
                                       timeout=args.get("timeout"), reason=args.get("reason", ""),
                                       pilots=set(pilots) if pilots else None)}
    if command == "move":
        return {"moved": pool.move_out(args.get("names", []), args["to"])}
    if command == "round":
        return _round_helper(pool, args)
    if command == "mark":
        return _mark(pool, args)
    if command == "output":
        return pool.output(args["token"]) if isinstance(pool, CouchPool) else {}
    if command == "push":
        if args.get("create") and isinstance(pool, CouchPool):
            pool.setup()
        pool.add_defs(args.get("defs") or [])
        return {}
    raise ValueError("unknown helper command %r" % command)


def _round_helper(pool, args):
    """The client's side of a follow-up round: ``claim`` (then wait for earlier rounds),
    ``end`` (record its outcome)."""
    if args.get("op") == "claim":
        k = claim_round(pool, args.get("by", "client"))
        ready = k is not None and wait_earlier_rounds(pool, k, time.time() + float(args.get("wait", 30)))
        return {"round": k, "ready": ready, "spent": rounds_spent(pool)}
    doc = end_round(pool, int(args["round"]), args["state"], **args.get("info", {}))
    return {"round": doc.get("round")}


def _mark(pool, args):
    """Facts the client learnt that launchers need: pilots that will never start (``gone``),
    the run cancelled (``cancelled``) or resumed with a fresh follow-up budget (``resumed``)."""
    for pilot in args.get("gone", []):
        try:
            os.close(os.open(pool.path("agents", pilot + ".gone"), os.O_WRONLY | os.O_CREAT, 0o644))
        except OSError:
            pass
    if args.get("cancelled"):
        write_atomic(pool.path("cancelled"), dump({"time": time.time()}))
    if args.get("resumed"):
        mkdirs(pool.path("followups"))
        recs = rounds(pool)
        write_atomic(pool.path("followups", "base.json"), dump({"base": max(recs) if recs else 0}))
        try:
            os.unlink(pool.path("cancelled"))
        except OSError:
            pass
    return {}


def answer(obj):
    """A helper's answer on stdout, after the marker the client looks for."""
    sys.stdout.write(HELPER_MARK + json.dumps(obj) + "\n")


def parse_answer(stdout):
    """The JSON a helper answered, whatever was printed before it; ValueError if none."""
    if HELPER_MARK in stdout:
        stdout = stdout.rsplit(HELPER_MARK, 1)[1]
    return json.loads(stdout)


def node_gpus(count, var=None):
    """The device ids this node's tasks share: what the scheduler put in the job's environment
    (the variable the batch script names, else a vendor's), else 0..count-1."""
    if not count:
        return []
    for name in ([var] if var else []) + list(GPU_VARS):
        ids = [x.strip() for x in (os.environ.get(name) or "").split(",") if x.strip()]
        if ids:
            return ids[:count]
    return [str(i) for i in range(count)]


def split_node(k, agent, cores, memory):
    """``run --launchers K``: fork K-1 more launchers of this node, each with an equal share
    of its cores and memory; node N's launchers are agents N*K .. N*K+K-1 (a resource with
    launchers_per_node has no multi-node tasks: no gang counts nodes by agent). Returns this
    process's (agent, cores, memory, pids of the forked ones: None in those)."""
    k = max(1, min(k, cores))
    shares = [(cores // k + (j < cores % k), memory // k) for j in range(k)]
    sys.stdout.flush()
    sys.stderr.flush()
    pids = []
    for j in range(1, k):
        pid = os.fork()
        if pid == 0:
            return (agent * k + j,) + shares[j] + (None,)
        pids.append(pid)
    return (agent * k,) + shares[0] + (pids,)


def _node_cores():
    """Cores this launcher may use when the batch script did not say (it always does)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _exit_now(rc):
    """Exit without the interpreter's teardown: freeing what a launcher held (at a million
    tokens, millions of objects) costs seconds before the batch script sees the end. Every
    file is written with os-level calls or closed already; the streams are flushed here."""
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc or 0)


if __name__ == "__main__":
    _exit_now(main())
