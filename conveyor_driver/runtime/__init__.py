"""The JetStream side of a driver: connection, pull consumer, and one message's journey."""
