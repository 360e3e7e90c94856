"""Session-wide fixtures: the real embedded model (loaded once) and real redis-server.

Fixture modules live in tests/fixtures/ and are registered here, so each area of the
suite keeps its fixtures in its own file.
"""

pytest_plugins = [
    "tests.fixtures.model",
    "tests.fixtures.redis",
    "tests.fixtures.server",
    "tests.fixtures.vllm",
    "tests.fixtures.reliability",
    "tests.fixtures.prompts",
    "tests.fixtures.frameworks",
    "tests.fixtures.ray",
    "tests.fixtures.docker",
]
