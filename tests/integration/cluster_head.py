"""A local multi-node Ray cluster with a job server, for ``ray job submit`` in the tests: a head with no CPUs (the
job's driver runs there) and two worker nodes of one CPU each, all on loopback. Writes the worker node ids to
READY_FILE once the cluster is up, then holds it until SIGTERM.

    python -m tests.integration.cluster_head READY_FILE DASHBOARD_PORT AGENT_PORT METRICS_PORT ENV_AGENT_PORT
"""

import json
import os
import signal
import sys
import time

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"


def main(ready: str, dashboard: str, agent: str, metrics: str, env_agent: str) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": int(dashboard),
            "dashboard_agent_listen_port": int(agent),
            "metrics_export_port": int(metrics),
            "runtime_env_agent_port": int(env_agent),
            "object_store_memory": 300 * 1024 * 1024,
        },
    )
    workers = [cluster.add_node(num_cpus=1, object_store_memory=300 * 1024 * 1024) for _ in range(2)]
    cluster.wait_for_nodes()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with open(ready + ".tmp", "w") as f:
        json.dump({"workers": [w.node_id for w in workers], "gcs": cluster.address}, f)
    os.replace(ready + ".tmp", ready)
    while not stop:
        time.sleep(0.5)
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
