"""ValidationLine: what the backend's ``train.validate`` says of the run as set up: the trainable
parameters as peft counts them, the memory the run needs against the device, the step count; or
how many settings need attention."""

from __future__ import annotations

from typing import Any

from textual.widgets import Static

from tui.widgets.lora.run_config import memory_text, speed_text, trainable_text

STATES = ("-ok", "-tight", "-invalid", "-pending", "-error")
VERDICT_STATES = {"fits": "-ok", "tight": "-tight", "will not fit": "-invalid"}


class ValidationLine(Static):
    """Two lines under the form, kept up to date by the LoRA pane."""

    HINT = "Set up the run; it is checked as you type."

    def __init__(self, **kwargs) -> None:
        super().__init__(self.HINT, markup=False, **kwargs)
        #: The last ``train.validate`` result shown, or None.
        self.result: dict[str, Any] | None = None

    def _state(self, state: str) -> None:
        for cls in STATES:
            self.set_class(cls == state, cls)

    #: Marks a shown result as the previous settings' while the backend checks the new ones
    #: (the dimmed colour alone is lost on a terminal without colours).
    STALE = "⧗ "

    def show_pending(self) -> None:
        if self.result is None:
            self.update("checking the run with the backend …")
        else:
            self.update(self._result_text(self.result, self.STALE))
        self._state("-pending")

    def show_invalid(self, errors: dict[str, str]) -> None:
        """Settings need attention: say how many and which (each is also shown at its field)."""
        paths = sorted(errors)
        more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
        noun = "setting needs" if len(paths) == 1 else "settings need"
        text = f"✖ {len(paths)} {noun} attention: {', '.join(paths[:3])}{more}"
        if self.result is not None:
            text += "\n" + trainable_text(self.result)
        self.update(text)
        self._state("-invalid")

    def show_result(self, result: dict[str, Any]) -> None:
        """A clean ``train.validate``: trainable parameters, memory, steps, warnings."""
        self.result = result
        self.update(self._result_text(result))
        verdict = (result.get("memory") or {}).get("verdict", "")
        self._state(VERDICT_STATES.get(verdict, "-ok"))

    @staticmethod
    def _result_text(result: dict[str, Any], mark: str = "") -> str:
        second = [memory_text(result.get("memory") or {}), speed_text(result.get("speed") or {})]
        if isinstance(result.get("total_steps"), int):
            second.append(f"{result['total_steps']:,} steps")
        warnings = result.get("warnings") or {}
        if warnings:
            path, message = next(iter(sorted(warnings.items())))
            second.append(f"⚠ {path}: {message}")
        return trainable_text(result) + "\n" + mark + " · ".join(p for p in second if p)

    def show_waiting(self, message: str) -> None:
        """The check waits (for the backend's job to end); the last result stays in view."""
        first = "" if self.result is None else trainable_text(self.result) + "\n"
        self.update(f"{first}⧗ {message}")
        self._state("-pending")

    def show_failure(self, message: str) -> None:
        """The backend could not check the run (not connected, or it failed)."""
        self.update(message)
        self._state("-error")
