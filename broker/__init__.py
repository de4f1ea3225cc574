"""The token broker: obtains, caches and refreshes OAuth 2.0 access tokens."""
