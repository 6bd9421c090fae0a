"""One module per collector; exporter.registry.discover() finds them, so nothing here lists them."""
