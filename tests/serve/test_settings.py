"""The Serve app's settings: a replica sized from the cluster's nodes, never from the machine
that deploys (a laptop deploying onto a GPU cluster gets GPU replicas)."""

from __future__ import annotations

import pytest

from pipeline.serve.settings import replica_resources


def _node(cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    resources = {"CPU": cpus} | ({"GPU": gpus} if gpus else {})
    return {"Alive": alive, "Resources": resources}


@pytest.mark.parametrize(
    "nodes, given, expected",
    [
        # KubeRay: a head without CPUs for work, two nodes of 8 GPUs and 96 CPUs: 12 CPUs a GPU
        ([_node(0), _node(96, 8), _node(96, 8)], (None, None), (12.0, 1.0)),
        # a CPU cluster: all the CPUs of its largest node
        ([_node(4), _node(16), _node(16, alive=False), _node(8)], (None, None), (16.0, 0.0)),
        (
            [_node(64, 8, alive=False), _node(2)],
            (None, None),
            (2.0, 0.0),
        ),  # a dead GPU node counts for nothing
        ([_node(32, 4)], (None, 2.0), (16.0, 2.0)),  # two GPUs a replica: the CPUs of two
        ([_node(32, 4)], (3.0, None), (3.0, 1.0)),  # what is given stays
        ([_node(32, 4)], (None, 0.0), (32.0, 0.0)),  # CPU replicas on a GPU node, asked for
    ],
)
def test_a_replica_is_sized_from_the_clusters_nodes(nodes, given, expected) -> None:
    assert replica_resources(nodes, *given) == expected
