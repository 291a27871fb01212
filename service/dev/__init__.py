"""Local development: emulators on loopback and the ``make run`` launcher."""
