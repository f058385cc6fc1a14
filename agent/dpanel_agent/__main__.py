"""Entry point for ``python -m dpanel_agent`` and for the PyInstaller freeze."""

from dpanel_agent.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
