"""monitor: drift detection, windowed tests against the training reference, and alerts.

It consumes predictions, predictions.labeled, monitoring.stats, deployments.log and its
own monitor.signals (one detector per model version and signal over the whole stream),
and is the only writer of the alerts topic (docs/adr/0007). Pure logic lives in
``signals``, ``detectors``, ``windows``, ``alerts`` and ``core``; ``service`` wires it to
Kafka, Redis and the sinks.
"""
