# Fixtures and helpers live in webhook_support.py, importable by name from any test folder (a module named
# "conftest" is ambiguous once several test folders have one).
from tests.webhook.webhook_support import _aiohttp_site, _am, _harness, _kube  # noqa: F401
