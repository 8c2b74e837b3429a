"""The front end's widgets: one package per capability, one widget per module."""
