"""The node's pieces without processes: grouping with a quiet period, priorities through the same
Batcher as ``score``, and the journal's states across a reopen (what a restart re-queues)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from radflash.archive.batching import Batcher
from radflash.serving.journal import Journal, JournalError
from radflash.serving.scheduler import Scheduler, Work


def _work(sop: str, study: str = "st", series: str = "se", priority: int = 1) -> Work:
    return Work(sop, study, series, None, priority, time.time())


def test_a_group_is_released_only_after_its_quiet_period_and_high_priority_goes_first() -> None:
    s = Scheduler("study", 0.2)
    s.add(_work("a1", "A", priority=2))
    s.add(_work("b1", "B"))
    s.add(_work("a2", "A", priority=2))
    assert s.release_due() == 0 and s.depth() == 3  # still assembling
    time.sleep(0.25)
    s.add(_work("c1", "C", priority=0))  # HIGH, but its study has just started assembling
    assert s.release_due() == 3
    time.sleep(0.25)
    assert s.release_due() == 1
    s.close()
    batches = [[w.sop for w in b.items] for b in Batcher(8, 0.01).from_queue(s.ready)]
    assert batches == [["c1", "b1", "a1", "a2"]]  # high first, then medium, then low in arrival order


def test_batches_are_bounded_by_max_batch() -> None:
    s = Scheduler("instance", 0.0)
    for i in range(5):
        s.add(_work(f"i{i}"))
    s.close()
    assert [len(b) for b in Batcher(2, 0.01).from_queue(s.ready)] == [2, 2, 1]


def test_the_journal_keeps_every_state_across_a_reopen_and_refuses_a_second_node(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    with pytest.raises(JournalError, match="already serving"):
        Journal(tmp_path)
    for sop in ("1", "2", "3", "4"):
        tmp = j.spool_bytes(b"DICM" + sop.encode())
        outcome = j.accept(tmp, sop=sop, study="s", series="r", sop_class=None, priority=1, source="t", caller=None)
        assert outcome == "new"
    assert j.accept(j.spool_bytes(b"again"), sop="1", study="s", series="r", sop_class=None, priority=1,
                    source="t", caller=None) == "waiting"  # still queued: not queued twice
    j.scored("2", {"probs": [0.5]}, ("T",))
    j.scored("3", {"probs": [0.5]}, ("T",))
    assert j.forward_done("3", "T")
    j.finished("4", "skipped", "modality CT")
    j.close()  # a kill -9 leaves the same rows: every transaction was committed

    j = Journal(tmp_path)
    assert [i.sop for i in j.unfinished()] == ["1"]
    assert [(sop, t) for sop, t, _ in j.pending_forwards(("T",))] == [("2", "T")]
    assert j.counts()["forwarded"] == 1 and j.counts()["skipped"] == 1
    assert not j.path_of("3").exists() and not j.path_of("4").exists()  # done: spool freed
    assert j.accept(j.spool_bytes(b"x"), sop="3", study="s", series="r", sop_class=None, priority=1,
                    source="t", caller=None) == "duplicate"
    j.close()
