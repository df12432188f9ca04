"""One router per area of the query API."""
