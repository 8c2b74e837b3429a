"""The Train capability's widgets."""
