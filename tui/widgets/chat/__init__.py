"""The Chat capability's widgets."""
