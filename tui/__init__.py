"""The qlw front end: a Textual app and the `qlw` command. Never imports the ML stack."""

__version__ = "0.1.0"
