"""The nats-server fixtures for the examples' tests, as a driver's own project enables them."""

pytest_plugins = ["conveyor_driver.testing.fixtures"]
