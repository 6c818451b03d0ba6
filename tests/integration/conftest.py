import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (starting one takes seconds); stages join it."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        # address="local": a new instance even while another one runs on this machine (a test's cluster, a user's
        # `ray start`), which ray.init() would otherwise join
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
