"""The GPU capability's widgets."""
