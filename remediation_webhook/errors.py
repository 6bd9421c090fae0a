"""The webhook's exception tree.

WebhookError
 +-- ConfigError              the config file or a flag is wrong; the message names the key
 +-- PayloadError             a webhook body is not a valid Alertmanager v4 notification (-> 400)
 +-- JournalError             the SQLite journal cannot be written or read (-> 503)
 +-- InventoryError
 |    +-- NodeNotFound        the inventory has no node of that name
 |    +-- InventoryUnavailable  the inventory cannot be reached (transient)
 +-- AlertmanagerUnavailable  Alertmanager's API v2 cannot be reached or answered garbage (transient)
 +-- KubeApiError             the Kubernetes API answered an error (status, reason)
 |    +-- KubeNotFound        404
 |    +-- KubeConflict        409 (resourceVersion changed under us)
 |    +-- KubeTooManyRequests 429 (eviction blocked by a PodDisruptionBudget)
 |    +-- KubeUnavailable     transport error or 5xx (transient)
 +-- ActionError              an action could not reach its post-condition
"""

from __future__ import annotations


class WebhookError(Exception):
    """Base class for every error the webhook raises on purpose."""


class ConfigError(WebhookError):
    """The configuration is invalid; the message names the key."""


class PayloadError(WebhookError):
    """The request body is not an Alertmanager v4 notification; the message names the field."""


class JournalError(WebhookError):
    """The journal could not commit; the receiver cannot accept work."""


class InventoryError(WebhookError):
    """Base class for inventory failures."""


class NodeNotFound(InventoryError):
    """The inventory has no node of that name."""


class InventoryUnavailable(InventoryError):
    """The inventory could not be asked (network, 5xx); try again later."""


class AlertmanagerUnavailable(WebhookError):
    """Alertmanager's API could not be asked; verification fails closed."""


class KubeApiError(WebhookError):
    """The Kubernetes API answered with an error status."""

    def __init__(self, status: int, reason: str, message: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}" if message else f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.message = message


class KubeNotFound(KubeApiError):
    """404 from the Kubernetes API."""


class KubeConflict(KubeApiError):
    """409 from the Kubernetes API: re-read and retry."""


class KubeTooManyRequests(KubeApiError):
    """429 from the Kubernetes API (for evictions: a PodDisruptionBudget says not now)."""


class KubeUnavailable(KubeApiError):
    """The API server could not be reached, or answered 5xx."""


class ActionError(WebhookError):
    """An action failed for good (its post-condition cannot be reached by retrying now)."""
