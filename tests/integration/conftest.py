import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (starting one takes seconds); stages join it."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
