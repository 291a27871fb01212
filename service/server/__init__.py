"""Every adaptation of a server's or Quart's internals, in one place."""
