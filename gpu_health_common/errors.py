"""The error the shared helpers raise by default. Each service passes its own ConfigError (`error=`) where it
calls them, so its callers catch the one exception tree they know."""


class ConfigError(Exception):
    """A configuration value is invalid; the message names the key."""
