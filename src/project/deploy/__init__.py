"""The deploy stage: deploy graph, exporters, parity validation, manifest, publishing."""
