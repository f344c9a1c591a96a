pytest_plugins = ["conveyor_driver.testing.fixtures"]
