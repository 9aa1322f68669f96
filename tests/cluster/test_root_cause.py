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


def test_a_worker_killed_for_memory_says_so_and_what_to_change() -> None:
    # Ray 2.60's text for a worker its memory monitor killed (trimmed): the preact-ResNet-1001 job
    # at batch 128 on a 24 GB machine
    error = """WorkerGroupError: Training failed due to worker errors:
[Rank 0 Error Snippet]:
A worker health check failed.
Worker info: Worker(
  actor=Actor(RayTrainWorker, 81b0e9a2e7c6d48b0b42297901000000),
)
4 worker(s) were killed due to the node running low on memory. Memory on the node (IP: 192.0.2.2, ID: a52b879a) was 22.41GB used / 23.54GB limit (0.952028)
OOM kill reason: Memory usage 24037380096B exceeded threshold of 24012384256B (95.0% of 25276194816B limit)
"""  # noqa: E501
    line = root_cause(error)
    assert line.startswith(
        "a worker was killed for memory: its node (192.0.2.2) had 22.41 of 23.54 GB in use"
    )
    assert "scaling.batch_size_per_worker" in line and "optim.accumulation_steps" in line


def test_a_snippet_without_an_error_line_gives_its_first_sentence_not_its_header() -> None:
    error = "WorkerGroupError: Training failed:\n[Rank 0 Error Snippet]:\nA worker failed.\n"
    assert root_cause(error) == "A worker failed."
