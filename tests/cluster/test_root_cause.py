"""The one line a failed run ends with, from the text Ray Train raises."""

from __future__ import annotations

from pipeline.cluster.launch import root_cause

# the shape of Ray Train's text for a worker group that failed: its wrappers, then each worker's
# traceback with the cause last
WRAPPED = """TrainingFailedError: Training failed due to worker errors:
WorkerGroupError: Training failed due to worker errors:
[Rank 0 Error Snippet]:
Traceback (most recent call last):
  File "/tmp/home/loop.py", line 10, in train_loop_per_worker
    stage(index)
{cause}
"""


def test_our_own_error_is_its_message_alone() -> None:
    message = "the dataset cache /tmp/c on rp-w2 has 0.1 MB free; staging needs 1.7 MB"
    assert root_cause(WRAPPED.format(cause=f"pipeline.data.index.DatasetError: {message}")) == message


def test_another_library_s_error_keeps_its_class() -> None:
    cause = "RuntimeError: [gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer"
    assert root_cause(WRAPPED.format(cause=cause)) == cause


def test_a_wrapper_followed_by_its_message_alone_is_that_message() -> None:
    error = "ControllerError: Training failed due to controller error:\n  the placement group timed out\n"
    assert root_cause(error) == "the placement group timed out"
