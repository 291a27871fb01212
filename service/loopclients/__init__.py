"""Clients created once per event loop: a Quart extension any app can use."""
