"""A local gpu-health stack on loopback: simulated-GPU exporters, Debian's Prometheus and Alertmanager, the webhook.

Used by the end-to-end tests (tests/e2e) and the demo. Every process runs in a temporary folder on 127.0.0.1
with ports chosen at start; everything is stopped by Stack.close() (or the context manager).
"""
