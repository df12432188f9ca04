"""Configuration models of the monitor, retraining and promotion (JSON in the environment)."""
