"""HTTP and websocket surfaces, one blueprint each."""
