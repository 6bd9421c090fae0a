"""What both services share and neither owns: the exporter-toolkit web config (TLS, client certificates, basic
auth), durations in Prometheus' notation, config-file validators, structured logging, and the configuration
error they raise. Neither service imports the other; both import this."""
