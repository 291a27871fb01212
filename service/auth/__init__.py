"""Who may do what: API tokens, JWTs, the authorizer every route calls, and per-token limits."""
