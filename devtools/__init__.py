"""Local development tools (not part of the installed package): emulators on loopback and the
``make run`` launcher."""
