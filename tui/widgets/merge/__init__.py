"""The Merge capability's widgets."""
