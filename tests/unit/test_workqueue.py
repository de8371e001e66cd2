"""The per-job work queue: deduplicated, never one key twice at once, and a slow key holds only itself."""

from __future__ import annotations

import threading

from imagebatch.operator.workqueue import WorkQueue


def test_a_key_is_queued_once_with_its_newest_value() -> None:
    q: WorkQueue[str, int] = WorkQueue()
    for v in (1, 2, 3):
        q.add("a", v)
    q.add("b", 10)
    assert len(q) == 2
    assert q.get(0) == ("a", 3)
    assert q.get(0) == ("b", 10)
    assert q.get(0) is None


def test_an_add_while_processing_runs_after_the_pass_not_beside_it() -> None:
    q: WorkQueue[str, int] = WorkQueue()
    q.add("a", 1)
    assert q.get(0) == ("a", 1)
    q.add("a", 2)  # a change while the pass runs
    assert q.get(0) is None, "a key being processed is not handed to a second worker"
    q.done("a")
    assert q.get(0) == ("a", 2), "the change made while it ran is not lost"
    q.done("a")
    assert q.get(0) is None


def test_a_forgotten_key_is_not_processed() -> None:
    q: WorkQueue[str, int] = WorkQueue()
    q.add("a", 1)
    q.add("b", 2)
    q.forget("a")
    assert q.get(0) == ("b", 2) and q.get(0) is None


def test_a_slow_pass_holds_only_its_own_key() -> None:
    """Two workers; job `huge`'s pass blocks until the end. Every other job is processed meanwhile,
    and `huge`, added again and again, waits for its own pass only."""
    q: WorkQueue[str, str] = WorkQueue()
    release = threading.Event()
    seen: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        while (got := q.get()) is not None:
            key, _ = got
            if key == "huge" and not release.is_set():
                release.wait()
            with lock:
                seen.append(key)
            q.done(key)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    q.add("huge", "")
    while "huge" not in q.processing():  # its slow pass has begun
        threading.Event().wait(0.01)
    others = [f"job-{i}" for i in range(50)]
    for k in others:
        q.add(k, "")
        q.add("huge", "")  # a burst of triggers for the slow job
    done = threading.Event()

    def all_others_seen() -> None:
        while True:
            with lock:
                if set(others) <= set(seen):
                    done.set()
                    return
            if release.is_set():
                return
            threading.Event().wait(0.01)

    watcher = threading.Thread(target=all_others_seen)
    watcher.start()
    assert done.wait(60), "the other jobs waited for the slow one"
    assert "huge" not in seen
    release.set()
    watcher.join()
    while True:  # the slow pass ends, then the one the burst queued meanwhile runs
        with lock:
            if seen.count("huge") == 2:
                break
        threading.Event().wait(0.01)
    assert q.get(0) is None and not q.processing(), "the burst of triggers made one more pass, not 50"
    q.close()
    for t in threads:
        t.join(10)
