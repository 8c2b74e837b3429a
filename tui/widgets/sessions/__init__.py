"""The Sessions capability's widgets."""
