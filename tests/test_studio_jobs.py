"""AFA Studio's one-job rule (afa_nodes.studio.jobs): pure Python, no ComfyUI, no gradio."""
import threading

import pytest

from afa_nodes.core.errors import AFAError
from afa_nodes.studio.jobs import GENERATION, TRAINING, JobBoard, StudioBusyError, format_duration


def test_one_job_at_a_time_and_the_busy_message_names_it():
    board = JobBoard()
    assert board.status_line().startswith("Idle")
    job = board.begin(TRAINING, "agg.safetensors: 2 models, 100 steps")
    job.detail = "step 12/100"
    with pytest.raises(StudioBusyError, match=r"busy: training \(agg.safetensors.*step 12/100.*press Stop") as e:
        board.begin(GENERATION, "2 models")
    assert isinstance(e.value, AFAError)
    assert board.status_line(waiting=2).startswith("Busy: training") and "2 request(s) waiting" in board.status_line(2)
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
