"""The LoRA capability's widgets."""
