"""label-join: predictions ⋈ labels by event_id, and performance per version x variant x segment.

Pure logic lives in ``join`` (the per-partition join state), ``performance`` (mergeable
sufficient statistics, the metrics derived from them, threshold evaluation) and ``labels``
(the label file reader). ``service`` is the I/O: an aiokafka batch loop with the state in
memory, its own changelog topic, and a publisher to monitoring.stats, Redis and Prometheus.
"""
