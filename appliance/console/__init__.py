"""The console pages beyond the stock admin: dashboard, usage, staff chat, /metrics, OpenAPI, sign-in."""
