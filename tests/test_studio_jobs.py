"""AFA Studio's one-job rule (afa_nodes.studio.jobs): pure Python, no ComfyUI, no gradio."""
import threading

import pytest

from afa_nodes.core.errors import AFAError
from afa_nodes.studio.jobs import GENERATION, TRAINING, JobBoard, JobCancelled, StudioBusyError, format_duration


def test_one_job_at_a_time_and_the_busy_message_names_it():
    board = JobBoard()
    assert board.status_line().startswith("Idle")
    job = board.begin(TRAINING, "agg.safetensors: 2 models, 100 steps")
    job.detail = "step 12/100"
    with pytest.raises(StudioBusyError, match=r"busy: training \(agg.safetensors.*step 12/100.*press Stop") as e:
        board.begin(GENERATION, "2 models")
    assert isinstance(e.value, AFAError)
    assert board.status_line(waiting=2).startswith("Busy: training") and "2 more request(s) queued" in board.status_line(2)
    board.end(job)
    board.end(job)  # ending twice is harmless
    assert board.current is None


def test_hold_releases_the_board_when_the_job_fails():
    board = JobBoard()
    with pytest.raises(RuntimeError):
        with board.hold(GENERATION, "x"):
            raise RuntimeError("boom")
    with board.hold(GENERATION, "y") as job:
        assert board.current is job


def test_racing_threads_get_exactly_one_job():
    board, barrier, won, lost = JobBoard(), threading.Barrier(8), [], []

    def contend(i):
        barrier.wait()
        try:
            won.append(board.begin(GENERATION, f"request {i}"))
        except StudioBusyError:
            lost.append(i)
    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7 and board.current is won[0]


@pytest.mark.parametrize("seconds,text", [(4.4, "4 s"), (75, "1 min 15 s"), (3 * 3600 + 120, "3 h 02 min")])
def test_durations_read_naturally(seconds, text):
    assert format_duration(seconds) == text


def test_jobs_wait_in_order_and_the_status_lists_them():
    board, order, started = JobBoard(), [], threading.Event()
    first = board.begin(GENERATION, "first")

    def later(name, delay):
        threading.Event().wait(delay)
        with board.hold(GENERATION, name):
            order.append(name)
    threads = [threading.Thread(target=later, args=(n, d)) for n, d in (("second", 0.0), ("third", 0.3))]
    for t in threads:
        t.start()
    for _ in range(100):
        if len(board.waiting()) == 2:
            break
        threading.Event().wait(0.05)
    assert [j.label for j in board.waiting()] == ["second", "third"]
    assert "waiting: 1. generation (second); 2. generation (third)" in board.status_line()
    board.end(first)
    for t in threads:
        t.join(10)
    assert order == ["second", "third"] and board.current is None and not started.is_set()


def test_cancel_flags_the_running_job_and_removes_a_waiting_one():
    board = JobBoard()
    running = board.begin(GENERATION, "running")
    running.detail = "AFA ensemble: step 3/20"
    errors = []

    def wait():
        try:
            board.wait_turn(GENERATION, "waiting")
        except JobCancelled as e:
            errors.append(str(e))
    t = threading.Thread(target=wait)
    t.start()
    for _ in range(100):
        if board.waiting():
            break
        threading.Event().wait(0.05)
    assert board.cancel(board.waiting()[0]) is not None
    t.join(10)
    assert errors == ["generation (waiting) was cancelled while waiting."] and not board.waiting()
    assert board.cancel() is running and "(cancelling)" in board.status_line()
    with pytest.raises(JobCancelled, match=r"was cancelled at AFA ensemble: step 3/20"):
        running.check()
    board.end(running)
    assert board.cancel() is None


def test_a_training_refuses_jobs_instead_of_queueing_them():
    board = JobBoard()
    board.begin(TRAINING, "agg: 2 models, 100 steps")
    with pytest.raises(StudioBusyError, match="press Stop"):
        board.wait_turn(GENERATION, "2 models")
    assert not board.waiting()
