"""Loading and scoring models: shared by the scorer and the query API."""
