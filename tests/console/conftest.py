"""The console's tests share the query API's fixtures (module-wide settings)."""

from tests.query.conftest import module_settings

__all__ = ["module_settings"]
