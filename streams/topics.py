"""The topics the worker reads and writes."""

from .app import app, settings

execution_events = app.topic(settings.events_topic)
dead_letters = app.topic(settings.dlq_topic)
