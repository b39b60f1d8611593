"""Root conftest: puts the project root on sys.path and loads shared test plugins."""

pytest_plugins = ["tests.kafka_mock"]
