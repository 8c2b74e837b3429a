"""The Data capability's widgets."""
