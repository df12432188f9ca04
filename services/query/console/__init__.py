"""The web console, served by the query API under ``/console``.

Server-rendered pages (Jinja2) of models and versions, live performance and label
coverage, drift per feature, alerts with their runbooks, and the deployment log; charts
by Chartkick/Chart.js, served from the installed ``chartkick`` package. Read-only without
the API token; promote, rollback and retrain go through the registry as the API does.
"""
