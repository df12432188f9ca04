"""scoremesh: an event-streaming microservice mesh for production ML."""

__version__ = "0.1.0"
