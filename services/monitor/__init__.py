"""monitor: drift detection, windowed tests against the training reference, and alerts.

It consumes predictions, predictions.labeled, monitoring.stats and deployments.log, and is
the only writer of the alerts topic (DESIGN.md). Pure logic lives in ``detectors``,
``windows``, ``alerts`` and ``core``; ``service`` wires it to Kafka, Redis and the sinks.
"""
