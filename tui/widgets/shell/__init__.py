"""The app's frame: header, connection and job indicators, placeholder panes."""
