"""Attack runs under ``torchrun``: which rank does which batch, where each rank's records go, and the merge.

``torchrun --nproc_per_node N -m blindspot.cli fnaf|invariances|audit …`` starts ``N`` processes (multi-node:
``--nnodes`` and a rendezvous endpoint; the run folder must then be on a file system every node sees). Each joins the
process group (:meth:`blindspot.training.distributed.DistContext.from_env`: its own GPU from ``LOCAL_RANK``, nccl on
GPUs, gloo on CPU, collectives that give up after :data:`TIMEOUT`) and

* attacks the batches ``b`` with ``b mod N = rank`` (:meth:`RankRecords.mine`). A batch is the unit of work: every
  image is attacked in the same batch, with the same counter-based random draws (keyed by image, setting and seed,
  never by rank), as in one process, so its records are bit-identical to one process's;
* appends its records, synced after every batch, to its own file ``ranks/records-RRRRR.jsonl`` in the run folder
  (each line ``{"order": […], "record": {…}}``; ``order`` is where one process would have written the record);
* at the end of a stage, rank 0 merges every rank file (and the ``records.jsonl`` of earlier runs) into
  ``records.jsonl`` — the same lines in the same order as one process writes — atomically, then removes the rank
  files (:meth:`RankRecords.merge`); every rank then reads the merged records.

Resume: the records already written (``records.jsonl`` and any rank file, whatever the number of processes that
wrote them) are skipped by every rank, so a run can be resumed with another number of processes. A rank that dies
(killed, out of memory) makes ``torchrun`` stop the others (its own failure propagation), and a barrier that waits
for a missing rank fails after :data:`TIMEOUT`; rerunning with ``--resume`` finishes the work.

One process without rank files from an earlier distributed run writes ``records.jsonl`` directly, as always.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from blindspot.errors import BlindspotError
from blindspot.fileio import append_jsonl, atomic_write_text, read_jsonl
from blindspot.runs.folder import RANK_DIR, RECORDS, RunFolder, drop_partial_line, rank_files
from blindspot.training.distributed import DistContext

#: How long a collective (a barrier, the merge) waits for the other ranks: generous, because a rank may still be on
#: its last batch (the work is balanced to one batch per rank and setting) when the others arrive.
TIMEOUT = timedelta(minutes=30)


def join(device: "torch.device | str" = "auto") -> DistContext:
    """This process's place in the job: under ``torchrun`` it joins the process group (with :data:`TIMEOUT`), unless
    a caller has joined it already (the audit's invariance runs share the audit's group); alone it is a
    single-process context on ``device``. Pair it with :func:`leave`, or use :func:`joined`."""
    global _OWNER
    fresh = not (dist.is_available() and dist.is_initialized())
    ctx = DistContext.from_env(str(device), timeout=TIMEOUT)
    if fresh and ctx.distributed:
        _OWNER = ctx
    return ctx


def leave(ctx: DistContext) -> None:
    """Leave the process group if :func:`join` joined it for ``ctx``."""
    global _OWNER
    if _OWNER is ctx:
        _OWNER = None
        ctx.shutdown()


_OWNER: DistContext | None = None


@contextmanager
def joined(device: "torch.device | str" = "auto") -> Iterator[DistContext]:
    """:func:`join` on entry, :func:`leave` on exit."""
    ctx = join(device)
    try:
        yield ctx
    finally:
        leave(ctx)


def open_folder(ranks: DistContext, make: Callable[[bool], RunFolder]) -> RunFolder:
    """The run folder, opened by rank 0 first (``make(True)``: checks, clears on overwrite, writes ``run.json``),
    then by the others (``make(False)``: checks only). A :class:`BlindspotError` of rank 0 is raised on every rank, so
    a bad folder ends every process with the same one-line error."""
    folder, err = None, None
    if ranks.is_main:
        try:
            folder = make(True)
        except BlindspotError as e:
            err = (e.source, e.problem)
    err = ranks.broadcast_object(err)
    if err is not None:
        raise BlindspotError(*err)
    return folder if folder is not None else make(False)


class RankRecords:
    """Where this rank's records go, and how they become one ``records.jsonl``.

    Args:
        folder: the run folder (:class:`~blindspot.runs.folder.RunFolder`, opened with :func:`open_folder`).
        ranks: this process's place in the job.

    With one process and no rank files from an earlier distributed run, records go straight to ``records.jsonl``
    (``sharded`` is false); otherwise to this rank's file.
    """

    def __init__(self, folder: RunFolder, ranks: DistContext) -> None:
        self.folder = folder
        self.ranks = ranks
        ranks.barrier()  # rank 0 has prepared the folder (cleared on overwrite) before anyone reads it
        self.sharded = ranks.distributed or bool(rank_files(folder.path))
        self.path = folder.path / RANK_DIR / f"records-{ranks.rank:05d}.jsonl"
        if self.sharded and folder.resume:
            drop_partial_line(self.path)
        ranks.barrier()

    def mine(self, index: int) -> bool:
        """Whether batch ``index`` (counted over the whole data set) is this rank's."""
        return index % self.ranks.world_size == self.ranks.rank

    def rows(self) -> list[dict[str, Any]]:
        """Every record written so far (``records.jsonl``, then the rank files' in one process's order); empty unless
        the run resumes."""
        if not self.folder.resume:
            return []
        return merged_rows(self.folder.path)

    def append(self, rows: Sequence[Mapping[str, Any]], order: Sequence[Sequence[int]]) -> None:
        """Log finished records durably; ``order[i]`` is where one process writes ``rows[i]`` (compared as tuples)."""
        if not rows:
            return
        if not self.sharded:
            self.folder.append(rows)
            return
        append_jsonl(self.path, [{"order": list(o), "record": r} for o, r in zip(order, rows)])

    def merge(self, sort_key: Callable[[Mapping[str, Any]], Any] | None = None) -> list[dict[str, Any]]:
        """End of a stage: rank 0 writes every record into ``records.jsonl`` (earlier runs' records first, then the
        rank files' in one process's order; then stably sorted by ``sort_key`` when given) atomically and removes the
        rank files; every rank returns the merged records. A collective: call it on every rank."""
        self.ranks.barrier()
        if self.ranks.is_main:
            rows = merged_rows(self.folder.path)
            if sort_key is not None:
                rows = sorted(rows, key=sort_key)
            atomic_write_text(self.folder.records_path, "".join(json.dumps(r) + "\n" for r in rows))
            for f in rank_files(self.folder.path):
                f.unlink()
            if (self.folder.path / RANK_DIR).is_dir() and not any((self.folder.path / RANK_DIR).iterdir()):
                (self.folder.path / RANK_DIR).rmdir()
        self.ranks.barrier()
        self.sharded = self.ranks.distributed
        return read_jsonl(self.folder.records_path)


def merged_rows(folder: Path) -> list[dict[str, Any]]:
    """``records.jsonl``'s records, then those of every rank file not already among them, in one process's order
    (their ``order`` tags); a record is identified by its whole content."""
    base = read_jsonl(Path(folder) / RECORDS)
    tagged = [(tuple(line["order"]), line["record"]) for f in rank_files(folder) for line in read_jsonl(f)]
    tagged.sort(key=lambda t: t[0])
    seen = {_identity(r) for r in base}
    out = list(base)
    for _, r in tagged:
        i = _identity(r)
        if i not in seen:
            seen.add(i)
            out.append(r)
    return out


def _identity(row: Mapping[str, Any]) -> str:
    return repr(sorted(row.items(), key=lambda kv: kv[0]))


def gather_ordered(ranks: DistContext, pairs: Iterable[tuple[tuple, Any]]) -> list[tuple[tuple, Any]]:
    """Every rank's ``(order, item)`` pairs (e.g. transfer replays, which are not logged), sorted by order: one
    process's order. A collective: call it on every rank."""
    everyone = [p for part in ranks.all_gather_objects(list(pairs)) for p in part]
    return sorted(everyone, key=lambda p: p[0])
